"""How much of a prompt a worker can read back from the hidden states it is sent: token
recovery rate by depth, on real text, with the packaged models (issue 12 part 6).

    PYTHONPATH=python python benches/inversion.py [--models smollm2 gemma3-270m]
        [--depths 0,1,2,4,8,16,29,30] [--train-tokens 40000] [--test-tokens 5000]
        [--window 128] [--threads 1] [--wire-dtype f32]

A worker hosting layers k.. receives the hidden state entering layer k at every prompt
position (depth k; depth n_layers is the last layer's output, before the final norm). For
each depth this computes those states with meshpy's own forward pass (one span per layer,
the End model's embedding first) and runs three attacks on them:

- nearest embedding: the token whose row of the (public) token embedding matrix has the
  highest cosine with the state. Needs no training; the attacker only has the weights.
- standardized nearest embedding: the same after shifting and scaling each dimension of the
  states by its mean and standard deviation over the test positions, i.e. over the traffic
  the worker itself receives (no training text needed). This tames the few dimensions of
  the residual stream that grow far larger than the rest and otherwise swamp the cosine.
- linear probe: a ridge regression, fitted on a training corpus, from the standardized state
  to the unit-length embedding row of the token at that position; its prediction is decoded
  by nearest embedding as above. The ridge strength is chosen on the last tenth of the
  training corpus, then the map is refitted on all of it.

All three rank the whole vocabulary. Reported on held-out text: top-1 (the recovered token is the
one at that position) and top-5 (it is among the 5 best), beside a trivial baseline (always
guess the training corpus's most frequent token) and the share of test tokens that occur in
the training corpus at all. The training corpus is the docstrings of this Python's standard
library (module, class and function docstrings read with `ast`, files in an order fixed by
the SHA-1 of their path, at most --doc-tokens per file); the test corpus is license texts
from /usr/share/common-licenses (--test-files), an equal share of --test-tokens from each.
Text is cut into windows of --window tokens, each after the model's BOS token, as a prompt
starts; the BOS position itself is not counted.

A linear probe and cosine decoding are weak attackers: the rates are what these recover,
a floor under what a trained non-linear inverter would. numpy's BLAS runs on one thread
unless OPENBLAS_NUM_THREADS says otherwise, the forward pass on --threads. Prints a markdown
table per model with the machine, model, threads, commit, corpora and run time.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import math
import os
import sys
import sysconfig
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# Before numpy loads: its BLAS would otherwise take every core for the vocabulary products.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402
from meshpy import _native  # noqa: E402
from meshpy.generation import Model, model_path  # noqa: E402
from meshpy.models.config import read_config  # noqa: E402
from meshpy.models.source import open_model_source  # noqa: E402

LICENSES = Path("/usr/share/common-licenses")
DEFAULT_TEST_FILES = [LICENSES / "Apache-2.0", LICENSES / "MPL-2.0", LICENSES / "GPL-3"]
# Standard-library folders that are tests, demos or third-party packages, not the library.
SKIP_DIRS = {"test", "tests", "idle_test", "turtledemo", "site-packages", "__pycache__"}
# Ridge strengths tried, as multiples of the number of training rows (standardized features
# put that on the diagonal of X^T X).
RIDGE_GRID = (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
# Query rows per product with the vocabulary: (rows, vocab) float32 scores at once.
SCORE_ROWS = 512


@dataclass
class Corpus:
    """Token windows of one text collection, each to be run after a BOS token."""

    windows: list[list[int]]
    n_documents: int

    @property
    def n_tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    def ids(self) -> np.ndarray:
        """Every window's tokens, in order, as the rows of the states are stored."""
        return np.array([t for w in self.windows for t in w], dtype=np.int64)


