"""Speculative decoding by prompt lookup (`meshpy.speculation`): the drafts it proposes, the
draft length it picks, and, on real models in one process, greedy tokens exactly equal to
plain decoding while drafts are really accepted and rejected (caches rewound), alone and
batched with other generations. The mesh's half (workers rewinding) is in test_mesh.py."""

from __future__ import annotations

import math
import threading
from collections import Counter
from pathlib import Path

import pytest

from meshpy.errors import InvalidArgumentError
from meshpy.generation import Completion, GenerationStats, Model
from meshpy.sampling import SamplingParams
from meshpy.speculation import MAX_DRAFT, PromptLookup, Speculator, best_length
from tests.conftest import DATA

PASSAGE = ("The lighthouse keeper climbed the stairs every evening at dusk. He lit the lamp, wiped the great lens, "
           "and wrote in his log: wind from the north, sea calm, no ships. ")
#: A prompt whose answer quotes it, so prompt lookup hits.
QUOTING = "Repeat this passage exactly, twice:\n\n" + PASSAGE
#: A prompt whose answer mostly does not.
FREE = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def test_lookup_proposes_what_followed_the_latest_longest_match() -> None:
    lookup = PromptLookup([1, 2, 3, 9, 1, 2, 4, 5, 6, 1, 2])
    # The bigram (1, 2) last occurred before 4; the trigram (6, 1, 2) never did.
    assert lookup.propose(3) == ([4, 5, 6], 2)
    lookup.append(3)  # ... 1 2 3: the trigram (1, 2, 3) occurred at the start
    assert lookup.propose(2) == ([9, 1], 3)
    assert lookup.propose(0) == ([], 0)
    assert PromptLookup([7, 8]).propose(4) == ([], 0)
    # Past the end of what is known, a repeating pattern repeats on.
    assert PromptLookup([5, 6, 5]).propose(4) == ([6, 5, 6, 5], 1)
    assert PromptLookup([1, 2, 3, 1, 2]).propose(5) == ([3, 1, 2, 3, 1], 2)


def test_draft_length_weighs_acceptance_against_row_cost() -> None:
    assert best_length(0.0, 0.1, MAX_DRAFT) == 0
    assert best_length(0.05, 0.1, MAX_DRAFT) == 0  # an extra row costs more than it brings
    assert best_length(0.9, 0.1, MAX_DRAFT) >= 4
    assert best_length(0.99, 0.01, MAX_DRAFT) == MAX_DRAFT
    assert best_length(0.99, 0.01, 3) == 3
    assert best_length(0.9, 5.0, MAX_DRAFT) == 0  # rows dearer than a whole step


def test_a_speculator_learns_from_what_it_would_have_drafted() -> None:
    spec = Speculator([1, 2, 3, 4, 1, 2, 3, 4, 1, 2])
    draft, shadow = spec.draft(row_cost=0.1, limit=8)
    assert draft == [3, 4] and not shadow  # the prior rate (0.5) pays for two
    assert spec.observe(draft, [3, 4, 9]) == 2
    for _ in range(5):
        assert spec.observe([3, 4, 1, 2], [3, 4, 1, 2, 3]) == 4
    draft, shadow = spec.draft(row_cost=0.1, limit=8)
    assert draft == [3, 4, 1, 2, 3, 4, 1, 2], "right drafts grow"
    assert spec.draft(row_cost=0.1, limit=3)[0] == [3, 4, 1]
    # Rejected again and again: the rate falls until drafting stops, then only shadows.
    for _ in range(30):
        spec.observe([5, 5, 5], [6, 6, 6, 6])
    draft, shadow = spec.draft(row_cost=0.3, limit=8)
    assert draft == [] and shadow == [3]


