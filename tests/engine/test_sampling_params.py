"""SamplingParams validation, and the sampler's filters on hand-made logits."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from muxserve.engine import SamplingParams, sampler
from muxserve.engine.sampler import candidate_probs, sample, seeded_uniform, splitmix64, step_seed
from muxserve.engine.sampling_params import SEED_MAX, SEED_MIN


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.5),
    ("max_tokens", True),
    ("max_tokens", "16"),
    ("temperature", -0.1),
    ("temperature", 100.5),
    ("temperature", "0.7"),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", -0.5),
    ("top_k", 0),
    ("top_k", -2),
    ("top_k", 3.0),
    ("top_k", True),
    ("top_k", 2**63),
    ("seed", 2**63),
    ("seed", 2**64 - 1),
    ("seed", 2**70),
    ("seed", -(2**63) - 1),
    ("seed", 1.5),
    ("seed", "42"),
    ("seed", False),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [2, 1.5]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", ["7"]),
])
def test_invalid_values_raise_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    message = str(err.value)
    assert message.startswith(field)
    shown = repr([v for v in value if v != 2]) if field == "stop_token_ids" else repr(value)
    assert re.search(re.escape(f"got {shown}"), message), message


def test_defaults_and_boundaries_are_valid():
    default = SamplingParams()
    assert (default.max_tokens, default.temperature, default.top_p, default.top_k) == (16, 1.0, 1.0, -1)
    assert default.seed is None and default.stop_token_ids == [] and not default.ignore_eos
    assert not default.greedy
    edge = SamplingParams(max_tokens=1, temperature=0, top_p=1.0, top_k=1, seed=0, stop_token_ids=(0, 5))
    assert edge.greedy
    assert edge.stop_token_ids == [0, 5] and isinstance(edge.stop_token_ids, list)
    assert SamplingParams(temperature=100, top_p=1e-9, top_k=-1).top_p == 1e-9
    assert (SamplingParams(seed=-(2**63)).seed, SamplingParams(seed=2**63 - 1).seed) == (SEED_MIN, SEED_MAX)
    assert SamplingParams(top_k=2**63 - 1).top_k == 2**63 - 1


def test_seed_range_message():
    with pytest.raises(ValueError) as err:
        SamplingParams(seed=2**64 - 1)
    assert str(err.value) == ("seed must be None or an integer in [-9223372036854775808, 9223372036854775807], "
                              "got 18446744073709551615")


def test_stop_token_ids_are_copied():
    stops = [3, 4]
    params = SamplingParams(stop_token_ids=stops)
    stops.append(5)
    assert params.stop_token_ids == [3, 4]


# -- the sampler ---------------------------------------------------------------------------------
PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])
LOGITS = PROBS.log()


def candidates(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
    """``candidate_probs`` of logits over each row's temperature."""
    vocab = logits.shape[1]
    top_k = torch.tensor([float(sampler._top_k(p, vocab)) for p in params], dtype=torch.float64)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64)
    temperature = torch.tensor([p.temperature or 1.0 for p in params])
    return candidate_probs(logits / temperature[:, None], params, top_k, top_p)


