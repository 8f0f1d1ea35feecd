"""The job and result messages keep every field of the API's features across msgpack."""

from __future__ import annotations

import math

from muxserve.ipc import runtime as M


def test_a_job_with_logprobs_echo_a_grammar_and_a_bias_round_trips():
    seq = M.SeqInput("r1", [1, 2, 3], 3, 0, [7, 8], 0.7, 0.9, 40, -5, 0, logprobs=4, prompt_logprobs=2,
                     guided=["json_schema", '{"type": "object"}', "response_format"], output_token_ids=[9],
                     logit_bias={11: -100.0, 12: 2.5})
    job = M.Job(3, M.Phase.PREFILL, [seq, M.SeqInput("r2", [4], 2, 1, [])], release=["r0"])
    assert M.decode_to_runtime(M.encode(job)) == job
    plain = M.decode_to_runtime(M.encode(M.Job(4, M.Phase.DECODE, [M.SeqInput("r2", [4], 2, 1, [])])))
    assert plain.seqs[0].guided is None and plain.seqs[0].logprobs is None


def test_a_result_with_logprobs_prompt_logprobs_and_finished_grammars_round_trips():
    lp = M.TokenLogprob(5, -0.25, 1, [5, 6], [-0.25, -1.75])
    result = M.JobResult(1, "m/prefill", [5, 6], 0.01, logprobs=[lp, None],
                         prompt_logprobs=[[None, M.TokenLogprob(2, -float("inf"), 9)], None], grammar_done=[1])
    back = M.decode_from_runtime(M.encode(result))
    assert back.logprobs == result.logprobs and back.grammar_done == [1]
    assert back.prompt_logprobs[0][0] is None and math.isinf(back.prompt_logprobs[0][1].logprob)
    assert M.decode_from_runtime(M.encode(M.JobResult(2, "m/decode", [1], 0.0))).logprobs == []
