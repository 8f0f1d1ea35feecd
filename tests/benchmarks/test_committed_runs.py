"""The committed end-to-end runs keep their per-request data compressed (``<system>.json.gz``); the
analysis still reads them, and reads the ``.json`` of older runs alike."""

from __future__ import annotations

import gzip
import shutil

import pytest

from benchmark.end_to_end import analyze
from benchmark.end_to_end.e2e_common import read_json, stats_files

from .helpers import REPO

RESULTS = REPO / "benchmark" / "results"
RUN_FOLDERS = sorted(p for p in RESULTS.glob("*/runs") if (p / "points").is_dir())


def test_every_committed_run_is_compressed():
    assert len(RUN_FOLDERS) == 3
    for runs in RUN_FOLDERS:
        assert not [p for p in (runs / "points").glob("*/*.json") if p.stem in ("muxserve", "temporal", "spatial")]
        assert all(path.name.endswith(".json.gz") for _, path in stats_files(runs))


@pytest.mark.parametrize("runs", RUN_FOLDERS, ids=lambda p: p.parent.name)
def test_analysis_of_the_committed_runs_has_a_row_per_run_with_its_requests(runs, tmp_path):
    summary = analyze.analyze(runs, tmp_path, plots=False)
    files = stats_files(runs)
    assert len(summary["rows"]) == len(files) > 0
    for system, path in files:
        doc = read_json(path)
        [row] = [r for r in summary["rows"] if r["tag"] == doc["tag"] and r["system"] == system]
        assert row["num_requests"] == doc["num_requests_expected"]
        assert row["unfinished"] == len(doc["unfinished"])
        assert row["finished"] == len(doc["requests"]) - len(doc["unfinished"])


def test_json_and_json_gz_runs_give_the_same_analysis(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(RESULTS / "end_to_end" / "runs", runs)
    compressed = analyze.analyze(runs, tmp_path / "a", plots=False)
    for _, path in stats_files(runs)[::2]:  # every other run as an older run wrote it
        path.with_suffix("").write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    assert {p.suffix for _, p in stats_files(runs)} == {".json", ".gz"}
    assert analyze.analyze(runs, tmp_path / "b", plots=False)["rows"] == compressed["rows"]
