"""KV quotas: initial split by rate × pages per token, and periodic moves to hungry LLMs."""

from __future__ import annotations

import pytest

from muxserve.scheduler.quota import HISTORY, QuotaManager, QuotaModel


def qm(name, rate, pages_per_block=4, page_tokens=32):
    return QuotaModel(name, rate, pages_per_block, page_tokens)


def test_pages_per_seq_rounds_up_to_blocks():
    m = qm("a", 1.0, pages_per_block=90, page_tokens=64)
    assert m.pages_per_seq(64) == 90
    assert m.pages_per_seq(65) == 180
    assert m.pages_per_seq(416) == 7 * 90


def test_initial_split_proportional_to_rate():
    q = QuotaManager([qm("llm-0", 3.0), qm("llm-1", 1.0)], total_pages=1000, avg_seq_len=100)
    # 100 tokens = ceil(100 / 32) = 4 blocks x 4 pages = 16 pages per sequence
    assert (q.pages("llm-0"), q.pages("llm-1")) == (750, 250)
    assert q.max_num_seqs("llm-0") == 750 // 16 == 46
    assert q.max_num_seqs("llm-1") == 250 // 16 == 15
    assert q.all_max_num_seqs() == {"llm-0": 46, "llm-1": 15}


def test_initial_split_weighs_pages_per_token():
    # b's tokens cost twice the pages of a's (2x the pages per block): equal rates, b gets 2/3
    q = QuotaManager([qm("a", 1.0, pages_per_block=4), qm("b", 1.0, pages_per_block=8)],
                     total_pages=900, avg_seq_len=64)
    assert (q.pages("a"), q.pages("b")) == (300, 600)
    assert q.all_max_num_seqs() == {"a": 300 // 8, "b": 600 // 16}
    # a head size of 64 doubles page_tokens: half the pages per token
    q = QuotaManager([qm("a", 1.0, page_tokens=64), qm("b", 1.0, page_tokens=32)], total_pages=900, avg_seq_len=64)
    assert (q.pages("a"), q.pages("b")) == (300, 600)


def test_fixed_mode_ignores_rates():
    q = QuotaManager([qm("llm-0", 3.0), qm("llm-1", 1.0)], total_pages=1000, avg_seq_len=100, by_rate=False)
    assert (q.pages("llm-0"), q.pages("llm-1")) == (500, 500)
    assert q.all_max_num_seqs() == {"llm-0": 31, "llm-1": 31}


def test_zero_rates_fall_back_to_geometry():
    q = QuotaManager([qm("a", 0.0), qm("b", 0.0)], total_pages=100, avg_seq_len=32)
    assert (q.pages("a"), q.pages("b")) == (50, 50)


def test_quota_at_least_one_sequence():
    q = QuotaManager([qm("a", 99.0), qm("b", 1.0)], total_pages=100, avg_seq_len=100)
    assert (q.pages("a"), q.pages("b")) == (99, 1)
    assert q.all_max_num_seqs() == {"a": 6, "b": 1}


def test_invalid_arguments():
    with pytest.raises(ValueError, match="at least one model"):
        QuotaManager([], 100, 100)
    with pytest.raises(ValueError, match="avg_seq_len must be >= 1, got 0"):
        QuotaManager([qm("a", 1.0)], 100, 0)


def _two_llms():
    # 64 tokens = 2 blocks x 4 pages = 8 pages per sequence; 400 pages = 50 sequences each
    q = QuotaManager([qm("hot", 1.0), qm("cold", 1.0)], total_pages=800, avg_seq_len=64)
    assert q.all_max_num_seqs() == {"hot": 50, "cold": 50}
    return q


def test_adapt_moves_pages_to_the_hungry_llm():
    q = _two_llms()
    for _ in range(5):
        q.record_decode_batch("hot", 50)  # util 1.0
        q.record_decode_batch("cold", 10)  # util 0.2
    moved = q.adapt({"hot": 80, "cold": 10})
    # cold can give int((0.95 - 0.2) * 50) = 37 sequences = 296 pages.
    # hot wants min(max(1, int(0.1 * 50)), int(80 - 50)) = 5 sequences = 40 pages.
    assert moved == {"hot": 40, "cold": -40}
    assert (q.pages("hot"), q.pages("cold")) == (440, 360)
    assert q.all_max_num_seqs() == {"hot": 55, "cold": 45}
    assert q.pages("hot") + q.pages("cold") == 800


def test_adapt_takes_from_donors_in_proportion_to_spare():
    q = QuotaManager([qm("hot", 1.0), qm("cold", 1.0), qm("warm", 1.0)], total_pages=1200, avg_seq_len=64)
    q.record_decode_batch("hot", 50)
    q.record_decode_batch("cold", 10)  # gives int(0.75 * 50) = 37 seqs = 296 pages at most
    q.record_decode_batch("warm", 20)  # gives int(0.55 * 50) = 27 seqs = 216 pages at most
    moved = q.adapt({"hot": 80, "cold": 10, "warm": 20})
    # 40 pages wanted: cold 40 * 296 // 512 = 23, warm 40 * 216 // 512 = 16, the page left over from cold
    assert moved == {"hot": 40, "cold": -24, "warm": -16}
    assert sum(q.pages(n) for n in ("hot", "cold", "warm")) == 1200


def test_adapt_needs_high_demand():
    q = _two_llms()
    q.record_decode_batch("hot", 50)
    q.record_decode_batch("cold", 10)
    # util 1.0 but waiting + running (54) < 1.1 x 50: not hungry
    assert q.adapt({"hot": 54, "cold": 10}) == {"hot": 0, "cold": 0}
    assert (q.pages("hot"), q.pages("cold")) == (400, 400)
    moved = q.adapt({"hot": 56, "cold": 10})  # 56 >= 55: wants min(max(1, 5), 6) = 5 sequences
    assert moved == {"hot": 40, "cold": -40}


def test_adapt_asks_for_at_most_the_excess_demand():
    q2 = QuotaManager([qm("hot", 1.0), qm("cold", 1.0)], total_pages=160, avg_seq_len=64)  # quota 10 each
    q2.record_decode_batch("hot", 10)  # util 1.0
    q2.record_decode_batch("cold", 1)  # util 0.1: can give int(0.85 * 10) = 8 seqs
    # wants min(max(1, int(1.0)), int(12 - 10)) = 1 sequence = 8 pages
    assert q2.adapt({"hot": 12, "cold": 1}) == {"hot": 8, "cold": -8}


def test_adapt_needs_high_utilization():
    q = _two_llms()
    q.record_decode_batch("hot", 44)  # util 0.88 < 0.9
    q.record_decode_batch("cold", 10)
    assert q.adapt({"hot": 500, "cold": 10}) == {"hot": 0, "cold": 0}


def test_adapt_without_history_assumes_batches_of_30():
    q = _two_llms()  # 30 / 50 = util 0.6 for both: nobody is hungry
    assert q.adapt({"hot": 500, "cold": 500}) == {"hot": 0, "cold": 0}
    small = QuotaManager([qm("hot", 1.0), qm("cold", 1.0)], total_pages=400, avg_seq_len=64)  # quota 25 each
    small.record_decode_batch("cold", 5)  # util 0.2: can give int(0.75 * 25) = 18 seqs
    # hot without history: 30 / 25 = util 1.2, hungry; wants min(max(1, 3), 70) = 3 sequences
    assert small.adapt({"hot": 100, "cold": 5}) == {"hot": 24, "cold": -24}


def test_adapt_is_capped_by_what_donors_can_give():
    q = _two_llms()
    q.record_decode_batch("hot", 50)
    q.record_decode_batch("cold", 40)  # util 0.8: gives int(0.15 * 50) = 7 seqs = 56 pages at most
    assert q.adapt({"hot": 1000, "cold": 40}) == {"hot": 40, "cold": -40}  # wants 5 seqs: fits
    assert q.all_max_num_seqs() == {"hot": 55, "cold": 45}
    # now cold's util is 40 / 45 = 0.889: gives int(0.061 * 45) = 2 seqs = 16 pages, less than wanted
    assert q.adapt({"hot": 1000, "cold": 40}) == {"hot": 16, "cold": -16}
    assert q.all_max_num_seqs() == {"hot": 57, "cold": 43}


def test_adapt_hungriest_first():
    q = QuotaManager([qm("a", 1.0), qm("b", 1.0), qm("idle", 1.0)], total_pages=1200, avg_seq_len=64)
    q.record_decode_batch("a", 46)  # util 0.92
    q.record_decode_batch("b", 50)  # util 1.0: served first
    q.record_decode_batch("idle", 44)  # util 0.88: gives int(0.07 * 50) = 3 seqs = 24 pages
    moved = q.adapt({"a": 1000, "b": 1000, "idle": 44})
    # b wants 5 sequences (40 pages) and takes all 24; nothing is left for a
    assert moved == {"a": 0, "b": 24, "idle": -24}


def test_history_is_bounded():
    q = _two_llms()
    for _ in range(HISTORY):
        q.record_decode_batch("hot", 1)
    for _ in range(HISTORY):
        q.record_decode_batch("hot", 50)  # the old batches are forgotten: avg 50
    q.record_decode_batch("cold", 10)
    assert q.adapt({"hot": 80, "cold": 10}) == {"hot": 40, "cold": -40}


def test_a_saturated_llm_is_hungry_whatever_its_decode_batches():
    def manager():
        q = QuotaManager([qm("a", 3.0), qm("b", 1.0)], total_pages=1000, avg_seq_len=100)  # 46 and 15 seqs
        for _ in range(10):
            q.record_decode_batch("a", 23)  # util 0.5
            q.record_decode_batch("b", 9)  # util 0.6: under the paper's rule a donor, never hungry
        return q

    q = manager()
    assert q.adapt({"a": 23, "b": 40}) == {"a": 0, "b": 0}  # the paper's rule: nobody is hungry
    q = manager()
    # b waits at its quota: it asks for its whole excess (40 - 15 = 25 seqs = 400 pages) and gives
    # nothing; a can give int((0.95 - 0.5) x 46) = 20 seqs = 320 pages
    assert q.adapt({"a": 23, "b": 40}, saturated={"b"}) == {"a": -320, "b": 320}
    assert (q.pages("a"), q.pages("b")) == (430, 570) and q.all_max_num_seqs() == {"a": 26, "b": 35}
    # saturated but asking for no more than its quota: nothing moves
    q = manager()
    assert q.adapt({"a": 23, "b": 15}, saturated={"b"}) == {"a": 0, "b": 0}
