"""Serving logic: one request's generation on the model's scheduler, its text fed to the
event loop.

Generation runs on the scheduler's threads (`meshpy.scheduler`), every request's tokens in
the same iterations; this request's tokens come to its `GenerationJob` there, are decoded to
text and cut at stop strings, and reach the event loop as events on an asyncio queue, which
is all the loop ever awaits. A request that goes away cancels its ticket: the scheduler drops
it before its next iteration and frees its session (its KV caches on every worker, for a mesh).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshpy.generation import GenerationStats, Model
from meshpy.sampling import SamplingParams, TokenLogprob
from meshpy.scheduler import Ticket
from meshpy.tokenizer import IncrementalDecoder
from meshpy.tools import ToolCall, ToolUse

if TYPE_CHECKING:
    from meshpy.constraint import Grammar
    from meshpy.metrics import ServerMetrics

__all__ = ["StopText", "ScoredToken", "Delta", "Finished", "Failed", "Event", "Outbox", "GenerationJob"]

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
class ScoredToken:
    """A token of the text, with the text it added and its log-probability under the model
    (None for a prompt's first token, which nothing predicts)."""

    token: int
    piece: str
    logprob: TokenLogprob | None


@dataclass(frozen=True)
class Delta:
    """New text of the reply, and the tokens it came from when log-probabilities were asked
    for (a token whose text is held back, a character split over tokens or the start of a
    stop string, comes with the text it completes)."""

    text: str
    tokens: tuple[ScoredToken, ...] = ()
    #: Tool calls completed with this text (see `meshpy.tools`).
    calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The generation ended: why (`stop`, `length`), and the token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    #: Prompt tokens a kept session held (not prefilled again; `meshpy.prompt_cache`).
    cached_tokens: int = 0


@dataclass(frozen=True)
class Failed:
    """The generation raised; the exception, to be answered to the client."""

    error: BaseException


Event = Delta | Finished | Failed


class Outbox:
    """Carries events from scheduler threads to one event loop, waking the loop once per
    burst: the tokens one scheduler iteration gives all its streams cost the loop one
    wake-up, not one each (on two cores the loop competes with the compute threads)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[Callable[[Any], object], Any]] = []

    def post(self, deliver: Callable[[Any], object], item: Any) -> None:
        """Calls `deliver(item)` on the loop soon (in order with other posts)."""
        with self._lock:
            self._pending.append((deliver, item))
            if len(self._pending) > 1:  # a wake-up is on its way already
                return
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass

    def _drain(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for deliver, item in pending:
            try:
                deliver(item)
            except Exception:  # one failing delivery must not drop the others' events
                log.exception("delivering a generation event")


class GenerationJob:
    """One request's generation on the model's scheduler.

    Events arrive in order: any number of `Delta`, then one `Finished` or `Failed`. `cancel`
    may be called from any thread at any time; the generation stops before its next token
    and frees its session.
    """

    def __init__(
        self,
        model: Model,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str] = (),
        *,
        logprobs: int | None = None,
        echo: bool = False,
        tools: ToolUse | None = None,
        constraint: Grammar | None = None,
        on_done: Callable[[GenerationJob], object] | None = None,
        outbox: Outbox | None = None,
        metrics: ServerMetrics | None = None,
        index: int = 0,
        events: asyncio.Queue[tuple[int, Event]] | None = None,
    ) -> None:
        self.model = model
        self.prompt_ids = list(prompt_ids)
        self.max_tokens = max_tokens
        self.sampling = sampling
        self.stop = tuple(stop)
        #: Alternatives listed per token; None: no log-probabilities.
        self.logprobs = logprobs
        #: Whether the first `Delta` is the prompt (with its tokens' log-probabilities, when
        #: asked for): the completions endpoint's `echo`.
        self.echo = echo
        #: True once the generation stopped early because of `cancel`.
        self.cancelled = False
        self.stats = GenerationStats(prompt_tokens=len(self.prompt_ids))
        self._on_done = on_done
        self._outbox = outbox
        #: The choice this is of the request (the API's `n`); events go out tagged with it, to
        #: a queue the request's choices may share.
        self.index = index
        self._events: asyncio.Queue[tuple[int, Event]] = events if events is not None else asyncio.Queue()
        self._decoder = IncrementalDecoder(model.tokenizer)
        self._stops = StopText(self.stop)
        self._scored: list[ScoredToken] = []  # tokens whose text has not been emitted yet
        self._prompt_decoder = IncrementalDecoder(model.tokenizer) if echo else None
        #: The grammar the tokens must follow (`meshpy.constraint`), or None.
        self.constraint = constraint
        #: Reads tool calls out of the text, in the model's format (None: no tools offered).
        self._tools = tools.parser() if tools is not None else None
        self._one_call = tools is not None and not tools.parallel  # `parallel_tool_calls: false`
        self._calls_sent = 0
        self._ticket: Ticket | None = None
        self._metrics = metrics
        #: When the generation was submitted, and when its last token came (perf_counter).
        self._started = self._last_token = 0.0

    def start(self, followers: Sequence[GenerationJob] = ()) -> GenerationJob:
        """Submits the generation, and `followers` (other choices of the same prompt, which
        share its prefill); call from the event loop that will read the events."""
        if self._outbox is None:
            self._outbox = Outbox(asyncio.get_running_loop())
        self._started = time.perf_counter()
        self._ticket = self.model.submit(self.prompt_ids, self.max_tokens, self.sampling, self, self.stats,
                                         logprobs=self.logprobs, prompt_logprobs=self.echo,
                                         followers=[(f.sampling, f, f.stats) for f in followers],
                                         constraint=self.constraint)
        for job, ticket in zip(followers, self._ticket.group[1:]):
            job._outbox, job._started, job._ticket = self._outbox, self._started, ticket
        return self

    def cancel(self) -> None:
        """Asks the generation to stop (a no-op once it has ended)."""
        if self._ticket is not None:
            self._ticket.cancel()

    async def next_event(self) -> tuple[int, Event]:
        """The next event on this job's queue (its choice index and the event), waiting for it
        without blocking the loop."""
        return await self._events.get()

    def join(self, timeout: float | None = None) -> bool:
        """Waits for the generation to end and its session to close; True if it has."""
        return self._ticket is None or self._ticket.wait(timeout)

    # --- on a scheduler thread (the TokenSink) -----------------------------------------

    def _emit(self, event: Event) -> None:
        assert self._outbox is not None
        self._outbox.post(self._events.put_nowait, (self.index, event))

    def prompt(self, logprobs: list[TokenLogprob | None]) -> None:
        decoder = self._prompt_decoder
        assert decoder is not None
        for logprob in logprobs:
            token = self.prompt_ids[len(self._scored)]
            self._scored.append(ScoredToken(token, decoder.add(token), logprob))
        if len(self._scored) == len(self.prompt_ids):  # the whole prompt: echo it
            last = self._scored[-1]
            self._scored[-1] = ScoredToken(last.token, last.piece + decoder.flush(), last.logprob)
            text = "".join(t.piece for t in self._scored)
            tokens = tuple(self._scored) if self.logprobs is not None else ()
            self._scored = []
            self._emit(Delta(text, tokens))

    def _emit_text(self, text: str, force: bool = False, last: bool = False) -> None:
        """Emits `text` (what of it is not a tool call, and the calls completed) with the
        tokens scored since the last emission (only those, with `force`, when there is no
        text); `last`: the reply has ended."""
        calls: list[ToolCall] = []
        if self._tools is not None:
            text, calls = self._tools.feed(text)
            if last:
                rest, more = self._tools.finish()
                text, calls = text + rest, calls + more
            if self._one_call:  # only the first call counts
                calls = calls[: max(0, 1 - self._calls_sent)]
            self._calls_sent += len(calls)
        if not text and not calls and not (force and self._scored):
            return
        tokens = tuple(self._scored) if self.logprobs is not None else ()
        self._scored = []
        self._emit(Delta(text, tokens, tuple(calls)))

    def token(self, token: int, logprob: TokenLogprob | None) -> bool:
        if self._metrics is not None:
            now = time.perf_counter()
            if self._last_token:
                self._metrics.next_token(now - self._last_token)
            else:
                self._metrics.first_token(now - self._started)
            self._last_token = now
        piece = self._decoder.add(token)
        if self.logprobs is not None:
            self._scored.append(ScoredToken(token, piece, logprob))
        self._emit_text(self._stops.add(piece), force=self._stops.stopped)
        return not self._stops.stopped

    def end(self, finish_reason: str | None, error: BaseException | None) -> None:
        event: Event = Failed(RuntimeError("the generation's end could not be reported"))
        try:
            if error is not None:
                event = Failed(error)
            else:
                if finish_reason == "cancelled":  # the client went away, or the server stops
                    self.cancelled = True
                    log.info("generation cancelled after %d tokens", self.stats.completion_tokens)
                elif not self._stops.stopped:
                    tail = self._decoder.flush()
                    if tail and self._scored:  # the last token's text, completed
                        last = self._scored[-1]
                        self._scored[-1] = ScoredToken(last.token, last.piece + tail, last.logprob)
                    self._emit_text(self._stops.add(tail) + self._stops.flush(), force=True, last=True)
                elif self._tools is not None:
                    self._emit_text("", force=True, last=True)
                # OpenAI's reasons are `stop` and `length` (a cancelled one ended by its
                # limit), and `tool_calls` when the reply called tools.
                reason = "stop" if self._stops.stopped or finish_reason == "stop" else "length"
                if self._tools is not None and self._tools.calls:
                    reason = "tool_calls"
                event = Finished(reason, self.stats.prompt_tokens, self.stats.completion_tokens,
                                 self.stats.cached_tokens)
        finally:  # whatever happened above, the request hears of its end
            self._emit(event)

    def closed(self) -> None:
        # The slot frees once the session is closed, so the server's limit on running
        # generations also bounds the sessions its workers hold.
        if self._on_done is not None:
            assert self._outbox is not None
            self._outbox.post(self._on_done, self)
