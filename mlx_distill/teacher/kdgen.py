"""``teacher generate``: ask a teacher every prompt of a shard, keep each answer as a KD record.

Each prompt's answer is looked up in the cache first (hits are replayed: no request, no cost). A
miss is requested through ``AsyncTeacherClient`` (which reserves the worst case on the budget
first), stored in the cache in one transaction with the ledger rows of everything that request was
charged, and only then appended to ``OUT``. So after any crash every answer paid for is in ``OUT``
or a free cache hit, and the run's spend is the sum of its ledger rows (``cache.py``,
``kdstate.py``).
The one window: an answer received but not yet committed to SQLite (milliseconds) is lost to a
kill -9 and asked again.

Exit codes: 0 every prompt of the shard has a record; 2 bad input or files (one line on stderr);
3 stopped at the budget cap (raise ``--budget-usd`` and ``--resume``); 4 finished, but some prompts
failed (``OUT.failed.jsonl``; ``--resume`` retries them); 5 stopped because failures exceeded
``--failure-limit``; 130 interrupted (state written; ``--resume`` continues).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import signal
import sys
import time
import uuid
from typing import Any

import httpx

from mlx_distill.cli import UserError
from mlx_distill.teacher.budget import Budget
from mlx_distill.teacher.cache import CACHE_SCHEMA, CachedAnswer, TeacherCache
from mlx_distill.teacher.client import AsyncTeacherClient
from mlx_distill.teacher.errors import BudgetExceeded, RequestFailed, TeacherError
from mlx_distill.teacher.jsontext import loads_plain
from mlx_distill.teacher.kdprogress import Progress, format_summary, redactor
from mlx_distill.teacher.kdrun import (
    EXIT_BUDGET,
    EXIT_FAILURE_LIMIT,
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    GenerateConfig,
    GenerateResult,
    RunFiles,
    open_run,
    parse_failure_limit,
    resolve_teacher,
)
from mlx_distill.teacher.kdstate import RunState, save_checkpoint_files
from mlx_distill.teacher.prompts import Prompt, load_prompts
from mlx_distill.teacher.records import (
    COMPLETION_FIELDS,
    build_record,
    dump_record,
    validate_record,
)
from mlx_distill.teacher.transport import new_event_loop
from mlx_distill.teacher.types import ChatRequest, Completion

# Cache lookups are batched: one SQLite query per this many prompts.
LOOKUP_BATCH = 256

# What the budget charged the request running in the current task (one list per request).
_charges: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "kd_charges", default=None
)


def _pass_on(future: asyncio.Future, exc: BaseException) -> None:
    """End ``future`` as its producer ended: requests waiting on it (via shield) re-raise."""
    if isinstance(exc, asyncio.CancelledError):
        future.cancel()
    else:
        future.set_exception(exc)
        future.exception()  # retrieved: no "never retrieved" warning when nobody waits


class LedgerBudget(Budget):
    """A ``Budget`` that also tells the request in the current task each amount it was charged,
    including attempts billed at their worst case (timeouts, cut streams), so that exactly what the
    budget counts goes into the cache's spend ledger."""

    def commit(self, reservation, actual_usd: float) -> None:
        super().commit(reservation, actual_usd)
        charges = _charges.get()
        if charges is not None:
            charges.append(float(actual_usd))


