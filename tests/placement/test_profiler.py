"""Cost profiler: the table's shape on a tiny model, unmeasured cells, MPS child processes, merge, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from muxserve.engine.model_hub import KNOWN_MODELS
from muxserve.placement import profiler as profile
from muxserve.placement.costs import load_cost_table


def cells(table: dict) -> list[tuple[tuple[str, ...], dict]]:
    return [((m, g, s, b, sl), c) for m, gs in table.items() for g, ss in gs.items() for s, bs in ss.items()
            for b, sls in bs.items() for sl, c in sls.items()]


def test_profiler_writes_the_cost_table(tmp_path, tiny_model, capsys):
    folder = tiny_model("llama-gqa-hd64")
    out = tmp_path / "costs.json"
    rc = profile.main(["--model", f"tiny={folder}", "--model", f"rnd=random:{folder}", "--batch-sizes", "2,1",
                       "--seq-lens", "8,16", "--max-prefill-tokens", "16", "--warmup", "0", "--repeats", "2",
                       "--output", str(out)])
    assert rc == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}: 2 model(s), 8 cells"
    table = load_cost_table(out)  # validates the nesting
    assert list(table) == ["tiny", "rnd"]
    got = cells(table)
    assert [k for k, _ in got[:4]] == [("tiny", "1", "100", "1", "8"), ("tiny", "1", "100", "1", "16"),
                                      ("tiny", "1", "100", "2", "8"), ("tiny", "1", "100", "2", "16")]
    for (_, _, _, bs, sl), cell in got:
        assert set(cell) == {"prefill", "decoding"}
        assert cell["decoding"] > 0
        if int(bs) * int(sl) > 16:  # over --max-prefill-tokens
            assert cell["prefill"] == -1
        else:
            assert cell["prefill"] > 0


def test_cells_the_pool_cannot_hold_are_not_measured(tiny_model):
    settings = profile.ProfileSettings("tiny", str(tiny_model("llama-gqa-hd64")), (1, 2), (8,), warmup=0, repeats=1)
    engine = profile.build_engine(settings)
    prof = profile.Profiler(engine, settings)
    assert engine.allocator.num_free == engine.allocator.num_pages
    assert prof.cell(4, 8) == {"prefill": -1, "decoding": -1}  # the pool was sized for 2 sequences
    measured = prof.cell(2, 8)
    assert measured["prefill"] > 0 and measured["decoding"] > 0
    assert engine.allocator.num_free == engine.allocator.num_pages  # every page went back


def test_sm_percentages_run_in_child_processes_with_the_mps_environment(tmp_path, tiny_model, monkeypatch):
    calls = []

    def fake_run(cmd, env):
        calls.append((cmd, {k: v for k, v in env.items() if k.startswith("CUDA_MPS")}))
        out = Path(cmd[cmd.index("--worker-output") + 1])
        pct = int(env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"])
        out.write_text(json.dumps({"1": {"8": {"prefill": 1000 / pct, "decoding": 10.0}}}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(profile.subprocess, "run", fake_run)
    out = tmp_path / "costs.json"
    rc = profile.main(["--model", "m=smollm2-135m", "--batch-sizes", "1", "--seq-lens", "8", "--sm-percentages",
                       "100,50", "--mps-dir", str(tmp_path / "mps"), "--output", str(out)])
    assert rc == 0
    assert [env for _, env in calls] == [
        {"CUDA_MPS_PIPE_DIRECTORY": f"{tmp_path}/mps/nvidia-mps",
         "CUDA_MPS_LOG_DIRECTORY": f"{tmp_path}/mps/nvidia-log",
         "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": pct} for pct in ("50", "100")]
    cmd = calls[0][0]
    assert cmd[1:3] == ["-m", "muxserve.muxsched.profile"] and cmd[cmd.index("--model") + 1] == "m=smollm2-135m"
    assert json.loads(out.read_text()) == {"m": {"1": {
        "50": {"1": {"8": {"prefill": 20.0, "decoding": 10.0}}},
        "100": {"1": {"8": {"prefill": 10.0, "decoding": 10.0}}}}}}


def test_worker_mode_and_merge(tmp_path, tiny_model):
    folder = str(tiny_model("llama-gqa-hd64"))
    worker_out = tmp_path / "cells.json"
    assert profile.main(["--model", folder, "--batch-sizes", "1", "--seq-lens", "8", "--warmup", "0",
                         "--repeats", "1", "--worker-output", str(worker_out)]) == 0
    got = json.loads(worker_out.read_text())
    assert list(got) == ["1"] and list(got["1"]) == ["8"] and got["1"]["8"]["decoding"] > 0
    out = tmp_path / "costs.json"
    base = ["--batch-sizes", "1", "--seq-lens", "8", "--warmup", "0", "--repeats", "1", "--output", str(out)]
    assert profile.main(["--model", f"a={folder}"] + base) == 0
    assert profile.main(["--model", f"b={folder}", "--merge"] + base) == 0
    assert list(load_cost_table(out)) == ["a", "b"]


@pytest.mark.parametrize("args, message", [
    (["--sm-percentages", "50,100"], "error: --sm-percentages 50,100 needs --mps-dir (start MPS with "
                                     "scripts/start_mps.sh DIR)"),
    (["--num-gpus", "2"], "error: --num-gpus 2: the profiler measures one GPU per model; the placement estimates "
                          "larger meshes from it (--estimate-tp)"),
    (["--model", "nowhere/model"], "error: model 'nowhere/model': model 'nowhere/model' is neither a model folder, "
                                   f"a .gguf file nor a known short name ({', '.join(sorted(KNOWN_MODELS))})"),
])
def test_bad_arguments(args, message, tmp_path, capsys):
    argv = ["--output", str(tmp_path / "c.json"), "--batch-sizes", "1", "--seq-lens", "8"] + args
    if "--model" not in args:
        argv += ["--model", "smollm2-135m"]
    assert profile.main(argv) == 2
    assert capsys.readouterr().err.strip() == message


def test_existing_output_needs_overwrite_or_merge(tmp_path, capsys):
    out = tmp_path / "c.json"
    out.write_text("{}")
    assert profile.main(["--model", "smollm2-135m", "--output", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: output file {out} already exists; pass --overwrite to "
                                               "replace it or --merge to add to it")
