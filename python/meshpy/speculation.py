"""Speculative decoding on the End node (issue 19, part 1): drafts from prompt lookup.

A generation's next tokens are often already in its context: a reply that quotes the prompt,
code that repeats a name, a list that repeats its pattern. `PromptLookup` finds the longest
recent n-gram (up to `MAX_NGRAM` tokens) that ends the sequence so far and occurred before,
and proposes the tokens that followed it then (prompt lookup decoding, as llama.cpp's
`lookup` example and llama-cpp-python's `LlamaPromptLookupDecoding` do). With a draft model
(`DraftModel`: a small local model sharing the target's tokenizer), the draft is instead
that model's greedy continuation, run on the End node (`DraftSession`).

The scheduler runs the generation's next token and the k drafted ones as k + 1 rows of one
pass (every kernel treats rows independently, so each row's logits are exactly those of
plain decoding), keeps the drafted tokens while they equal what the model picks, adds the
model's pick after the last kept one, and rewinds the session's KV caches past the rows it
rejected (a mesh worker takes the next step's earlier start position as a rewind: the span
protocol's retry rule). Greedy output is therefore exactly the plain output.

How long a draft pays depends on how often drafts are right and on what an extra row costs
next to a step: on one CPU decode reads every weight once for any few rows, so extra rows
are cheap; over a slow link a step is mostly waiting, so they are nearly free. `Speculator`
keeps a decayed acceptance rate per n-gram length and picks the k that maximises expected
tokens per unit of cost, `(1 - a^(k+1)) / (1 - a) / (1 + k * r)` for acceptance rate `a`
and relative row cost `r` (the scheduler measures `r`); when no k > 0 beats plain decoding,
it drafts nothing and keeps learning from the draft it would have made (a free comparison
once the step's token is known).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from meshpy.errors import InvalidArgumentError

__all__ = ["PromptLookup", "Speculator", "DraftModel", "DraftSession", "MAX_DRAFT", "MAX_NGRAM"]

#: Most tokens drafted for one verification pass.
MAX_DRAFT = 8
#: Longest n-gram looked up (longer matches are tried first).
MAX_NGRAM = 3
#: Acceptance rate a new generation starts from, per draft source: index 0 a draft model,
#: 1..MAX_NGRAM an n-gram match of that length (a single repeated token is weak evidence,
#: three in a row strong); and how many observations that prior weighs.
_PRIOR_RATES = (0.6, 0.1, 0.3, 0.5)
_PRIOR_WEIGHT = 4.0
#: A draft must promise this much more per unit of cost than plain decoding: the cost model
#: is rough, and a wasted row also costs memory traffic the estimate leaves out.
_MARGIN = 1.05
assert len(_PRIOR_RATES) == MAX_NGRAM + 1
#: A draft model that does not pay drafts one token after this many steps without a draft,
#: to keep measuring its acceptance (lookup learns from free shadow drafts instead).
_PROBE_EVERY = 16
#: Weight kept by older observations at each new one (an effective window of ~32 tokens).
_DECAY = 0.97


class PromptLookup:
    """The tokens of a generation so far (prompt, then output) and, per n-gram length, where
    each n-gram last occurred: the index of the token that followed it."""

    def __init__(self, tokens: Sequence[int], max_ngram: int = MAX_NGRAM) -> None:
        self.tokens: list[int] = []
        self.max_ngram = max_ngram
        self._next: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]
        for t in tokens:
            self.append(t)

    def append(self, token: int) -> None:
        """One more token of the sequence."""
        toks = self.tokens
        i = len(toks)
        for n in range(1, min(self.max_ngram, i) + 1):
            self._next[n][tuple(toks[i - n : i])] = i
        toks.append(token)

    def propose(self, k: int) -> tuple[list[int], int]:
        """`k` tokens that followed the latest earlier occurrence of the longest n-gram ending
        the sequence, and that n-gram's length; `([], 0)` when none occurred."""
        toks = self.tokens
        if k <= 0:
            return [], 0
        for n in range(min(self.max_ngram, len(toks)), 0, -1):
            at = self._next[n].get(tuple(toks[len(toks) - n :]))
            if at is not None:
                # Past the end of what is known, the match runs on into the draft itself (a
                # repeating pattern repeats on).
                out: list[int] = []
                for j in range(at, at + k):
                    out.append(toks[j] if j < len(toks) else out[j - len(toks)])
                return out, n
        return [], 0