def speculative_and_plain(model: Model, prompt: str, n: int, draft_length: int | None = None) -> tuple[Completion, Completion]:
    """The same greedy request with speculation on (`draft_length` tokens per match, or as
    the generation chooses) and off."""
    model.speculation, model.draft_length = True, draft_length
    try:
        spec = model.generate(prompt, max_tokens=n)
        model.speculation = False
        plain = model.generate(prompt, max_tokens=n)
    finally:
        model.speculation, model.draft_length = True, None
    return spec, plain


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_greedy_tokens_equal_plain_decoding(name: str, smollm2_gguf: Path, gemma3_gguf: Path) -> None:
    with Model.load(smollm2_gguf if name == "smollm2" else gemma3_gguf, threads=2) as model:
        for prompt, hits in ((QUOTING, True), (FREE, False)):
            spec, plain = speculative_and_plain(model, prompt, 96)
            assert spec.token_ids == plain.token_ids, prompt
            assert plain.stats.draft_tokens == 0
            s = spec.stats
            print(f"\n{name} {'quoting' if hits else 'free'}: {len(spec.token_ids)} tokens, {s.draft_tokens} drafted, "
                  f"{s.accepted_draft_tokens} kept; {s.decode_tokens_per_second:.0f} against "
                  f"{plain.stats.decode_tokens_per_second:.0f} tok/s")
            if hits:
                assert s.accepted_draft_tokens >= len(spec.token_ids) // 3, s
        # Eight tokens per match whatever the odds, on free text: drafts are rejected and
        # caches rewound (the adaptive length may happen to draft only what is kept).
        spec, plain = speculative_and_plain(model, FREE, 96, draft_length=8)
        assert spec.token_ids == plain.token_ids
        assert spec.stats.draft_tokens > spec.stats.accepted_draft_tokens, spec.stats


def test_rewinds_across_a_sliding_window_keep_the_tokens() -> None:
    """tiny-gemma3's sliding window of 8 positions: rejected drafts rewind caches whose
    sliding layers drop old rows (its greedy output repeats, so drafts are made)."""
    with Model.load(DATA / "tiny-gemma3", threads=2) as model:
        ids = [5 + (i * 7) % 40 for i in range(24)] * 2
        stats, plain = GenerationStats(), GenerationStats()
        model.speculation, model.draft_length = True, 8
        got = list(model.generate_ids(ids, 80, stats=stats))
        model.speculation = False
        want = list(model.generate_ids(ids, 80, stats=plain))
        assert got == want
        assert stats.draft_tokens > stats.accepted_draft_tokens > 0, stats


