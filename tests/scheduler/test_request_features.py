"""What a request tells the runtimes of its logprobs, echo and grammar, and what it keeps of their answers."""

from __future__ import annotations

from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.sequence import FinishReason
from muxserve.engine.structured import GuidedSpec
from muxserve.ipc.runtime import JobResult, Phase, TokenLogprob
from muxserve.scheduler.state import Request

SPEC = GuidedSpec.choice(["yes", "no"])


def make() -> Request:
    params = SamplingParams(max_tokens=8, logprobs=2, prompt_logprobs=1, guided=SPEC, logit_bias={5: -3.0})
    req = Request("1", [3, 4, 5], params, idx=1, llm="m", arrival=0.0)
    req.pages = [10, 11]
    return req


def test_the_first_prefill_asks_for_the_prompt_logprobs_and_carries_the_grammar():
    req = make()
    s = req.seq_input("m/prefill", Phase.PREFILL)
    assert (s.logprobs, s.prompt_logprobs, s.guided, s.logit_bias) == (2, 1, SPEC.to_wire(), {5: -3.0})
    assert s.output_token_ids is None  # a prefill carries every token already
    result = JobResult(0, "m/prefill", [7], 0.1,
                       logprobs=[TokenLogprob(7, -0.5, 1, [7, 9], [-0.5, -1.5])],
                       prompt_logprobs=[[None, TokenLogprob(4, -2.0, 3, [1], [-0.1]), TokenLogprob(5, -1.0, 1, [5],
                                                                                                     [-1.0])]])
    assert req.take_result(0, result) is False
    assert req.append_token(7, False) is None
    assert (req.logprobs[0].token_id, req.logprobs[0].top) == (7, [(7, -0.5), (9, -1.5)])
    assert [lp and lp.token_id for lp in req.prompt_logprobs] == [None, 4, 5]
    req.preempt()
    again = req.seq_input("m/prefill", Phase.PREFILL)
    assert again.prompt_logprobs is None and again.num_output_tokens == 1  # a recompute does not score it again


def test_a_decode_runtime_new_to_a_guided_request_gets_its_whole_output_once():
    req = make()
    req.seq_input("m/prefill", Phase.PREFILL)
    req.append_token(7)
    first = req.seq_input("m/decode", Phase.DECODE)
    assert (first.token_ids, first.output_token_ids, first.prompt_logprobs) == ([7], [7], None)
    req.append_token(8)
    assert req.seq_input("m/decode", Phase.DECODE).output_token_ids is None


def test_a_complete_grammar_ends_the_request_with_stop():
    req = make()
    result = JobResult(0, "m/decode", [7], 0.1, grammar_done=[0])
    assert req.take_result(0, result) is True
    assert req.append_token(7, True) is FinishReason.STOP
