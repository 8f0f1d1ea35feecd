"""What the scheduler does when a runtime dies: recompute its requests, or fail its LLM alone.

A dead runtime's job is lost; its requests are recomputed as after a preemption (pages freed,
back to the head of the queue) once the runtime is back, and the new process gets every
request's whole page list. When the runtime cannot come back, only its LLM fails.
"""

from __future__ import annotations

from muxserve.engine.sequence import FinishReason
from muxserve.ipc.runtime import Phase
from muxserve.scheduler.state import Request


class LLMUnavailable(RuntimeError):
    """The LLM failed (its runtime died and could not be restarted): its requests are refused."""


class RuntimeRecovery:
    """Part of MuxScheduler: the state it touches (``inflight``, ``llms``, ``down``, ``failed``, ...) is its own."""

    def runtime_lost(self, llm: str, phase: Phase) -> list[Request]:
        """The runtime of (``llm``, ``phase``) died: it gets no job until ``runtime_ready``.

        The requests of its job in flight are recomputed as after a preemption (pages freed, back
        to the head of the queue); the restarted runtime gets every request's whole page list.
        Returns the requests sent back to the queue.
        """
        self.down.add((llm, phase))
        state = self.llms[llm]
        lost = [r for job_id, job in list(self.inflight.items()) if (job.llm, job.phase) == (llm, phase)
                for r in self._drop_job(job_id)]
        aborted = [r for r in lost if r.req_id in self._aborting]
        requeue = [r for r in lost if r.req_id not in self._aborting]
        for req in aborted:
            self._aborting.discard(req.req_id)
            self._end(req, FinishReason.ABORT, self.clock())
        self._release(state, aborted)
        if requeue:
            self.allocator.free(llm, [r.req_id for r in requeue])
        for req in sorted(requeue, key=lambda r: r.idx, reverse=True):
            req.preempt()
            state.waiting.appendleft(req)
        runtime = f"{llm}/{phase.value}"
        for req in self._requests_of(llm):
            req.pages_sent.pop(runtime, None)
        state.release[phase] = []
        for s in self.llms.values():
            s.wait_for_cache = False
        return requeue

    def runtime_ready(self, llm: str, phase: Phase) -> None:
        """The runtime of (``llm``, ``phase``) is back: jobs go to it again."""
        if llm not in self.failed:
            self.down.discard((llm, phase))

    def fail_llm(self, llm: str, message: str) -> list[Request]:
        """``llm`` cannot run any more: every unfinished request of it ends with ``message``, new ones
        are refused (``LLMUnavailable``); the other LLMs are not touched. Returns the failed requests."""
        self.failed[llm] = message
        self.down |= {(llm, phase) for phase in Phase}
        state = self.llms[llm]
        reqs = [r for job_id, job in list(self.inflight.items()) if job.llm == llm for r in self._drop_job(job_id)]
        reqs += state.running + list(state.waiting)
        state.running.clear()
        state.waiting.clear()
        state.release = {phase: [] for phase in Phase}
        holding = [r.req_id for r in reqs if r.pages]
        if holding:
            self.allocator.free(llm, holding)
        now = self.clock()
        for req in reqs:
            req.pages = []
            if req.req_id in self._aborting:
                self._aborting.discard(req.req_id)
                self._end(req, FinishReason.ABORT, now)
                continue
            req.error = message
            self._end(req, FinishReason.ERROR, now)
            if self.on_error is not None:
                self.on_error(req)
        for s in self.llms.values():
            s.wait_for_cache = False
        return [r for r in reqs if r.finish_reason is FinishReason.ERROR]

    def _requests_of(self, llm: str) -> list[Request]:
        state = self.llms[llm]
        inflight = [r for job in self.inflight.values() if job.llm == llm for r in job.requests]
        return [*state.waiting, *state.running, *inflight]

