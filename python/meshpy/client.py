"""The Python client API: `meshpy.connect(...)` gives a `Client` with `chat` and `complete`,
from sync code or (as `achat`, `acomplete`, `astream_chat`, `astream_complete`) from async
code.

>>> import meshpy
>>> client = meshpy.connect(model="smollm2", bootstrap="/ip4/.../p2p/12D3Koo...")  # doctest: +SKIP
>>> client.chat([{"role": "user", "content": "Hi!"}]).text                         # doctest: +SKIP

Without `bootstrap` the whole model runs in this process. Generation is blocking work (Rust
and the network release the GIL), so the async methods run it on a thread and never block
the event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from meshpy.end_model import Prompt
from meshpy.generation import Completion, Generation, Model
from meshpy.sampling import SamplingParams

__all__ = ["Client", "connect"]

_DONE = object()


class Client:
    """Chat and completion requests against one model (in this process or on a mesh)."""

    def __init__(self, model: Model) -> None:
        self.model = model

    # --- sync ---------------------------------------------------------------------------

    def chat(self, messages: Sequence[dict[str, Any]], *, stream: bool = False, max_tokens: int = 256,
             **sampling: Any) -> Completion | Generation:
        """The reply to `messages` (chat template applied): a `Completion`, or with
        `stream=True` a `Generation` yielding text pieces."""
        return self._run(list(messages), False, stream, max_tokens, sampling)

    def complete(self, prompt: str, *, stream: bool = False, max_tokens: int = 256,
                 **sampling: Any) -> Completion | Generation:
        """The continuation of `prompt` as is (no template); as `chat` otherwise."""
        return self._run(prompt, True, stream, max_tokens, sampling)

    def _run(self, prompt: Prompt, raw: bool, stream: bool, max_tokens: int, sampling: dict[str, Any]) -> Completion | Generation:
        params = SamplingParams(**sampling)
        if stream:
            return self.model.stream(prompt, max_tokens=max_tokens, sampling=params, raw=raw)
        return self.model.generate(prompt, max_tokens=max_tokens, sampling=params, raw=raw)

    # --- async --------------------------------------------------------------------------

    async def achat(self, messages: Sequence[dict[str, Any]], *, max_tokens: int = 256, **sampling: Any) -> Completion:
        """`chat` for async code: the whole reply."""
        return await asyncio.to_thread(self._run, list(messages), False, False, max_tokens, sampling)  # type: ignore[return-value]

    async def acomplete(self, prompt: str, *, max_tokens: int = 256, **sampling: Any) -> Completion:
        """`complete` for async code: the whole continuation."""
        return await asyncio.to_thread(self._run, prompt, True, False, max_tokens, sampling)  # type: ignore[return-value]

    def astream_chat(self, messages: Sequence[dict[str, Any]], *, max_tokens: int = 256, **sampling: Any) -> AsyncIterator[str]:
        """Text pieces of the reply as they are generated, for `async for`."""
        return self._astream(list(messages), False, max_tokens, sampling)

    def astream_complete(self, prompt: str, *, max_tokens: int = 256, **sampling: Any) -> AsyncIterator[str]:
        """Text pieces of the continuation as they are generated, for `async for`."""
        return self._astream(prompt, True, max_tokens, sampling)

    async def _astream(self, prompt: Prompt, raw: bool, max_tokens: int, sampling: dict[str, Any]) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        params = SamplingParams(**sampling)

        def produce() -> None:
            # The generation runs, and is closed (its session freed), on this one thread.
            gen = self.model.stream(prompt, max_tokens=max_tokens, sampling=params, raw=raw)
            try:
                for piece in gen:
                    if stop.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, piece)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                gen.close()
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        worker = loop.run_in_executor(None, produce)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            stop.set()  # the consumer left early: the producer stops at the next token
            await asyncio.shield(worker)

    # --- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Leaves the mesh (or frees the local model's resources)."""
        self.model.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(model: str | os.PathLike[str], bootstrap: str | Sequence[str] | None = None, **kwargs: Any) -> Client:
    """A client for `model`: its layers on the mesh joined through `bootstrap` (see
    `meshpy.mesh.connect` for the keyword arguments), or, without one, in this process (see
    `Model.load`)."""
    if bootstrap is None:
        return Client(Model.load(model, **kwargs))
    from meshpy.mesh import connect as connect_mesh

    return Client(connect_mesh(model, bootstrap, **kwargs))
