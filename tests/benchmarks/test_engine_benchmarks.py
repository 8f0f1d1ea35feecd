"""CPU dry runs of the engine benchmarks that measure on GPUs: decode and sampling steps, tensor parallelism,
the decode profile."""

from __future__ import annotations

import json

import pytest

from .helpers import REPO, run_module


def _run(script: str, *args: str, timeout: float = 240):
    return run_module("engine." + script.removesuffix(".py"), *args, timeout=timeout)


def test_bench_tp_on_cpu_ranks_agree_with_tp1(tiny_model, tmp_path):
    out = tmp_path / "tp.json"
    proc = _run("bench_tp.py", "--shape", str(tiny_model("qwen2")), "--device", "cpu", "--tp", "1", "2",
                "--batches", "1", "4", "--ctx", "64", "--prefill", "128", "--parity-tokens", "8",
                "--kv-cache-gb", "0.02", "--output-json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [r["tp"] for r in report["results"]] == [1, 2]
    assert all(set(r["decode_ms"]) == {"1", "4"} and r["prefill_ms"] > 0 for r in report["results"])
    # gloo ranks in float32 compute TP=1's tokens: every parity prompt identical
    assert report["results"][1]["parity"] == {"prompts": 4, "exact": 4, "mean_common_prefix": 8,
                                              "tokens_per_prompt": 8}
    table = out.with_suffix(".md").read_text()
    assert "| 2 | no |" in table and "TP=2: 4/4 prompts identical over 8 tokens" in table


def test_bench_tp_names_a_missing_shape():
    proc = _run("bench_tp.py", "--shape", "no-such-shape", "--device", "cpu")
    assert proc.returncode == 2
    assert "--shape 'no-such-shape': no config.json there or under examples/shapes/" in proc.stderr


def test_bench_tp_refuses_a_context_the_shape_lacks(tiny_model):
    folder = tiny_model("qwen2")  # 256 tokens of context
    proc = _run("bench_tp.py", "--shape", str(folder), "--device", "cpu", "--ctx", "4000")
    assert proc.returncode == 2
    assert f"--ctx 4000 / --prefill 2048 do not fit the context of {folder} (256 tokens" in proc.stderr


def test_profile_decode_dry_run_writes_its_tables(tiny_model, tmp_path):
    out = tmp_path / "profile.json"
    proc = _run("profile_decode.py", "--shape", str(tiny_model("llama-gqa-hd64")), "--device", "cpu",
                "--batches", "1", "2", "--ctx", "32", "--steps", "3", "--output-json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [b["batch"] for b in result["batches"]] == [1, 2]
    assert all(b["wall_ms"] > 0 and b["kernel_ms"] == 0 for b in result["batches"])  # no CUDA kernels on CPU
    assert "| batch | wall ms | kernels ms |" in out.with_suffix(".md").read_text()


def test_a_batch_the_kv_cache_cannot_hold_is_refused_with_the_numbers(tiny_model):
    import torch

    from benchmark.engine import bench_gpu
    from muxserve.engine.llm_engine import EngineConfig, LLMEngine

    folder = tiny_model("llama-gqa-hd64")
    model, spec = bench_gpu.random_model(folder, torch.float32, torch.device("cpu"))
    engine = LLMEngine(EngineConfig(model=str(folder), dtype="float32", device="cpu", kv_cache_bytes=1 << 20,
                                    max_num_seqs=4, max_model_len=256), model=model)
    bench = bench_gpu.Ours.on_engine(engine)
    held = engine.allocator.max_tokens(engine.model_name)
    try:
        bench.make_seqs([200] * 4, 8, spec.vocab_size)
    except RuntimeError as e:
        assert str(e) == (f"the KV cache holds {held} tokens, too few for 4 sequences of 208 tokens; "
                          "give the benchmark more KV memory")
    else:
        raise AssertionError(f"4 x 208 tokens fit a cache of {held} tokens; the test needs a smaller one")
    assert engine.allocator.num_free == engine.allocator.num_pages  # the sequences it made are given back
    assert bench.make_seqs([8], 0, spec.vocab_size)  # and can be taken again


def test_gemm_and_attention_benchmarks_name_a_missing_shape_and_a_missing_gpu():
    import torch

    for script in ("bench_gemm.py", "bench_decode_attention.py"):
        proc = _run(script, "--shape", "no-such-shape")
        assert proc.returncode == 2
        assert "--shape 'no-such-shape': no config.json there or under examples/shapes/" in proc.stderr
        if not torch.cuda.is_available():
            proc = _run(script, "--shape", "llama-3-8b")
            assert proc.returncode == 2 and f"{script}: error: needs a CUDA GPU (and triton)" in proc.stderr


def _table(text: str, header: str) -> list[list[str]]:
    """The cells of each row of the markdown table whose header line starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 2  # past the header and |---|
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_report_gpu_tables_of_a_measured_run(tmp_path):
    source = REPO / "benchmark/results/engine_gpu_h200_llama-3-8b.json"
    run = json.loads(source.read_text())
    ours, hf, peak = run["muxserve"], run["transformers"], run["ceilings"]["bf16_matmul_TFLOPs"]
    out = tmp_path / "engine.md"
    proc = _run("report_gpu.py", str(source), "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    decode = _table(text, "| batch | context | muxserve | floor |")
    assert [f"{b}x{c}" for b, c, *_ in decode] == list(ours["decode_s"])  # one row per measured point
    for b, c, t, floor, ratio, target, t_hf, speed in decode:
        key, batch = f"{b}x{c}", int(b)
        assert (float(t), float(floor)) == pytest.approx((1e3 * ours["decode_s"][key], 1e3 * ours["floor_s"][key]),
                                                         abs=0.006)
        exact = ours["decode_s"][key] / ours["floor_s"][key]
        assert float(ratio.removesuffix("x")) == pytest.approx(exact, abs=0.006)
        assert target == ("n/a" if batch > 32 else "met" if exact <= 1.3 else "missed")  # 1.3x up to batch 32
        assert float(t_hf) == pytest.approx(1e3 * hf["decode_s"][key], abs=0.006)
        assert float(speed.removesuffix("x")) == pytest.approx(hf["decode_s"][key] / ours["decode_s"][key], abs=0.06)
    breakdown = _table(text, "| batch | context | wall | host prep |")
    assert [f"{b}x{c}" for b, c, *_ in breakdown] == list(ours["decode_breakdown"])
    prefill = _table(text, "| prompts x tokens | muxserve ms |")
    assert [row[0] for row in prefill] == list(ours["prefill_s"])
    for key, t, _, tflops, frac, target, _ in prefill:
        assert float(t) == pytest.approx(1e3 * ours["prefill_s"][key], abs=0.006)
        assert float(tflops) == pytest.approx(ours["prefill_TFLOPs"][key], abs=0.6)
        exact = ours["prefill_TFLOPs"][key] / peak
        assert int(frac.removesuffix("%")) == round(100 * exact)
        assert target == ("met" if exact >= 0.6 else "missed")  # 60 % of the matmul peak


def test_bench_gpu_dry_run_times_sampled_decode_steps(tmp_path):
    out = tmp_path / "engine.json"
    proc = _run("bench_gpu.py", "--device", "cpu", "--shape", "tiny", "--skip-hf", "--batches", "1", "4",
                "--contexts", "64", "--prefill", "1x64", "--eager-points", "--sampled-points", "4x64",
                "--kv-cache-gb", "0.05", "--output-json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = json.loads(out.read_text())["muxserve"]
    assert set(ours["decode_s"]) == {"1x64", "4x64"}
    sampled = ours["decode_sampled_s"]
    assert list(sampled) == ["temperature 1", "temperature 0.8, top-p 0.95", "temperature 0.8, top-p 0.95, top-k 50",
                             "temperature 0.8, top-p 0.95, top-k 50, seeded"]
    assert all(list(times) == ["4x64"] and times["4x64"] > 0 for times in sampled.values())
    report = _run("report_gpu.py", str(out))
    assert report.returncode == 0, report.stderr[-2000:]
    assert "| sampling | batch 4, context 64 |" in report.stdout
    assert f"| greedy | {ours['decode_s']['4x64'] * 1e3:.2f} |" in report.stdout
    assert f"| temperature 1 | {sampled['temperature 1']['4x64'] * 1e3:.2f} |" in report.stdout


@pytest.mark.parametrize("flag, value", [("--sampled-points", "32"), ("--eager-points", "0x512"),
                                         ("--prefill", "8xabc")])
def test_bench_gpu_names_a_bad_point(flag, value):
    proc = _run("bench_gpu.py", "--device", "cpu", "--shape", "tiny", flag, value)
    assert proc.returncode == 2
    assert f"argument {flag}: {value!r} is not COUNTxLEN (two positive integers, e.g. 32x512)" in proc.stderr


def test_green_context_splits_and_table():
    from benchmark.engine.bench_green_contexts import _summary, green_split, markdown

    # H200: 132 SMs in groups of 8; each side keeps at least one group
    assert green_split(132, 0.8, 8) == (104, 24)
    assert green_split(132, 0.5, 8) == (64, 64)
    assert green_split(132, 0.99, 8) == (124, 8) and green_split(132, 0.01, 8) == (8, 120)
    alone = _summary([0.010] * 10, 2048, None)
    row = _summary([0.020] * 99 + [0.050], 2048, alone)
    assert (row["steps"], row["p50_ms"], row["p99_ms"], row["slowdown_p50"]) == (100, 20.0, 50.0, 2.0)
    doc = {"device": "GPU", "total_sms": 132, "torch": "x", "duration_s": 5.0,
           "prefill": {"shape": "llama-3-8b", "tokens": 2048}, "decode": {"shape": "llama-3.2-3b", "batch": 32},
           "rows": [{"name": "alone", "prefill": alone, "decode": alone},
                    {"name": "green 0.8", "prefill_sms": 104, "decode_sms": 24, "prefill": row, "decode": row,
                     "change_split_s": {"create": 0.001, "create_and_first_steps": 0.2}}],
           "notes": ["MPS not measured (no --mps-dir)"]}
    text = markdown(doc)
    assert "| green 0.8 | 104 | 24 | 20.00 | 50.00 |" in text and "| 2.00 | 2.00 | 0.200 |" in text
    assert "- MPS not measured (no --mps-dir)" in text
