"""Generating text: prefill the prompt through the pipeline, then decode token by token.

`Model` is the single-process engine and the public entry point of the Python API:
`meshpy.load_model(path)` gives one, `model.generate(...)` returns the text with token
counts and timings, `model.stream(...)` yields text pieces as they are decoded. Generations
run on the model's scheduler (`meshpy.scheduler`), so calls from several threads share its
iterations; `prefill`, `step` and `logits_all` are the unscheduled building blocks.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from meshpy import _native
from meshpy.end_model import EndModel, Prompt
from meshpy.gpu import check_device
from meshpy.models.config import ModelConfig, read_config
from meshpy.models.packaged import PACKAGED_MODELS, resolve_packaged
from meshpy.models.source import ModelSource, open_model_source
from meshpy.pipeline import LocalPipeline, LocalSpan, Pipeline, split_layers
from meshpy.prompt_cache import PromptCache
from meshpy.sampling import Sampler, SamplingParams
from meshpy.scheduler import PREFILL_CHUNK, Scheduler, Ticket, TokenSink, on_scheduler_thread
from meshpy.speculation import DraftModel
from meshpy.tokenizer import IncrementalDecoder

__all__ = ["Model", "Completion", "GenerationStats", "Generation", "load_model", "default_threads"]

log = logging.getLogger(__name__)

def default_threads() -> int:
    """Compute threads to use: the CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class GenerationStats:
    """Token counts and timings of one generation."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    #: Tokens decoded after the first (with drafts, a pass may decode several).
    decode_steps: int = 0
    finish_reason: str | None = None
    #: Speculative decoding: tokens drafted for verification, and those the model kept.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    #: Prompt tokens whose caches a kept session gave (not prefilled; `meshpy.prompt_cache`).
    cached_tokens: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prompt tokens prefilled (those a kept session held are not) per second."""
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class Completion:
    """The result of `Model.generate`."""

    text: str
    token_ids: list[int]
    stats: GenerationStats = field(default_factory=GenerationStats)


class Generation:
    """An iterator of text pieces; `stats` and `token_ids` fill in as it runs."""

    def __init__(self, model: Model, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams) -> None:
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.token_ids: list[int] = []
        # A generator that does not refer back to this object: dropped unfinished, it is
        # closed (its session freed) at once, not whenever the cycle collector runs.
        self._pieces = _text_pieces(model, prompt_ids, max_tokens, sampling, self.stats, self.token_ids)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stops the generation early; its session's KV caches are freed (on the workers too)."""
        self._pieces.close()


