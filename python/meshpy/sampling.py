"""Choosing the next token from the LM head's logits.

Greedy (temperature 0) takes the first highest logit. Otherwise the logits are divided by the
temperature, cut to the ``top_k`` highest, turned into probabilities (softmax over what is
left), cut to the smallest set of most likely tokens whose probability reaches ``top_p``
(nucleus; at least one token stays), and one token is drawn with numpy's PCG64 generator, so a
given seed gives the same tokens for the same logits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from meshpy.errors import InvalidSamplingError

__all__ = ["SamplingParams", "Sampler", "sample_rows", "TokenLogprob", "token_logprobs", "MAX_TOP_LOGPROBS"]

# Nucleus search starts with this many candidates and doubles until they hold top_p of the
# probability, so a 262k vocabulary is not fully sorted for every token.
_NUCLEUS_START = 64
#: Most alternatives a token's log-probability may list (OpenAI's limit for `top_logprobs`).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens.

    ``temperature`` 0 means greedy; ``top_k`` 0 means no top-k cut; ``top_p`` 1 means no
    nucleus cut; ``seed`` None draws a fresh seed from the OS.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise InvalidSamplingError(f"temperature must be a number, got {self.temperature!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidSamplingError(f"temperature must be finite and >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)):
            raise InvalidSamplingError(f"top_k must be an int, got {self.top_k!r}")
        if self.top_k < 0:
            raise InvalidSamplingError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise InvalidSamplingError(f"top_p must be a number, got {self.top_p!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidSamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
                raise InvalidSamplingError(f"seed must be an int or None, got {self.seed!r}")
            if self.seed < 0:
                raise InvalidSamplingError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax."""
        return self.temperature == 0.0 or self.top_k == 1