def stdlib_docstrings() -> Iterator[str]:
    """The docstrings of each standard-library module file, joined, in an order fixed by the
    SHA-1 of the file's path (spread over the library, the same on every run)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    paths.sort(key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        docs = [ast.get_docstring(node) for node in ast.walk(tree) if isinstance(node, kinds)]
        text = "\n\n".join(d for d in docs if d)
        if text:
            yield text


def windows_of(ids: Sequence[int], window: int) -> list[list[int]]:
    return [list(ids[i : i + window]) for i in range(0, len(ids), window)]


def build_corpus(documents: Iterable[str], encode: Callable[[str], list[int]], total: int, per_document: int,
                 window: int) -> Corpus:
    """Up to `total` tokens, at most `per_document` from each document, in windows."""
    windows, n_docs, n = [], 0, 0
    for text in documents:
        ids = encode(text)[: min(per_document, total - n)]
        if not ids:
            continue
        windows += windows_of(ids, window)
        n_docs += 1
        n += len(ids)
        if n >= total:
            break
    return Corpus(windows, n_docs)


def depth_states(model: Model, corpus: Corpus, depths: Sequence[int], wire_dtype: str) -> dict[int, np.ndarray]:
    """Per depth, the hidden state entering that layer at every corpus token `(tokens, hidden)`,
    as a worker receives it (rounded to bf16 when the wire carries bf16)."""
    spans = model.pipeline.spans
    if [s.layers for s in spans] != [range(i, i + 1) for i in range(model.config.n_layers)]:
        raise ValueError("load the model with one span per layer")
    bos = model.tokenizer.bos_id
    parts: dict[int, list[np.ndarray]] = {d: [] for d in depths}
    for ids in corpus.windows:
        session = model.pipeline.new_session(len(ids) + 1)
        hidden = model.end.embed([bos, *ids])
        for depth in range(model.config.n_layers + 1):
            if depth in parts:
                state = hidden[1:]  # the BOS row is the same in every prompt: not counted
                if wire_dtype == "bf16":
                    state = _native.bf16_to_f32(_native.f32_to_bf16(np.ascontiguousarray(state)))
                parts[depth].append(np.array(state, dtype=np.float32))
            if depth < model.config.n_layers:
                hidden = spans[depth].forward(hidden, session.caches[depth])
        model.pipeline.close_session(session)
    return {d: np.concatenate(p) for d, p in parts.items()}


def unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def recovery(queries: np.ndarray, targets: np.ndarray, table: np.ndarray) -> tuple[float, float]:
    """(top-1, top-5) share of rows whose target is the nearest row of `table` (unit rows) by
    cosine, and among the 5 nearest. Ties count against the attacker in top-5 only."""
    queries = unit_rows(queries)
    top1 = top5 = 0
    for start in range(0, len(queries), SCORE_ROWS):
        scores = queries[start : start + SCORE_ROWS] @ table.T  # (rows, vocab)
        want = targets[start : start + SCORE_ROWS]
        own = scores[np.arange(len(want)), want]
        top1 += int(np.count_nonzero(scores.argmax(axis=1) == want))
        top5 += int(np.count_nonzero(np.count_nonzero(scores > own[:, None], axis=1) < 5))
    return top1 / len(queries), top5 / len(queries)


class RidgeProbe:
    """A linear map from standardized states to unit embedding rows, fitted in closed form."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, y_mean: np.ndarray, weight: np.ndarray) -> None:
        self.mean, self.scale, self.y_mean, self.weight = mean, scale, y_mean, weight

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, strengths: Sequence[float]) -> list[RidgeProbe]:
        """One probe per ridge strength (a multiple of the number of rows), from one X^T X."""
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale == 0] = 1.0
        y_mean = y.mean(axis=0)
        xs = ((x - mean) / scale).astype(np.float64)
        gram = xs.T @ xs  # (hidden, hidden)
        cross = xs.T @ (y - y_mean)  # (hidden, hidden of the embedding)
        eye = np.eye(len(gram))
        return [cls(mean, scale, y_mean, np.linalg.solve(gram + s * len(x) * eye, cross).astype(np.float32))
                for s in strengths]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weight + self.y_mean


def fit_probe(x: np.ndarray, targets: np.ndarray, table: np.ndarray) -> tuple[RidgeProbe, float]:
    """The probe from states `x` to the unit embedding rows of `targets`, at the ridge strength
    of RIDGE_GRID best on the last tenth of the rows (by top-1 among the tokens of the
    training rows: cheaper than the whole vocabulary), refitted on every row; and that strength."""
    y = table[targets]
    cut = len(x) - len(x) // 10
    candidates = np.unique(targets)
    local, shortlist = np.searchsorted(candidates, targets[cut:]), table[candidates]
    probes = RidgeProbe.fit(x[:cut], y[:cut], RIDGE_GRID)
    scores = [recovery(p.predict(x[cut:]), local, shortlist)[0] for p in probes]
    best = RIDGE_GRID[int(np.argmax(scores))]
    return RidgeProbe.fit(x, y, [best])[0], best


