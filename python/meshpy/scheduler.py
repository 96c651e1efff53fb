"""Every running generation advances together (issue 11, part 3).

A `Scheduler` owns the generations of one model. Sessions open and close on threads of their
own (on a mesh that is route planning and a request per worker, which must not hold up the
others). Each lane is a thread that loops: it takes in newly opened generations, drops
cancelled ones, and runs one *iteration* for all the rest:

- every decoding generation's last token, one row each;
- the next chunk of prompts still prefilling, sized so the iteration takes at most about twice
  a decode-only iteration (chunked prefill: a long prompt arriving never stalls the streams
  already running; alone, a prompt goes in chunks of `PREFILL_CHUNK`);

as one embedding lookup, one `forward_batch` through the pipeline (one pass per span, or one
request per hop of the mesh, every session with its own cache), one product with the output
head for the rows that need logits, and sampling for all of them at once (`sample_rows`).
Rows are independent in every kernel, so a generation's tokens are the same however many
others share its iterations.

With several lanes (a mesh: each hop is a stage on another machine) the lanes' batches are in
flight at once, so while one batch crosses the second worker the next crosses the first.

Generations report through a `TokenSink` called on scheduler threads: `token` for each token
(returning False stops the generation there, as a stop string does; with its log-probability
when the generation asked for them), then `end` once, then `closed` once its session is
closed; a generation that asked for its prompt's log-probabilities gets them through `prompt`
as its chunks are run (for log-likelihood scoring; with a budget of 0 it stops there).

Several generations of one prompt (the API's `n`) prefill it once: the first runs the prompt,
and when its last row's logits are in, each other one starts from a copy of its session
(`Pipeline.fork`; where a copy cannot be made, it prefills on its own) and samples its first
token from those same logits with its own sampler.

A constrained generation (structured output, a forced tool call: `meshpy.constraint`) has
its rows' logits masked to the tokens its grammar allows before its token is picked, and ends
once the grammar is complete; it does not draft. A
generation whose iteration fails is run again on its own, so a bad request fails alone.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from meshpy.errors import InvalidSamplingError
from meshpy.sampling import Sampler, TokenLogprob, sample_rows, token_logprobs
from meshpy.speculation import DraftModel, Speculator, agreeing

if TYPE_CHECKING:
    from meshpy.generation import GenerationStats

__all__ = ["Scheduler", "TokenSink", "Ticket", "PREFILL_CHUNK", "on_scheduler_thread"]

log = logging.getLogger(__name__)

#: Prompt tokens per pass when nothing else is decoding: bounds a long prompt's scratch memory.
PREFILL_CHUNK = 512
#: Fewest prompt tokens a prefilling request gets per iteration while others decode.
MIN_PREFILL_CHUNK = 8
#: While others decode, an iteration's prefill part may cost this many decode-only iterations.
PREFILL_SHARE = 1.0
#: Threads that open sessions, and threads that close them (on a mesh each may wait on the
#: network: a vanished worker answers a close only by its timeout).
SESSION_THREADS = 4
#: Prompt rows whose logits are held at once when the prompt's log-probabilities are asked for.
_LOGPROB_ROWS = 64
#: Weight of the newest measurement in the running averages of iteration costs.
_EMA = 0.2
#: Names of the scheduler's threads start with this (see `on_scheduler_thread`).
THREAD_PREFIX = "meshpy-scheduler"


def on_scheduler_thread() -> bool:
    """Whether this is one of a scheduler's threads, which must never wait for a generation
    to end (it may be the one to end it): e.g. a generator finalized here by the garbage
    collector."""
    return threading.current_thread().name.startswith(THREAD_PREFIX)


class TokenSink(Protocol):
    """Where a generation's tokens go; both methods are called on a scheduler thread."""

    def token(self, token: int, logprob: TokenLogprob | None) -> bool:
        """One generated token, with its log-probability if the generation asked for them
        (else None); False stops the generation after it (finish reason `stop`)."""

    def prompt(self, logprobs: list[TokenLogprob | None]) -> None:
        """Log-probabilities of the next prompt tokens, in order (None for the first, which
        nothing predicts); called only for a generation that asked for them."""

    def end(self, finish_reason: str | None, error: BaseException | None) -> None:
        """The generation ended (`stop`, `length`, `cancelled`), or failed with `error`."""

    def closed(self) -> None:
        """The generation's session is closed (on every worker, for a mesh): what it held is
        free. Called once, after `end`, on a scheduler thread."""


