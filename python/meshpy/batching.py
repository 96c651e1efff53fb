"""Decode steps of concurrent generations run together (issue 11).

Each generation still runs on its own thread (the server's, or the caller's), sampling and
stopping as before; only `Model.step`'s heavy part is shared. The first step to find the
model idle runs at once; steps arriving meanwhile queue, and when the running batch ends one
of their threads takes the whole queue as the next batch: one embedding lookup, one pass
through the layers with every session's cache (`forward_batch`), one product with the output
head. No timer, so a lone generation waits for nothing. Rows are independent in every
kernel, so each step's logits equal the step run alone, bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["StepBatcher"]


class _Step:
    __slots__ = ("session", "token", "logits", "error")

    def __init__(self, session: Any, token: int) -> None:
        self.session = session
        self.token = token
        self.logits: np.ndarray | None = None
        self.error: BaseException | None = None


class StepBatcher:
    """Runs concurrent `step(session, token)` calls as batches through `run_batch`, which
    takes `(sessions, tokens)` and returns their logits `(n, vocab)`, and leaves every
    session as it was when it raises. A batch that fails runs again one step at a time
    through `run_one`, so each caller gets its own result or its own error."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Any], Sequence[int]], np.ndarray],
        run_one: Callable[[Any, int], np.ndarray],
    ) -> None:
        self._run_batch, self._run_one = run_batch, run_one
        self._cond = threading.Condition()
        self._queue: list[_Step] = []
        self._running = False
        #: Batches run and steps they held, and the largest batch, for tests and benchmarks.
        self.batches = 0
        self.steps = 0
        self.largest = 0

    @property
    def busy(self) -> bool:
        """Whether a batch is running or steps wait for one."""
        with self._cond:
            return self._running or bool(self._queue)

    def step(self, session: Any, token: int) -> np.ndarray:
        """The next-token logits of `token` in `session`, run with whatever steps of other
        sessions arrive meanwhile."""
        job = _Step(session, token)
        with self._cond:
            self._queue.append(job)
            while job.logits is None and job.error is None:
                if self._running:
                    self._cond.wait()
                    continue
                batch = self._take()
                self._running = True
                self._cond.release()
                try:
                    self._run(batch)
                finally:
                    for other in batch:  # only an interrupt (KeyboardInterrupt) leaves any
                        if other.logits is None and other.error is None:
                            other.error = RuntimeError("the batch this step was in was interrupted")
                    self._cond.acquire()
                    self._running = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        assert job.logits is not None
        return job.logits

    def _take(self) -> list[_Step]:
        """The queued steps of distinct sessions (a session stepped twice at once keeps its
        second step queued for the next batch)."""
        batch, rest, seen = [], [], set()
        for job in self._queue:
            (rest if id(job.session) in seen else batch).append(job)
            seen.add(id(job.session))
        self._queue = rest
        self.batches += 1
        self.steps += len(batch)
        self.largest = max(self.largest, len(batch))
        return batch

    def _run(self, batch: list[_Step]) -> None:
        if len(batch) > 1:
            try:
                logits = self._run_batch([job.session for job in batch], [job.token for job in batch])
            except Exception:  # noqa: BLE001 - rerun one by one: each caller gets its own error
                pass
            else:
                for job, row in zip(batch, logits):
                    job.logits = row
                return
        for job in batch:
            try:
                job.logits = self._run_one(job.session, job.token)
            except BaseException as e:  # noqa: BLE001 - handed to the step's own caller
                job.error = e
