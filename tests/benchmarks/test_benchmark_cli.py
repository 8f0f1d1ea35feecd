"""Every benchmark script's command line with its default arguments: the defaults parse to the types
the script uses, the scripts that need a GPU say so on a machine without one, and those that run on
a CPU reach their measurements with tiny flags (and leave no temporary folder behind)."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess

import pytest
import torch

from .helpers import REPO, run_module

BENCH = REPO / "benchmark"
# Every script under benchmark/ with a command line -> the arguments it cannot start without;
# every other argument stays at its default.
SCRIPTS = {
    "chatlmsys/make_synthetic_trace.py": ["--output", "trace.json"],
    "chatlmsys/run_chatlmsys.py": ["--trace", "trace.json"],
    "cluster/bench_frontdoor.py": ["--placement", "placement", "--model", "llm-0"],
    "elastic/bench_elastic.py": [],
    "end_to_end/analyze.py": [],
    "end_to_end/launch_synced.py": ["--barrier-dir", "barrier", "--barrier-count", "1", "--barrier-rank", "0"],
    "end_to_end/mps_sweep.py": [],
    "end_to_end/run_end_to_end.py": [],
    "engine/bench_decode_attention.py": [],
    "engine/bench_gemm.py": [],
    "engine/bench_green_contexts.py": [],
    "engine/bench_gpu.py": ["--shape", "tiny"],
    "engine/bench_offline.py": [],
    "engine/bench_tp.py": [],
    "engine/profile_decode.py": [],
    "engine/report_gpu.py": ["results.json"],
    "flexstore/bench_flexstore.py": [],
    "serve/bench_api_features.py": [],
    "serve/bench_serve.py": ["--workload-file", "workload.json"],
    "serve/runtime_memory.py": [],
    "structured/bench_grammar.py": [],
}
# Their defaults measure on a GPU: on a machine without one they stop with a usage error.
GPU_DEFAULTS = ("elastic/bench_elastic.py", "end_to_end/mps_sweep.py", "engine/bench_decode_attention.py",
                "engine/bench_gemm.py", "engine/bench_green_contexts.py", "engine/bench_gpu.py", "engine/bench_tp.py",
                "engine/profile_decode.py", "serve/bench_api_features.py")


def _module(script: str):
    return importlib.import_module("benchmark." + script.removesuffix(".py").replace("/", "."))


class _Parsed(Exception):
    pass


def _parser_of(script: str, monkeypatch) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """Run the script's main() up to its argument parsing; return the parser and what it parsed."""
    real = argparse.ArgumentParser.parse_args
    seen = {}

    def capture(self, args=None, namespace=None):
        seen["parser"], seen["args"] = self, real(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        _module(script).main(list(SCRIPTS[script]))
    return seen["parser"], seen["args"]


def test_the_table_names_every_script_with_a_command_line():
    found = {str(p.relative_to(BENCH)) for p in BENCH.rglob("*.py") if '__name__ == "__main__"' in p.read_text()}
    assert found == set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_default_arguments_parse_to_their_types(script, monkeypatch):
    """argparse applies ``type`` to a string default but not to a list of strings: such a default
    reaches the script unparsed (``--eager-points`` of bench_gpu.py crashed on it)."""
    parser, args = _parser_of(script, monkeypatch)
    for action in parser._actions:
        if action.type in (None, str) or not isinstance(action.default, (list, tuple)):
            continue
        raw = [x for x in action.default if isinstance(x, str)]
        assert not raw, f"{script} {'/'.join(action.option_strings)}: default {action.default!r} is not parsed"
        assert getattr(args, action.dest) == action.default


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("script", GPU_DEFAULTS)
def test_gpu_defaults_without_a_gpu_are_a_clear_error(script, capsys):
    try:
        code = _module(script).main(list(SCRIPTS[script]))
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _run(script: str, *args: str, tmp_path, timeout: float = 240) -> subprocess.CompletedProcess:
    # TMPDIR: whatever a script leaves in the temporary folder stays in tmp_path, to be checked.
    proc = run_module(script.removesuffix(".py").replace("/", "."), *args, timeout=timeout, cwd=tmp_path,
                      env={"TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _scratch_left(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.glob("muxserve-bench-*"))


def test_bench_gpu_on_cpu_times_its_default_eager_points(tmp_path):
    out = tmp_path / "engine.json"
    _run("engine/bench_gpu.py", "--device", "cpu", "--shape", "tiny", "--skip-hf", "--batches", "1", "--contexts",
         "64", "--prefill", "1x64", "--sampled-points", "--kv-cache-gb", "0.1", "--output-json", str(out),
         tmp_path=tmp_path)
    ours = json.loads(out.read_text())["muxserve"]
    assert list(ours["decode_eager_s"]) == ["1x512", "32x512"]  # the defaults, after the decode points
    assert all(t > 0 for t in ours["decode_eager_s"].values())
    assert _scratch_left(tmp_path) == []  # the generated model folder is removed at exit


def test_bench_offline_on_cpu_measures_both_systems(tiny_model, tmp_path):
    out = tmp_path / "offline.json"
    proc = _run("engine/bench_offline.py", "--model", str(tiny_model("llama-gqa-hd64")), "--num-prompts", "2",
                "--input-len", "8", "--output-len", "4", "--hf-batch-size", "2", "--output-json", str(out),
                tmp_path=tmp_path)
    assert "\r" not in proc.stderr  # no weight-loading bars of transformers in a log
    result = json.loads(out.read_text())
    assert list(result["systems"]) == ["muxserve", "transformers"]
    assert all(s["output_tokens_per_s"] > 0 for s in result["systems"].values())
    assert result["greedy_outputs_identical_before_eos"] == "2/2"


def test_bench_offline_removes_its_random_model(tmp_path):
    _run("engine/bench_offline.py", "--random-shape", "tiny", "--num-prompts", "1", "--input-len", "4",
         "--output-len", "2", "--skip-hf", tmp_path=tmp_path)
    assert _scratch_left(tmp_path) == []


def test_bench_flexstore_on_cpu_measures_ping_and_allocation(tmp_path):
    out = tmp_path / "flexstore.json"
    proc = _run("flexstore/bench_flexstore.py", "--address", f"ipc://{tmp_path}/fs.sock", "--batch-sizes", "4",
                "--iterations", "5", "--warmup", "1", "--kv-cache-bytes", str(64 << 20), "--skip-attach",
                "--output-json", str(out), tmp_path=tmp_path)
    assert proc.stdout.startswith("ping (transport floor): mean ")
    result = json.loads(out.read_text())
    assert result["ping"]["mean_ms"] > 0
    assert [(r["batch"], r["n"]) for r in result["allocation"]] == [(4, 5)]


def test_mps_sweep_on_cpu_measures_at_100_percent(tmp_path):
    from .helpers import write_shape

    shape = write_shape(tmp_path / "tiny-a", "tiny-a")
    _run("end_to_end/mps_sweep.py", "--device", "cpu", "--model", str(shape), "--batch-sizes", "1", "--seq-lens",
         "16", "--repeats", "1", "--warmup", "0", "--output-dir", str(tmp_path / "out"), tmp_path=tmp_path)
    table = (tmp_path / "out" / "mps_sweep_tiny-a.md").read_text()
    assert "| phase | batch | length | 100 % |" in table
    assert "| decoding | 1 | 16 |" in table and "| prefill | 1 | 16 |" in table


def test_bench_api_features_on_cpu_times_every_mode(tmp_path):
    out = tmp_path / "api.json"
    _run("serve/bench_api_features.py", "--device", "cpu", "--batch", "2", "--context", "8", "--steps", "2",
         "--warmup", "1", "--top-logprobs", "2", "--output-json", str(out), tmp_path=tmp_path, timeout=400)
    result = json.loads(out.read_text())
    assert list(result["modes"]) == ["greedy", "sampled", "logprobs", "json", "json+logprobs"]
    assert all(m["steps"] == 2 and m["median_ms"] > 0 for m in result["modes"].values())
    assert result["device"] == "cpu" and result["cuda_graphs"] is False
