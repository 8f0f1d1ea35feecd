"""SamplingParams validation, and the sampler's filters on hand-made logits."""

from __future__ import annotations

import math
import re

import pytest
import torch

from muxserve.engine import SamplingParams
from muxserve.engine.sampler import _mix32, filtered_probs, sample, seeded_exponentials, step_seed


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


def test_stop_token_ids_are_copied():
    stops = [3, 4]
    params = SamplingParams(stop_token_ids=stops)
    stops.append(5)
    assert params.stop_token_ids == [3, 4]


# -- the sampler ---------------------------------------------------------------------------------
PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3])
LOGITS = PROBS.log()


def one_row(params: SamplingParams) -> torch.Tensor:
    return filtered_probs(LOGITS[None], [params])[0]


def test_top_k_keeps_the_k_most_likely():
    torch.testing.assert_close(one_row(SamplingParams(top_k=2)), torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Sorted: 0.5, 0.3, 0.15, 0.05. Mass before 0.3 is 0.5 < 0.7 (kept); before 0.15 is 0.8 (dropped).
    torch.testing.assert_close(one_row(SamplingParams(top_p=0.7)), torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    # The most likely token always stays, however small top_p is.
    torch.testing.assert_close(one_row(SamplingParams(top_p=1e-6)), torch.tensor([0.0, 1, 0, 0]))


def test_top_p_applies_to_what_top_k_left():
    # top_k=3 leaves 0.5, 0.3, 0.15 (renormalized: 0.526, 0.316, 0.158); the mass before the third is 0.842.
    torch.testing.assert_close(one_row(SamplingParams(top_k=3, top_p=0.8)), torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    torch.testing.assert_close(one_row(SamplingParams(top_k=3, top_p=0.9)),
                               torch.tensor([0.0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95]))


def test_temperature_scales_logits():
    probs = one_row(SamplingParams(temperature=0.5))
    expected = PROBS**2 / (PROBS**2).sum()
    torch.testing.assert_close(probs, expected)
    assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)


def test_each_row_of_a_batch_keeps_its_own_settings():
    settings = [SamplingParams(top_k=2), SamplingParams(top_p=0.7, temperature=0.5), SamplingParams(temperature=0),
                SamplingParams(top_k=1), SamplingParams()]
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS, LOGITS.roll(1), LOGITS])
    batched = filtered_probs(logits, settings)
    for row, params in zip(range(len(settings)), settings):
        assert torch.equal(batched[row], filtered_probs(logits[row:row + 1], [params])[0])
    assert batched[3].tolist() == [0.0, 0.0, 1.0, 0.0]  # top_k=1: the argmax of the rolled row
    torch.testing.assert_close(batched[4], PROBS)


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
def test_draws_follow_the_filtered_distribution(seeded):
    # 4000 draws of one row: every frequency within 4 standard deviations of its probability
    # (seeded: the same 4000 keys every run, so this cannot flake).
    n = 4000
    params = SamplingParams(temperature=0.5, top_k=3)  # probabilities 0.25/0.35, 0.0225/0.35, 0.09/0.35
    logits = LOGITS[None].expand(n, 4).contiguous()
    torch.manual_seed(0)
    draws = sample(logits, [params] * n, [step_seed(7, i) if seeded else None for i in range(n)])
    freq = torch.bincount(torch.tensor(draws), minlength=4).double() / n
    expected = one_row(params).double()
    assert freq[0] == 0  # filtered out by top_k
    assert ((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt()).all(), (freq, expected)


def test_seeded_draws_depend_only_on_seed_step_and_token():
    row = SamplingParams(temperature=1.0, seed=3)
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    keys = [step_seed(3, i) for i in range(6)]
    batched = sample(logits, [row] * 6, keys)
    assert batched == [sample(logits[i:i + 1], [row], [keys[i]])[0] for i in range(6)]
    noise = seeded_exponentials(keys, 50, "cpu")
    assert torch.equal(noise[2:4], seeded_exponentials(keys[2:4], 50, "cpu"))
    assert torch.equal(noise[:, :20], seeded_exponentials(keys, 20, "cpu"))  # a token's variate is its own
    assert not torch.equal(noise[0], noise[1])


def test_the_seeded_hash_is_exact_in_int64_tensors():
    # The same 32-bit hash on Python ints (exact) and on int64 tensors (where an overflowing
    # product would differ): equal on values up to 2**32 - 1.
    values = [0, 1, 2, 12345, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    assert _mix32(torch.tensor(values, dtype=torch.int64)).tolist() == [_mix32(v) for v in values]

    def lowbias32(x: int) -> int:  # the textbook form, modulo 2**32 on unbounded ints
        x ^= x >> 16
        x = x * 0x7FEB352D % 2**32
        x ^= x >> 15
        x = x * 0x846CA68B % 2**32
        return x ^ (x >> 16)

    assert [_mix32(v) for v in values] == [lowbias32(v) for v in values]
