"""The MPS sweep's table and plot from a cost table (the GPU measurement itself runs on the device)."""

from __future__ import annotations

import json

from benchmark.end_to_end import mps_sweep


def _table():
    # decode barely slows at 30 % of the SMs, prefill does: the paper's observation
    cells = {"30": {"1": {"128": {"prefill": 12.0, "decoding": 10.5}},
                    "64": {"128": {"prefill": 200.0, "decoding": 11.0}}},
             "100": {"1": {"128": {"prefill": 10.0, "decoding": 10.0}},
                     "64": {"128": {"prefill": 100.0, "decoding": 10.0}}}}
    return {"llama-3-8b": {"1": cells}}


def test_sweep_rows_give_ms_and_slowdown():
    sms, rows = mps_sweep.sweep_rows(_table(), "llama-3-8b")
    assert sms == [30, 100]
    assert [(r["phase"], r["batch_size"], r["seq_len"], r["slowdown"][30]) for r in rows] == [
        ("decoding", 1, 128, 1.05), ("decoding", 64, 128, 1.1), ("prefill", 1, 128, 1.2), ("prefill", 64, 128, 2.0)]


def test_from_table_writes_markdown_and_plot(tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps(_table()))
    assert mps_sweep.main(["--from-table", str(table), "--output-dir", str(tmp_path)]) == 0
    md = (tmp_path / "mps_sweep_llama-3-8b.md").read_text()
    assert "| decoding | 64 | 128 | 11.00 (1.10x) | 10.00 (1.00x) |" in md
    assert "At 30 % of the SMs, decoding is 1.05x-1.10x slower than at 100 %" in md
    assert "At 30 % of the SMs, prefill is 1.20x-2.00x slower than at 100 %" in md
    assert (tmp_path / "mps_sweep_llama-3-8b.png").read_bytes()[:4] == b"\x89PNG"