def default_depths(n_layers: int) -> list[int]:
    """0, powers of two, three quarters of the way, the last layer's input and its output."""
    depths = {0, n_layers * 3 // 4, n_layers - 1, n_layers}
    depths |= {2**i for i in range(n_layers.bit_length()) if 2**i < n_layers}
    return sorted(depths)


def run_model(name: str, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    path = model_path(name)
    n_layers = read_config(open_model_source(path)).n_layers
    depths = sorted(set(args.depths)) if args.depths else default_depths(n_layers)
    if not all(0 <= d <= n_layers for d in depths):
        raise SystemExit(f"{name}: depths must lie in 0..{n_layers}")
    with Model.load(path, threads=args.threads, n_spans=n_layers) as model:
        encode = lambda text: model.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        train = build_corpus(stdlib_docstrings(), encode, args.train_tokens, args.doc_tokens, args.window)
        test_files = [p for p in args.test_files if p.exists()]
        per_file = math.ceil(args.test_tokens / max(len(test_files), 1))
        test = build_corpus((p.read_text(encoding="utf-8") for p in test_files), encode,
                            args.test_tokens, per_file, args.window)
        train_ids, test_ids = train.ids(), test.ids()
        vocab = model.tokenizer.vocab_size
        table = unit_rows(model.end.embed(range(vocab)))  # (vocab, hidden)

        t0 = time.perf_counter()
        train_states = depth_states(model, train, depths, args.wire_dtype)
        test_states = depth_states(model, test, depths, args.wire_dtype)
        forward_s = time.perf_counter() - t0
        quant = model.source.metadata.get("general.file_type", "?")
        hidden = model.config.hidden

    common, _ = Counter(train_ids.tolist()).most_common(1)[0]
    baseline = float(np.mean(test_ids == common))
    seen = float(np.mean(np.isin(test_ids, train_ids)))
    rows = []
    for depth in depths:
        states = test_states[depth]
        nearest = recovery(states, test_ids, table)
        standardized = recovery((states - states.mean(axis=0)) / np.maximum(states.std(axis=0), 1e-30), test_ids, table)
        probe, strength = fit_probe(train_states[depth], train_ids, table)
        probed = recovery(probe.predict(states), test_ids, table)
        rows.append((depth, nearest, standardized, probed, strength))
        print(f"  {name}: depth {depth} done", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started

    print(f"### {path.name}\n")
    print(f"- model: {path.name} (general.file_type {quant}), {n_layers} layers, hidden {hidden}, vocabulary {vocab}")
    print(f"- train: {train.n_tokens} tokens, docstrings of {train.n_documents} standard-library files "
          f"(Python {sys.version.split()[0]}), {len(train.windows)} windows")
    print(f"- test: {test.n_tokens} tokens from {', '.join(p.name for p in test_files)}, {len(test.windows)} windows; "
          f"{seen:.1%} of them occur in train")
    print(f"- baseline (always the most frequent training token, {common} {model.tokenizer.id_to_token(common)!r}): "
          f"{baseline:.1%} of test tokens")
    print(f"- run time {elapsed:.0f} s, of which forward passes {forward_s:.0f} s "
          f"({(train.n_tokens + test.n_tokens) / forward_s:.0f} tokens/s)\n")
    print("| depth k | nearest embedding top-1 | top-5 | standardized nearest top-1 | top-5 "
          "| linear probe top-1 | top-5 | ridge / rows |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for depth, (n1, n5), (s1, s5), (p1, p5), strength in rows:
        label = f"{depth} (output)" if depth == n_layers else str(depth)
        print(f"| {label} | {n1:.1%} | {n5:.1%} | {s1:.1%} | {s5:.1%} | {p1:.1%} | {p5:.1%} | {strength:g} |")
    print(flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gemma3-270m"],
                        help="packaged model names or GGUF/checkpoint paths")
    parser.add_argument("--depths", type=lambda s: [int(d) for d in s.split(",")], default=None,
                        help="comma-separated layer indices whose input is attacked (n_layers: the "
                             "last layer's output); default 0, powers of two, 3/4, last, output")
    parser.add_argument("--train-tokens", type=int, default=40_000)
    parser.add_argument("--test-tokens", type=int, default=5_000)
    parser.add_argument("--doc-tokens", type=int, default=256, help="most training tokens from one file")
    parser.add_argument("--test-files", type=Path, nargs="+", default=DEFAULT_TEST_FILES)
    parser.add_argument("--window", type=int, default=128, help="tokens per prompt (after BOS)")
    parser.add_argument("--threads", type=int, default=1, help="threads of the forward pass")
    parser.add_argument("--wire-dtype", choices=("f32", "bf16"), default="f32",
                        help="hidden states as sent: f32 (meshpy's default) or rounded to bf16")
    args = parser.parse_args(argv)

    print(f"machine: {machine()}")
    print(f"threads {args.threads} (forward), BLAS {os.environ['OPENBLAS_NUM_THREADS']}, meshpy kernels "
          f"{_native.simd_level()}, wire {args.wire_dtype}, window {args.window}, commit {commit()}\n")
    started = time.perf_counter()
    for name in args.models:
        run_model(name, args)
    print(f"total run time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