class Ticket:
    """A submitted generation: `cancel()` stops it, `wait()` returns once its session is
    closed (on every worker, for a mesh)."""

    def __init__(self, prompt: Sequence[int], budget: int, sampler: Sampler, stop_ids: frozenset[int],
                 sink: TokenSink, stats: GenerationStats, speculate: bool = False, draft_length: int | None = None,
                 draft_model: DraftModel | None = None, logprobs: int | None = None,
                 prompt_logprobs: bool = False, constraint: Any = None) -> None:
        self.prompt = list(prompt)
        #: The grammar's state for this generation (`meshpy.constraint.Matcher`), or None.
        self.matcher = constraint.start() if constraint is not None else None
        speculate = speculate and self.matcher is None  # drafts would need the grammar's state per row
        self.budget = budget
        #: Alternatives listed with each token's log-probability; None: no log-probabilities.
        self.logprobs = logprobs
        self.prompt_logprobs = prompt_logprobs
        self.sampler = sampler
        self.stop_ids = stop_ids
        self.sink = sink
        self.stats = stats
        self.session: Any = None
        self.fed = 0  # prompt tokens run through the layers so far
        self.next_token: int | None = None  # the token to run next, once decoding
        # With speculation on, tokens are drafted by prompt lookup; `draft` rides with
        # `next_token` in the current iteration, `shadow` is only compared afterwards. A
        # seeded sampled generation drafts only at a fixed length: the adaptive length
        # follows timings, and would change which random numbers its tokens get.
        params = sampler.params
        if speculate and (params.greedy or params.seed is None or draft_length is not None):
            drafter = draft_model.session() if draft_model is not None else None
            self.speculator: Speculator | None = Speculator(prompt, fixed=draft_length, drafter=drafter)
        else:
            self.speculator = None
        self.draft: list[int] = []
        self.shadow: list[int] = []
        self.generated: list[int] = []  # the tokens handed to the sink
        self.started = 0.0
        self.last = 0.0
        #: Generations of the same prompt waiting for this one's prefill, to start from a copy
        #: of its session; emptied when they start.
        self.followers: list[Ticket] = []
        #: This ticket and those that followed it, in order (as submitted).
        self.group: list[Ticket] = [self]
        #: Whether its session is kept for the prompt cache when it ends (of a group sharing
        #: a prompt, only the first's is: the others would only push other prefixes out).
        self.keep_session = True
        #: An error met outside the pass (masking its logits), ending it at its next pick.
        self.failure: BaseException | None = None
        self._cancel = threading.Event()
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stops the generation before its next iteration (a no-op once it ended)."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        """Whether `cancel` was called."""
        return self._cancel.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Waits for the generation to end and its session to close; True if it has."""
        return self._done.wait(timeout)

    def mark_done(self) -> None:
        """Called by the scheduler once the generation ended and its session is closed."""
        self._done.set()
        try:
            self.sink.closed()
        except Exception:
            log.exception("a generation's sink failed once its session closed")


