"""SamplingParams validation, and the sampler's filters on hand-made logits."""

from __future__ import annotations

import math
import re

import pytest
import torch

from muxserve.engine import SamplingParams
from muxserve.engine.sampler import _filtered_probs, sample


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


def test_top_k_keeps_the_k_most_likely():
    probs = _filtered_probs(LOGITS, SamplingParams(top_k=2))
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Sorted: 0.5, 0.3, 0.15, 0.05. Mass before 0.3 is 0.5 < 0.7 (kept); before 0.15 is 0.8 (dropped).
    probs = _filtered_probs(LOGITS, SamplingParams(top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]))
    # The most likely token always stays, however small top_p is.
    torch.testing.assert_close(_filtered_probs(LOGITS, SamplingParams(top_p=1e-6)), torch.tensor([0.0, 1, 0, 0]))


def test_temperature_scales_logits():
    probs = _filtered_probs(LOGITS, SamplingParams(temperature=0.5))
    expected = PROBS**2 / (PROBS**2).sum()
    torch.testing.assert_close(probs, expected)
    assert math.isclose(probs.sum().item(), 1.0, rel_tol=1e-6)


def test_sample_mixes_greedy_and_seeded_rows():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])  # (2, 4): argmax 1 and 2
    greedy = SamplingParams(temperature=0)
    assert sample(logits, [greedy, greedy], [None, None]) == [1, 2]
    seeded = SamplingParams(temperature=1.0, seed=0)
    draws = [sample(logits, [greedy, seeded], [None, torch.Generator().manual_seed(s)]) for s in range(200)]
    assert all(d[0] == 1 for d in draws)
    counts = torch.bincount(torch.tensor([d[1] for d in draws]), minlength=4)
    # Row 1 has probabilities (0.3, 0.15, 0.5, 0.05): every token shows up, the likeliest most.
    assert counts.argmax().item() == 2 and (counts > 0).all()
    again = [sample(logits, [greedy, seeded], [None, torch.Generator().manual_seed(s)]) for s in range(200)]
    assert again == draws
