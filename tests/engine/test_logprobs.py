"""Log-probabilities of sampled and prompt tokens (``engine/logprobs.py``): exact on small tensors,
and on the real SmolLM2 equal to log-softmax of transformers' logits for the same tokens."""

from __future__ import annotations

import math

import pytest
import torch

from muxserve.engine import SamplingParams
from muxserve.engine import runner as runner_module
from muxserve.engine.logprobs import (
    MAX_TOP_LOGPROBS,
    TokenLogprobs,
    check_num_top,
    logits_rows,
    prompt_logprobs,
    token_logprobs,
)

TOL = 1e-4


# -- small tensors -------------------------------------------------------------------------------
def test_chosen_token_rank_and_top_on_a_known_row():
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0 - 1e-3]])
    lse = math.log(sum(math.exp(v) for v in logits[0].tolist()))
    [row] = token_logprobs(logits, [2], [3])
    assert row.token_id == 2
    assert row.rank == 3  # tokens 1 and 3 are more likely
    assert row.logprob == pytest.approx(1.0 - lse, abs=1e-6)
    assert [t for t, _ in row.top] == [1, 3, 2]
    assert [v for _, v in row.top] == pytest.approx([2.0 - lse, 2.0 - 1e-3 - lse, 1.0 - lse], abs=1e-6)


def test_each_row_gets_its_own_count_and_rows_without_one_get_none():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    chosen = [7, 0, 49, 13]
    rows = token_logprobs(logits, torch.tensor(chosen), [0, None, 5, 20])
    assert rows[1] is None
    reference = torch.log_softmax(logits, -1)
    for i in (0, 2, 3):
        row = rows[i]
        assert row.token_id == chosen[i]
        assert row.logprob == pytest.approx(reference[i, chosen[i]].item(), abs=1e-6)
        assert row.rank == 1 + int((reference[i] > reference[i, chosen[i]]).sum())
        k = [0, None, 5, 20][i]
        values, ids = reference[i].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.int64))
        assert [t for t, _ in row.top] == ids.tolist()
        assert [v for _, v in row.top] == pytest.approx(values.tolist(), abs=1e-6)


def test_the_greedy_token_has_rank_one_and_is_first_of_the_top():
    torch.manual_seed(1)
    logits = torch.randn(3, 100)
    greedy = logits.argmax(-1)
    for row, g in zip(token_logprobs(logits, greedy, [2, 2, 2]), greedy.tolist()):
        assert row.rank == 1 and row.top[0][0] == g and row.top[0][1] == row.logprob


def test_bfloat16_logits_are_computed_in_float32():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    [row] = token_logprobs(logits, [0], [1])
    expected = torch.log_softmax(torch.tensor([1.0, 2.0, 3.0]), -1)
    assert row.logprob == pytest.approx(expected[0].item(), abs=1e-6)


def test_no_row_asking_returns_nones_without_computing():
    assert token_logprobs(torch.randn(2, 8), [1, 2], [None, None]) == [None, None]


def test_one_transfer_to_the_host(monkeypatch):
    calls = []
    real_tolist = torch.Tensor.tolist

    def counting(self):
        calls.append(tuple(self.shape))
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("item() is a per-value transfer"))
    token_logprobs(torch.randn(5, 64), torch.arange(5), [3, None, 0, 20, 1])
    assert calls == [(4, 3 + 2 * 20)]


@pytest.mark.parametrize("bad", [-1, 21, 2.0, True, "3"])
def test_bad_counts_are_refused_naming_the_field(bad):
    with pytest.raises(ValueError) as err:
        token_logprobs(torch.randn(1, 8), [0], [bad])
    assert str(err.value) == f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {bad!r}"
    with pytest.raises(ValueError, match=r"^logprobs must be an integer"):
        prompt_logprobs(torch.randn(3, 8), [0, 1, 2], bad)
    assert check_num_top(20) == 20


