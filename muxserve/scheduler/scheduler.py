"""The MuxServe scheduler: decides each moment which prefill and decode jobs run side by side.

It owns no tensors. For every LLM it keeps a FCFS queue of waiting requests and the set of
prefilled requests between decode steps; it asks the page allocator (FlexStore) for pages,
accounts SM units (10 % each, plus a bounded overload) and sends typed jobs to the runtimes,
one job at a time per runtime. Results come back as one token per request.

NOTE: a batch is all-prefill or all-decode, as in the original; a prefill recomputes every
token a request has so far (prompt + output), so preemption is just "free pages, re-queue".
A runtime that dies is handled the same way: the requests of its job are recomputed once it is
back (``runtime_lost`` / ``runtime_ready``); an LLM whose runtime cannot come back fails alone
(``fail_llm``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable

from muxserve.engine.sequence import FinishReason
from muxserve.ipc.runtime import Job, JobResult, Phase
from muxserve.scheduler.fairness import OverloadFairness, WaitGuard
from muxserve.scheduler.policy import QuotaMode, SchedulePolicy
from muxserve.scheduler.quota import QuotaManager, SMResource
from muxserve.scheduler.recovery import LLMUnavailable, RuntimeRecovery
from muxserve.scheduler.residency import ResidencyTracking
from muxserve.scheduler.state import (
    Dispatch,
    ErrorCallback,
    LLMInfo,
    Request,
    RuntimeLink,
    TokenCallback,
    _Inflight,
    _LLMState,
)

logger = logging.getLogger(__name__)
# Policies with overload_fairness: a job held this long (prefill, decode) gets the next SM units. A decode
# step of a 1-14 B LLM takes 5-20 ms on one large GPU, a prefill of 2048 tokens 20-200 ms.
DEFAULT_WAIT_BOUND_S = (0.1, 0.025)
__all__ = ["ErrorCallback", "LLMInfo", "LLMUnavailable", "MuxScheduler", "RuntimeLink", "TokenCallback"]


class MuxScheduler(RuntimeRecovery, OverloadFairness, ResidencyTracking):
    """ADBS and its baselines over the LLMs of one instance.

    ``on_token(request, token)``, when set, is called for every token a result brings, after the
    request took it (``finish_reason`` and ``end`` are set when it was the last one): the HTTP
    server streams from it. Aborted requests get no more calls. ``on_error(request)`` is called
    for each unfinished request of an LLM that failed (``finish_reason`` ``error``, ``error`` set).
    """

    def __init__(self, llms: list[LLMInfo], allocator, links: dict[tuple[str, Phase], RuntimeLink],
                 policy: SchedulePolicy, max_num_batched_tokens: int, overload_threshold: int,
                 quota: QuotaManager | None = None, clock: Callable[[], float] | None = None,
                 adapt_interval: float = 8.0, on_token: TokenCallback | None = None,
                 on_error: ErrorCallback | None = None, wait_bound_s: tuple[float, float] = DEFAULT_WAIT_BOUND_S):
        if policy.quota is not QuotaMode.NONE and quota is None:
            raise ValueError(f"schedule approach {policy.name!r} needs a QuotaManager")
        self.llms = {info.name: _LLMState(info) for info in llms}
        self.order = [info.name for info in llms]
        self.allocator = allocator
        self.links = links
        self.policy = policy
        self.max_num_batched_tokens = max_num_batched_tokens
        self.sm = SMResource(overload_threshold)
        self.quota = quota
        self.clock = clock or __import__("time").monotonic
        self.adapt_interval = adapt_interval
        self._last_adapt = self.clock()
        self._prefill_ptr = 0
        self._decode_ptr = 0
        self._job_ids = itertools.count()
        self.inflight: dict[int, _Inflight] = {}
        self.busy: set[tuple[str, Phase]] = set()
        self.num_preemptions = 0
        self.on_token = on_token
        self.on_error = on_error
        self._aborting: set[str] = set()  # aborted while inside an in-flight job
        self.down: set[tuple[str, Phase]] = set()  # runtimes that are restarting (or failed): no jobs
        self.failed: dict[str, str] = {}  # LLM -> why it failed
        self.guard = WaitGuard(*wait_bound_s) if policy.overload_fairness else None
        self.offloaded: set[str] = set()  # elastic LLMs whose weights are off the device: no jobs
        self.weights_epochs: dict[str, int] = {}  # LLM -> weights epoch its jobs carry (elastic residency)

    # -- requests in and out ----------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue ``request``; it ends at its LLM's EOS ids and context from now on."""
        if request.llm in self.failed:
            raise LLMUnavailable(self.failed[request.llm])
        state = self.llms[request.llm]
        request.eos_token_ids, request.max_model_len = state.info.eos_ids, state.info.max_model_len
        state.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.inflight) or any(s.waiting or s.running for s in self.llms.values())

    def info(self, llm: str) -> LLMInfo:
        return self.llms[llm].info

    def queue_lengths(self) -> dict[str, tuple[int, int]]:
        """Per LLM: (requests running or inside a job, requests waiting)."""
        return {name: (s.active, len(s.waiting)) for name, s in self.llms.items()}

    def quota_of(self, llm: str) -> int:
        cap = self.llms[llm].info.max_num_seqs
        if self.quota is None:
            return cap
        return min(cap, self.quota.max_num_seqs(llm))

    def on_result(self, result: JobResult) -> list[Request]:
        """Apply one job's tokens; return the requests that finished with it."""
        if result.job_id not in self.inflight:  # its runtime was declared dead: the job is being recomputed
            logger.info("ignoring the result of job %d from %s (dropped)", result.job_id, result.runtime)
            return []
        job = self.inflight[result.job_id]
        self._drop_job(result.job_id)
        state = self.llms[job.llm]
        if len(result.tokens) != len(job.requests):
            raise RuntimeError(f"runtime {result.runtime} returned {len(result.tokens)} tokens "
                               f"for {len(job.requests)} requests")
        now = self.clock()
        had_running = bool(state.running)
        done, aborted = [], []
        for i, (req, token) in enumerate(zip(job.requests, result.tokens)):
            if req.req_id in self._aborting:  # its token is dropped
                self._aborting.discard(req.req_id)
                self._end(req, FinishReason.ABORT, now)
                aborted.append(req)
                continue
            if req.prefill_end is None:
                req.prefill_end = now
            if req.append_token(token, req.take_result(i, result)):
                req.end = now
                done.append(req)
            else:
                state.running.append(req)
            if self.on_token is not None:
                self.on_token(req, token)
        self._release(state, done + aborted)
        if state.running and (job.llm, Phase.DECODE) not in self.busy and (
                state.decode_ready_since is None or not had_running):
            state.decode_ready_since = now  # decodable from now on (a stale mark from an emptied list is reset)
        return done

    def decode_waits(self) -> dict[str, dict[str, float]]:
        """Per LLM: decode jobs sent and the mean time (ms) a decodable batch waited for its job."""
        return {name: {"decode_jobs": s.decode_jobs,
                       "decode_wait_ms_mean": 1e3 * s.decode_wait_s / s.decode_jobs if s.decode_jobs else 0.0}
                for name, s in self.llms.items()}

    def abort(self, req_id: str) -> bool:
        """Drop an unfinished request wherever it is; False when no unfinished request has ``req_id``.

        Waiting: it leaves its queue (it holds no pages). Running between steps: its pages go back
        to the allocator now and both runtimes drop it with their next job. Inside an in-flight
        job: the same happens when that job's result comes back (its token is discarded). Its
        ``finish_reason`` becomes ``abort``; no result returns it as finished.
        """
        now = self.clock()
        for state in self.llms.values():
            for req in state.waiting:
                if req.req_id == req_id:
                    state.waiting.remove(req)
                    self._end(req, FinishReason.ABORT, now)
                    return True
            for req in state.running:
                if req.req_id == req_id:
                    state.running.remove(req)
                    self._end(req, FinishReason.ABORT, now)
                    self._release(state, [req])
                    return True
        for job in self.inflight.values():
            if any(r.req_id == req_id for r in job.requests):
                self._aborting.add(req_id)
                return True
        return False

    @staticmethod
    def _end(req: Request, reason: FinishReason, now: float) -> None:
        req.finish(reason)
        req.end = now

    def _drop_job(self, job_id: int) -> list[Request]:
        """Forget an in-flight job (its result came, or its runtime died); returns its requests."""
        job = self.inflight.pop(job_id)
        self.sm.release(job.units)
        self.busy.discard((job.llm, job.phase))
        self.llms[job.llm].executing -= len(job.requests)
        return job.requests

    def _release(self, state: _LLMState, requests: list[Request]) -> None:
        """Requests that left for good: free their pages; runtimes drop them with their next job."""
        if not requests:
            return
        self.allocator.free(state.info.name, [r.req_id for r in requests])
        for phase in Phase:
            state.release[phase].extend(r.req_id for r in requests)
        for s in self.llms.values():  # pages came back: every LLM may try again
            s.wait_for_cache = False

    # -- the scheduling step ----------------------------------------------------------------
    def schedule(self) -> int:
        """Dispatch what may run now; returns the number of jobs sent."""
        self._maybe_adapt_quotas()
        if not self.inflight and not any(s.running for s in self.llms.values()):
            for s in self.llms.values():  # nothing holds pages: nothing to wait for
                s.wait_for_cache = False
        sent = 0
        if self.guard is not None:
            reserved = self._serve_overdue()
            if reserved is None:
                return 0  # an overdue job waits for SM units: every unit that frees up is kept for it
            sent += reserved
        sent += self._schedule_prefills()
        prefill_running = any(j.phase is Phase.PREFILL for j in self.inflight.values())
        # fcfs waits only for the prefill it picked: if that LLM is at its quota, its running
        # requests must decode (they free the room), whatever other LLMs have waiting
        contenders = [self._fcfs_pick()] if self.policy.fcfs_order else self.llms.values()
        if not prefill_running and any(s is not None and self._wants_prefill(s) for s in contenders):
            return sent  # prefill priority: no decode starts while a prefill waits for SM units
        return sent + self._schedule_decodes()

    def _schedule_prefills(self) -> int:
        sent = 0
        if self.policy.fcfs_order:
            oldest = self._fcfs_pick()
            if oldest is not None:
                sent += self._try_prefill(oldest) is Dispatch.SENT
            return sent
        n, start = len(self.order), self._prefill_ptr  # the pointer moves inside the loop
        for i in range(n):
            pos = (start + i) % n
            outcome = self._try_prefill(self.llms[self.order[pos]])
            if outcome is Dispatch.SENT:
                sent += 1
                self._prefill_ptr = (pos + 1) % n
            elif outcome is Dispatch.NO_SM_UNITS and self.policy.stop_on_blocked_prefill:
                break
        return sent

    def _fcfs_pick(self) -> _LLMState | None:
        """The LLM of the oldest waiting request over all LLMs."""
        candidates = [s for s in self.llms.values() if s.waiting and (s.info.name, Phase.PREFILL) not in self.down]
        return min(candidates, key=lambda s: s.waiting[0].idx) if candidates else None

    def _schedule_decodes(self) -> int:
        sent = 0
        if self.policy.fcfs_order:
            ordered = sorted((s for s in self.llms.values() if s.running),
                             key=lambda s: min(r.idx for r in s.running))
            for state in ordered:
                outcome = self._try_decode(state)
                if outcome is Dispatch.NO_SM_UNITS:
                    break
                sent += outcome is Dispatch.SENT
            return sent
        n, start = len(self.order), self._decode_ptr
        for i in range(n):
            pos = (start + i) % n
            if self._try_decode(self.llms[self.order[pos]]) is Dispatch.SENT:
                sent += 1
                self._decode_ptr = (pos + 1) % n
        return sent

    def _wants_prefill(self, state: _LLMState) -> bool:
        name = state.info.name
        return (bool(state.waiting) and not state.wait_for_cache and state.active < self.quota_of(name)
                and (name, Phase.PREFILL) not in self.down and name not in self.offloaded)

    def _phase_blocked(self, state: _LLMState, phase: Phase) -> bool:
        name = state.info.name
        if (name, phase) in self.busy or (name, phase) in self.down or name in self.offloaded:
            return True
        other = Phase.DECODE if phase is Phase.PREFILL else Phase.PREFILL
        return self.policy.exclusive_phases and (name, other) in self.busy

    def _try_prefill_once(self, state: _LLMState) -> Dispatch:
        if not self._wants_prefill(state) or self._phase_blocked(state, Phase.PREFILL):
            return Dispatch.SKIPPED
        if not self.sm.can_allocate(state.info.prefill_units):
            return Dispatch.NO_SM_UNITS
        room = self.quota_of(state.info.name) - state.active
        batch, tokens = [], 0
        for req in state.waiting:
            if len(batch) >= room or (batch and tokens + req.num_tokens > self.max_num_batched_tokens):
                break
            batch.append(req)
            tokens += req.num_tokens
        admitted = self._allocate(state, batch)
        if len(admitted) < len(batch):
            state.wait_for_cache = True  # the rest stays queued, in order
        if not admitted:
            return Dispatch.SKIPPED
        for _ in admitted:
            state.waiting.popleft()
        now = self.clock()
        for req in admitted:
            if req.submit is None:
                req.submit = now
        self._dispatch(state, Phase.PREFILL, admitted, state.info.prefill_units)
        return Dispatch.SENT

    def _try_decode(self, state: _LLMState) -> Dispatch:
        if not state.running or self._phase_blocked(state, Phase.DECODE):
            return Dispatch.SKIPPED
        if not self.sm.can_allocate(state.info.decode_units):
            return Dispatch.NO_SM_UNITS
        state.running.sort(key=lambda r: r.idx)
        batch = state.running[: max(1, self.quota_of(state.info.name))]
        admitted = self._allocate(state, batch)
        preempted = batch[len(admitted):]
        for req in preempted:
            state.running.remove(req)
            req.preempt()
            for phase in Phase:
                state.release[phase].append(req.req_id)
        for req in reversed(preempted):  # back to the head of the queue, oldest first
            state.waiting.appendleft(req)
        if preempted:
            self.num_preemptions += len(preempted)
            for s in self.llms.values():  # freed pages: others may admit again; this one waits
                s.wait_for_cache = False
            state.wait_for_cache = True
            logger.info("%s: preempted %d requests (KV pool full)", state.info.name, len(preempted))
        if not admitted:
            return Dispatch.SKIPPED
        del state.running[: len(admitted)]
        if self.quota is not None:
            self.quota.record_decode_batch(state.info.name, len(admitted))
        if state.decode_ready_since is not None:
            state.decode_wait_s += self.clock() - state.decode_ready_since
            state.decode_jobs += 1
            state.decode_ready_since = None
        self._dispatch(state, Phase.DECODE, admitted, state.info.decode_units)
        return Dispatch.SENT

    def _allocate(self, state: _LLMState, batch: list[Request]) -> list[Request]:
        """Pages for every request of the batch; returns the admitted prefix (the tail was preempted)."""
        if not batch:
            return []
        result = self.allocator.allocate(state.info.name, [(r.req_id, r.num_tokens) for r in batch])
        admitted = batch[: len(batch) - len(result.preempted)]
        for req in admitted:
            req.pages.extend(result.new_pages.get(req.req_id, ()))
        return admitted

    def _dispatch(self, state: _LLMState, phase: Phase, requests: list[Request], units_needed: int) -> None:
        name = state.info.name
        runtime = f"{name}/{phase.value}"
        job = Job(next(self._job_ids), phase, [r.seq_input(runtime, phase) for r in requests],
                  release=state.release[phase], kv_epoch=getattr(self.allocator, "kv_epoch", 0),
                  weights_epoch=self.weights_epochs.get(name, 0))
        state.release[phase] = []
        units = self.sm.allocate(units_needed)
        self.inflight[job.job_id] = _Inflight(name, phase, requests, units)
        self.busy.add((name, phase))
        state.executing += len(requests)
        self.links[(name, phase)].send(job)

    def _maybe_adapt_quotas(self) -> None:
        if self.policy.quota is not QuotaMode.ADAPTIVE or self.quota is None:
            return
        now = self.clock()
        if now - self._last_adapt < self.adapt_interval:
            return
        self._last_adapt = now
        demand = {n: len(s.waiting) + s.active for n, s in self.llms.items()}
        if self.policy.overload_fairness:  # admission at its quota (not its config cap) with requests waiting
            saturated = {n for n, s in self.llms.items() if s.waiting and s.active >= self.quota.max_num_seqs(n)}
            moved = self.quota.adapt(demand, saturated)
        else:
            moved = self.quota.adapt(demand)
        if any(moved.values()):
            logger.info("quota adapted: %s", self.quota.all_max_num_seqs())