class _Lane:
    """One thread running iterations over its own generations."""

    def __init__(self, model: weakref.ref[Any], index: int, closer: _SessionThreads) -> None:
        # Weak, so a model nobody holds is freed (and its scheduler stops its lanes).
        self._model = model
        self.closer = closer
        self.cond = threading.Condition()
        self.opening = 0  # tickets given to this lane whose sessions are being opened
        self.incoming: list[Ticket] = []  # opened, not yet running
        self.active: list[Ticket] = []
        self.stopping = False
        # Running averages: seconds of a decode-only iteration, seconds per prompt token.
        self.decode_cost: float | None = None
        self.token_cost: float | None = None
        # Iterations run, the generations' entries they held, and the most in one.
        self.iterations = self.entries = self.largest = 0
        self.thread = threading.Thread(target=self._loop, name=f"{THREAD_PREFIX}-{index}", daemon=True)
        self.thread.start()

    @property
    def model(self) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("the model was freed")
        return model

    @property
    def load(self) -> int:
        return len(self.active) + len(self.incoming) + self.opening

    def reserve(self) -> None:
        """Counts a ticket whose session is being opened for this lane."""
        with self.cond:
            self.opening += 1

    def admit(self, ticket: Ticket | None) -> None:
        """A reserved ticket with its session open (None: its opening failed). A lane that
        stopped meanwhile cancels it and has its session closed."""
        with self.cond:
            self.opening -= 1
            if ticket is None:
                return
            if not self.stopping:
                self.incoming.append(ticket)
                self.cond.notify()
                return
        self._end(ticket, "cancelled")

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.incoming and not self.active and not self.stopping:
                    self.cond.wait()
                new, self.incoming = self.incoming, []
                if self.stopping:
                    break
            self.active.extend(new)
            new = []  # an idle lane holds no ticket (nor, through its sink, the model)
            for ticket in [t for t in self.active if t.cancelled]:
                self._finish(ticket, "cancelled")
            if self.active:
                try:
                    self._iterate()
                except BaseException:  # a bug here must not leave callers waiting forever
                    log.exception("scheduler iteration failed")
                    for ticket in list(self.active):
                        self._finish(ticket, None, RuntimeError("the scheduler failed; see the server log"))
        self.active.extend(new)
        for ticket in list(self.active):
            self._finish(ticket, "cancelled")

    def _finish(self, ticket: Ticket, reason: str | None, error: BaseException | None = None) -> None:
        """Ends an active generation (see `_end`)."""
        self.active.remove(ticket)
        self._end(ticket, reason, error)

    def _end(self, ticket: Ticket, reason: str | None, error: BaseException | None = None) -> None:
        """Tells the sink, then closes the session on the closer's threads (on a mesh that is
        a request to every worker of its route, which must not hold up the others)."""
        spec = ticket.speculator
        if spec is not None and spec.passes:
            stats = ticket.stats
            log.info("speculation: %d tokens drafted, %d kept, %.2f tokens per verification pass", stats.draft_tokens,
                     stats.accepted_draft_tokens, (stats.accepted_draft_tokens + spec.passes) / spec.passes)
        model = self.model
        # A session that ran without error is kept for a prompt that starts the same way
        # (`meshpy.prompt_cache`); its caches hold the prompt and the tokens handed out.
        _end_ticket(ticket, reason, error, self.closer,
                    lambda session: model.end_session(session, ticket.prompt + ticket.generated,
                                                      keep=error is None and ticket.keep_session))

    # --- one iteration ----------------------------------------------------------------

    def _plan(self) -> list[tuple[Ticket, list[int]]]:
        """The rows of the next iteration: each decoding generation's token (and its draft,
        see `meshpy.speculation`), then prompt chunks (oldest request first) within this
        iteration's prefill budget."""
        decoding = [t for t in self.active if t.next_token is not None]
        row_cost = self._row_cost(len(decoding))
        share = self.decode_cost / len(decoding) if self.decode_cost and decoding else None
        for t in decoding:
            t.draft, t.shadow = [], []
            if t.speculator is not None:
                # Drafts never run past the budget (so never past the context either).
                room = t.budget - t.stats.completion_tokens - 1
                try:
                    t.draft, t.shadow = t.speculator.draft(row_cost, room, share)
                except Exception:  # noqa: BLE001 - a failing draft model costs only the draft
                    log.exception("drafting failed; this step runs without a draft")
        budget = PREFILL_CHUNK
        if decoding:
            if self.decode_cost is None or self.token_cost is None:
                budget = MIN_PREFILL_CHUNK
            else:
                budget = int(PREFILL_SHARE * self.decode_cost / self.token_cost)
                budget = max(MIN_PREFILL_CHUNK, min(PREFILL_CHUNK, budget))
        prefilling = []
        for t in self.active:
            if t.next_token is None and budget > 0:
                chunk = t.prompt[t.fed : t.fed + budget]
                budget -= len(chunk)
                prefilling.append((t, chunk))
        return [(t, [t.next_token, *t.draft]) for t in decoding] + prefilling

    def _row_cost(self, n_decoding: int) -> float:
        """What one more row costs next to one decoding generation's share of an iteration
        (the measured cost of a prompt token over a decode-only iteration's, per decoding
        generation); before anything is measured, a guess that lets good drafts through."""
        if self.decode_cost is None or self.token_cost is None or self.decode_cost <= 0:
            return 0.25
        return max(n_decoding, 1) * self.token_cost / self.decode_cost

    def _iterate(self) -> None:
        plan = self._plan()
        self.iterations += 1
        self.entries += len(plan)
        self.largest = max(self.largest, len(plan))
        model = self.model
        t0 = time.perf_counter()
        results = self._forward(plan)
        elapsed = time.perf_counter() - t0
        # Prompt chunks and drafted tokens are the rows beyond one per decoding generation.
        n_decode = sum(1 for t, _ in plan if t.next_token is not None)
        self._learn(elapsed, n_decode, sum(len(ids) for _, ids in plan) - n_decode)

        # Rows that need logits: decode rows (with their drafts), and the last row of a
        # prompt's final chunk.
        want: list[tuple[Ticket, np.ndarray]] = []
        for (ticket, ids), out in zip(plan, results):
            if isinstance(out, BaseException):
                self._finish(ticket, None, out)
                continue
            if ticket.next_token is None:
                if ticket.prompt_logprobs and not self._report_prompt(ticket, out):
                    continue
                ticket.fed += len(ids)
                if ticket.fed < len(ticket.prompt):
                    continue
                ticket.stats.prefill_seconds = time.perf_counter() - ticket.started
                if ticket.budget == 0:  # only the prompt was asked for
                    self._finish(ticket, "length")
                    continue
                out = out[-1:]
                want.extend((follower, out) for follower in self._start_followers(ticket))
            want.append((ticket, out))
        if not want:
            return
        logits = model.end.logits(np.concatenate([rows for _, rows in want]))
        n_tokens = model.end.tokenizer.vocab_size
        # Constrained rows are masked before the pick; their log-probabilities stay the
        # model's own (from the row as it was), as for every other row.
        unmasked: dict[int, np.ndarray] = {}
        starts = _starts(want)  # each entry's first logits row
        for (ticket, _), start in zip(want, starts):
            if ticket.matcher is not None:  # one row: constrained generations do not draft
                if ticket.logprobs is not None:
                    unmasked[id(ticket)] = logits[start : start + 1, :n_tokens].copy()
                try:
                    ticket.matcher.mask_logits(logits[start])
                except Exception as e:  # noqa: BLE001 - this generation's failure, reported by `_take`
                    ticket.failure = e
                    logits[start] = 0.0  # some pick, never used
        # Sampled generations verifying a draft pick their tokens one row at a time (the
        # rejection rule); every other row is picked at once.
        verifying = [bool(t.draft) and not t.sampler.params.greedy for t, _ in want]
        blocks = [range(start, start + len(rows)) for start, (_, rows) in zip(starts, want)]
        samplers = [t.sampler for (t, _), v, block in zip(want, verifying, blocks) if not v for _ in block]
        plain = logits
        if any(verifying):  # (a copy of the other rows only when some are left out)
            plain = logits[[r for v, block in zip(verifying, blocks) if not v for r in block]]
        picks = iter(sample_rows(samplers, plain, n_tokens))
        now = time.perf_counter()
        for (ticket, _), v, block in zip(want, verifying, blocks):
            rows = logits[block.start : block.stop, :n_tokens]
            picked = _verify_sampled(ticket, rows) if v else [next(picks) for _ in block]
            if ticket.failure is not None:
                self._finish(ticket, None, ticket.failure)
                continue
            self._take(ticket, picked, now, unmasked.get(id(ticket), rows))

    def _start_followers(self, leader: Ticket) -> list[Ticket]:
        """Starts the generations waiting for `leader`'s prefill, each on a copy of its
        session; those whose copy could not be made start a session of their own and
        prefill. The ones started from a copy (their first token comes from the leader's
        last row)."""
        followers, leader.followers = leader.followers, []
        started = []
        for f in followers:
            if f.cancelled:
                _end_ticket(f, "cancelled", None)
                continue
            try:
                f.session = self.model.pipeline.fork(leader.session, leader.session.n_positions)
            except Exception as e:  # noqa: BLE001 - no copy: this one prefills on its own
                log.info("a session could not be copied (%s); this generation prefills its prompt itself", e)
                try:
                    f.session = self.model.new_session()
                except Exception as e2:  # noqa: BLE001 - this generation's error
                    _end_ticket(f, None, e2)
                    continue
                f.started = time.perf_counter()
                self.active.append(f)
                continue
            f.fed, f.started = leader.fed, leader.started
            f.stats.prefill_seconds, f.stats.cached_tokens = leader.stats.prefill_seconds, leader.stats.cached_tokens
            self.active.append(f)
            started.append(f)
        return started

    def _report_prompt(self, ticket: Ticket, out: np.ndarray) -> bool:
        """Hands the sink the log-probabilities of the prompt tokens this chunk's rows predict
        (row j predicts token `fed + j + 1`; the prompt's last row predicts the first
        generated token, which `_take` reports); False if that failed and ended it."""
        start = ticket.fed
        n = min(len(out), len(ticket.prompt) - 1 - start)  # rows that predict a prompt token
        try:
            entries: list[TokenLogprob | None] = [None] if start == 0 else []
            end = self.model.end
            for at in range(0, n, _LOGPROB_ROWS):  # bounded memory with a large vocabulary
                upto = min(n, at + _LOGPROB_ROWS)
                rows = end.logits(out[at:upto])[:, : end.tokenizer.vocab_size]
                entries += token_logprobs(rows, ticket.prompt[start + 1 + at : start + 1 + upto], ticket.logprobs or 0)
            ticket.sink.prompt(entries)
        except Exception as e:  # noqa: BLE001 - this generation's failure only
            self._finish(ticket, None, e)
            return False
        return True

    def _take(self, ticket: Ticket, picked: list[int | BaseException], now: float, rows: np.ndarray) -> None:
        """Hands a generation the tokens picked for its rows this iteration: one, or with a
        draft the drafted tokens the picks agree with and the pick after the last of them (so
        greedy output equals plain decoding, and sampled output, picked by the rejection
        rule, is distributed as plain sampling's). The session's caches forget the rejected
        rows. A row's error counts only where plain decoding would have reached it: the
        tokens before it are handed over first."""
        spec, draft = ticket.speculator, ticket.draft
        kept = agreeing(draft, picked)
        picked = picked[: kept + 1]  # rows past the first rejected draft are never used
        error = next((p for p in picked if isinstance(p, BaseException)), None)
        tokens = [p for p in picked if not isinstance(p, BaseException)]
        if error is not None:
            tokens = tokens[: picked.index(error)]
        if spec is not None and error is None:
            if ticket.next_token is None:  # the prompt's last row: the first token
                spec.lookup.append(tokens[0])
            else:
                spec.observe(draft or ticket.shadow, tokens)
                if draft:
                    spec.passes += 1
                    ticket.stats.draft_tokens += len(draft)
                    rejected = len(draft) - kept
                    if rejected:
                        try:
                            self.model.pipeline.rewind(ticket.session, ticket.session.n_positions - rejected)
                        except Exception as e:  # noqa: BLE001 - this generation's caches could not rewind
                            self._finish(ticket, None, e)
                            return
                for token in tokens:
                    spec.lookup.append(token)
        before = ticket.stats.completion_tokens
        logprobs: list[TokenLogprob | None] = [None] * len(tokens)
        if ticket.logprobs is not None and tokens:
            logprobs = list(token_logprobs(rows[: len(tokens)], tokens, ticket.logprobs))
        for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
            if (i and ticket.cancelled) or not self._advance(ticket, token, now, logprob):
                break
        if spec is not None and draft and error is None:
            # Drafted tokens kept and handed out (a stop or the budget may end the step early).
            ticket.stats.accepted_draft_tokens += min(kept, ticket.stats.completion_tokens - before)
        if error is not None and ticket in self.active:
            self._finish(ticket, None, error)

    def _advance(self, ticket: Ticket, token: int, now: float, logprob: TokenLogprob | None) -> bool:
        """Hands `token` (and its log-probability, if asked for) to the generation; False once
        it ended."""
        stats = ticket.stats
        if ticket.next_token is not None:  # a decode step ran
            stats.decode_seconds += now - ticket.last
            stats.decode_steps += 1
        ticket.last = now
        if token in ticket.stop_ids:
            self._finish(ticket, "stop")
            return False
        stats.completion_tokens += 1
        ticket.generated.append(token)
        try:
            if ticket.matcher is not None:
                ticket.matcher.accept(token)
            go_on = ticket.sink.token(token, logprob)
        except Exception as e:  # noqa: BLE001 - the sink's failure ends only its generation
            self._finish(ticket, None, e)
            return False
        if not go_on or (ticket.matcher is not None and ticket.matcher.done):  # a complete grammar stops too
            self._finish(ticket, "stop")
        elif stats.completion_tokens >= ticket.budget:
            self._finish(ticket, "length")
        else:
            ticket.next_token = token
            return True
        return False

    def _forward(self, plan: list[tuple[Ticket, list[int]]]) -> list[np.ndarray | BaseException]:
        """The last layer's rows for each planned entry, or the error that entry alone met."""
        end, pipeline = self.model.end, self.model.pipeline
        counts = [len(chunk) for _, chunk in plan]
        sessions = [t.session for t, _ in plan]
        if len(plan) > 1:
            try:
                hidden = end.embed([i for _, chunk in plan for i in chunk])
                out = pipeline.forward_batch(sessions, hidden, counts)
            except Exception:  # noqa: BLE001 - run one by one: each entry gets its own error
                pass
            else:
                return list(np.split(out, np.cumsum(counts)[:-1]))
        results: list[np.ndarray | BaseException] = []
        for session, (_, chunk) in zip(sessions, plan):
            try:
                results.append(pipeline.forward(session, end.embed(chunk)))
            except Exception as e:  # noqa: BLE001 - handed to this entry's generation
                results.append(e)
        return results

    def _learn(self, elapsed: float, n_decode: int, n_prompt: int) -> None:
        """Updates the running costs the prefill budget is sized from."""
        def ema(old: float | None, new: float) -> float:
            return new if old is None else (1 - _EMA) * old + _EMA * new

        # Extra rows are prompt tokens and drafted ones. A mixed iteration teaches whichever
        # cost is unknown from the other (so a generation that drafts every step still
        # measures both); with neither known yet, it teaches nothing.
        if n_prompt == 0:
            self.decode_cost = ema(self.decode_cost, elapsed)
        elif n_decode == 0:
            self.token_cost = ema(self.token_cost, elapsed / n_prompt)
        elif self.decode_cost is not None:
            self.token_cost = ema(self.token_cost, max(elapsed - self.decode_cost, 0.0) / n_prompt)
        elif self.token_cost is not None:
            self.decode_cost = ema(None, max(elapsed - self.token_cost * n_prompt, 0.1 * elapsed))


