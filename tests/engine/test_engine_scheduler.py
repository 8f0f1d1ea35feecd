"""The engine's continuous-batching scheduler: a decode step whose every sequence was preempted is skipped."""

from __future__ import annotations

from muxserve.engine.kv_cache import Allocation
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.scheduler import Scheduler
from muxserve.engine.sequence import Sequence


class _Starved:
    """Admits prefills, then preempts every request of each decode batch (another LLM took the memory)."""

    def can_allocate(self, model, requests):
        return True

    def allocate(self, model, requests):
        requests = list(requests)
        if len(requests) == 1 and requests[0][0] == "fresh":
            return Allocation({"fresh": [0]}, [])
        return Allocation({}, [rid for rid, _ in requests])

    def free(self, model, ids):
        return 0


def test_decode_with_every_sequence_preempted_is_skipped():
    sched = Scheduler(_Starved(), "m", max_num_seqs=4, max_num_batched_tokens=64)
    seq = Sequence("fresh", [1, 2, 3], SamplingParams(max_tokens=4))
    sched.add(seq)
    first = sched.schedule()
    assert first is not None and first.seqs == [seq]
    seq.append_token(7)
    seq.req_id = "old"  # now its decode batch is preempted whole
    assert sched.schedule() is None  # no empty batch for the runner
    assert list(sched.waiting) == [seq] and sched.running == [] and sched.num_preemptions == 1
