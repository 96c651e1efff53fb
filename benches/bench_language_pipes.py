"""meshpy against Language Pipes (https://github.com/erinclemmer/language-pipes), each on its own
2-node setup on this machine, through its OpenAI-compatible server and the official openai
client: a streamed greedy chat completion of `--max-tokens` tokens (time to first token and
streamed tokens/s) and `--streams` concurrent ones (aggregate tokens/s), and the ratios.

    PYTHONPATH=python python benches/bench_language_pipes.py [--venv /work/lp-venv]
        [--hf-dir /tmp/lp-smollm2-hf] [--make-hf] [--gguf smollm2] [--max-tokens 128]
        [--repeats 3] [--streams 4] [--concurrent-repeats 1] [--lp-threads default 1]
        [--no-meshpy-hf] [--meshpy-threads 1 2] [--mark FILE] [--wait-for FILE]

Language Pipes runs from its own virtual environment (`--venv`, with `language-pipes` 2.5
installed) and loads SmolLM2-135M-Instruct in Hugging Face format from `--hf-dir`; it has no
GGUF loader. `--make-hf` writes that directory from the GGUF first (bf16 safetensors and the
tokenizer with its chat template, through the venv's transformers and `gguf` package;
nothing is downloaded).
Its 2-node setup is the one its README describes: node-1 hosts the End Model (embedding,
head, tokenizer, the OpenAI server, and its default one local layer) plus a Layer Model whose
memory budget fits the first half of the layers; node-2 joins node-1 (bootstrap node) and
hosts a Layer Model with the rest. Both run headless (`language-pipes -c NODE.toml run`) on
127.0.0.1, CPU, its default dtype (bf16), in a scratch app/model directory (LP_APP_DIR,
LP_MODEL_DIR; the model directory is a link to `--hf-dir`). `--lp-threads` runs it once per
value: `default` leaves torch's thread count per node (the CPU count) alone, N sets
OMP_NUM_THREADS=N for both nodes. On a small machine the default oversubscribes the cores as
soon as both nodes compute at once (concurrent streams), so both are shown.

meshpy's 2-node setup: a bootstrap node, two workers (half the layers each) and `meshpy
serve --bootstrap` (the End node), each with `--meshpy-threads` compute threads (one run per
value: 2 is the default on this machine, like torch's; 1 keeps three processes within 2
cores when they compute at once), on the GGUF (`--gguf`, its native Q4_1) and, unless
`--no-meshpy-hf`, on the same HF directory Language Pipes loads.

Every system gets the same requests: one warm-up, then `--repeats` single streams of the
prompt below (temperature 0, max_tokens `--max-tokens`) and, for the concurrent figure,
`--concurrent-repeats` rounds of `--streams` streams at once (a variant of the prompt each).
Streamed tokens/s is content chunks over the time from the request to the last content
chunk (aggregate: all streams' chunks over the time to the last one); time to first token is
the time from the request to the first content chunk; medians over the repeats. Language
Pipes computes `max_tokens` tokens but streams one chunk fewer (its last token only reaches
the non-streamed result), so chunk counts are printed beside the figures. Each Language
Pipes node runs its jobs one at a time in one runner thread (no batching), so concurrent
streams take turns.

`--mark FILE` exists while the timed requests run; `--wait-for FILE` makes each timed part
wait while that file exists (for benchmarks sharing a machine). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from openai import OpenAI

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benches.bench_generate import commit, machine  # noqa: E402
from benches.bench_serve import start_server  # noqa: E402
from meshpy.generation import model_path  # noqa: E402
from meshpy.mesh.launcher import LocalMesh, _die_with_parent  # noqa: E402
from meshpy.mesh.placement import format_layers  # noqa: E402
from meshpy.models.config import read_config  # noqa: E402
from meshpy.models.source import open_model_source  # noqa: E402
from meshpy.pipeline import split_layers  # noqa: E402

PROMPT = "Tell me a story about a lighthouse keeper."
#: One prompt per concurrent stream (the first is PROMPT).
STREAM_PROMPTS = [PROMPT] + [f"Tell me a story about a lighthouse keeper named {n}." for n in
                             ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jun")]

#: Run by the venv's python: GGUF -> HF directory (bf16 safetensors, tokenizer, chat template).
#: Weights go through transformers' own GGUF reader (dequantized, q/k un-permuted), without the
#: `accelerate` that `from_pretrained(gguf_file=...)` insists on.
MAKE_HF = r"""
import os, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
gguf, out = sys.argv[1], sys.argv[2]
d, f = os.path.split(gguf)
tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
config = AutoConfig.from_pretrained(d, gguf_file=f)
with torch.device("meta"):
    shell = AutoModelForCausalLM.from_config(config)
tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=shell, torch_dtype=torch.bfloat16)["tensors"]
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
missing, unexpected = model.load_state_dict(tensors, strict=False)
missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
if missing or unexpected:
    sys.exit(f"GGUF tensors do not fit the model: missing {missing}, unexpected {unexpected}")
if not tok.chat_template:
    sys.exit("the GGUF has no chat template")
# The GGUF names <|im_start|> as EOS; SmolLM2-Instruct's own tokenizer stops at <|im_end|>.
if "<|im_end|>" in tok.get_vocab():
    tok.eos_token = tok.pad_token = "<|im_end|>"
tok.clean_up_tokenization_spaces = False
model.save_pretrained(out)
tok.save_pretrained(out)
ids = tok.apply_chat_template([{"role": "user", "content": sys.argv[3]}], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
with torch.inference_mode():
    new = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
print("greedy check:", repr(tok.decode(new, skip_special_tokens=True)))
"""


# ---------------------------------------------------------------- measuring


@dataclass
class Stream:
    """One streamed completion: arrival times of its content chunks, and its text."""

    t0: float = 0.0
    times: list[float] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish: str | None = None


def stream_chat(client: OpenAI, model: str, prompt: str, max_tokens: int, out: Stream) -> None:
    out.t0 = time.perf_counter()
    chunks = client.chat.completions.create(
        model=model, stream=True, temperature=0, max_tokens=max_tokens,
        messages=[{"role": "user", "content": prompt}],
    )
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content:
            out.times.append(time.perf_counter())
            out.text.append(choice.delta.content)
        if choice.finish_reason:
            out.finish = choice.finish_reason


@dataclass
class Figures:
    """A system's medians: one stream's tokens/s, its time to first token, its chunk count,
    and the aggregate tokens/s of the concurrent streams."""

    label: str
    setup: str
    tok_s: float = math.nan
    ttft: float = math.nan
    chunks: int = 0
    finish: str | None = None
    agg_tok_s: float = math.nan
    agg_chunks: int = 0
    text: str = ""


@contextmanager
def timed_section(mark: str | None, wait_for: str | None):
    """Waits while `wait_for` exists, then holds `mark` until the block ends."""
    if wait_for:
        announced = False
        while os.path.exists(wait_for):
            if not announced:
                print(f"  (waiting while {wait_for} exists)", flush=True)
                announced = True
            time.sleep(2.0)
    if mark:
        Path(mark).touch()
    print(f"  (load average {os.getloadavg()[0]:.2f} before the timed requests)", flush=True)
    try:
        yield
    finally:
        if mark:
            Path(mark).unlink(missing_ok=True)


def measure(fig: Figures, url: str, model: str, args: argparse.Namespace) -> None:
    """Warm-up, `repeats` single streams, `concurrent_repeats` rounds of `streams` concurrent streams."""
    client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=900, max_retries=0)
    with timed_section(args.mark, args.wait_for):
        stream_chat(client, model, PROMPT, args.max_tokens, Stream())  # warm-up
        singles = []
        for _ in range(args.repeats):
            s = Stream()
            stream_chat(client, model, PROMPT, args.max_tokens, s)
            if not s.times:
                raise RuntimeError(f"{fig.label}: the stream had no content")
            singles.append(s)
        fig.tok_s = statistics.median(len(s.times) / (s.times[-1] - s.t0) for s in singles)
        fig.ttft = statistics.median(s.times[0] - s.t0 for s in singles)
        fig.chunks = len(singles[-1].times)
        fig.finish = singles[-1].finish
        fig.text = "".join(singles[-1].text)
        if args.streams > 1:
            rates = []
            for _ in range(args.concurrent_repeats):
                streams = [Stream() for _ in range(args.streams)]
                threads = [threading.Thread(target=stream_chat, args=(client, model, STREAM_PROMPTS[i % len(STREAM_PROMPTS)],
                                                                      args.max_tokens, streams[i]))
                           for i in range(args.streams)]
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                if any(not s.times for s in streams):
                    raise RuntimeError(f"{fig.label}: a concurrent stream had no content")
                fig.agg_chunks = sum(len(s.times) for s in streams)
                rates.append(fig.agg_chunks / (max(s.times[-1] for s in streams) - t0))
            fig.agg_tok_s = statistics.median(rates)
    print(f"  {fig.label}: 1 stream {fig.tok_s:.1f} tok/s ({fig.chunks} chunks, finish {fig.finish}), "
          f"first token {fig.ttft * 1e3:.0f} ms" +
          (f"; {args.streams} streams {fig.agg_tok_s:.1f} tok/s aggregate ({fig.agg_chunks} chunks)" if args.streams > 1 else ""),
          flush=True)


# ---------------------------------------------------------------- Language Pipes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layer_bytes_bf16(hf_dir: Path) -> int:
    """Bytes of decoder layer 0 in bf16 (what Language Pipes budgets a layer at), from the
    safetensors headers."""
    total = 0
    for f in sorted(hf_dir.glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(math.prod(v["shape"]) * 2 for k, v in header.items() if ".layers.0." in k and k.startswith("model."))
    if not total:
        raise RuntimeError(f"{hf_dir}: no model.layers.0.* tensors in its safetensors files")
    return total


def toml_node(node_id: str, peer_port: int, model_id: str, memory_gb: float, job_port: int | None = None,
              bootstrap_port: int | None = None, end_model: bool = False) -> str:
    lines = [f'node_id = "{node_id}"', f"peer_port = {peer_port}", 'network_ip = "127.0.0.1"', "api_keys = []",
             f"end_models = [{json.dumps(model_id) if end_model else ''}]"]
    if job_port is not None:
        lines.append(f"job_port = {job_port}")
    if bootstrap_port is None:
        lines.append("bootstrap_nodes = []")
    else:
        lines += ["", "[[bootstrap_nodes]]", 'address = "127.0.0.1"', f"port = {bootstrap_port}"]
    lines += ["", "[[layer_models]]", f"model_id = {json.dumps(model_id)}", 'device = "cpu"',
              f"memory = {memory_gb:.6f}", "data_type = 16", ""]
    return "\n".join(lines)


class LpNode:
    """One `language-pipes -c NODE.toml run` process; its output goes to a log file."""

    def __init__(self, venv: Path, name: str, config: Path, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._out = open(log, "w")
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "language-pipes"), "-c", str(config), "run"],
            stdout=self._out, stderr=subprocess.STDOUT, env=env, cwd=config.parent, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.text())
            if m:
                return m
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = f"exited ({self.proc.returncode})" if self.proc.poll() is not None else f"no {pattern!r} in {timeout:.0f} s"
                tail = "\n".join(self.text().splitlines()[-25:])
                raise RuntimeError(f"Language Pipes {self.name}: {why}:\n{tail}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    pass
        self._out.close()


def run_language_pipes(args: argparse.Namespace, hf_dir: Path, n_layers: int, threads: str) -> Figures:
    """Language Pipes' 2-node setup; `threads` "default" leaves torch's thread count alone,
    a number sets OMP_NUM_THREADS for both nodes."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("OMP_NUM_THREADS", None)
    if threads != "default":
        env["OMP_NUM_THREADS"] = threads
    version = subprocess.run([str(args.venv / "bin" / "python"), "-c",
                              "import importlib.metadata as m, torch; print(m.version('language-pipes'), torch.__version__, torch.get_num_threads())"],
                             capture_output=True, text=True, check=True, env=env).stdout.split()
    model_id = f"local/{hf_dir.name}"
    first = n_layers // 2  # node-1's layer model: 0..first-1, node-2: the rest
    layer = layer_bytes_bf16(hf_dir)
    # Language Pipes loads int(budget / layer size) - 1 more layers than its first one.
    mem1 = (first + 0.5) * layer / 1024**3
    mem2 = (n_layers - first + 0.5) * layer / 1024**3
    tmp = Path(tempfile.mkdtemp(prefix="lp-bench-"))
    nodes: list[LpNode] = []
    try:
        model_dir = tmp / "models" / model_id
        model_dir.mkdir(parents=True)
        (model_dir / "data").symlink_to(hf_dir)
        peer1, peer2, job_port = free_port(), free_port(), free_port()
        (tmp / "node-1.toml").write_text(toml_node("node-1", peer1, model_id, mem1, job_port=job_port, end_model=True))
        (tmp / "node-2.toml").write_text(toml_node("node-2", peer2, model_id, mem2, bootstrap_port=peer1))
        base_env = dict(env, LP_MODEL_DIR=str(tmp / "models"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        loaded = r"Layers (\d+)-(\d+) for \S+ successfully loaded on (\S+)"
        node1 = LpNode(args.venv, "node-1", tmp / "node-1.toml", dict(base_env, LP_APP_DIR=str(tmp / "app-1")), tmp / "node-1.log")
        nodes.append(node1)
        m1 = node1.wait_for(loaded, 300)
        node1.wait_for(r"End Model for \S+ loaded successfully", 300)
        node2 = LpNode(args.venv, "node-2", tmp / "node-2.toml", dict(base_env, LP_APP_DIR=str(tmp / "app-2")), tmp / "node-2.log")
        nodes.append(node2)
        m2 = node2.wait_for(loaded, 300)
        url = f"http://127.0.0.1:{job_port}"
        deadline = time.monotonic() + 120
        while True:  # the pipe is complete once node-1 lists the model
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as r:
                    if any(d["id"] == model_id for d in json.load(r)["data"]):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Language Pipes never listed {model_id}:\n{node1.text()[-2000:]}")
            time.sleep(0.5)
        how_many = f"{version[2]} thread{'s' if version[2] != '1' else ''} per node, " + (
            "torch's default" if threads == "default" else f"OMP_NUM_THREADS={threads}")
        setup = (f"Language Pipes {version[0]} (torch {version[1]}, {how_many}), 2 nodes on 127.0.0.1, "
                 f"bf16 on cpu: node-1 End Model (embedding, head, layer 0 local) + layers {m1.group(1)}-{m1.group(2)}, "
                 f"OpenAI server; node-2 layers {m2.group(1)}-{m2.group(2)}")
        print(f"setup: {setup}", flush=True)
        fig = Figures(f"Language Pipes {version[0]} (HF bf16, {version[2]} thr)", setup)
        measure(fig, url, model_id, args)
        return fig
    finally:
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- meshpy


def run_meshpy(args: argparse.Namespace, model: Path, label: str, n_layers: int, threads: int) -> Figures:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = None
    with LocalMesh(env=env) as mesh:
        mesh.start_bootstrap()
        spans = [format_layers(r) for r in split_layers(n_layers, 2)]
        for layers in spans:
            mesh.add_worker(model, layers=layers, threads=threads, kv_budget="512MiB")
        try:
            proc, url = start_server(["--model", str(model), "--bootstrap", mesh.bootstrap_addr, "--threads", str(threads)],
                                     mesh.env)
            client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=600)
            name = client.models.list().data[0].id
            setup = (f"meshpy, 2 nodes on 127.0.0.1 ({mesh.transport}): bootstrap node, workers layers "
                     f"{' and '.join(spans)} ({threads} thread(s) each), serve --bootstrap (End node, {threads}); model {model}")
            print(f"setup: {setup}", flush=True)
            fig = Figures(label, setup)
            measure(fig, url, name, args)
            return fig
        finally:
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


# ---------------------------------------------------------------- main


def make_hf(venv: Path, gguf: Path, hf_dir: Path) -> None:
    print(f"making {hf_dir} from {gguf} with {venv}/bin/python", flush=True)
    tmp = hf_dir.with_name(hf_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    done = subprocess.run([str(venv / "bin" / "python"), "-c", MAKE_HF, str(gguf), str(tmp), PROMPT],
                          capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if done.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"making the HF directory failed (is `gguf` installed in {venv}?):\n{done.stderr[-3000:]}")
    print("  " + done.stdout.strip().splitlines()[-1], flush=True)
    if hf_dir.exists():
        hf_dir.rmdir()  # empty
    tmp.rename(hf_dir)


def agreement(a: str, b: str) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return "same text" if n == min(len(a), len(b)) else f"texts differ from character {n}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=Path("/work/lp-venv"), help="virtual environment with language-pipes")
    parser.add_argument("--hf-dir", type=Path, default=Path("/tmp/lp-smollm2-hf"), help="the model in HF format")
    parser.add_argument("--make-hf", action="store_true", help="write --hf-dir from --gguf first if it is missing")
    parser.add_argument("--gguf", default="smollm2", help="meshpy's GGUF (a path or packaged name)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4, help="concurrent streams (1: none)")
    parser.add_argument("--concurrent-repeats", type=int, default=1, help="rounds of concurrent streams")
    parser.add_argument("--no-meshpy-hf", action="store_true", help="skip meshpy on the HF directory")
    parser.add_argument("--no-language-pipes", action="store_true", help="measure meshpy only")
    parser.add_argument("--lp-threads", nargs="+", default=["default", "1"],
                        help="Language Pipes runs, each with torch's default threads per node or OMP_NUM_THREADS=N")
    parser.add_argument("--meshpy-threads", type=int, nargs="+", default=[1, 2],
                        help="compute threads per meshpy process, one run per value (the HF run takes the first)")
    parser.add_argument("--mark", help="a file that exists while timed requests run")
    parser.add_argument("--wait-for", help="before timed requests, wait while this file exists")
    args = parser.parse_args()
    args.venv = args.venv.resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up the nodes on SIGTERM too

    gguf = model_path(args.gguf)
    hf_dir = args.hf_dir.resolve()
    if not (hf_dir / "config.json").exists():
        if hf_dir.exists() and any(hf_dir.iterdir()):
            raise SystemExit(f"{hf_dir} exists but holds no config.json")
        if not args.make_hf:
            raise SystemExit(f"{hf_dir} holds no HF model: pass --make-hf to write it from {gguf}")
        make_hf(args.venv, gguf, hf_dir)
    if not (args.venv / "bin" / "language-pipes").exists() and not args.no_language_pipes:
        raise SystemExit(f"no {args.venv}/bin/language-pipes: pass --venv with language-pipes installed")
    n_layers = read_config(open_model_source(hf_dir)).n_layers
    if read_config(open_model_source(gguf)).n_layers != n_layers:
        raise SystemExit(f"{gguf} and {hf_dir} are not the same model")

    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "python", "rust"],
                           capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine()}; commit {commit()}{' with local changes to python/ or rust/' if dirty else ''}")
    print(f"model: {gguf.name} (meshpy) and {hf_dir} (HF bf16, made from it); {n_layers} layers")
    print(f"requests: streamed greedy chat completion, max_tokens {args.max_tokens}, prompt {PROMPT!r}; "
          f"warm-up, then medians of {args.repeats}; {args.streams} concurrent streams, "
          f"{args.concurrent_repeats} round{'s' if args.concurrent_repeats != 1 else ''}", flush=True)

    lps = [] if args.no_language_pipes else [run_language_pipes(args, hf_dir, n_layers, t) for t in args.lp_threads]
    quant = gguf.stem.rsplit('.', 1)[-1]
    meshpys = [run_meshpy(args, gguf, f"meshpy (GGUF {quant}, {t} thr)", n_layers, t) for t in args.meshpy_threads]
    if not args.no_meshpy_hf:
        t = args.meshpy_threads[0]
        meshpys.append(run_meshpy(args, hf_dir, f"meshpy (HF bf16, {t} thr)", n_layers, t))

    rows = [(f.label, f.tok_s, f.ttft * 1e3, f.agg_tok_s, "") for f in lps + meshpys]
    for lp in lps:
        for mp in meshpys:
            rows.append((f"meshpy ({mp.label.split(' (', 1)[1]} / LP ({lp.label.split(' (', 1)[1]}", mp.tok_s / lp.tok_s,
                         lp.ttft / mp.ttft, mp.agg_tok_s / lp.agg_tok_s, "x"))
    w = max(len(r[0]) for r in rows)
    print()
    print(f"{'':<{w}}  {'tok/s 1 stream':>14}  {'first token ms':>14}  {f'tok/s {args.streams} streams':>16}")
    for i, (label, a, b, c, x) in enumerate(rows):
        if i == len(lps + meshpys):
            print("ratio meshpy / Language Pipes (how many times faster meshpy is; first token: LP's time / meshpy's)")
        print(f"{label:<{w}}  {a:{14 - len(x)}.{2 if x else 1}f}{x}  {b:{14 - len(x)}.{2 if x else 0}f}{x}  "
              f"{c:{16 - len(x)}.{2 if x else 1}f}{x}")
    for lp in lps[:1]:
        for mp in meshpys:
            print(f"greedy text, {mp.label} against {lp.label}: {agreement(lp.text, mp.text)}")


if __name__ == "__main__":
    main()