def _starts(want: Sequence[tuple[Ticket, np.ndarray]]) -> list[int]:
    """The first logits row of each entry of `want`."""
    return np.concatenate([[0], np.cumsum([len(rows) for _, rows in want])[:-1]]).astype(int).tolist()


def _verify_sampled(ticket: Ticket, logits: np.ndarray) -> list[int | BaseException]:
    """A sampled generation's tokens for a step with a draft: row i keeps drafted token i
    with the rejection rule (`Sampler.verify`) and stops at the first it replaces; after
    every drafted token kept, the last row is sampled as usual. Tokens past the first
    replaced draft are never used, so none are drawn."""
    out: list[int | BaseException] = []
    try:
        for row, draft in zip(logits, ticket.draft):
            out.append(ticket.sampler.verify(row, draft))
            if out[-1] != draft:
                return out
        out.append(ticket.sampler.sample(logits[len(ticket.draft)]))
    except InvalidSamplingError as e:
        out.append(e)
    return out


def _end_ticket(ticket: Ticket, reason: str | None, error: BaseException | None,
                closer: _SessionThreads | None = None, close: Callable[[Any], object] | None = None) -> None:
    """Tells the ticket's sink it ended; then, with `close`, has `closer` close its session
    before the ticket is done (without, it has no session and is done at once). Generations
    still waiting for its prefill end the same way."""
    followers, ticket.followers = ticket.followers, []
    for f in followers:
        _end_ticket(f, reason, error)
    if ticket.speculator is not None:
        try:
            ticket.speculator.close()
        except Exception:
            log.exception("closing a generation's draft session failed")
    try:
        ticket.sink.end(reason, error)
    except Exception:
        log.exception("a generation's sink failed at its end")
    if close is None or closer is None:
        ticket.mark_done()
        return

    def close_it() -> None:
        try:
            close(ticket.session)
        except Exception:
            log.exception("closing a generation's session")
        finally:
            ticket.mark_done()

    closer.put(close_it)


