"""Serving logic: one request's generation on a thread of its own, its text fed to the
event loop.

Generation is blocking work (the Rust forward pass, or network round trips to the mesh;
both release the GIL), so each request runs `Model.generate_ids` on its own thread and
hands text deltas to an asyncio queue; the event loop only ever awaits that queue. A
request that goes away sets a cancel flag that the thread checks between tokens; the
thread then closes the token generator itself, which frees the session (its KV caches on
every worker, for a mesh) on the thread that ran it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meshpy.generation import GenerationStats, Model
from meshpy.sampling import SamplingParams
from meshpy.tokenizer import IncrementalDecoder

__all__ = ["StopText", "Delta", "Finished", "Failed", "Event", "GenerationJob"]

log = logging.getLogger(__name__)


class StopText:
    """Cuts generated text before the first stop string.

    Text is released as soon as it cannot be the start of a stop string; a tail that could
    be is held back until the next piece tells (or `flush`), so the stop string itself is
    never emitted, however the tokens split it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._pending = ""

    def add(self, piece: str) -> str:
        """Takes the next piece of text; returns what may be emitted now."""
        if self.stopped:
            return ""
        text = self._pending + piece
        if not self.stops:
            self._pending = ""
            return text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._pending = ""
            return text[: min(hits)]
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """The held-back tail, once no more text will come."""
        text, self._pending = self._pending, ""
        return "" if self.stopped else text


@dataclass(frozen=True)
class Delta:
    """New text of the reply."""

    text: str


@dataclass(frozen=True)
class Finished:
    """The generation ended: why (`stop`, `length`), and the token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    """The generation raised; the exception, to be answered to the client."""

    error: BaseException


Event = Delta | Finished | Failed


class GenerationJob:
    """One request's generation, run on its own thread.

    Events arrive in order: any number of `Delta`, then one `Finished` or `Failed`. `cancel`
    may be called from any thread at any time; the generation stops after the token in
    progress and frees its session.
    """

    def __init__(
        self,
        model: Model,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str] = (),
        *,
        on_done: Callable[[GenerationJob], object] | None = None,
    ) -> None:
        self.model = model
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stop = tuple(stop)
        #: True once the thread stopped early because of `cancel`.
        self.cancelled = False
        self._cancel = threading.Event()
        self._on_done = on_done
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._thread = threading.Thread(target=self._run, name="meshpy-generation", daemon=True)

    def start(self) -> GenerationJob:
        """Starts the thread; call from the event loop that will read the events."""
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Asks the generation to stop (a no-op once it has ended)."""
        self._cancel.set()

    async def next_event(self) -> Event:
        """The next event, waiting for it without blocking the loop."""
        return await self._events.get()

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the thread to end; True if it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # --- on the generation thread -------------------------------------------------------

    def _emit(self, event: Event) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _run(self) -> None:
        stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        tokens = self.model.generate_ids(self.prompt_ids, self.max_tokens, self.sampling, stats=stats)
        decoder = IncrementalDecoder(self.model.tokenizer)
        stops = StopText(self.stop)
        event: Event
        try:
            for token in tokens:
                if self._cancel.is_set():
                    self.cancelled = True
                    break
                text = stops.add(decoder.add(token))
                if text:
                    self._emit(Delta(text))
                if stops.stopped:
                    break
            else:
                text = stops.add(decoder.flush())
                text += stops.flush()
                if text:
                    self._emit(Delta(text))
            reason = "stop" if stops.stopped else (stats.finish_reason or "length")
            event = Finished(reason, stats.prompt_tokens, stats.completion_tokens)
        except Exception as e:  # answered to the client by the route
            event = Failed(e)
        finally:
            # Frees the session here, on the thread that ran the generator (a no-op if the
            # generator ran to its end or never started).
            try:
                tokens.close()
            except Exception:
                log.exception("closing a generation's session")
        if self.cancelled:
            log.info("generation cancelled after %d tokens", stats.completion_tokens)
        self._emit(event)
        if self._on_done is not None and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._on_done, self)
            except RuntimeError:
                pass
