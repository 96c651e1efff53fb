"""Speculative decoding on the End node (issue 19, part 1): drafts from prompt lookup.

A generation's next tokens are often already in its context: a reply that quotes the prompt,
code that repeats a name, a list that repeats its pattern. `PromptLookup` finds the longest
recent n-gram (up to `MAX_NGRAM` tokens) that ends the sequence so far and occurred before,
and proposes the tokens that followed it then (prompt lookup decoding, as llama.cpp's
`lookup` example and llama-cpp-python's `LlamaPromptLookupDecoding` do; no draft model).

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

from collections.abc import Sequence

__all__ = ["PromptLookup", "Speculator", "MAX_DRAFT", "MAX_NGRAM"]

#: Most tokens drafted for one verification pass.
MAX_DRAFT = 8
#: Longest n-gram looked up (longer matches are tried first).
MAX_NGRAM = 3
#: Acceptance rate a new generation starts from, per n-gram length (index 1..MAX_NGRAM: a
#: single repeated token is weak evidence, three in a row strong), and how many observations
#: that prior weighs.
_PRIOR_RATES = (0.0, 0.1, 0.3, 0.5)
_PRIOR_WEIGHT = 4.0
#: A draft must promise this much more per unit of cost than plain decoding: the cost model
#: is rough, and a wasted row also costs memory traffic the estimate leaves out.
_MARGIN = 1.05
assert len(_PRIOR_RATES) == MAX_NGRAM + 1
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

    def __init__(self, prompt: Sequence[int], max_draft: int = MAX_DRAFT, fixed: int | None = None) -> None:
        """`fixed`: draft that many tokens whenever lookup finds a match (within the limit)
        instead of choosing by acceptance and cost; drafts then depend only on the tokens, so
        a seeded sampled generation repeats."""
        self.lookup = PromptLookup(prompt)
        self.max_draft = max_draft if fixed is None else fixed
        self.fixed = fixed
        # Decayed counts per n-gram length: drafted tokens compared, and those accepted.
        self._tried = [_PRIOR_WEIGHT] * (MAX_NGRAM + 1)
        self._kept = [_PRIOR_WEIGHT * r for r in _PRIOR_RATES]
        self._match = 0  # n-gram length of the last draft's match
        self.drafted = 0  # tokens sent for verification
        self.accepted = 0  # of those, kept
        self.passes = 0  # verification passes

    def rate(self, n: int) -> float:
        """Estimated chance that a token drafted from an n-gram match is accepted."""
        return self._kept[n] / self._tried[n]

    def draft(self, row_cost: float, limit: int) -> tuple[list[int], list[int]]:
        """The draft to verify with the next step (at most `limit` tokens; `row_cost`: what
        one extra row costs relative to the generation's share of a step), and a shadow
        draft of one token to learn from when drafting does not pay (both from the same
        match). Returns `(draft, shadow)`; at most one is non-empty."""
        proposal, n = self.lookup.propose(min(self.max_draft, limit))
        self._match = n
        if not proposal:
            return [], []
        k = len(proposal) if self.fixed is not None else best_length(self.rate(n), max(row_cost, 1e-3), len(proposal))
        return (proposal[:k], []) if k else ([], proposal[:1])

    def observe(self, drafted: Sequence[int], produced: Sequence[int]) -> int:
        """The model's tokens `produced` for a step whose input rows were the last token and
        `drafted` (or, for a shadow draft, the one token it produced); returns how many
        drafted tokens are kept (each equal to the model's token before it)."""
        kept = 0
        while kept < len(drafted) and kept < len(produced) and drafted[kept] == produced[kept]:
            kept += 1
        compared = kept + (1 if kept < len(drafted) else 0)
        n = self._match
        if compared and n:
            self._tried[n] = self._tried[n] * _DECAY**compared + compared
            self._kept[n] = self._kept[n] * _DECAY**compared + kept
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
