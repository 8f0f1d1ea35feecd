"""SM accounting in 10 % units with a bounded overload (reference §6.2, DESIGN §5)."""

from __future__ import annotations

import pytest

from muxserve.scheduler.quota import NUM_UNITS, SMResource, units_for


@pytest.mark.parametrize("percentage, units", [(100, 10), (80, 8), (30, 3), (35, 3), (10, 1), (5, 1), (1, 1)])
def test_units_for(percentage, units):
    assert units_for(percentage) == units


def test_fresh_resource():
    sm = SMResource(2)
    assert NUM_UNITS == 10
    assert (sm.num_free, sm.num_overloaded) == (10, 0)
    assert sm.can_allocate(10)
    assert not sm.can_allocate(11)  # nothing busy yet: nothing to share


def test_threshold_2_full_prefill_and_30_decode_cannot_overlap():
    sm = SMResource(2)
    prefill = sm.allocate(units_for(100))
    assert prefill == list(range(10))
    assert sm.num_free == 0
    assert sm.can_allocate(2)
    assert not sm.can_allocate(units_for(30))  # 10 + 3 > 12
    with pytest.raises(RuntimeError, match="cannot allocate 3 SM units"):
        sm.allocate(3)
    assert sm.refs == [1] * 10  # a refused allocation changes nothing


def test_threshold_2_prefill_80_and_decode_30_overlap():
    sm = SMResource(2)
    prefill = sm.allocate(units_for(80))
    assert prefill == [0, 1, 2, 3, 4, 5, 6, 7]
    assert sm.can_allocate(units_for(30))  # 8 + 3 <= 12
    decode = sm.allocate(units_for(30))
    assert decode == [8, 9, 0]  # free units first, then one shared unit
    assert sm.refs == [2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    assert (sm.num_free, sm.num_overloaded) == (0, 1)
    assert sm.can_allocate(1)
    assert not sm.can_allocate(2)  # one overload unit left of two


def test_release_returns_units():
    sm = SMResource(2)
    prefill = sm.allocate(8)
    decode = sm.allocate(3)
    sm.release(prefill)
    assert sm.refs == [1, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    assert (sm.num_free, sm.num_overloaded) == (7, 0)
    sm.release(decode)
    assert sm.refs == [0] * 10
    assert sm.can_allocate(10)
    assert sm.allocate(10) == list(range(10))


def test_overload_never_exceeds_threshold():
    for threshold in range(0, 5):
        sm = SMResource(threshold)
        held = []
        for units in (3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1):  # more than 10 + threshold in total
            if sm.can_allocate(units):
                held.append(sm.allocate(units))
            assert sm.num_overloaded <= threshold
            assert max(sm.refs) <= 2
        assert sum(len(h) for h in held) == 10 + threshold
        assert not sm.can_allocate(1)


def test_threshold_0_no_sharing():
    sm = SMResource(0)
    sm.allocate(7)
    assert sm.can_allocate(3)
    assert not sm.can_allocate(4)


def test_shared_units_limited_by_busy_units():
    sm = SMResource(5)
    sm.allocate(2)  # only two busy units can be shared, though the threshold allows five
    assert sm.can_allocate(10)  # 8 free + 2 shared
    assert not sm.can_allocate(11)


def test_release_more_than_allocated_raises():
    sm = SMResource(2)
    units = sm.allocate(3)
    sm.release(units)
    with pytest.raises(RuntimeError, match="SM unit 0 released more often than allocated"):
        sm.release(units)
    with pytest.raises(RuntimeError, match="SM unit 9 released"):
        sm.release([9])


def test_negative_threshold_rejected():
    with pytest.raises(ValueError, match="overload_threshold must be >= 0, got -1"):
        SMResource(-1)
