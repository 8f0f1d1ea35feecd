"""Merging the statistics of launches that ran side by side, and the replay with a drain deadline."""

from __future__ import annotations

import json

import pytest

from benchmark.end_to_end.e2e_plan import Launch, SystemPlan
from benchmark.end_to_end.e2e_runs import merge_parts
from muxserve.instance.instance import Instance


def _record(idx, model, arrival, out_len, end=True):
    return {"idx": idx, "model": model, "arrival": arrival, "prompt_len": 4, "output_len": out_len,
            "submit": arrival, "prefill_end": arrival + 0.1 if end else None, "end": arrival + 0.5 if end else None,
            "output_token_ids": list(range(out_len)), "num_preemptions": 0}


def test_merge_maps_mesh_indices_back_and_lists_unfinished(tmp_path):
    point = tmp_path
    run_dir = point / "runs" / "muxserve"
    (run_dir / "barrier").mkdir(parents=True)
    # the point's workload: idx 0..4; mesh 0 serves llm-0 (idx 0, 2, 4), mesh 1 llm-1 (idx 1, 3)
    (point / "mesh0.idx.json").write_text("[0, 2, 4]")
    (point / "mesh1.idx.json").write_text("[1, 3]")
    base = {"prefill_points": [[16, 0.01]], "decode_step": 0.001}
    parts = []
    for rank, (name, recs, model) in enumerate((
            ("mesh0", [_record(0, "llm-0", 0.0, 3), _record(1, "llm-0", 0.2, 3), _record(2, "llm-0", 0.4, 2)], "llm-0"),
            ("mesh1", [_record(0, "llm-1", 0.1, 5), _record(1, "llm-1", 0.3, 5, end=False)], "llm-1"))):
        stats = run_dir / f"{name}.stats.json"
        stats.write_text(json.dumps({"requests": recs, "summary": {"overall": {"num_finished": len(recs)}},
                                     "base_latency": {model: base}}))
        (run_dir / "barrier" / f"start-{rank}").write_text(json.dumps({"wall": 1000.0 + 0.004 * rank}))
        launch = Launch(name, f"configs/{name}.yaml", f"configs/workload_{name}.json", [rank], "adbs", True,
                        idx_map=f"{name}.idx.json")
        parts.append({"launch": launch, "stats": stats, "command": ["x"]})
    plan = SystemPlan("muxserve", [p["launch"] for p in parts])
    expected = {0: ("llm-0", 3), 1: ("llm-1", 5), 2: ("llm-0", 3), 3: ("llm-1", 5), 4: ("llm-0", 3), 5: ("llm-0", 1)}
    doc = merge_parts(plan, point, parts, expected, {"tag": "t"})
    assert [(r["idx"], r["model"]) for r in doc["requests"]] == [
        (0, "llm-0"), (1, "llm-1"), (2, "llm-0"), (3, "llm-1"), (4, "llm-0")]
    assert all("output_token_ids" not in r for r in doc["requests"])
    assert [r["num_output_tokens"] for r in doc["requests"]] == [3, 5, 3, 5, 2]
    # idx 3 has no end, idx 4 generated 2 of 3 tokens, idx 5 never came back
    assert doc["unfinished"] == [3, 4, 5]
    assert doc["num_requests"] == 5 and doc["num_requests_expected"] == 6
    assert doc["summary"]["overall"]["num_finished"] == 4
    assert sorted(doc["base_latency"]) == ["llm-0", "llm-1"] and "slo_attainment" in doc["summary"]["overall"]
    assert abs(doc["replay_start_skew_s"] - 0.004) < 1e-9
    assert [(p["launch"], p["devices"], p["replay_start_wall"]) for p in doc["parts"]] == [
        ("mesh0", [0], 1000.0), ("mesh1", [1], 1000.004)]


class _FakeRequest:
    def __init__(self, req_id, llm, arrival):
        self.req_id, self.llm, self.arrival = req_id, llm, arrival
        self.submit = arrival
        self.prefill_end = self.end = self.finish_reason = None


class _FakeInstance:
    """Requests of llm 'fast' finish at the next poll; 'slow' ones only when aborted. Its loop is the Instance's."""

    run_until_done = Instance.run_until_done

    def __init__(self):
        self.requests = []

    def has_work(self):
        return any(r.end is None for r in self.requests)

    def submit(self, llm, prompt, params, arrival, idx):
        req = _FakeRequest(str(idx), llm, arrival)
        self.requests.append(req)
        return req

    def poll(self, wait):
        import time

        now = time.monotonic()
        done = [r for r in self.requests if r.llm == "fast" and r.end is None]
        for r in done:
            r.prefill_end, r.end, r.finish_reason = now, now, "length"
        return done

    def abort(self, req_id):
        import time

        r = next(r for r in self.requests if r.req_id == req_id)
        r.end, r.finish_reason = time.monotonic(), "abort"
        return True


def test_replay_with_deadline_aborts_what_is_left_and_keeps_it_unfinished():
    from muxserve.launch import replay
    from muxserve.workload.workload_file import Workload, WorkloadRequest

    workload = Workload({}, [WorkloadRequest(0, "fast", 0.0, [1], 2), WorkloadRequest(1, "slow", 0.01, [1], 2),
                             WorkloadRequest(2, "fast", 0.02, [1], 2)])
    instance = _FakeInstance()
    got = replay(instance, workload, max_drain_s=0.05)
    assert [(r.llm, r.finish_reason, r.end is None) for r in got] == [
        ("fast", "length", False), ("slow", "abort", True), ("fast", "length", False)]
    assert got[1].submit == pytest.approx(0.01, abs=0.03) and got[0].end < 0.1  # relative to the replay's start