def test_shapes_that_do_not_match_are_refused():
    with pytest.raises(ValueError, match="2 rows of logits but 3 token ids and 2 counts"):
        token_logprobs(torch.randn(2, 8), [0, 1, 2], [0, 0])
    with pytest.raises(ValueError, match=r"must be \(batch, vocab\)"):
        token_logprobs(torch.randn(8), [0], [0])
    with pytest.raises(ValueError, match=r"\(T, vocab\) for T = 3"):
        prompt_logprobs(torch.randn(2, 8), [0, 1, 2])


def test_prompt_logprobs_score_each_token_by_the_row_before_it():
    torch.manual_seed(2)
    logits = torch.randn(4, 30)
    ids = [5, 9, 0, 29]
    out = prompt_logprobs(logits, ids, 2)
    assert out[0] is None and len(out) == 4
    reference = torch.log_softmax(logits, -1)
    for t in range(1, 4):
        assert out[t].token_id == ids[t]
        assert out[t].logprob == pytest.approx(reference[t - 1, ids[t]].item(), abs=1e-6)
        assert [i for i, _ in out[t].top] == reference[t - 1].topk(2).indices.tolist()
    assert prompt_logprobs(torch.randn(1, 30), [4]) == [None]


def test_logits_rows_keeps_every_position_only_where_asked():
    indices, spans = logits_rows([3, 2, 4], [False, True, True])
    assert indices == [2, 3, 4, 5, 6, 7, 8]
    assert spans == [(0, 1), (1, 2), (3, 4)]
    assert logits_rows([5], [False]) == ([4], [(0, 1)])
    with pytest.raises(ValueError):
        logits_rows([5, 2], [False])


# -- the real model against transformers --------------------------------------------------------
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Three primary colors are red,"]


class StepRecorder:
    """Wraps the runner's ``sample`` and the model's forward: keeps each step's logits, sampled ids
    and, for prefills, every position's hidden state (what a prefill that returns all positions'
    logits computes)."""

    def __init__(self, monkeypatch, runner):
        self.steps: list[tuple[torch.Tensor, list[int]]] = []
        self.hidden: list[torch.Tensor] = []
        real_sample, model = runner_module.sample, runner.model
        real_forward = model.forward

        def sample(logits, params, seeds):
            tokens = real_sample(logits, params, seeds)
            self.steps.append((logits.clone(), list(tokens)))
            return tokens

        def forward(*args, **kwargs):
            hidden = real_forward(*args, **kwargs)
            self.hidden.append(hidden.clone())
            return hidden

        monkeypatch.setattr(runner_module, "sample", sample)
        monkeypatch.setattr(model, "forward", forward)


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, -1)


def assert_matches(row: TokenLogprobs, reference: torch.Tensor, token: int, k: int) -> None:
    """``row`` against the (vocab,) reference log-probabilities at its position."""
    assert row.token_id == token
    assert abs(row.logprob - reference[token].item()) < TOL
    assert row.rank == 1 + int((reference > reference[token]).sum())
    values, ids = reference.topk(k)
    assert [t for t, _ in row.top] == ids.tolist()
    assert max((abs(v - r) for (_, v), r in zip(row.top, values.tolist())), default=0) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("sampled", [False, True])
def test_generated_token_logprobs_equal_transformers(monkeypatch, smollm2_llm, smollm2_hf, sampled):
    engine, tokenizer = smollm2_llm.engine, smollm2_llm.get_tokenizer()
    recorder = StepRecorder(monkeypatch, engine.runner)
    counts = [5, 0, 20]
    params = SamplingParams(max_tokens=6, temperature=0.9 if sampled else 0, seed=11 if sampled else None,
                            ignore_eos=True)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    seqs = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    # Rows in each step are the sequences in order (one prefill of all three, then decodes).
    per_seq: list[list[TokenLogprobs]] = [[] for _ in seqs]
    for logits, tokens in recorder.steps:
        assert logits.shape == (3, 49152)
        for i, row in enumerate(token_logprobs(logits, tokens, counts)):
            per_seq[i].append(row)
    for prompt, seq, rows, k in zip(prompts, seqs, per_seq, counts):
        output = seq.output_token_ids
        assert [r.token_id for r in rows] == output
        reference = hf_logprobs(smollm2_hf, prompt + output)
        for t, (row, token) in enumerate(zip(rows, output)):
            assert_matches(row, reference[len(prompt) - 1 + t], token, k)
        if not sampled:
            assert all(r.rank == 1 for r in rows)