class Speculator:
    """One generation's drafts: what prompt lookup proposes, and how many tokens of it are
    worth a verification pass."""

    def __init__(self, prompt: Sequence[int], max_draft: int = MAX_DRAFT, fixed: int | None = None,
                 drafter: DraftSession | None = None) -> None:
        """`fixed`: draft that many tokens whenever a draft can be made (within the limit)
        instead of choosing by acceptance and cost; drafts then depend only on the tokens, so
        a seeded sampled generation repeats. `drafter`: draft with a draft model's session
        instead of prompt lookup (closed by `close`)."""
        self.lookup = PromptLookup(prompt)
        self.drafter = drafter
        self._idle = 0  # steps since the draft model last drafted
        self.max_draft = max_draft if fixed is None else fixed
        self.fixed = fixed
        # Decayed counts per n-gram length: drafted tokens compared, and those accepted.
        self._tried = [_PRIOR_WEIGHT] * (MAX_NGRAM + 1)
        self._kept = [_PRIOR_WEIGHT * r for r in _PRIOR_RATES]
        self._match = 0  # n-gram length of the last draft's match
        self.passes = 0  # verification passes (the tokens are counted in GenerationStats)

    def rate(self, n: int) -> float:
        """Estimated chance that a token drafted from an n-gram match is accepted."""
        return self._kept[n] / self._tried[n]

    def draft(self, row_cost: float, limit: int, share: float | None = None) -> tuple[list[int], list[int]]:
        """The draft to verify with the next step (at most `limit` tokens; `row_cost`: what
        one extra row costs relative to the generation's share of a step, `share`, in
        seconds), and a shadow draft of one token to learn from when drafting does not pay
        (both from the same match). Returns `(draft, shadow)`; at most one is non-empty."""
        if self.drafter is not None:
            return self._model_draft(row_cost, limit, share), []
        proposal, n = self.lookup.propose(min(self.max_draft, limit))
        self._match = n
        if not proposal:
            return [], []
        k = len(proposal) if self.fixed is not None else best_length(self.rate(n), max(row_cost, 1e-3), len(proposal))
        return (proposal[:k], []) if k else ([], proposal[:1])

    def _model_draft(self, row_cost: float, limit: int, share: float | None) -> list[int]:
        """The draft model's greedy continuation, as long as its acceptance pays for its
        rows and its own steps (each draft token costs a draft-model step)."""
        assert self.drafter is not None
        self._match = 0
        most = min(self.max_draft, limit)
        if most <= 0:
            return []
        if self.fixed is not None:
            k = most
        else:
            step = self.drafter.draft.step_seconds
            own = step / share if step is not None and share else 0.1
            k = best_length(self.rate(0), max(row_cost, 1e-3) + own, most)
            if k == 0 and self._idle >= _PROBE_EVERY:
                k = 1
        self._idle = 0 if k else self._idle + 1
        return self.drafter.propose(self.lookup.tokens, k) if k else []

    def close(self) -> None:
        """Frees the draft model's session, if any."""
        if self.drafter is not None:
            self.drafter.close()

    def observe(self, drafted: Sequence[int], produced: Sequence[int]) -> int:
        """The model's tokens `produced` for a step whose input rows were the last token and
        `drafted` (or, for a shadow draft, the one token it produced); returns how many
        drafted tokens are kept (each equal to the model's token before it)."""
        kept = agreeing(drafted, produced)
        compared = kept + (1 if kept < len(drafted) else 0)
        n = self._match
        if compared and (n or self.drafter is not None):
            self._tried[n] = self._tried[n] * _DECAY**compared + compared
            self._kept[n] = self._kept[n] * _DECAY**compared + kept
        return kept