class Sampler:
    """Draws token ids from logits under fixed :class:`SamplingParams`; keeps its own RNG."""

    def __init__(self, params: SamplingParams | None = None) -> None:
        """A sampler for ``params`` (greedy by default), its generator seeded from ``params.seed``."""
        self.params = params if params is not None else SamplingParams()
        self._rng = np.random.Generator(np.random.PCG64(self.params.seed))

    def sample(self, logits: np.ndarray) -> int:
        """The next token id for a 1-D array of logits (float32 or float64).

        ``-inf`` marks a token that must not be chosen; NaN or ``+inf`` is an error.
        """
        x, best = _checked(logits)
        if self.params.greedy:
            return best
        ids, probs = self._distribution(x)
        k = self._draw(probs)
        return k if ids is None else int(ids[k])

    def verify(self, logits: np.ndarray, draft: int) -> int:
        """The token at a position where `draft` was proposed by a deterministic drafter
        (speculative sampling's rejection rule for a draft of probability 1): `draft` with
        the probability `sample` would give it, else a token drawn from the rest of the
        distribution (renormalised without it). Either way the token is distributed as
        `sample(logits)`'s. Greedy: the argmax, as `sample`."""
        x, best = _checked(logits)
        if self.params.greedy:
            return best
        ids, probs = self._distribution(x)
        total = float(probs.sum())
        at = draft if ids is None else np.flatnonzero(ids == draft)
        at = int(at) if ids is None else (int(at[0]) if len(at) else -1)
        p_draft = float(probs[at]) / total if 0 <= at < len(probs) else 0.0
        if self._rng.random() < p_draft:
            return draft
        rest = probs.copy()
        if 0 <= at < len(rest):
            rest[at] = 0.0
        k = self._draw(rest)
        return k if ids is None else int(ids[k])

    def _draw(self, probs: np.ndarray) -> int:
        """An index drawn with the unnormalised probabilities `probs` (one uniform number)."""
        cdf = np.cumsum(probs)
        u = self._rng.random() * cdf[-1]
        k = int(np.searchsorted(cdf, u, side="right"))
        if k >= len(probs) or probs[k] == 0.0:  # u rounded up to the total: the last token that can be drawn
            k = int(np.flatnonzero(probs)[-1])
        return k

    def _distribution(self, x: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """The tokens `sample` draws from and their unnormalised probabilities: `(ids,
        probs)` with `ids` None when position is the token id (the whole vocabulary)."""
        p = self.params
        n = x.size
        # Candidates: the top_k highest logits (as ids, ascending), or the whole vocabulary.
        if 0 < p.top_k < n:
            cand = np.sort(np.argpartition(x, n - p.top_k)[n - p.top_k :])
        else:
            cand = None  # the whole vocabulary
        probs = (x if cand is None else x[cand]).astype(np.float64)
        probs -= probs.max()
        probs /= p.temperature
        np.exp(probs, out=probs)  # unnormalized softmax; the CDF is scaled by its total
        ids: np.ndarray | None = cand  # None: position == token id
        if p.top_p < 1.0:
            probs /= probs.sum()
            order = _nucleus(probs, p.top_p)
            probs = probs[order]
            ids = order if cand is None else cand[order]
        return ids, probs


def _checked(logits: np.ndarray) -> tuple[np.ndarray, int]:
    """The logits as an array and their first maximum, or the error they make."""
    x = np.asarray(logits)
    if x.ndim != 1 or x.size == 0:
        raise InvalidSamplingError(f"logits must be a non-empty 1-D array, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise InvalidSamplingError(f"logits must be floating point, got {x.dtype}")
    best = int(np.argmax(x))  # first maximum
    top = x[best]
    if np.isnan(x).any() or top == np.inf:
        raise InvalidSamplingError("logits contain NaN or +inf")
    if top == -np.inf:
        raise InvalidSamplingError("every logit is -inf: no token can be chosen")
    return x, best


def sample_rows(samplers: Sequence[Sampler], logits: np.ndarray, n_tokens: int) -> list[int | InvalidSamplingError]:
    """One token per row of `logits` `(rows, columns)`, row i drawn by `samplers[i]`, as each
    sampler's `sample` would draw it. Columns from `n_tokens` on (head rows past the
    tokenizer's vocabulary, padding some checkpoints carry) name no token and are never
    chosen. Greedy rows take one vectorised argmax; a row's error takes its token's place."""
    x = logits[:, :n_tokens]
    out: list[int | InvalidSamplingError] = [0] * len(samplers)
    greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
    if greedy:
        rows = x if len(greedy) == len(samplers) else x[greedy]
        best = np.argmax(rows, axis=1)  # first maximum; a NaN counts as the maximum
        top = rows[np.arange(len(greedy)), best]
        for i, b, t in zip(greedy, best.tolist(), top.tolist()):
            out[i] = b if math.isfinite(t) else InvalidSamplingError(
                "logits contain NaN or +inf" if t != -math.inf else "every logit is -inf: no token can be chosen")
    for i, sampler in enumerate(samplers):
        if not sampler.params.greedy:
            try:
                out[i] = sampler.sample(x[i])
            except InvalidSamplingError as e:
                out[i] = e
    return out


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Indices of the smallest most-likely set whose probability reaches top_p, best first."""
    n = probs.size
    k = min(n, _NUCLEUS_START)
    while True:
        if k < n:
            part = np.sort(np.argpartition(probs, n - k)[n - k :])
        else:
            part = np.arange(n)
        order = part[np.argsort(-probs[part], kind="stable")]
        mass = np.cumsum(probs[order])
        if mass[-1] >= top_p or k >= n:
            # keep token i when the mass before it is still below top_p (the first always)
            keep = int(np.searchsorted(mass, top_p, side="left")) + 1
            return order[: min(keep, len(order))]
        k = min(n, k * 4)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the likeliest tokens at its position."""

    token: int
    logprob: float
    #: `(token id, log-probability)` of the most likely tokens there, likeliest first.
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: np.ndarray, tokens: Sequence[int], top_n: int) -> list[TokenLogprob]:
    """Row i's log-probability of `tokens[i]` and its `top_n` likeliest tokens, for logits
    `(rows, n_tokens)`. This is the model's own distribution (log-softmax of the raw logits,
    before temperature, top-k and top-p), as log-likelihood scoring needs, and as vLLM and
    OpenAI report it."""
    x = np.asarray(logits, dtype=np.float64)
    top = x.max(axis=1, keepdims=True)
    norm = top + np.log(np.exp(x - top).sum(axis=1, keepdims=True))  # log of each row's softmax total
    out = []
    for i, token in enumerate(tokens):
        row = x[i]
        best: tuple[tuple[int, float], ...] = ()
        if top_n > 0:
            k = min(top_n, row.size)
            ids = np.argpartition(row, row.size - k)[row.size - k :]
            ids = ids[np.argsort(-row[ids], kind="stable")]
            # Tokens of probability 0 (-inf, as a grammar's mask leaves them) are no alternative.
            best = tuple((int(j), float(row[j] - norm[i, 0])) for j in ids if np.isfinite(row[j]))
        out.append(TokenLogprob(int(token), float(row[token] - norm[i, 0]), best))
    return out