class Generator:
    """One invocation of ``teacher generate`` (fresh or resumed).

    ``client_options`` go to ``AsyncTeacherClient`` (e.g. ``limits`` with a short window, for
    benchmarks); the command line never sets them.
    """

    def __init__(self, cfg: GenerateConfig, client_options: dict[str, Any] | None = None) -> None:
        self.cfg = cfg
        self.client_options = dict(client_options or {})
        self.limit, self.limit_is_fraction = parse_failure_limit(cfg.failure_limit)
        self.spec, self.defaults = resolve_teacher(cfg)
        prompts, prompts_sha = load_prompts(cfg.prompts, self.spec.max_top_logprobs)
        self.prompts = [p for p in prompts if cfg.shard.contains(p.id)]
        self.cache = TeacherCache(cfg.cache_dir())  # before open_run: a bad cache writes nothing
        try:
            self.run: RunFiles = open_run(cfg, self.spec, self.defaults, prompts_sha,
                                          len(prompts), {p.id for p in self.prompts})
        except BaseException:
            self.cache.close()
            raise
        self.redact = redactor(self.spec)
        self._base_host, self._fingerprint = self.spec.base_host, self.spec.fingerprint()
        self.failed: dict[str, dict[str, Any]] = {
            pid: info for pid, info in self.run.state.failed.items() if pid not in self.run.done
        }
        # The ledger is exact; the checkpoint's figure is a lower bound (kept if the cache is lost).
        self.ledger_spent = max(self.cache.run_spent(self.run.run_id), self.run.state.spent_usd)
        self.budget = LedgerBudget(cfg.budget_usd, spent_usd=self.ledger_spent)
        self.failures: collections.Counter[str] = collections.Counter()
        self.stop_reason: str | None = None
        self.new_records = 0
        self._since_checkpoint = 0
        self._checkpoint_task: asyncio.Future | None = None
        self._fatal: BaseException | None = None  # a background checkpoint failed
        self._inflight: dict[str, asyncio.Future[CachedAnswer | None]] = {}
        self._storing: set[asyncio.Task] = set()  # answers being committed, then emitted
        self._unwritten: list[str] = []  # ids of OUT lines appended this turn, written at its end
        # Requests inside client.chat(), and an event set whenever one returns: a request the
        # budget refuses waits for those (their reservations may settle lower) before stopping.
        self._requests_out = 0
        self._client: AsyncTeacherClient | None = None

    def pending(self) -> list[Prompt]:
        return [p for p in self.prompts if p.id not in self.run.done]

    def generate(self) -> GenerateResult:
        start = time.monotonic()
        try:
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(self._main())
        except asyncio.CancelledError:
            self.stop_reason = "interrupted"  # a second signal abandoned the requests in flight
        finally:
            self.cache.close()
            self.run.log.close()
        return self._result(time.monotonic() - start)

    async def _main(self) -> None:
        pending = self.pending()
        if self.run.resumed:
            print(f"resuming run {self.run.run_id}: {self.run.log.records} records kept, "
                  f"{len(pending)} prompts to go, ${self.ledger_spent:.4f} spent so far",
                  file=sys.stderr)
        self.threshold = self.limit * len(pending) if self.limit_is_fraction else self.limit
        self.progress = Progress(len(self.prompts), len(self.prompts) - len(pending),
                                 self.cfg.progress, self.budget)
        self._checkpoint_lock = asyncio.Lock()
        self._settled = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            # Not from a thread other than the main one (asyncio: RuntimeError, uvloop: ValueError).
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._interrupt, asyncio.current_task())
        try:
            await self._checkpoint()  # the recovered (or empty) OUT, before the first request
            await self._schedule(pending)
        finally:
            if self._client is not None:
                await self._client.aclose()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            await self._checkpoint(finished=not self.pending() and not self.failed)
            self.progress.close()
        if self._fatal is not None:
            raise self._fatal

    def _teacher(self) -> AsyncTeacherClient:
        """The HTTP client, built on first use: a run answered from the cache needs none."""
        if self._client is None:
            timeout = httpx.Timeout(self.cfg.timeout_s, connect=min(10.0, self.cfg.timeout_s))
            self._client = AsyncTeacherClient(
                self.spec, timeout=timeout, max_attempts=self.cfg.max_attempts,
                budget=self.budget, **self.client_options,
            )
        return self._client

    async def _schedule(self, pending: list[Prompt]) -> None:
        queue: asyncio.Queue = asyncio.Queue(maxsize=2 * self.cfg.concurrency)
        tasks = [asyncio.create_task(self._produce(queue, pending))]
        tasks += [asyncio.create_task(self._worker(queue))
                  for _ in range(self.cfg.concurrency)]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            # Answers received are committed and emitted, even when stopping: milliseconds.
            await asyncio.gather(*self._storing, return_exceptions=True)

    async def _produce(self, queue: asyncio.Queue, pending: list[Prompt]) -> None:
        """Replay cache hits in place; queue misses for the workers."""
        for start in range(0, len(pending), LOOKUP_BATCH):
            if self.stop_reason:
                break
            batch = [(p, self.defaults.request(p)) for p in pending[start:start + LOOKUP_BATCH]]
            keys = [self._key(request) for _, request in batch]
            found = await self.cache.aget_many(keys)
            for (prompt, request), key in zip(batch, keys, strict=True):
                if self.stop_reason:
                    break
                if key in found:
                    self._emit(prompt, request, found[key], hit=True)
                else:
                    await queue.put((prompt, request, key))
        for _ in range(self.cfg.concurrency):
            await queue.put(None)

    def _key(self, request: ChatRequest) -> str:
        return request.cache_key(self.spec.model, self._fingerprint, CACHE_SCHEMA)

    async def _worker(self, queue: asyncio.Queue) -> None:
        while (item := await queue.get()) is not None:
            if self.stop_reason:
                continue  # drain: prompts never sent stay pending for --resume
            prompt, request, key = item
            try:
                answer = await self._answer(prompt, request, key)
            except RequestFailed as exc:
                self._fail(prompt, exc.reason, exc.status, exc.message, exc.attempts)
            except TeacherError as exc:  # e.g. InvalidRequest: refused before sending
                self._fail(prompt, type(exc).__name__, None, str(exc), 0)
            else:
                if answer is not None:
                    self._emit(prompt, request, answer, hit=False)

    async def _answer(self, prompt: Prompt, request: ChatRequest,
                      key: str) -> CachedAnswer | None:
        """The stored answer for ``key`` when an identical request is already in flight (shared
        with it). Otherwise None: the request is sent, and its answer is stored and then emitted
        in the background (``_store``), so that this worker sends its next request while SQLite
        commits (a commit waits for an fsync: 7 ms on average here, 7 % of a 100-ms answer).
        None too when the budget cannot fit the request, and the run is stopping."""
        if key in self._inflight:
            return await asyncio.shield(self._inflight[key])
        future: asyncio.Future[CachedAnswer | None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        charges: list[float] = []
        try:
            completion = await self._fetch(request, charges)
        except BaseException as exc:
            del self._inflight[key]
            _pass_on(future, exc)
            raise
        if completion is None:
            del self._inflight[key]
            future.set_result(None)
            return None
        task = asyncio.create_task(self._store(prompt, request, key, completion, charges, future))
        self._storing.add(task)
        task.add_done_callback(self._stored)
        return None

    async def _fetch(self, request: ChatRequest, charges: list[float]) -> Completion | None:
        """The teacher's answer; every amount the budget charged for it goes into ``charges``.
        None: refused by the budget (possibly after billed attempts)."""
        _charges.set(charges)
        try:
            completion = await self._chat(request)
        except asyncio.CancelledError:
            if sum(charges) > 0:  # queued: the cache writes it before it closes
                self.cache.record_charge(self.run.run_id, uuid.uuid4().hex, sum(charges))
            raise
        except BaseException:
            await self._bill_unanswered(charges)
            raise
        if completion is None:
            await self._bill_unanswered(charges)
        return completion

    async def _store(self, prompt: Prompt, request: ChatRequest, key: str,
                     completion: Completion, charges: list[float],
                     future: asyncio.Future[CachedAnswer | None]) -> None:
        """Commit the answer with its ledger rows, then append its record to ``OUT``."""
        try:
            answer_cost = charges[-1] if charges else self._teacher().cost(completion)
            answer = await self.cache.aput(key, completion, answer_cost, self.run.run_id,
                                           ledger_usd=sum(charges))
        except BaseException as exc:
            _pass_on(future, exc)
            raise
        finally:
            del self._inflight[key]
        self.ledger_spent += sum(charges)
        future.set_result(answer)
        self._emit(prompt, request, answer, hit=False)

    def _stored(self, task: asyncio.Task) -> None:
        self._storing.discard(task)
        if not task.cancelled() and task.exception() is not None and self._fatal is None:
            self._fatal = task.exception()  # e.g. the cache cannot be written: stop sending
            self._stop("error")

    async def _bill_unanswered(self, charges: list[float]) -> None:
        """Attempts billed without an answer (worst case when unknown) still count for the run."""
        if sum(charges) > 0:
            await asyncio.wrap_future(
                self.cache.record_charge(self.run.run_id, uuid.uuid4().hex, sum(charges)))
            self.ledger_spent += sum(charges)

    async def _chat(self, request: ChatRequest):
        """``client.chat``; when the budget refuses the request while others are in flight (their
        reservations may settle below the worst case), wait for one to return and try again.
        None: the request cannot fit the budget, and the run stops."""
        while True:
            if self.stop_reason:
                return None
            self._requests_out += 1
            refused = False
            try:
                return await self._teacher().chat(request, stream=self.cfg.stream)
            except BudgetExceeded:
                refused = True
            finally:
                self._requests_out -= 1
                if not refused:
                    self._settled.set()
            if self._requests_out > 0:
                self._settled.clear()
                await self._settled.wait()
            elif self.spec.pricing.worst_case(request) > self.budget.remaining:
                self._stop("budget")
                self._settled.set()  # wake requests waiting here: they cannot fit either
                return None

    def _emit(self, prompt: Prompt, request: ChatRequest, answer: CachedAnswer, hit: bool) -> None:
        completion, plain = loads_plain(answer.completion_json)
        record = build_record(
            prompt.id, request, completion, model=self.spec.model,
            base_host=self._base_host, cost_usd=answer.cost_usd, created=answer.created,
        )
        problems, line = validate_record(record), None
        try:
            line = None if problems else dump_record(
                record, COMPLETION_FIELDS if plain else frozenset())
        except ValueError as exc:  # NaN/inf in the answer: not valid JSON
            problems = [str(exc)]
        if line is None:
            self._fail(prompt, "invalid_answer", None, "; ".join(problems), 1)
            return
        self.run.log.append(line)
        if not self._unwritten:  # every line of this event-loop turn in one write()
            asyncio.get_running_loop().call_soon(self._write_lines)
        self._unwritten.append(prompt.id)
        self.run.done.add(prompt.id)
        self.failed.pop(prompt.id, None)
        self.new_records += 1
        self.progress.advance(hit=hit)
        self._count_for_checkpoint()

    def _write_lines(self) -> None:
        try:
            self.run.log.write_pending()
        except UserError as exc:  # e.g. disk full: those prompts are not done; stop, say why
            self.run.done.difference_update(self._unwritten)
            if self._fatal is None:
                self._fatal = exc
            self._stop("error")
        finally:
            self._unwritten.clear()

    def _fail(self, prompt: Prompt, reason: str, status: int | None, message: str,
              attempts: int) -> None:
        self.failed[prompt.id] = {
            "reason": reason, "status": status, "message": self.redact(message)[:500],
            "attempts": attempts,
        }
        self.failures[reason] += 1
        self.progress.advance(failed=True)
        self._count_for_checkpoint()
        if sum(self.failures.values()) > self.threshold:
            self._stop("failure_limit")

    def _stop(self, reason: str) -> None:
        if not self.stop_reason:
            self.stop_reason = reason
            self.progress.note(f"stopping ({reason}): finishing the requests in flight")

    def _interrupt(self, main_task: asyncio.Task) -> None:
        if self.stop_reason == "interrupted":
            main_task.cancel()  # second signal: abandon the requests in flight
            return
        self.stop_reason = "interrupted"
        self.progress.note("interrupted: finishing the requests in flight (again to abandon them)")

    def _count_for_checkpoint(self) -> None:
        self._since_checkpoint += 1
        if self._since_checkpoint >= self.cfg.checkpoint_interval:
            self._since_checkpoint = 0
            if self._checkpoint_task is None or self._checkpoint_task.done():
                self._checkpoint_task = asyncio.ensure_future(self._checkpoint())
                self._checkpoint_task.add_done_callback(self._checkpoint_done)

    async def _checkpoint(self, finished: bool = False) -> None:
        """fsync ``OUT``, then atomically write the state describing exactly the synced bytes."""
        async with self._checkpoint_lock:
            self._write_lines()
            records, nbytes, sha = self.run.log.snapshot()
            state = RunState(
                run_id=self.run.run_id, records=records, bytes=nbytes, sha256=sha,
                spent_usd=self.ledger_spent, failed=dict(self.failed), finished=finished,
                stop_reason=self.stop_reason,
            )
            await asyncio.to_thread(self._write_checkpoint, state)

    def _write_checkpoint(self, state: RunState) -> None:
        try:
            self.run.log.fsync()
            save_checkpoint_files(self.cfg.out, state)
        except OSError as exc:
            raise UserError(f"cannot write the checkpoint of {self.cfg.out}: "
                            f"{exc.strerror or exc}") from None

    def _checkpoint_done(self, task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None and self._fatal is None:
            self._fatal = task.exception()
            self._stop("error")

    def _result(self, wall_s: float) -> GenerateResult:
        codes = {"interrupted": EXIT_INTERRUPTED, "budget": EXIT_BUDGET,
                 "failure_limit": EXIT_FAILURE_LIMIT}
        code = codes.get(self.stop_reason or "", EXIT_FAILURES if self.failed or self.pending()
                         else EXIT_OK)
        return GenerateResult(
            exit_code=code, stop_reason=self.stop_reason, records=self.run.log.records,
            new_records=self.new_records, total=len(self.prompts), cache_hits=self.cache.hits,
            cache_misses=self.cache.misses, failures=dict(self.failures),
            failed_ids=sorted(self.failed), spent_usd=self.budget.spent,
            reserved_usd=self.budget.reserved, budget_usd=self.cfg.budget_usd, wall_s=wall_s,
        )


def run_generate(cfg: GenerateConfig, client_options: dict[str, Any] | None = None) -> int:
    result = Generator(cfg, client_options).generate()
    print(format_summary(result, cfg.out), file=sys.stderr)
    return result.exit_code


if __name__ == "__main__":  # `teacher generate` without importing every other command
    from mlx_distill.teacher.cli import generate_main

    sys.exit(generate_main())
