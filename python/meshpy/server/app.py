"""The OpenAI-compatible HTTP app: routes, API key, error handler, lifespan.

`create_app` builds everything the app needs around a loaded `Model`; there is no module
state. Routes are thin: parse the request (`protocol`), run the generation on its own
thread (`engine`), and answer JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from meshpy import _native
from meshpy.errors import MeshpyError
from meshpy.generation import Model
from meshpy.metrics import RequestCounter, ServerMetrics
from meshpy.server import protocol
from meshpy.server.coverage import Coverage
from meshpy.server.dashboard import dashboard_routes
from meshpy.server.engine import Delta, Failed, Finished, GenerationJob, Outbox, ScoredToken
from meshpy.server.errors import APIError, api_error, invalid
from meshpy.server.protocol import ChatRequest, CompletionRequest, Options
from meshpy.tokenizer import Tokenizer
from meshpy.constraint import ConstraintError, Grammar
from meshpy.tools import ToolCall, ToolFormat, ToolUse

__all__ = ["create_app", "ServerState"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Largest request body accepted (a long prompt is well under this).
MAX_BODY_BYTES = 16 << 20
#: Seconds the app waits, at shutdown, for cancelled generations to free their sessions.
SHUTDOWN_JOIN_TIMEOUT = 30.0
#: Generations run at once, and requests waiting for one of those slots, by default.
DEFAULT_MAX_CONCURRENT = 16
DEFAULT_MAX_WAITING = 64


class ServerState:
    """What the app serves and what is running: the model, its name, the live generations."""

    def __init__(
        self,
        model: Model,
        model_name: str,
        api_key: str | None,
        coverage: Coverage | None,
        default_max_tokens: int | None,
        max_concurrent: int = DEFAULT_MAX_CONCURRENT,
        max_waiting: int = DEFAULT_MAX_WAITING,
    ) -> None:
        if max_concurrent < 1 or max_waiting < 0:
            raise ValueError(f"max_concurrent must be >= 1 and max_waiting >= 0, got {max_concurrent}, {max_waiting}")
        self.model = model
        self.model_name = model_name
        self.api_key = api_key
        self.coverage = coverage
        self.default_max_tokens = default_max_tokens
        self.max_concurrent = max_concurrent
        self.max_waiting = max_waiting
        self.created = int(time.time())
        self.jobs: set[GenerationJob] = set()
        self.waiting = 0
        # Free generation slots, and the lock a request holds while it takes its slots; made on
        # first use, inside the app's event loop.
        self._slots: asyncio.Semaphore | None = None
        self._admitting: asyncio.Lock | None = None
        # Events from the scheduler's threads to the app's event loop; made on first use.
        self._outbox: Outbox | None = None
        self.completed = 0
        self.cancelled = 0
        self.refused_busy = 0
        #: The client node when the layers run on a mesh (for metrics and the dashboard).
        self.node: _native.Node | None = getattr(model.pipeline, "node", None)
        recovery = getattr(model.pipeline, "recovery", None)
        cache = model.prompt_cache
        self.metrics = ServerMetrics(lambda: len(self.jobs), lambda: self.waiting, self.node,
                                     (lambda: dict(recovery)) if recovery is not None else None,
                                     (lambda: cache.sessions) if cache is not None else None)

    def check_key(self, request: Request) -> None:
        """401 unless the request carries the API key (when one is set)."""
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        """404 for a model this server does not serve."""
        if name != self.model_name:
            raise APIError(
                404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model", code="model_not_found",
            )

    def tool_format(self, options: Options) -> ToolFormat | None:
        """The format the model writes tool calls in, when the request offers tools (and does
        not say "none"); 400 when the model's chat template does not render tools."""
        if not options.tools or options.tool_choice == "none":
            return None
        fmt = ToolFormat.for_template(self.model.end.chat_template)
        if fmt is None:
            raise invalid("this model's chat template does not render tools, so the model cannot be offered any",
                          "tools", "unsupported_value")
        return fmt

    def offered_tools(self, options: Options) -> list[dict[str, Any]] | None:
        """The tools the chat template renders: none with `tool_choice` "none"."""
        return options.tools if options.tools and options.tool_choice != "none" else None

    def constraint(self, options: Options) -> Grammar | None:
        """The grammar the request's tokens must follow: a call of the tools `tool_choice`
        forces, or its `response_format`'s JSON; None when free. 400 for a format or schema
        that does not compile. Blocking (the first grammar for a tokenizer takes a while)."""
        fmt = self.tool_format(options)
        forced = options.tool_choice if fmt is not None and options.tool_choice not in ("auto", "none") else None
        if forced is not None and options.response_format is not None:
            raise invalid("'response_format' cannot be combined with a forced tool call ('tool_choice')",
                          "response_format", "invalid_value")
        try:
            if forced is not None:
                assert fmt is not None and options.tools is not None
                tools = [t for t in options.tools if forced == "required" or t["function"]["name"] == forced]
                return Grammar.from_lark(fmt.grammar(tools), self.model.tokenizer)
            if options.response_format is not None:
                return Grammar.from_response_format(options.response_format, self.model.tokenizer)
        except ConstraintError as e:
            raise invalid(str(e), "tools" if forced is not None else "response_format", "invalid_value") from None
        return None

    def prepare(self, prompt: str | Sequence[Any], raw: bool, options: Options) -> tuple[list[int], int, Grammar | None]:
        """`prompt_ids` and the request's `constraint`. Blocking: run it on a thread."""
        ids, max_tokens = self.prompt_ids(prompt, raw, options)
        return ids, max_tokens, self.constraint(options)

    def prompt_ids(self, prompt: str | Sequence[Any], raw: bool, options: Options) -> tuple[list[int], int]:
        """The prompt's token ids (chat messages, text, or token ids) and the completion
        token limit; 400 when they do not fit the context. Blocking (chat template,
        tokenizer): run it on a thread."""
        model = self.model
        param = "prompt" if raw else "messages"
        limit = model.config.max_positions
        self.tool_format(options)  # a model that cannot be offered tools: 400 before anything runs
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            vocab = model.tokenizer.vocab_size
            bad = next((t for t in prompt if t >= vocab), None)
            if bad is not None:
                raise invalid(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt", "invalid_value")
            ids = list(prompt)
        else:
            ids = model.encode(prompt, raw=raw, tools=self.offered_tools(options))  # type: ignore[arg-type]
        if not ids:
            raise invalid("the prompt is empty", param, "invalid_value")
        if len(ids) >= limit:
            raise invalid(f"the prompt has {len(ids)} tokens; this model's context holds {limit}", param,
                          "context_length_exceeded")
        room = limit - len(ids)
        if options.max_tokens is not None and options.max_tokens > room:
            raise invalid(
                f"this model's context holds {limit} tokens; the request asks for "
                f"{len(ids) + options.max_tokens} ({len(ids)} in the prompt, {options.max_tokens} to complete)",
                "max_tokens", "context_length_exceeded",
            )
        max_tokens = options.max_tokens if options.max_tokens is not None else min(self.default_max_tokens or room, room)
        return ids, max_tokens

    async def admit(self, n: int = 1) -> None:
        """Takes a slot for each of a request's `n` generations: at once if that many are
        free, else after waiting in line (first come, first served) with at most
        `max_waiting` others; a request beyond that is refused with 429 (which OpenAI clients
        retry after a pause). Each generation holds the CPU and a KV cache on every worker, so
        running more at once only slows every one of them; the wait is what a slot costs.
        One request takes its slots at a time, so two never each hold part of what they need."""
        if n > self.max_concurrent:
            raise invalid(f"'n' is {n}; this server runs at most {self.max_concurrent} generations at once", "n",
                          "invalid_value")
        if self._slots is None or self._admitting is None:
            self._slots, self._admitting = asyncio.Semaphore(self.max_concurrent), asyncio.Lock()
        if (self._slots.locked() or self._admitting.locked()) and self.waiting >= self.max_waiting:
            self.refused_busy += 1
            raise APIError(
                429, f"the server is busy: {len(self.jobs)} generations running and {self.waiting} waiting "
                "(its limits); retry later", "rate_limit_error", code="server_busy",
            )
        self.waiting += 1
        taken = 0
        try:
            async with self._admitting:
                while taken < n:
                    await self._slots.acquire()
                    taken += 1
        except BaseException:
            for _ in range(taken):
                self._slots.release()
            raise
        finally:
            self.waiting -= 1

    def start(self, ids: list[int], max_tokens: int, options: Options,
              constraint: Grammar | None = None) -> list[GenerationJob]:
        """Starts a request's generations (its `n` choices, sharing the prompt's prefill) on the
        model's scheduler, in the slots `admit` took (one each); they are tracked until each
        ends. Their events share the first one's queue."""
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:  # the app served on another loop
            self._outbox = Outbox(loop)
        events: asyncio.Queue[Any] = asyncio.Queue()
        fmt = self.tool_format(options)
        tools = None
        if fmt is not None and options.tools is not None:
            tools = ToolUse(fmt, frozenset(t["function"]["name"] for t in options.tools), options.parallel_tool_calls)
        jobs = [GenerationJob(self.model, ids, max_tokens, options.choice_sampling(i), options.stop,
                              logprobs=options.logprobs, echo=options.echo, tools=tools, constraint=constraint,
                              on_done=self._done, outbox=self._outbox, metrics=self.metrics, index=i, events=events)
                for i in range(options.n)]
        jobs[0].start(jobs[1:])  # may raise (the model closing): then none is tracked
        self.jobs.update(jobs)
        return jobs

    def release_unused_slots(self, n: int) -> None:
        """Gives back the slots `admit` took for generations that never started."""
        if self._slots is not None:
            for _ in range(n):
                self._slots.release()

    def _done(self, job: GenerationJob) -> None:
        self.jobs.discard(job)
        if self._slots is not None:
            self._slots.release()
        if job.cancelled:
            self.cancelled += 1
        else:
            self.completed += 1
        # A request's choices share its prompt: counted once, with the first.
        first = job.index == 0
        self.metrics.ended("cancelled" if job.cancelled else "completed", job.stats.prompt_tokens if first else 0,
                           job.stats.cached_tokens if first else 0)

    async def shutdown(self) -> None:
        """Cancels every generation and waits (off the loop) for their sessions to close."""
        jobs = list(self.jobs)
        for job in jobs:
            job.cancel()
        for job in jobs:
            if not await run_in_threadpool(job.join, SHUTDOWN_JOIN_TIMEOUT):
                log.warning("a generation did not stop within %.0f s", SHUTDOWN_JOIN_TIMEOUT)


# --- disconnects -------------------------------------------------------------------------


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """`(True, result)` of `work`, or `(False, None)` if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return True, task.result()
    return False, None


class _GenerationStream(StreamingResponse):
    """Server-sent events of one generation; however the response ends (finished, client
    gone, server stopping) the generation is cancelled."""

    def __init__(self, events: AsyncIterator[bytes], jobs: list[GenerationJob]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.jobs = jobs

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.jobs:
                job.cancel()


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


# --- the two generating endpoints ---------------------------------------------------------


class _Shape:
    """How one endpoint words its answers: whole body and stream chunks, with the
    log-probabilities of their tokens when asked for."""

    def __init__(self, chat: bool, tokenizer: Tokenizer, logprobs: bool) -> None:
        self.chat = chat
        self.prefix = "chatcmpl" if chat else "cmpl"
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self._offsets: dict[int, int] = {}  # per choice, where its next token starts (`text_offset`)

    def scored(self, index: int, tokens: Sequence[ScoredToken]) -> dict[str, Any] | None:
        """The `logprobs` of choice `index`, or of a chunk of it, holding these tokens (None
        when not asked for); a stream's chunks are given their tokens in order."""
        if not self.logprobs:
            return None
        pairs = [(t.token, t.logprob) for t in tokens]
        if self.chat:
            return protocol.chat_logprobs(pairs, self.tokenizer)
        offsets, at = [], self._offsets.get(index, 0)
        for t in tokens:
            offsets.append(at)
            at += len(t.piece)
        self._offsets[index] = at
        return protocol.completion_logprobs(pairs, offsets, self.tokenizer)

    def body(self, id: str, model: str, choices: Sequence[tuple[str, str, Sequence[ScoredToken], Sequence[ToolCall]]],
             usage: dict[str, Any]) -> dict[str, Any]:
        """The whole answer; `choices`: each choice's text, finish reason, tokens and tool calls."""
        if self.chat:
            return protocol.chat_body(id, model, [
                protocol.chat_choice(i, text, finish, self.scored(i, tokens), [c.body() for c in calls])
                for i, (text, finish, tokens, calls) in enumerate(choices)], usage)
        return protocol.completion_body(id, model, [protocol.completion_choice(i, text, finish, self.scored(i, tokens))
                                                    for i, (text, finish, tokens, _) in enumerate(choices)], usage)

    def chunk(self, id: str, model: str, created: int, text: str | None, finish: str | None = None,
              usage: dict[str, Any] | None = None, *, with_usage: bool, first: bool = False,
              tokens: Sequence[ScoredToken] = (), index: int = 0, calls: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
        logprobs = self.scored(index, tokens) if tokens else None
        if not self.chat:
            return protocol.completion_chunk(id, model, created, text, finish, usage, with_usage=with_usage,
                                             logprobs=logprobs, index=index)
        delta: dict[str, Any] | None
        if text is None:
            delta = None
        elif first:
            delta = {"role": "assistant", "content": text, "refusal": None}
        else:
            delta = {"content": text} if finish is None else {}
            if calls:
                delta = {"content": text or None, "tool_calls": list(calls)}
        return protocol.chat_chunk(id, model, created, delta, finish, usage, with_usage=with_usage, logprobs=logprobs,
                                   index=index)


def _usage(ends: Sequence[Finished]) -> dict[str, Any]:
    """A request's usage: its prompt once (its choices share it), every choice's tokens."""
    return protocol.usage_body(ends[0].prompt_tokens, sum(e.completion_tokens for e in ends), ends[0].cached_tokens)


async def _generate(
    state: ServerState, request: Request, prompt: Any, raw: bool, options: Options, shape: _Shape
) -> Response:
    ids, max_tokens, constraint = await run_in_threadpool(state.prepare, prompt, raw, options)
    await state.admit(options.n)
    try:
        jobs = state.start(ids, max_tokens, options, constraint)
    except BaseException:
        state.release_unused_slots(options.n)
        raise
    handed_over = False
    try:
        if options.stream:
            response = await _stream(state, request, jobs, options, shape)
            handed_over = isinstance(response, _GenerationStream)
            return response
        return await _whole(state, request, jobs, shape)
    finally:
        if not handed_over:
            for job in jobs:
                job.cancel()


async def _whole(state: ServerState, request: Request, jobs: list[GenerationJob], shape: _Shape) -> Response:
    n = len(jobs)
    texts: list[list[str]] = [[] for _ in range(n)]
    tokens: list[list[ScoredToken]] = [[] for _ in range(n)]
    calls: list[list[ToolCall]] = [[] for _ in range(n)]
    ends: list[Finished | None] = [None] * n

    async def collect() -> None:
        while not all(ends):
            index, event = await jobs[0].next_event()
            if isinstance(event, Delta):
                texts[index].append(event.text)
                tokens[index].extend(event.tokens)
                calls[index].extend(event.calls)
            elif isinstance(event, Failed):
                raise api_error(event.error)
            else:
                ends[index] = event

    connected, _ = await _unless_disconnected(request, collect())
    if not connected:
        return Response(status_code=499)  # nobody reads it; the generations are cancelled
    done = [e for e in ends if e is not None]
    choices = [("".join(t), e.finish_reason, k, c) for t, e, k, c in zip(texts, done, tokens, calls)]
    return JSONResponse(shape.body(protocol.new_id(shape.prefix), state.model_name, choices, _usage(done)))


async def _stream(state: ServerState, request: Request, jobs: list[GenerationJob], options: Options,
                  shape: _Shape) -> Response:
    # The first event decides the status: a generation that fails before its first text (no
    # route, a worker refusing) is answered with an HTTP error, not a broken stream.
    connected, first = await _unless_disconnected(request, jobs[0].next_event())
    if not connected or first is None:
        return Response(status_code=499)
    if isinstance(first[1], Failed):
        raise api_error(first[1].error)
    id, created, model, with_usage = protocol.new_id(shape.prefix), int(time.time()), state.model_name, options.include_usage
    n = len(jobs)

    async def events() -> AsyncIterator[bytes]:
        index, event = first
        for i in range(n):  # each choice opens with the role
            yield _sse(shape.chunk(id, model, created, "", with_usage=with_usage, first=True, index=i))
        ends: list[Finished | None] = [None] * n
        n_calls = [0] * n  # tool calls each choice has streamed
        while True:
            if isinstance(event, Delta):
                calls = [c.body(index=n_calls[index] + k) for k, c in enumerate(event.calls)]
                n_calls[index] += len(calls)
                yield _sse(shape.chunk(id, model, created, event.text, with_usage=with_usage, tokens=event.tokens,
                                       index=index, calls=calls))
            elif isinstance(event, Finished):
                yield _sse(shape.chunk(id, model, created, "", event.finish_reason, with_usage=with_usage, index=index))
                ends[index] = event
                if all(ends):
                    if with_usage:
                        usage = _usage([e for e in ends if e is not None])
                        yield _sse(shape.chunk(id, model, created, None, usage=usage, with_usage=True))
                    break
            else:  # failed mid-stream: the status is sent already, so the error is an event
                yield _sse(api_error(event.error).body())
                break
            index, event = await jobs[0].next_event()
        yield _sse("[DONE]")

    return _GenerationStream(events(), jobs)


# --- routes ------------------------------------------------------------------------------


async def _json_body(request: Request) -> dict[str, Any]:
    """The body as a JSON object; 413 past MAX_BODY_BYTES."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB", code="request_too_large")
        chunks.append(chunk)
    return protocol.parse_json(b"".join(chunks))


def create_app(
    model: Model,
    model_name: str,
    api_key: str | None = None,
    coverage: Coverage | None = None,
    *,
    default_max_tokens: int | None = None,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_waiting: int = DEFAULT_MAX_WAITING,
) -> Starlette:
    """The OpenAI-compatible app serving `model` as `model_name`.

    `api_key`: required as `Authorization: Bearer KEY` on /v1 routes when set. `coverage`:
    a function describing which layers run where (see `layer_coverage`), reported by
    `/v1/models`. `default_max_tokens`: the limit for requests naming none (default: the
    rest of the context). `max_concurrent` generations run at once; up to `max_waiting`
    more requests wait for a slot, and others get 429 (see `ServerState.admit`). The app
    does not own the model: close it after the app stops.
    """
    state = ServerState(model, model_name, api_key, coverage, default_max_tokens, max_concurrent, max_waiting)

    async def health(request: Request) -> Response:
        return JSONResponse({
            "status": "ok",
            "model": state.model_name,
            "active_generations": len(state.jobs),
            "waiting_requests": state.waiting,
            "refused_busy": state.refused_busy,
            "completed_generations": state.completed,
            "cancelled_generations": state.cancelled,
        })

    async def models(request: Request) -> Response:
        state.check_key(request)
        if state.coverage is not None:
            layers = await run_in_threadpool(state.coverage)
        else:
            layers = {"n_layers": model.config.n_layers, "local": True, "missing_layers": []}
        entry = {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "meshpy",
                 "context_length": model.config.max_positions, "layers": layers}
        return JSONResponse({"object": "list", "data": [entry]})

    async def chat_completions(request: Request) -> Response:
        state.check_key(request)
        req = ChatRequest.parse(await _json_body(request))
        state.check_model(req.options.model)
        return await _generate(state, request, req.messages, False, req.options,
                               _Shape(True, model.tokenizer, req.options.logprobs is not None))

    async def completions(request: Request) -> Response:
        state.check_key(request)
        req = CompletionRequest.parse(await _json_body(request))
        state.check_model(req.options.model)
        return await _generate(state, request, req.prompt, True, req.options,
                               _Shape(False, model.tokenizer, req.options.logprobs is not None))

    async def tokenize(request: Request) -> Response:
        # llama-server's /tokenize: {"content", "add_special" (false), "with_pieces" (false)}.
        state.check_key(request)
        body = await _json_body(request)
        content = body.get("content")
        if not isinstance(content, str):
            raise APIError(400, "'content' must be a string", param="content")
        options = {k: body.get(k, default) for k, default in (("add_special", False), ("with_pieces", False), ("parse_special", True))}
        for name, value in options.items():
            if not isinstance(value, bool):
                raise APIError(400, f"'{name}' must be true or false", param=name)
        if not options["parse_special"]:
            raise APIError(400, "'parse_special': false is not supported (special tokens written in the text are "
                                "always matched)", param="parse_special")
        tokenizer = model.tokenizer
        ids = tokenizer.encode(content, add_special_tokens=options["add_special"])
        tokens = [{"id": i, "piece": tokenizer.decode([i])} for i in ids] if options["with_pieces"] else ids
        return JSONResponse({"tokens": tokens})

    async def detokenize(request: Request) -> Response:
        # llama-server's /detokenize: {"tokens": [ids]} -> {"content"}.
        state.check_key(request)
        ids = (await _json_body(request)).get("tokens")
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise APIError(400, "'tokens' must be a list of token ids", param="tokens")
        vocab = model.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise APIError(400, f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="tokens")
        return JSONResponse({"content": model.tokenizer.decode(ids)})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def on_error(request: Request, exc: Exception) -> Response:
        if isinstance(exc, HTTPException) and exc.status_code in (404, 405):
            error = APIError(exc.status_code, f"no route {request.method} {request.url.path}", code="unknown_url")
        else:
            error = api_error(exc)
        headers = {"www-authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log.info("serving %s", state.model_name)
        try:
            yield
        finally:
            await state.shutdown()

    handlers: dict[Any, Callable[..., Any]] = {APIError: on_error, HTTPException: on_error, MeshpyError: on_error,
                                               Exception: on_error}
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        *dashboard_routes(state),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers=handlers,
        lifespan=lifespan,
        middleware=[Middleware(RequestCounter, counter=state.metrics.requests, routes=tuple(r.path for r in routes))],
    )
    app.state.meshpy = state
    return app