def test_batched_speculative_generations_each_equal_their_plain_run(smollm2_gguf: Path) -> None:
    """Drafting generations share iterations with plain, sampled and prefilling ones."""
    with Model.load(smollm2_gguf, threads=2) as model:
        prompts = [model.encode(p) for p in (QUOTING, FREE, "Name three colours.", QUOTING + " Then stop.")]
        params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.8, seed=3), SamplingParams()]
        model.speculation = False
        want = [list(model.generate_ids(p, 48, s)) for p, s in zip(prompts, params)]
        model.speculation = True
        got: list[list[int] | None] = [None] * len(prompts)
        stats = [GenerationStats() for _ in prompts]

        def run(i: int) -> None:
            got[i] = list(model.generate_ids(prompts[i], 48, params[i], stats=stats[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert got == want
        # Whether adaptive drafting pays depends on measured timings (on a loaded machine it
        # may never draft), so that drafts are kept in a batch is checked at a fixed length
        # below; a seeded sampled generation never drafts at an adaptive length.
        assert stats[2].draft_tokens == 0, "sampled generations do not draft"


def test_batched_greedy_generations_with_fixed_drafts_keep_drafts_and_equal_their_plain_run(smollm2_gguf: Path) -> None:
    """At a fixed draft length drafting does not depend on timings: greedy generations batched
    together verify drafts (and keep some), and each equals its plain run."""
    with Model.load(smollm2_gguf, threads=2) as model:
        prompts = [model.encode(p) for p in (QUOTING, FREE, QUOTING + " Then stop.")]
        model.speculation = False
        want = [list(model.generate_ids(p, 48)) for p in prompts]
        model.speculation = True
        model.draft_length = 4
        got: list[list[int] | None] = [None] * len(prompts)
        stats = [GenerationStats() for _ in prompts]

        def run(i: int) -> None:
            got[i] = list(model.generate_ids(prompts[i], 48, stats=stats[i]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert got == want
        assert stats[0].accepted_draft_tokens > 0 and stats[2].accepted_draft_tokens > 0


def _chi2_two_sample_p(a: Counter[int], b: Counter[int]) -> float:
    """p-value of a chi-square test that two samples come from one distribution (2 x K
    table; values seen fewer than 10 times in both together pooled), with the
    Wilson-Hilferty approximation of the chi-square tail (ample for a 1e-3 threshold)."""
    keys = [k for k in a.keys() | b.keys() if a[k] + b[k] >= 10]
    rows = [[a[k] for k in keys] + [sum(a.values()) - sum(a[k] for k in keys)],
            [b[k] for k in keys] + [sum(b.values()) - sum(b[k] for k in keys)]]
    cols = [x + y for x, y in zip(*rows)]
    keep = [i for i, c in enumerate(cols) if c > 0]
    n = sum(cols)
    stat = sum((row[i] - sum(row) * cols[i] / n) ** 2 / (sum(row) * cols[i] / n) for row in rows for i in keep)
    df = len(keep) - 1
    if df <= 0:
        return 1.0
    z = ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))
    return 0.5 * math.erfc(z / math.sqrt(2))


def test_sampled_speculation_keeps_the_distribution() -> None:
    """Sampled generations (top-k 3, temperature 1) that verify drafts by the rejection rule
    against plain sampling: each of the first six tokens has the same distribution
    (chi-square, 1000 generations each; seeded, and a fixed draft length so seeds repeat,
    so the test is deterministic). A sampler at another temperature is told apart, so the
    test can fail."""
    def sample(speculate: bool, first_seed: int, temperature: float = 1.0) -> tuple[list[Counter[int]], GenerationStats]:
        counts: list[Counter[int]] = [Counter() for _ in range(6)]
        total = GenerationStats()
        model.speculation = speculate
        for seed in range(first_seed, first_seed + 1000):
            stats = GenerationStats()
            params = SamplingParams(temperature=temperature, top_k=3, seed=seed)
            for j, token in enumerate(model.generate_ids(prompt, 6, params, stats=stats)):
                counts[j][token] += 1
            total.draft_tokens += stats.draft_tokens
            total.accepted_draft_tokens += stats.accepted_draft_tokens
        return counts, total

    with Model.load(DATA / "tiny-llama", threads=1) as model:
        prompt = [5 + (i * 7) % 40 for i in range(24)] * 2
        model.draft_length = 4
        spec, stats = sample(True, 0)
        plain, _ = sample(False, 10**6)
        colder, _ = sample(False, 2 * 10**6, temperature=0.6)
    assert stats.draft_tokens > 3 * stats.accepted_draft_tokens > 0, stats  # both outcomes, often
    p_values = [_chi2_two_sample_p(a, b) for a, b in zip(spec, plain)]
    print(f"\nspeculative against plain sampling, tokens 1-6: p = {', '.join(f'{p:.3f}' for p in p_values)}; "
          f"{stats.draft_tokens} drafted, {stats.accepted_draft_tokens} kept")
    assert min(p_values) > 1e-3, p_values
    assert min(_chi2_two_sample_p(a, b) for a, b in zip(colder, plain)) < 1e-6


def test_a_draft_model_gives_the_plain_tokens() -> None:
    """Drafts from a small local model (`Model.use_draft_model`), four per step: from the
    target itself (every draft kept), from a model that mostly disagrees (tiny-llama with
    linear RoPE scaling), and from one whose 8-position sliding window cannot rewind four
    drafted steps (its draft session starts over): always the plain tokens."""
    with Model.load(DATA / "tiny-llama", threads=2) as model:
        ids = [5 + (i * 7) % 40 for i in range(24)]
        model.speculation = False
        want = list(model.generate_ids(ids, 60))
        model.speculation, model.draft_length = True, 4
        kept = {}
        for drafter in ("tiny-llama", "tiny-llama-linear", "tiny-gemma3"):
            model.use_draft_model(DATA / drafter, threads=1)
            stats = GenerationStats()
            assert list(model.generate_ids(ids, 60, stats=stats)) == want, drafter
            assert stats.draft_tokens > 0, drafter
            kept[drafter] = stats.accepted_draft_tokens / stats.draft_tokens
    assert kept["tiny-llama"] == 1.0 and kept["tiny-llama-linear"] < 0.5, kept


def test_a_draft_model_must_share_the_tokenizer(smollm2_gguf: Path, gemma3_gguf: Path) -> None:
    with Model.load(smollm2_gguf, threads=1) as model:
        with pytest.raises(InvalidArgumentError, match="does not share the tokenizer"):
            model.use_draft_model(gemma3_gguf, threads=1)
        assert model.draft_model is None
