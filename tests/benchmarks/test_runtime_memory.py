"""benchmark.serve.runtime_memory without starting an instance: /proc figures, the fit, the table."""

from __future__ import annotations

import os

import pytest

from benchmark.serve.runtime_memory import config_doc, figures_of, fit, markdown, parse_smaps, smaps_rollup

ROLLUP = """55d1c0a2e000-7ffd4b3f2000 ---p 00000000 00:00 0                          [rollup]
Rss:              400000 kB
Pss:              300000 kB
Pss_Anon:         250000 kB
Pss_File:          40000 kB
Pss_Shmem:         10000 kB
Shared_Clean:     120000 kB
Shared_Dirty:       5000 kB
Private_Clean:     15000 kB
Private_Dirty:    260000 kB
Swap:                  0 kB
"""


def test_figures_from_smaps_rollup():
    f = figures_of(parse_smaps(ROLLUP))
    assert f == {"uss": 275000 * 1024, "pss": 300000 * 1024, "rss": 400000 * 1024, "shared": 125000 * 1024,
                 "pss_anon": 250000 * 1024, "pss_file": 40000 * 1024, "pss_shmem": 10000 * 1024, "swap": 0}
    assert smaps_rollup(os.getpid())["Rss"] > 0  # the real file parses


def test_fit_is_exact_on_a_line_and_the_table_names_every_run():
    runs = [{"num_llms": n, "num_runtimes": 2 * n, "ready_s": 1.0,
             "total": {"pss": 100 + 30 * 2 * n, "uss": 1, "rss": 1},
             "runtimes_pss": 60 * n, "per_runtime": dict.fromkeys(("uss", "pss", "shared", "pss_anon", "pss_file",
                                                                   "pss_shmem"), 2**20),
             "processes": [{"name": "flexstore", "pss": 2**20}]} for n in (2, 4, 8)]
    assert fit(runs, "total") == pytest.approx((100, 30))
    text = markdown({"device": "cpu", "machine": "m", "model_note": "tiny", "command": "c", "runs": runs})
    assert [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "LLMs" not in line] \
        == ["2", "4", "8"]


def test_config_has_one_entry_per_llm():
    doc = config_doc(3, "m", "random", "fp32", 1 << 20)
    assert [m["name"] for m in doc["models"]] == ["llm-0", "llm-1", "llm-2"]
    assert all(m["load_format"] == "random" for m in doc["models"])