def agreeing(drafted: Sequence[int], picked: Sequence[object]) -> int:
    """How many drafted tokens, from the first, equal the tokens picked for their positions
    (a pick that is an error equals none)."""
    kept = 0
    while kept < len(drafted) and kept < len(picked) and drafted[kept] == picked[kept]:
        kept += 1
    return kept


def best_length(rate: float, row_cost: float, most: int) -> int:
    """The draft length k in 0..most that maximises expected tokens per pass over its cost,
    `(1 + a + ... + a^k) / (1 + k * r)`, each longer draft having to beat the best shorter
    one by `_MARGIN`; 0 when none beats plain decoding so."""
    best_k, best_value = 0, 1.0
    tokens, power = 1.0, 1.0
    for k in range(1, most + 1):
        power *= rate
        tokens += power
        value = tokens / (1 + k * row_cost)
        if value > best_value * _MARGIN:
            best_k, best_value = k, value
    return best_k


class DraftModel:
    """A small model in this process that drafts tokens for a larger one sharing its
    tokenizer (speculative decoding with a draft model); `step_seconds` is its measured cost
    per drafted token."""

    def __init__(self, model: Any, target: Any) -> None:
        """`model` drafts for `target` (both `meshpy.generation.Model`); refused with
        InvalidArgumentError unless their tokenizers agree (vocabulary size, stop tokens,
        and the ids of a probe text)."""
        a, b = model.end.tokenizer, target.end.tokenizer
        probe = "Speculative decoding: 12 drafts, 3 kept; naïve café ☕ <tags>\n\tend."
        if a.vocab_size != b.vocab_size or a.stop_ids != b.stop_ids or a.encode(probe) != b.encode(probe):
            raise InvalidArgumentError(
                f"the draft model {model.source.path.name} does not share the tokenizer of {target.source.path.name} "
                f"(vocabulary {a.vocab_size} against {b.vocab_size}); a draft model must use the same one"
            )
        self.model = model
        self.step_seconds: float | None = None

    def session(self) -> DraftSession:
        """A fresh drafting session for one generation."""
        return DraftSession(self)


class DraftSession:
    """A draft model's KV cache for one generation, kept in step with the generation's
    tokens: each proposal first rewinds to what the cache and the tokens share (drafted
    tokens the target rejected are dropped), runs the tokens it lacks, then drafts greedily."""

    def __init__(self, draft: DraftModel) -> None:
        self.draft = draft
        self.session = draft.model.new_session()
        self.held: list[int] = []  # the tokens the cache holds, in order

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to `k` greedy tokens of the draft model after `tokens` (none when they would
        not fit its context)."""
        model = self.draft.model
        if len(tokens) + k > model.config.max_positions:
            return []
        t0 = time.perf_counter()
        same = 0
        for a, b in zip(self.held, tokens):
            if a != b:
                break
            same += 1
        same = min(same, len(tokens) - 1)  # the last token is run again for its logits
        if same < len(self.held):
            try:
                model.pipeline.rewind(self.session, same)
            except InvalidArgumentError:
                # Its sliding-window layers dropped rows the rewind needs (a window smaller
                # than the drafts): start the session over.
                model.close_session(self.session)
                self.session, same = model.new_session(), 0
            del self.held[same:]
        logits = model.prefill(self.session, list(tokens[same:]))
        self.held.extend(tokens[same:])
        out: list[int] = []
        while True:
            out.append(int(np.argmax(model.end.samplable(logits))))
            if len(out) == k:
                break
            logits = model.step(self.session, out[-1])
            self.held.append(out[-1])
        # The cost per drafted token, counting the catch-up (the tokens kept since the last
        # draft) only when it is a step's worth, not a whole prompt or a long gap.
        if len(tokens) - same <= k + 1:
            per_token = (time.perf_counter() - t0) / k
            old = self.draft.step_seconds
            self.draft.step_seconds = per_token if old is None else 0.8 * old + 0.2 * per_token
        return out

    def close(self) -> None:
        self.draft.model.close_session(self.session)