@pytest.mark.slow
def test_echo_prompt_logprobs_equal_transformers(monkeypatch, smollm2_llm, smollm2_hf):
    engine, tokenizer = smollm2_llm.engine, smollm2_llm.get_tokenizer()
    recorder = StepRecorder(monkeypatch, engine.runner)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    wants = [True, False, True]
    seqs = [engine.add_request(p, SamplingParams(max_tokens=1, temperature=0)) for p in prompts]
    engine.step()  # the prefill
    assert all(s.is_finished for s in seqs)
    indices, spans = logits_rows([len(p) for p in prompts], wants)
    logits = engine.runner.model.compute_logits(recorder.hidden[0][indices])
    for prompt, want, (start, n), seq in zip(prompts, wants, spans, seqs):
        rows = logits[start:start + n]
        # The last row is the next-token logits the sampler got: the same greedy token.
        assert int(rows[-1].argmax()) == seq.output_token_ids[0]
        if not want:
            assert n == 1
            continue
        echoed = prompt_logprobs(rows, prompt, 3)
        reference = hf_logprobs(smollm2_hf, prompt)
        assert echoed[0] is None
        for t in range(1, len(prompt)):
            assert_matches(echoed[t], reference[t - 1], prompt[t], 3)


# -- through the engine -------------------------------------------------------------------------
def test_generate_returns_the_logprobs_of_transformers(tiny_llm, tiny_model):
    """Raw logprobs (any temperature), prompt logprobs, and a logit bias that changes the sampling
    but not the logprobs, in one batch with a row that asks for nothing."""
    from conftest import load_hf

    from muxserve.engine import SamplingParams

    hf = load_hf(tiny_model("llama-gqa-hd64"))
    prompts = [[5, 17, 99, 3, 250, 41], [7, 8, 300, 12]]
    params = [SamplingParams(max_tokens=4, temperature=0.9, seed=3, logprobs=3, prompt_logprobs=2),
              SamplingParams(max_tokens=4, temperature=0, logprobs=0, logit_bias={42: 100.0})]
    outs = [tiny_llm.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    plain = tiny_llm.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.9, seed=3))[0]
    assert plain.token_ids == outs[0].token_ids and plain.logprobs is None
    assert outs[1].token_ids == [42] * 4  # the bias decides the token
    for prompt, out, sp in zip(prompts, outs, params):
        ids = prompt + out.token_ids
        with torch.inference_mode():
            expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
        for i, lp in enumerate(out.logprobs):
            t = len(prompt) - 1 + i
            assert lp.token_id == ids[t + 1]
            assert lp.logprob == pytest.approx(expected[t, ids[t + 1]].item(), abs=2e-4)
            assert lp.rank == int((expected[t] > expected[t, ids[t + 1]]).sum()) + 1
            assert [v for _, v in lp.top] == pytest.approx(expected[t].topk(sp.logprobs).values.tolist(), abs=2e-4)
    first = outs[0].prompt_logprobs
    assert first[0] is None and len(first) == len(prompts[0])
    for t in range(1, len(prompts[0])):
        assert first[t].logprob == pytest.approx(
            torch.log_softmax(hf(torch.tensor([prompts[0]])).logits[0].float(), -1)[t - 1, prompts[0][t]].item(),
            abs=2e-4)
        assert len(first[t].top) == 2
