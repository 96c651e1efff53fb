"""Prompt caching: a generation that ends leaves its session (its KV caches, here or on every
worker of its route) to the next prompt that starts the same way.

When a generation ends, its session is kept with the tokens its caches hold (the prompt and
the reply so far) instead of being closed. A new prompt takes the kept session that shares the
longest prefix with it, the session is cut back to that prefix (`rewind`: on a mesh each worker
cuts its cache when the next step starts earlier, the span protocol's retry rule), and only
the rest of the prompt is prefilled. A repeated system prompt, or a chat whose history grows a
turn at a time, is then prefilled once. The session is taken, not copied: two prompts running
at once with the same prefix each need a kept session, and each leaves one when it ends.

Memory is bounded: at most `max_sessions` kept sessions holding `max_positions` positions
between them, the least recently used closed first, and none kept longer than `max_idle`
seconds (a worker expires idle sessions itself after 300 s by default; a session the End node
still counted would be rebuilt from its kept inputs, which is correct but slow).

Layers with a sliding window keep only the last positions of a session, so a kept session can
rarely be cut back far; models with such layers do not cache prompts (`supports`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from meshpy.models.config import ModelConfig

__all__ = ["PromptCache", "MIN_REUSED_TOKENS"]

log = logging.getLogger(__name__)

#: Fewest prompt tokens worth taking a kept session for (each use uses the session up).
MIN_REUSED_TOKENS = 8
#: Defaults: kept sessions, positions they hold between them, seconds one may sit unused.
DEFAULT_MAX_SESSIONS = 8
DEFAULT_MAX_POSITIONS = 32_768
DEFAULT_MAX_IDLE = 120.0


@dataclass(eq=False)  # kept sessions are told apart by identity
class _Kept:
    tokens: np.ndarray  # the token ids the session's caches hold, in order
    session: Any
    last_used: float = field(default_factory=time.monotonic)


class PromptCache:
    """Sessions of ended generations, kept for prompts that start the same way."""

    def __init__(self, pipeline: Any, *, max_sessions: int = DEFAULT_MAX_SESSIONS,
                 max_positions: int = DEFAULT_MAX_POSITIONS, max_idle: float = DEFAULT_MAX_IDLE) -> None:
        self.pipeline = pipeline
        self.max_sessions = max_sessions
        self.max_positions = max_positions
        self.max_idle = max_idle
        self._kept: list[_Kept] = []  # least recently used first
        self._lock = threading.Lock()
        self._closed = False  # after `close`, sessions are closed, not kept
        # Closes idle sessions while nothing else happens (started with the first one kept).
        self._sweeper: threading.Thread | None = None
        self._stop = threading.Event()
        #: Prompts that reused a kept session, and the prompt tokens that were not prefilled.
        self.hits = 0
        self.reused_tokens = 0

    @staticmethod
    def supports(config: ModelConfig) -> bool:
        """Whether a model's sessions can be cut back to any prefix (no sliding-window layer)."""
        return not any(config.layer_sliding)

    def take(self, prompt: Sequence[int]) -> tuple[Any, int] | None:
        """The kept session sharing the longest prefix with `prompt` (at least
        `MIN_REUSED_TOKENS`, and never the whole prompt: its last token must run to give the
        first token's logits), cut back to that prefix, and the prefix's length; None when
        no kept session shares enough."""
        ids = np.asarray(prompt, dtype=np.int64)
        limit = len(ids) - 1
        with self._lock:
            stale = self._expired()
            best, best_len = None, 0
            for kept in self._kept:
                n = min(limit, len(kept.tokens))
                same = kept.tokens[:n] == ids[:n]
                shared = n if same.all() else int(np.argmin(same))
                if shared > best_len:
                    best, best_len = kept, shared
            if best is not None and best_len >= MIN_REUSED_TOKENS:
                self._kept.remove(best)
            else:
                best = None
        self._close(stale)
        if best is None:
            return None
        try:
            self.pipeline.rewind(best.session, best_len)
        except Exception as e:  # noqa: BLE001 - this session cannot be cut back: not reused
            log.info("a kept session could not be cut back to %d positions (%s); prefilling the whole prompt", best_len, e)
            self._close([best])
            return None
        with self._lock:
            self.hits += 1
            self.reused_tokens += best_len
        return best.session, best_len

    def put(self, tokens: Sequence[int], session: Any) -> None:
        """Keeps an ended generation's session, whose caches hold `tokens` (its first
        `session.n_positions` of them; a session holding nothing is closed), evicting the
        least recently used beyond the bounds."""
        held = session.n_positions
        if held > len(tokens):  # positions past the tokens handed out (a draft cut by a stop)
            try:
                self.pipeline.rewind(session, len(tokens))
            except Exception:  # noqa: BLE001 - then it is not kept
                held = 0
            else:
                held = len(tokens)
        if held < MIN_REUSED_TOKENS or held > self.max_positions:
            self._close([_Kept(np.zeros(0, np.int64), session)])
            return
        kept = _Kept(np.asarray(tokens[:held], dtype=np.int64), session)
        with self._lock:
            if self._closed:
                evicted = [kept]
            else:
                self._kept.append(kept)
                if self._sweeper is None:
                    self._sweeper = threading.Thread(target=self._sweep, name="meshpy-prompt-cache", daemon=True)
                    self._sweeper.start()
                evicted = self._expired()
            while len(self._kept) > self.max_sessions or sum(len(k.tokens) for k in self._kept) > self.max_positions:
                evicted.append(self._kept.pop(0))
        self._close(evicted)

    def clear(self) -> bool:
        """Closes every kept session; True if there was one."""
        with self._lock:
            kept, self._kept = self._kept, []
        self._close(kept)
        return bool(kept)

    def close(self) -> None:
        """Closes every kept session, and those put from now on (the model is closing)."""
        with self._lock:
            self._closed = True
        self._stop.set()
        self.clear()

    def _sweep(self) -> None:
        """Closes sessions idle past `max_idle`, checking every quarter of it (at most a
        minute apart), until the cache is closed."""
        while not self._stop.wait(min(max(self.max_idle / 4, 0.05), 60.0)):
            with self._lock:
                stale = self._expired()
            self._close(stale)

    @property
    def sessions(self) -> int:
        """Sessions kept now."""
        return len(self._kept)

    def _expired(self) -> list[_Kept]:
        """Takes out the sessions unused for longer than `max_idle` (under the lock)."""
        now = time.monotonic()
        stale = [k for k in self._kept if now - k.last_used > self.max_idle]
        if stale:
            self._kept = [k for k in self._kept if now - k.last_used <= self.max_idle]
        return stale

    def _close(self, kept: list[_Kept]) -> None:
        for k in kept:
            try:
                self.pipeline.close_session(k.session)
            except Exception:  # noqa: BLE001 - the workers' idle expiry is the net
                log.exception("closing a kept session")