class _SessionThreads:
    """Runs session jobs on a few threads of their own: opening (on a mesh, planning a route,
    which may ask the DHT) and closing (a request to every worker of the route), so a slow
    one holds up neither the iterations of running generations nor every other session.
    Once stopped, jobs run at once on the caller's thread, so none is ever dropped."""

    def __init__(self, name: str, n_threads: int) -> None:
        self._pool = ThreadPoolExecutor(n_threads, thread_name_prefix=f"{THREAD_PREFIX}-{name}")
        self._lock = threading.Lock()
        self._stopped = False

    def put(self, job: Callable[[], object]) -> None:
        """Runs `job` soon (its errors are logged)."""
        with self._lock:
            if not self._stopped:
                self._pool.submit(_logged, job)
                return
        _logged(job)

    def stop(self, timeout: float) -> None:
        """Waits up to `timeout` for the queued jobs; later ones run inline."""
        with self._lock:
            self._stopped = True
        if timeout <= 0 or sys.is_finalizing():
            # No waiting, and no new thread: one started while the interpreter exits never
            # runs, and `Thread.start` would wait for it forever.
            self._pool.shutdown(wait=False)
            return
        done = threading.Event()
        threading.Thread(target=lambda: (self._pool.shutdown(wait=True), done.set()), daemon=True).start()
        done.wait(timeout)