def distribution(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The whole-vocabulary distribution each (filtering) row draws from."""
    probs, ids = candidates(logits, params)
    full = torch.zeros_like(logits).scatter_(1, ids, probs)
    return full / full.sum(-1, keepdim=True)


def reference(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's distribution, the plain way: a full sort per row."""
    x = logits / (p.temperature or 1.0)
    if 0 < p.top_k < x.numel():
        x = x.masked_fill(x < torch.topk(x, p.top_k).values[-1], float("-inf"))
    if p.top_p < 1.0:
        ordered, order = x.sort(descending=True)
        probs = ordered.softmax(-1)
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= p.top_p, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(0, order, ordered)
    return x.softmax(-1)


def one_row(params: SamplingParams) -> torch.Tensor:
    return distribution(LOGITS[None], [params])[0]


def test_top_k_keeps_the_k_most_likely():
    torch.testing.assert_close(one_row(SamplingParams(top_k=2)), torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Sorted: 0.5, 0.3, 0.15, 0.05. Mass before 0.3 is 0.5 < 0.7 (kept); before 0.15 is 0.8 (dropped).
    torch.testing.assert_close(one_row(SamplingParams(top_p=0.7)), torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    # The most likely token always stays, however small top_p is.
    torch.testing.assert_close(one_row(SamplingParams(top_p=1e-6)), torch.tensor([0.0, 1, 0, 0]))


def test_top_p_applies_to_what_top_k_left():
    # top_k=3 leaves 0.5, 0.3, 0.15 (renormalized: 0.526, 0.316, 0.158); the mass before the third is 0.842.
    torch.testing.assert_close(one_row(SamplingParams(top_k=3, top_p=0.8)),
                               torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    torch.testing.assert_close(one_row(SamplingParams(top_k=3, top_p=0.9)),
                               torch.tensor([0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]))


def test_temperature_scales_before_the_filters():
    # At temperature 0.5 the probabilities are PROBS**2 renormalized: 0.0068, 0.6803, 0.0612, 0.2449;
    # top_p=0.9 keeps the first two (mass before the third: 0.925).
    sharp = PROBS**2 / (PROBS**2).sum()
    torch.testing.assert_close(one_row(SamplingParams(temperature=0.5, top_p=0.9)),
                               torch.tensor([0.0, sharp[1] / (sharp[1] + sharp[3]), 0.0,
                                             sharp[3] / (sharp[1] + sharp[3])]))


@pytest.mark.parametrize("vocab", [3000, 40])
def test_candidates_give_the_distribution_of_a_full_sort(vocab, monkeypatch):
    # Peaked rows (their top-p nucleus lies within 64 candidates) and flat rows (it does not, so
    # the batch falls back to sorting everything), with top k, top p, both, at several temperatures.
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", 64)
    gen = torch.Generator().manual_seed(0)
    peaked = torch.randn(4, vocab, generator=gen) * 4
    flat = torch.randn(2, vocab, generator=gen) * 0.1
    settings = [SamplingParams(top_p=0.9), SamplingParams(top_k=20, top_p=0.5, temperature=0.7),
                SamplingParams(top_k=7), SamplingParams(top_p=0.3, temperature=1.5)]
    for logits, count in ((peaked, min(vocab, 64)), (torch.cat([peaked[:2], flat]), vocab)):
        got = distribution(logits, settings)
        for row, p in enumerate(settings):
            torch.testing.assert_close(got[row], reference(logits[row], p), atol=1e-6, rtol=1e-4)
        assert candidates(logits, settings)[1].shape == (4, count)


def test_each_row_of_a_batch_keeps_its_own_settings():
    settings = [SamplingParams(top_k=2), SamplingParams(top_p=0.7, temperature=0.5), SamplingParams(top_k=1),
                SamplingParams(top_k=3, top_p=0.9)]
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS.roll(1), LOGITS])
    batched = distribution(logits, settings)
    for row, params in enumerate(settings):
        torch.testing.assert_close(batched[row], reference(logits[row], params))
    assert batched[2].tolist() == [0.0, 0.0, 1.0, 0.0]  # top_k=1: the argmax of the rolled row


def test_sample_mixes_greedy_and_seeded_rows():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])  # (2, 4): argmax 1 and 2
    greedy = SamplingParams(temperature=0)
    assert sample(logits, [greedy, greedy], [None, None]) == [1, 2]
    seeded = SamplingParams(temperature=1.0, seed=0)
    draws = [sample(logits, [greedy, seeded], [None, step_seed(s, 0)]) for s in range(200)]
    assert all(d[0] == 1 for d in draws)
    counts = torch.bincount(torch.tensor([d[1] for d in draws]), minlength=4)
    # Row 1 has probabilities (0.3, 0.15, 0.5, 0.05): every token shows up, the likeliest most.
    assert counts.argmax().item() == 2 and (counts > 0).all()
    again = [sample(logits, [greedy, seeded], [None, step_seed(s, 0)]) for s in range(200)]
    assert again == draws


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
@pytest.mark.parametrize("params, expected", [
    (SamplingParams(temperature=0.5, top_k=3), [0.0, 0.25 / 0.3625, 0.0225 / 0.3625, 0.09 / 0.3625]),
    (SamplingParams(temperature=1.0), PROBS.tolist()),
    (SamplingParams(temperature=1.0, top_p=0.9), [0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]),
], ids=["top_k", "plain", "top_p"])
def test_draws_follow_the_distribution(seeded, params, expected):
    # 4000 draws of one row (next to a greedy and a plain row, so the batch mixes paths): every
    # frequency within 4 standard deviations of its probability. Seeded: the same keys every run.
    n = 4000
    rows = [params, SamplingParams(temperature=0), SamplingParams(temperature=2.0)] * n
    logits = LOGITS[None].expand(len(rows), 4).contiguous()
    torch.manual_seed(0)
    draws = sample(logits, rows, [step_seed(7, i) if seeded else None for i in range(len(rows))])[::3]
    freq = torch.bincount(torch.tensor(draws), minlength=4).double() / n
    expected = torch.tensor(expected, dtype=torch.float64)
    assert (freq[expected == 0] == 0).all()  # filtered out
    assert ((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt()).all(), (freq, expected)


def test_seeded_draws_depend_only_on_seed_and_step():
    rows = [SamplingParams(temperature=1.0, seed=3), SamplingParams(top_p=0.8, seed=3), SamplingParams(top_k=9, seed=3)]
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [rows[i % 3] for i in range(6)]
    keys = [step_seed(3, i) for i in range(6)]
    batched = sample(logits, params, keys)
    assert batched == [sample(logits[i:i + 1], [params[i]], [keys[i]])[0] for i in range(6)]
    assert sample(logits, params, keys) == batched
    assert len({seeded_uniform(k) for k in keys}) == 6 and all(0 <= seeded_uniform(k) < 1 for k in keys)


def _unxorshift(y: int, k: int) -> int:
    x = y
    for _ in range(64 // k + 1):
        x = y ^ (x >> k)
    return x


def _unsplitmix64(z: int) -> int:
    """The inverse of ``splitmix64``: it exists, so the hash is a bijection of 64-bit words."""
    z = _unxorshift(z, 31) * pow(0x94D049BB133111EB, -1, 2**64) % 2**64
    z = _unxorshift(z, 27) * pow(0xBF58476D1CE4E5B9, -1, 2**64) % 2**64
    return (_unxorshift(z, 30) - 0x9E3779B97F4A7C15) % 2**64


@given(st.integers(SEED_MIN, SEED_MAX), st.integers(0, 1 << 20))
def test_a_step_key_gives_back_its_seed(seed, step):
    # Every accepted seed has its own key at every step: no two seeds share a sampling stream.
    key = step_seed(seed, step)
    assert 0 <= key < 2**64
    unmixed = _unsplitmix64(key ^ step)
    assert unmixed - (2**64 if unmixed >= 2**63 else 0) == seed


def test_seeds_that_used_to_fold_together_draw_different_tokens():
    # -1, 2**63 - 1 and -2**63 were one stream when keys were reduced mod 2**63.
    logits = torch.zeros(1, 50)  # flat: every step's token is its uniform's bucket
    params = [SamplingParams(temperature=1.0, seed=s) for s in (-1, 2**63 - 1, -(2**63), 0)]
    streams = [[sample(logits, [p], [step_seed(p.seed, i)])[0] for i in range(32)] for p in params]
    assert len({tuple(s) for s in streams}) == 4, streams
    assert streams == [[sample(logits, [p], [step_seed(p.seed, i)])[0] for i in range(32)] for p in params]


def test_splitmix64_matches_its_reference_values():
    # The first outputs of SplitMix64 seeded with 0 (state advanced by the golden gamma each call).
    assert [hex(splitmix64(i * 0x9E3779B97F4A7C15 % 2**64)) for i in range(3)] == [
        "0xe220a8397b1dcdaf", "0x6e789e6aa1b965f4", "0x6c45d188009454f"]


def test_a_greedy_rows_top_p_does_not_widen_the_candidates(monkeypatch):
    # A greedy request may carry top_p; it must not count as a top-p row whose nucleus (over a flat
    # row) reaches past the candidates, which would make the whole batch sort its vocabulary.
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", 8)
    sorted_rows = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort",
                        lambda self, *a, **k: sorted_rows.append(self.shape) or real_sort(self, *a, **k))
    logits = torch.zeros(2, 100)
    logits[1, 7] = 50.0
    params = [SamplingParams(temperature=0, top_p=0.5), SamplingParams(top_k=3)]
    assert sample(logits, params, [None, step_seed(1, 0)]) == [0, 7]
    assert sorted_rows == []