def _text_pieces(model: Model, prompt_ids: list[int], max_tokens: int, sampling: SamplingParams,
                 stats: GenerationStats, token_ids: list[int]) -> Iterator[str]:
    decoder = IncrementalDecoder(model.end.tokenizer)
    for token in model.generate_ids(prompt_ids, max_tokens, sampling, stats=stats):
        token_ids.append(token)
        piece = decoder.add(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail


class Model:
    """A model: the End model here, its layers in this process (`Model.load`, as one span or
    several fed in turn) or on the mesh (`meshpy.mesh.connect`)."""

    def __init__(self, source: ModelSource, config: ModelConfig, end: EndModel, pipeline: Pipeline,
                 *, lanes: int | None = None) -> None:
        self.source = source
        self.config = config
        self.end = end
        self.pipeline = pipeline
        #: Runs every generation's iterations together (see `meshpy.scheduler`); `lanes`
        #: batches in flight at once, by default as many as the pipeline keeps busy.
        self.scheduler = Scheduler(self, pipeline.in_flight if lanes is None else lanes)
        #: Whether generations draft tokens (by prompt lookup, or `draft_model`) and verify
        #: them in one pass (`meshpy.speculation`): greedy output is the same tokens either
        #: way, sampled output the same distribution; seeded sampled generations draft only
        #: with a fixed `draft_length`, so a seed repeats. `submit` may override it.
        self.speculation = True
        #: Tokens drafted per lookup match; None chooses per generation from its acceptance
        #: rate and what an extra row costs (a fixed length also lets seeded sampled
        #: generations speculate, since their drafts then depend only on their tokens).
        self.draft_length: int | None = None
        #: Drafts from this small local model (`meshpy.speculation.DraftModel`, sharing the
        #: tokenizer) instead of prompt lookup; see `use_draft_model`.
        self.draft_model: DraftModel | None = None
        #: Sessions of ended generations kept for prompts that start the same way (None: every
        #: prompt is prefilled whole; models with sliding-window layers have none).
        self.prompt_cache: PromptCache | None = PromptCache(pipeline) if PromptCache.supports(config) else None
        if self.prompt_cache is not None and hasattr(pipeline, "make_room"):
            # A worker without room for a new session first gets back the kept ones.
            pipeline.make_room = self.prompt_cache.clear

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        quantize: str | None = None,
        n_spans: int = 1,
        progress: Callable[[int, int], object] | None = None,
        kv_dtype: str | None = None,
        device: str = "cpu",
    ) -> Model:
        """Loads a GGUF file or an HF checkpoint directory.

        `quantize` ("Q8_0" or "Q4_0") converts float weight matrices at load; `n_spans`
        cuts the layers into that many spans run one after another (as the mesh would);
        `progress(layers_loaded, n_layers)` is called as layers load; `kv_dtype` ("f16" or
        "f32") overrides how KV caches store keys and values (see `LocalSpan.kv_dtype`);
        `device` runs the layers with torch ("cuda", "cuda:N", "torch-cpu"; see `meshpy.gpu`).
        """
        check_device(device)
        source = open_model_source(model_path(path))
        config = read_config(source)
        pool = _native.ThreadPool(threads or default_threads())
        end = EndModel(source, config, pool, device)
        spans = []
        for layers in split_layers(config.n_layers, n_spans):
            report = None
            if progress is not None:
                report = lambda done, start=layers.start: progress(start + done, config.n_layers)  # noqa: E731
            spans.append(LocalSpan(source, config, layers, pool, quantize, report, kv_dtype, device))
        log.info("loaded %s: %d layers in %d span(s), %d threads, %s KV cache", source.path, config.n_layers, n_spans,
                 pool.n_threads, spans[0].kv_dtype)
        return cls(source, config, end, LocalPipeline(spans, config.max_positions))

    @property
    def tokenizer(self):  # noqa: ANN201 - the Tokenizer class
        """The model's tokenizer."""
        return self.end.tokenizer

    def encode(self, prompt: Prompt, *, raw: bool = False, tools: Sequence[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of a prompt (chat template applied, with `tools`, unless `raw`)."""
        return self.end.encode(prompt, raw=raw, tools=tools)

    def new_session(self) -> Any:
        """A fresh generation session (KV caches on every span)."""
        return self.pipeline.new_session()

    def close_session(self, session: Any) -> None:
        """Frees a session's KV caches (on the workers, for a mesh)."""
        self.pipeline.close_session(session)

    def keep_prompts(self, sessions: int) -> None:
        """Keeps up to `sessions` ended generations' sessions for the prompt cache (0: none,
        prompt caching off)."""
        if sessions <= 0:
            if self.prompt_cache is not None:
                self.prompt_cache.close()
            self.prompt_cache = None
        elif self.prompt_cache is not None:
            self.prompt_cache.max_sessions = sessions

    def reuse_session(self, prompt: Sequence[int]) -> tuple[Any, int] | None:
        """A kept session holding the start of `prompt`, cut back to it, and how many of its
        tokens it holds; None when the prompt cache has none (see `meshpy.prompt_cache`)."""
        return self.prompt_cache.take(prompt) if self.prompt_cache is not None else None

    def end_session(self, session: Any, tokens: Sequence[int], *, keep: bool = True) -> None:
        """An ended generation's session, whose caches hold `tokens`: kept in the prompt
        cache (with `keep`, when there is one), else closed."""
        if keep and self.prompt_cache is not None:
            self.prompt_cache.put(tokens, session)
        else:
            self.close_session(session)

    def close(self) -> None:
        """Stops its generations and releases what the model holds open (the mesh client's node)."""
        self.scheduler.close()
        if self.prompt_cache is not None:
            self.prompt_cache.close()
        close = getattr(self.pipeline, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefill(self, session: Any, ids: Sequence[int]) -> np.ndarray:
        """Runs prompt tokens through the model; returns the logits of the last one."""
        hidden = None
        for start in range(0, len(ids), PREFILL_CHUNK):
            hidden = self.pipeline.forward(session, self.end.embed(ids[start : start + PREFILL_CHUNK]))
        if hidden is None:
            raise ValueError("the prompt is empty")
        return self.end.logits(hidden[-1:])[0]

    def logits_all(self, ids: Sequence[int], session: Any = None) -> np.ndarray:
        """Next-token logits `(len(ids), vocab)` at every position (teacher forcing)."""
        own = session is None
        session = self.new_session() if own else session
        try:
            self.end.check_context(session.n_positions + len(ids))
            parts = [
                self.end.logits(self.pipeline.forward(session, self.end.embed(ids[start : start + PREFILL_CHUNK])))
                for start in range(0, len(ids), PREFILL_CHUNK)
            ]
        finally:
            if own:
                self.close_session(session)
        return np.concatenate(parts)

    def step(self, session: Any, token: int) -> np.ndarray:
        """Runs one token; returns the next-token logits."""
        return self.end.logits(self.pipeline.forward(session, self.end.embed([token])))[0]

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_tokens: int,
        sampling: SamplingParams | None = None,
        *,
        stats: GenerationStats | None = None,
        constraint: Any = None,
    ) -> Iterator[int]:
        """Yields generated token ids until an end-of-turn token or `max_tokens` (or, with
        `constraint`, a `meshpy.constraint.Grammar`, until its text is complete)."""
        stats = stats if stats is not None else GenerationStats(prompt_tokens=len(prompt_ids))
        self.end.check_context(len(prompt_ids))
        stats.finish_reason = "length"
        if max_tokens <= 0:
            return
        sink = _QueueSink()
        ticket = self.submit(prompt_ids, max_tokens, sampling or SamplingParams(), sink, stats, constraint=constraint)
        yielded = 0
        try:
            while (token := sink.tokens.get()) is not None:
                yielded += 1
                yield token
            if sink.error is not None:
                raise sink.error
            stats.finish_reason = sink.reason
        finally:
            # Also when the caller stops iterating early (the generator is closed): the
            # session is closed (on the workers too) before this returns. Not on a scheduler
            # thread (a generator the garbage collector finalizes there): it may be the one
            # that has to end this generation, so it only asks.
            ticket.cancel()
            if not on_scheduler_thread():
                ticket.wait()
                # The scheduler may have run ahead of a consumer that stopped early.
                stats.completion_tokens = min(stats.completion_tokens, yielded)

    def use_draft_model(self, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
        """Drafts tokens with the model at `path` (loaded in this process) instead of prompt
        lookup; refused unless it shares this model's tokenizer."""
        self.draft_model = DraftModel(Model.load(path, threads=threads), self)

    def submit(self, prompt_ids: Sequence[int], max_tokens: int, sampling: SamplingParams, sink: TokenSink,
               stats: GenerationStats, speculate: bool | None = None, *, logprobs: int | None = None,
               prompt_logprobs: bool = False,
               followers: Sequence[tuple[SamplingParams, TokenSink, GenerationStats]] = (),
               constraint: Any = None) -> Ticket:
        """Starts a generation of up to `max_tokens` (>= 1) tokens on the scheduler, cut to the
        context left after the prompt; its tokens go to `sink` (see `meshpy.scheduler`);
        `speculate` (default `self.speculation`) turns drafting on or off for it; `logprobs`
        (alternatives to list) reports each token's log-probability, `prompt_logprobs` the
        prompt's too (and allows `max_tokens` 0). Each of `followers` (sampling, sink, stats)
        is another generation of the prompt, sharing its prefill (the ticket's `group` holds
        all of them). `constraint` (a `meshpy.constraint.Grammar`) limits the tokens to what it
        allows. Raises ContextOverflowError when the prompt does not fit."""
        self.end.check_context(len(prompt_ids))
        budget = min(max_tokens, self.config.max_positions - len(prompt_ids))
        speculate = self.speculation if speculate is None else speculate
        return self.scheduler.submit(prompt_ids, budget, Sampler(sampling), self.end.tokenizer.stop_ids, sink, stats,
                                     speculate, self.draft_length, self.draft_model, logprobs, prompt_logprobs,
                                     [(Sampler(p), sink, st) for p, sink, st in followers], constraint)

    def stream(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 256,
        sampling: SamplingParams | None = None,
        raw: bool = False,
    ) -> Generation:
        """Text pieces as they are generated; the returned object's `stats` fill in."""
        return Generation(self, self.encode(prompt, raw=raw), max_tokens, sampling or SamplingParams())

    def generate(
        self,
        prompt: Prompt,
        *,
        max_tokens: int = 256,
        sampling: SamplingParams | None = None,
        raw: bool = False,
    ) -> Completion:
        """The whole reply, with token ids, counts and timings."""
        gen = self.stream(prompt, max_tokens=max_tokens, sampling=sampling, raw=raw)
        text = "".join(gen)
        return Completion(text=text, token_ids=gen.token_ids, stats=gen.stats)


class _QueueSink:
    """Hands a scheduled generation's tokens to the thread iterating `generate_ids`."""

    def __init__(self) -> None:
        self.tokens: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self.reason: str | None = None
        self.error: BaseException | None = None

    def token(self, token: int, logprob: object) -> bool:
        self.tokens.put(token)
        return True

    def end(self, finish_reason: str | None, error: BaseException | None) -> None:
        self.reason, self.error = finish_reason, error
        self.tokens.put(None)

    def closed(self) -> None:
        pass  # `generate_ids` waits on the ticket itself


def model_path(path: str | os.PathLike[str]) -> Path:
    """A checkpoint path; the path of a packaged model given by short name; or for a Hugging
    Face Hub repository (`org/repo`, `org/repo:Q4_K_M`), the store directory it is downloaded
    to (whole: this process runs every layer)."""
    p = Path(path)
    if not p.exists() and str(path) in PACKAGED_MODELS:
        return resolve_packaged(str(path))
    if not p.exists():
        from meshpy.mesh.hub import download_whole, hub_ref

        ref = hub_ref(path)
        if ref is not None:
            return download_whole(ref)
    return p


def load_model(path: str | os.PathLike[str], **kwargs: object) -> Model:
    """Loads a model for single-process generation (see `Model.load`)."""
    return Model.load(path, **kwargs)  # type: ignore[arg-type]