def _logged(job: Callable[[], object]) -> None:
    try:
        job()
    except Exception:  # jobs report their own errors; this is a bug
        log.exception("a scheduler session job failed")


class Scheduler:
    """Runs a model's generations in iterations shared by all of them, on `lanes` threads
    (each with its own generations; several keep several batches in flight on a mesh)."""

    def __init__(self, model: Any, lanes: int = 1) -> None:
        self._lanes: list[_Lane] = []
        self._opener: _SessionThreads | None = None
        self._closer: _SessionThreads | None = None
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes}")
        self._model = weakref.ref(model)
        self.n_lanes = lanes
        self._lock = threading.Lock()
        self.closed = False

    def submit(
        self,
        prompt: Sequence[int],
        budget: int,
        sampler: Sampler,
        stop_ids: frozenset[int],
        sink: TokenSink,
        stats: GenerationStats,
        speculate: bool = False,
        draft_length: int | None = None,
        draft_model: DraftModel | None = None,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        followers: Sequence[tuple[Sampler, TokenSink, GenerationStats]] = (),
        constraint: Any = None,
    ) -> Ticket:
        """Starts a generation of up to `budget` tokens after `prompt`; its tokens go to
        `sink`, its counts to `stats` (a `GenerationStats`). With `speculate`, the
        generation drafts tokens by prompt lookup (`meshpy.speculation`), `draft_length` of
        them per match if set, else as many as its acceptance and their cost justify; with
        `draft_model`, that model drafts instead of prompt lookup. `logprobs` (the number of
        alternatives to list, 0 or more) gives the sink each token's log-probability;
        `prompt_logprobs` the prompt's too, and then `budget` may be 0 (the prompt only).
        Each of `followers` (sampler, sink, stats) is another generation of the same prompt,
        started from a copy of this one's session once it has prefilled (see the module
        documentation); they are the returned ticket's `followers` until then. `constraint`
        (a `meshpy.constraint.Grammar`) limits every one of them to what it allows."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if budget < (0 if prompt_logprobs else 1):
            raise ValueError(f"a generation needs a budget of at least 1 token, got {budget}")
        ticket = Ticket(prompt, budget, sampler, stop_ids, sink, stats, speculate, draft_length, draft_model,
                        logprobs, prompt_logprobs, constraint)
        ticket.followers = [Ticket(prompt, budget, s, stop_ids, k, st, speculate, draft_length, draft_model, logprobs,
                                   constraint=constraint) for s, k, st in followers]
        ticket.group = [ticket, *ticket.followers]
        for follower in ticket.followers:
            follower.keep_session = False
        with self._lock:
            if self.closed:
                raise RuntimeError("the model is closed")
            if not self._lanes:  # started on first use, so a model that never generates has no threads
                self._opener = _SessionThreads("opener", SESSION_THREADS)
                self._closer = _SessionThreads("closer", SESSION_THREADS)
                self._lanes = [_Lane(self._model, i, self._closer) for i in range(self.n_lanes)]
            lane = min(self._lanes, key=lambda lane: lane.load)
            lane.reserve()
            assert self._opener is not None
            self._opener.put(lambda: self._open(ticket, lane))  # under the lock: `close` comes before or after
        return ticket

    def _open(self, ticket: Ticket, lane: _Lane) -> None:
        """Opens the ticket's session (on the opener's thread) and hands it to its lane."""
        model = self._model()
        if ticket.cancelled or model is None:
            lane.admit(None)
            _end_ticket(ticket, "cancelled", None)
            return
        try:
            # A kept session sharing the prompt's start (`meshpy.prompt_cache`) skips that
            # much prefill; a generation scoring its whole prompt needs every row run.
            reused = None if ticket.prompt_logprobs else model.reuse_session(ticket.prompt)
            if reused is not None:
                ticket.session, ticket.fed = reused
                ticket.stats.cached_tokens = ticket.fed
            else:
                ticket.session = model.new_session()
        except Exception as e:  # noqa: BLE001 - no route, no room: this request's error
            lane.admit(None)
            _end_ticket(ticket, None, e)
            return
        ticket.started = time.perf_counter()
        lane.admit(ticket)

    @property
    def running(self) -> int:
        """Generations submitted and not yet ended."""
        return sum(lane.load for lane in list(self._lanes))

    def counters(self) -> tuple[int, int, int]:
        """Iterations run, generation entries they held, and the most in one iteration (for
        tests and benchmarks)."""
        lanes = list(self._lanes)
        return (sum(lane.iterations for lane in lanes), sum(lane.entries for lane in lanes),
                max((lane.largest for lane in lanes), default=0))

    def __del__(self) -> None:
        # Nothing runs (a running generation holds the model): the threads just end.
        for lane in self._lanes:
            lane.stop()
        for threads in (self._opener, self._closer):
            if threads is not None:
                threads.stop(0)

    def close(self) -> None:
        """Cancels every generation, closes their sessions and stops the lanes."""
        with self._lock:
            self.closed = True
            lanes, self._lanes = self._lanes, []
            opener, self._opener = self._opener, None
            closer, self._closer = self._closer, None
        # Openings first (their lanes then cancel them); a lane still in a pass after the
        # wait ends its generations later, and their closes then run on its own thread.
        if opener is not None:
            opener.stop(timeout=30)
        for lane in lanes:
            lane.stop()
        for lane in lanes:
            lane.thread.join(timeout=30)
        if closer is not None:
            closer.stop(timeout=30)

