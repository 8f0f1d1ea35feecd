"""What the scheduler does for elastic residency: no job for an LLM whose weights are not on the device.

An offloaded LLM's requests wait in its queue (the wait counts in their TTFT) until the instance
wakes it; the requests inside in-flight jobs are protected from the wake's preemption; the
requests a wake preempted (other LLMs', between steps) go back to the head of their queues and
are recomputed, as after the pool ran out. Which LLM to offload and when is the instance's
residency policy (``instance/residency.py``), not the scheduler's.
"""

from __future__ import annotations

from muxserve.scheduler.state import Request


class ResidencyTracking:
    """Part of MuxScheduler: ``offloaded`` and ``weights_epochs`` are its own, the rest is the scheduler's."""

    def set_offloaded(self, llm: str) -> None:
        """``llm``'s weights left the device: it gets no job until ``set_resident``."""
        state = self.llms[llm]
        if state.active:
            raise ValueError(f"{llm!r} has {state.active} requests running or in flight: it cannot be offloaded")
        self.offloaded.add(llm)

    def set_resident(self, llm: str, weights_epoch: int = 0) -> None:
        """``llm`` is woken; its next jobs tell its runtimes to follow its weights up to ``weights_epoch``."""
        self.offloaded.discard(llm)
        self.weights_epochs[llm] = max(self.weights_epochs.get(llm, 0), weights_epoch)

    def is_resident(self, llm: str) -> bool:
        return llm not in self.offloaded

    def is_idle(self, llm: str) -> bool:
        """No request of ``llm`` waits, runs or holds pages."""
        state = self.llms[llm]
        return not state.waiting and not state.active

    def to_wake(self) -> list[str]:
        """Offloaded LLMs with waiting requests, oldest waiting request first."""
        waiting = [self.llms[n] for n in self.offloaded if self.llms[n].waiting and n not in self.failed]
        return [s.info.name for s in sorted(waiting, key=lambda s: s.waiting[0].idx)]

    def protected(self) -> list[tuple[str, str]]:
        """``(llm, request id)`` of every request inside an in-flight job: a wake never preempts them."""
        return [(job.llm, r.req_id) for job in self.inflight.values() for r in job.requests]

    def requeue_preempted(self, preempted: dict[str, list[str]]) -> list[Request]:
        """Requests whose pages a wake took (per LLM, oldest first; FlexStore already freed them) go
        back to the head of their queue and are recomputed. Returns them."""
        requeued = []
        for llm, ids in preempted.items():
            state = self.llms[llm]
            by_id = {r.req_id: r for r in state.running}
            missing = [rid for rid in ids if rid not in by_id]
            if missing:
                raise RuntimeError(f"a wake preempted requests {missing[:4]} of {llm!r} that are not between steps")
            reqs = [by_id[rid] for rid in ids]
            for req in reqs:
                state.running.remove(req)
                req.preempt()
                for release in state.release.values():
                    release.append(req.req_id)
            for req in sorted(reqs, key=lambda r: r.idx, reverse=True):
                state.waiting.appendleft(req)
            if not state.running:
                state.decode_ready_since = None
            requeued += reqs
        if requeued:
            self.num_preemptions += len(requeued)
            for s in self.llms.values():
                s.wait_for_cache = False
        return requeued
