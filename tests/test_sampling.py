"""Sampling: greedy, temperature, top-k, top-p, seeding."""

from __future__ import annotations


import numpy as np
import pytest

from meshpy.errors import InvalidSamplingError, MeshpyError
from meshpy.sampling import Sampler, SamplingParams

VOCAB = 49152


def random_logits(seed: int, n: int = VOCAB) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 4).astype(np.float32)


def test_greedy_is_argmax() -> None:
    sampler = Sampler(SamplingParams(temperature=0.0))
    for seed in range(20):
        logits = random_logits(seed)
        assert sampler.sample(logits) == int(np.argmax(logits))


def test_greedy_takes_the_first_of_equal_maxima() -> None:
    logits = np.array([0.0, 3.0, 1.0, 3.0], dtype=np.float32)
    assert Sampler().sample(logits) == 1


def test_same_seed_same_tokens() -> None:
    logits = [random_logits(s) / 6 for s in range(50)]  # flat enough that draws spread

    def run(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=0.9, top_k=500, top_p=0.95, seed=seed))
        return [sampler.sample(x) for x in logits]

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_top_k_1_is_greedy() -> None:
    sampler = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=0))
    for seed in range(20):
        logits = random_logits(seed)
        assert sampler.sample(logits) == int(np.argmax(logits))


def test_tiny_top_p_is_greedy() -> None:
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=1e-6, seed=0))
    for seed in range(20):
        logits = random_logits(seed)
        assert sampler.sample(logits) == int(np.argmax(logits))


def test_top_k_only_draws_from_the_k_best() -> None:
    logits = random_logits(3) / 10  # nearly flat: without the cut, draws would spread widely
    best = set(np.argsort(-logits)[:5].tolist())
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=5, seed=1))
    drawn = {sampler.sample(logits) for _ in range(500)}
    assert drawn == best


def test_top_p_keeps_the_smallest_nucleus() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps exactly the first two
    probs = np.array([0.05, 0.5, 0.15, 0.3])
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.8, seed=2))
    drawn = [sampler.sample(np.log(probs).astype(np.float32)) for _ in range(2000)]
    assert set(drawn) == {1, 3}
    assert abs(drawn.count(1) / len(drawn) - 0.5 / 0.8) < 0.05


def test_minus_inf_logits_are_never_drawn() -> None:
    logits = np.full(1000, -np.inf, dtype=np.float32)
    logits[[10, 500, 999]] = [0.0, 1.0, 0.5]
    sampler = Sampler(SamplingParams(temperature=2.0, seed=3))
    assert {sampler.sample(logits) for _ in range(300)} == {10, 500, 999}


def test_frequencies_match_softmax() -> None:
    """20,000 draws at T=1 from a 4-token distribution: each frequency within 0.015 of its
    softmax probability (about 4.5 standard deviations for p = 0.5)."""
    logits = np.array([1.0, 2.0, 0.5, -1.0], dtype=np.float32)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    sampler = Sampler(SamplingParams(temperature=1.0, seed=1234))
    n = 20_000
    counts = np.bincount([sampler.sample(logits) for _ in range(n)], minlength=4)
    assert np.all(np.abs(counts / n - p) < 0.015), (counts / n, p)


def test_temperature_sharpens_and_flattens() -> None:
    logits = np.array([1.0, 2.0, 0.5, -1.0], dtype=np.float32)
    n = 5000

    def share_of_best(t: float) -> float:
        sampler = Sampler(SamplingParams(temperature=t, seed=5))
        return sum(sampler.sample(logits) == 1 for _ in range(n)) / n

    p_best = lambda t: float(np.exp(logits / t)[1] / np.exp(logits / t).sum())  # noqa: E731
    for t in (0.5, 2.0):
        assert abs(share_of_best(t) - p_best(t)) < 0.03


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"temperature": float("inf")},
        {"temperature": "1"},
        {"top_k": -1},
        {"top_k": 2.5},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": -0.2},
        {"seed": -1},
        {"seed": 1.5},
    ],
)
def test_invalid_params_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidSamplingError) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, MeshpyError)


@pytest.mark.parametrize(
    "logits",
    [
        np.zeros((2, 3), dtype=np.float32),
        np.zeros(0, dtype=np.float32),
        np.array([1, 2, 3]),
        np.array([0.0, np.nan], dtype=np.float32),
        np.array([0.0, np.inf], dtype=np.float32),
        np.array([-np.inf, -np.inf], dtype=np.float32),
    ],
)
def test_invalid_logits_raise(logits: np.ndarray) -> None:
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=0)):
        with pytest.raises(InvalidSamplingError):
            Sampler(params).sample(logits)
