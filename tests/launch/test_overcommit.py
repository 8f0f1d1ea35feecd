"""An instance that holds more LLMs than fit (real processes, CPU): four tiny elastic LLMs under a
``memory_budget_bytes`` that holds about two of them. Those that do not fit start offloaded; their
requests wake them, and a wake short of room offloads idle LLMs least recently used first. Every
token equals the offline engine's, and the resident weights never exceed the budget."""

from __future__ import annotations

import time

import pytest
import yaml

from muxserve.config import load_config
from muxserve.engine import SamplingParams
from muxserve.errors import ConfigError
from muxserve.instance.instance import Instance
from muxserve.instance.options import InstanceOptions
from muxserve.scheduler.policy import get_policy

from .helpers import run_launch
from .test_elastic import GRANULE, PAGE, _no_segment_left  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.timeout(600)
# Weights in granules of 64 KiB: llm-0 65, llm-1 27, llm-2 33, llm-3 (llm-1's model) 27; 152 in all.
BUDGET = 110 * GRANULE


def overcommit_config(setup, name: str, budget: int):
    models = [{"name": n, "model": str(p), "mps_percentage": [100, 40], "model_dtype": "fp32",
               "residency": "elastic"} for n, p in setup.models.items()]
    models.append({**models[1], "name": "llm-3"})  # a fourth LLM: llm-1's model under another name
    doc = {"num_gpus": 1, "max_num_seqs": 32, "overload_threshold": 2, "memory_budget_bytes": budget,
           "models": models}
    path = setup.root / name
    path.write_text(yaml.safe_dump(doc))
    return path


def options(tmp_path) -> InstanceOptions:
    return InstanceOptions(policy=get_policy("roundrobin"), device="cpu", log_dir=tmp_path / "logs", page_bytes=PAGE,
                           granule_bytes=GRANULE, reserve_granules=1)


def test_four_elastic_llms_in_a_budget_for_two(setup, tmp_path):
    config = load_config(overcommit_config(setup, "overcommit.yaml", BUDGET))
    # llm-3 serves llm-1's prompts (same model, so the same tokens) under ids of its own.
    workload = [(r.llm, r.idx, r) for r in setup.requests] + [("llm-3", 1000 + r.idx, r) for r in setup.requests
                                                              if r.llm == "llm-1"]
    instance = Instance(config, options(tmp_path))
    try:
        instance.start()
        store = instance._allocator
        info = {m.name: m for m in instance.store_info.models}
        granules = {n: -(-m.weight_bytes // GRANULE) for n, m in info.items()}
        assert sum(granules.values()) * GRANULE > BUDGET  # the weights of all do not fit
        start_states = {n: m.state for n, m in info.items()}
        assert start_states == {"llm-0": "resident", "llm-1": "resident", "llm-2": "offloaded",
                                "llm-3": "offloaded"}
        assert instance.load().llms["llm-3"].state == "offloaded"
        reqs = []
        for llm, idx, r in workload:
            reqs.append((r.idx, instance.submit(llm, r.prompt_token_ids, SamplingParams(
                max_tokens=r.output_len, temperature=0, ignore_eos=True), time.monotonic(), idx)))
        instance.run_until_done()
        budget = store.stats().budget
        stats = {m.name: m for m in store.stats().models}
        metrics = instance.metrics()
        events = list(instance.residency.events)
    finally:
        instance.stop()
    for expected_idx, req in reqs:
        assert req.output_token_ids == setup.expected[expected_idx], f"request {req.idx} of {req.llm}"
    # Both LLMs offloaded at start were woken, which took offloading others (LRU, idle ones only).
    wakes = [e.llm for e in events if e.kind == "wake"]
    offloads = [e.llm for e in events if e.kind == "offload"]
    assert {"llm-2", "llm-3"} <= set(wakes) and offloads
    for name in granules:
        assert metrics.residency[name]["wakes"] == stats[name].wakes == wakes.count(name)
        assert metrics.residency[name]["offloads"] == stats[name].offloads == offloads.count(name)
    # At no time more weights resident than the budget: replay the offloads and wakes from the start.
    resident = {n for n, s in start_states.items() if s == "resident"}
    assert sum(granules[n] for n in resident) * GRANULE <= BUDGET
    for e in events:
        if e.kind == "offload":
            assert e.llm in resident
            resident.discard(e.llm)
        else:
            assert e.llm not in resident
            resident.add(e.llm)
        assert sum(granules[n] for n in resident) * GRANULE <= BUDGET, f"after the {e.kind} of {e.llm}"
    assert budget.num_granules * GRANULE == BUDGET
    assert budget.elastic_granules + budget.kv_granules + budget.free_granules == budget.num_granules
    assert budget.elastic_granules == sum(granules[n] for n in resident)


def test_an_llm_that_can_never_fit_is_refused_before_start(setup, tmp_path):
    # 50 granules: llm-0's weights alone take 65.
    config = load_config(overcommit_config(setup, "too-small.yaml", 50 * GRANULE))
    instance = Instance(config, options(tmp_path))
    with pytest.raises(ConfigError, match=r"elastic LLM 'llm-0' can never run within memory_budget_bytes 3276800: "
                                          r"its weights \(4259840 B\) plus one block of KV \(65536 B\) need 66 "
                                          r"granules of 65536 B, the budget has 50"):
        instance.start()
    assert instance.flexstore is None or not instance.flexstore.alive()


def test_memory_budget_bytes_is_checked_at_load(setup):
    path = overcommit_config(setup, "both.yaml", BUDGET)
    doc = yaml.safe_load(path.read_text())
    doc["kv_cache_bytes"] = 8 << 20
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="memory_budget_bytes .* replaces kv_cache_bytes"):
        load_config(path)
    for m in doc["models"]:
        m["residency"] = "pinned"
    del doc["kv_cache_bytes"]
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="memory_budget_bytes needs at least one LLM with 'residency: elastic'"):
        load_config(path)


def test_launch_serves_three_elastic_llms_in_a_budget_for_two(setup, tmp_path):
    # Granules of 2 MiB (the launcher's): llm-0 3, llm-1 1, llm-2 2; a budget of 5 starts llm-2 offloaded.
    path = overcommit_config(setup, "overcommit-launch.yaml", 5 << 21)
    doc = yaml.safe_load(path.read_text())
    doc["models"] = doc["models"][:3]
    path.write_text(yaml.safe_dump(doc))
    proc, stats = run_launch(path, setup.workload, tmp_path, "--no-slo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "elastic LLMs offloaded at start (beyond the memory budget): ['llm-2']" in proc.stderr
    got = {r["idx"]: r["output_token_ids"] for r in stats["requests"]}
    assert got == {r.idx: setup.expected[r.idx] for r in setup.requests}
    events = stats["summary"]["overall"]["residency_events"]
    assert [e["llm"] for e in events if e["kind"] == "wake"][:1] == ["llm-2"]
    assert stats["summary"]["per_model"]["llm-2"]["residency"]["wakes"] >= 1


def test_launch_refuses_an_llm_that_can_never_fit(setup, tmp_path):
    path = overcommit_config(setup, "overcommit-small.yaml", 3 << 21)  # llm-0: 3 granules + a block of KV
    proc, _ = run_launch(path, setup.workload, tmp_path)
    assert proc.returncode != 0
    assert "elastic LLM 'llm-0' can never run within memory_budget_bytes 6291456" in proc.stderr, proc.stderr[-2000:]
