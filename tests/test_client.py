"""meshpy.connect: the client API from sync and async code, in-process and on a mesh."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

import meshpy
from meshpy.mesh.launcher import LocalMesh

MESSAGES = [{"role": "user", "content": "Name three rivers."}]


@pytest.fixture(scope="module")
def client(smollm2_gguf: Path) -> meshpy.Client:
    with meshpy.connect(smollm2_gguf, threads=1) as c:
        yield c


def test_sync_chat_complete_and_stream(client: meshpy.Client) -> None:
    reply = client.chat(MESSAGES, max_tokens=24)
    assert reply.text and reply.stats.completion_tokens == len(reply.token_ids) <= 24
    assert reply.token_ids == client.model.generate(MESSAGES, max_tokens=24).token_ids
    assert "".join(client.chat(MESSAGES, max_tokens=24, stream=True)) == reply.text
    raw = client.complete("The capital of France is", max_tokens=8)
    assert raw.text == client.model.generate("The capital of France is", max_tokens=8, raw=True).text
    sampled = [client.chat(MESSAGES, max_tokens=16, temperature=0.8, seed=7).text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_async_chat_and_stream(client: meshpy.Client) -> None:
    expected = client.chat(MESSAGES, max_tokens=24).text

    async def main() -> tuple[str, str, list[str]]:
        whole = (await client.achat(MESSAGES, max_tokens=24)).text
        pieces = [p async for p in client.astream_chat(MESSAGES, max_tokens=24)]
        # Two at once on one event loop: neither blocks it.
        both = await asyncio.gather(client.acomplete("Once upon a time", max_tokens=8),
                                    client.acomplete("Once upon a time", max_tokens=8))
        return whole, "".join(pieces), [c.text for c in both]

    whole, streamed, both = asyncio.run(main())
    assert whole == expected == streamed
    assert both[0] == both[1]


@pytest.mark.slow
def test_leaving_a_stream_early_frees_the_workers_sessions(smollm2_gguf: Path) -> None:
    with LocalMesh(transport="tcp") as mesh:
        mesh.start_bootstrap()
        mesh.add_worker(smollm2_gguf, layers="0-14", threads=1)
        mesh.add_worker(smollm2_gguf, layers="15-29", threads=1)
        with meshpy.connect(smollm2_gguf, mesh.bootstrap_addr, threads=1) as client:
            pipeline = client.model.pipeline

            def sessions() -> list[int]:
                return [p.info["sessions"] for p in pipeline.refresh()]

            gen = client.chat(MESSAGES, max_tokens=64, stream=True)
            next(iter(gen))
            assert sessions() == [1, 1]
            gen.close()
            # Closed, or kept for a prompt that starts the same way (`meshpy.prompt_cache`).
            kept = client.model.prompt_cache
            assert sessions() == [kept.sessions] * 2 and kept.sessions <= 1
            kept.clear()
            assert sessions() == [0, 0]

            async def leave_early() -> None:
                async for _ in client.astream_chat(MESSAGES, max_tokens=64):
                    break

            asyncio.run(leave_early())
            deadline = time.monotonic() + 10
            while sessions() != [kept.sessions] * 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sessions() == [kept.sessions] * 2 and kept.sessions == 1
