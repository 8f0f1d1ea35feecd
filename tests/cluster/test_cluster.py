"""End to end on a real Ray cluster of two nodes on this machine (two CPU stand-in GPUs each; the
second node joins through ``muxserve.launch --node-rank 1``): four tiny LLMs on three meshes behind
the front door, tokens equal to the offline engine, a FlexStore killed -9 and its instance
restarted while the others serve, ``cluster down`` leaving nothing; the same placement replayed
offline across both nodes; and ``cluster up`` on a Ray of its own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from server.helpers import metric_samples, shm_segments, sse_events

from .helpers import (
    MESHES,
    REPO,
    World,
    build_world,
    cluster_env,
    cluster_up,
    cmdline,
    group_alive,
    wait_gone,
    write_placement,
)

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.timeout(900)
MESH_OF = {llm: f"mesh{index}" for index, _, llms, _ in MESHES for llm in llms}


@pytest.fixture(scope="module")
def world(tmp_path_factory, smollm2_folder) -> World:
    return build_world(tmp_path_factory.mktemp("cluster"), smollm2_folder)


@dataclass
class RayCluster:
    address: str
    env: dict[str, str]
    tmp: Path


@pytest.fixture(scope="module")
def ray_cluster(world, tmp_path_factory):
    from ray.cluster_utils import Cluster

    tmp = tmp_path_factory.mktemp("ray")
    env = cluster_env(tmp / "state")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # the nodes' workers import muxserve
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 2, "include_dashboard": False,
                                                         "object_store_memory": 100 << 20})
    join_log = tmp / "join.log"
    with open(join_log, "wb") as out:  # node rank 1 of the original's launch joins the cluster
        join = subprocess.Popen([sys.executable, "-m", "muxserve.launch", str(world.placement), "--nnodes", "2",
                                 "--node-rank", "1", "--master-addr", head.address, "--nproc-per-node", "2"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        ray.init(address=head.address, log_to_driver=False, logging_level="ERROR")
        deadline = time.monotonic() + 90
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert join.poll() is None and time.monotonic() < deadline, join_log.read_text()
            time.sleep(0.5)
        yield RayCluster(head.address, env, tmp)
    finally:
        ray.shutdown()
        join.send_signal(signal.SIGTERM)  # `ray start --block` drains and stops its node
        join.wait(90)
        head.shutdown()
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    assert "joining the Ray cluster at" in join_log.read_text()


@pytest.fixture(scope="module")
def cluster(ray_cluster, world):
    up = cluster_up(world.placement, ray_cluster.tmp, ray_cluster.env, "--address", ray_cluster.address,
                    "--", "--device", "cpu")
    try:
        yield up
    finally:
        up.kill()


async def _ask(client: httpx.AsyncClient, r, stream: bool) -> tuple[list[int], int, int]:
    """(token ids, SSE token chunks, usage completion tokens) of one workload request."""
    body = {"model": r.llm, "prompt": r.prompt_token_ids, "max_tokens": r.output_len, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True, "stream": stream,
            "stream_options": {"include_usage": True}}
    if not stream:
        resp = await client.post("/v1/completions", json=body)
        assert resp.status_code == 200, resp.text
        doc = resp.json()
        return doc["choices"][0]["token_ids"], 0, doc["usage"]["completion_tokens"]
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        assert resp.status_code == 200
        events = sse_events([line async for line in resp.aiter_lines()])
    chunks = [e for e in events[:-1] if e["choices"]]
    tokens = [t for e in chunks for t in e["choices"][0]["token_ids"]]
    return tokens, len(chunks), events[-2]["usage"]["completion_tokens"]


def test_front_door_serves_every_llm_with_offline_tokens(cluster, world):
    info = cluster.cluster()
    inst = {i["instance"]: i for i in info["instances"]}
    assert {n: i["state"] for n, i in inst.items()} == {"mesh0": "ready", "mesh1": "ready", "mesh2": "ready"}
    # node 0's mesh of two GPUs on one Ray node; node 1's two one-GPU meshes together on the other
    assert inst["mesh0"]["gpus"] == ["0", "1"]
    assert inst["mesh1"]["node_id"] == inst["mesh2"]["node_id"] != inst["mesh0"]["node_id"]
    assert sorted([inst["mesh1"]["gpus"], inst["mesh2"]["gpus"]]) == [["0"], ["1"]]
    models = httpx.get(cluster.url + "/v1/models").json()["data"]
    assert [(m["id"], m["instance"], m["state"], m["max_model_len"]) for m in models] == [
        ("llm-0", "mesh0", "ready", 256), ("llm-1", "mesh0", "ready", 256), ("llm-2", "mesh1", "ready", 256),
        ("llm-3", "mesh2", "ready", 512)]

    async def replay():
        async with httpx.AsyncClient(base_url=cluster.url, timeout=120) as client:
            return await asyncio.gather(*(_ask(client, r, r.idx % 2 == 0) for r in world.requests))

    results = asyncio.run(replay())
    generated = {llm: 0 for llm in MESH_OF}
    for r, (tokens, chunks, usage) in zip(world.requests, results):
        assert tokens == world.expected[r.idx], f"request {r.idx} ({r.llm})"
        assert usage == r.output_len and chunks == (r.output_len if r.idx % 2 == 0 else 0)
        generated[r.llm] += usage
    assert len(results) == 24

    missing = httpx.post(cluster.url + "/v1/completions", json={"model": "gpt-4", "prompt": "hi"})
    assert (missing.status_code, missing.json()) == (404, {"error": {
        "message": "The model `gpt-4` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    bad = httpx.post(cluster.url + "/v1/completions", json={"model": "llm-2", "prompt": [1], "temperature": -1})
    assert bad.status_code == 400 and bad.headers["x-muxserve-instance"] == "mesh1"  # the instance's own answer
    assert bad.json()["error"]["param"] == "temperature"

    chat = {"model": "llm-3", "messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 8,
            "temperature": 0}
    whole = httpx.post(cluster.url + "/v1/chat/completions", json=chat, timeout=60).json()
    with httpx.stream("POST", cluster.url + "/v1/chat/completions", json={**chat, "stream": True}, timeout=60) as s:
        events = sse_events(list(s.iter_lines()))
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == \
        whole["choices"][0]["message"]["content"]
    generated["llm-3"] += 2 * whole["usage"]["completion_tokens"]

    samples = metric_samples(httpx.get(cluster.url + "/metrics").text)
    for llm, mesh in MESH_OF.items():
        key = ("vllm:generation_tokens_total", (("instance", mesh), ("model_name", llm)))
        assert samples[key] == generated[llm], llm
        assert samples[("muxserve:cluster_instance_ready", (("instance", mesh), ("state", "ready")))] == 1.0


class KeepAsking:
    """Requests to the LLMs other than ``skip``, one after another in a thread, checked against
    the offline engine's tokens."""

    def __init__(self, up, world, skip: set[str]):
        self.up, self.world = up, world
        self.requests = [r for r in world.requests if r.llm not in skip]
        self.answers: list[tuple[int, int, bool]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run)

    def run(self) -> None:
        with httpx.Client(base_url=self.up.url, timeout=60) as client:
            i = 0
            while not self.stop.is_set():
                r = self.requests[i % len(self.requests)]
                resp = client.post("/v1/completions", json={
                    "model": r.llm, "prompt": r.prompt_token_ids, "max_tokens": r.output_len, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True})
                ok = resp.status_code == 200 and resp.json()["choices"][0]["token_ids"] == self.world.expected[r.idx]
                self.answers.append((r.idx, resp.status_code, ok))
                i += 1

    def __enter__(self):
        self.thread.start()
        time.sleep(1)
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)
        assert len(self.answers) >= 5 and all(status == 200 and ok for _, status, ok in self.answers), self.answers


def _wait_state(up, llm: str, until, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not until(_state(up, llm)):
        assert time.monotonic() < deadline, f"{what}:\n{up.log_text()[-3000:]}"
        time.sleep(0.2)


def _answers_all(up, world, llm: str) -> None:
    for r in world.by_llm(llm):
        resp = httpx.post(up.url + "/v1/completions", timeout=60, json={
            "model": llm, "prompt": r.prompt_token_ids, "max_tokens": r.output_len, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        assert resp.json()["choices"][0]["token_ids"] == world.expected[r.idx]


def test_a_killed_flexstore_is_restarted_while_the_other_llms_serve(cluster, world):
    before = {i["instance"]: i for i in cluster.cluster()["instances"]}
    old = before["mesh1"]["pid"]  # the instance's process, leader of its process group
    store = [p for p in group_alive(old) if "muxserve.flexstore" in cmdline(p)]
    assert len(store) == 1
    assert shm_segments(f"muxserve{old}-")  # its weights and pool
    with KeepAsking(cluster, world, skip={"llm-2"}):  # llm-0/1 on the other node, llm-3 on this one
        os.kill(store[0], signal.SIGKILL)
        _wait_state(cluster, "llm-2", lambda s: s != "ready", 60, "still ready after its FlexStore was killed")
        refused = httpx.post(cluster.url + "/v1/completions", json={"model": "llm-2", "prompt": [1, 2]})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert refused.json()["error"]["message"].startswith(
            "LLM `llm-2` is unavailable: its instance mesh1 is restarting; retry in ")
        _wait_state(cluster, "llm-2", lambda s: s == "ready", 240, "not back")
    _answers_all(cluster, world, "llm-2")
    after = {i["instance"]: i for i in cluster.cluster()["instances"]}
    assert [after[m]["restarts"] for m in ("mesh0", "mesh1", "mesh2")] == [0, 1, 0]
    assert after["mesh1"]["pid"] != old and after["mesh0"]["pid"] == before["mesh0"]["pid"]
    assert after["mesh1"]["error"] is None
    assert wait_gone(group_alive(old)) == [] and shm_segments(f"muxserve{old}-") == set()
    log = cluster.log_text()
    assert "mesh1 is restarting (exited with code 1: error: the engine failed (FlexStore (pid " in log
    assert "which holds the weights and the KV pool of every LLM, exited with code -9 (SIGKILL)" in log
    assert "mesh1 ready again at" in log
    samples = metric_samples(httpx.get(cluster.url + "/metrics").text)
    assert samples[("muxserve:cluster_instance_restarts_total", (("instance", "mesh1"),))] == 1.0


def test_a_killed_actor_is_restarted_by_ray_with_its_instance(cluster, world):
    before = {i["instance"]: i for i in cluster.cluster()["instances"]}
    actor, serve = before["mesh2"]["host_pid"], before["mesh2"]["pid"]
    with KeepAsking(cluster, world, skip={"llm-3"}):
        os.kill(actor, signal.SIGKILL)  # the instance dies with it (parent-death signal)
        assert wait_gone(group_alive(serve), 30) == []
        _wait_state(cluster, "llm-3", lambda s: s != "ready", 60, "still ready after its actor was killed")
        _wait_state(cluster, "llm-3", lambda s: s == "ready", 240, "not back")
    _answers_all(cluster, world, "llm-3")
    after = {i["instance"]: i for i in cluster.cluster()["instances"]}
    assert after["mesh2"]["host_pid"] not in (None, actor) and after["mesh2"]["pid"] != serve
    assert after["mesh2"]["gpus"] == before["mesh2"]["gpus"]  # the same bundle of the same placement group
    assert [after[m]["restarts"] for m in ("mesh0", "mesh1", "mesh2")] == [0, 1, 1]
    assert shm_segments(f"muxserve{serve}-") == set()
    assert "mesh2 is restarting (its Ray actor is unavailable" in cluster.log_text()


def _state(up, llm: str) -> str:
    return next(m["state"] for m in httpx.get(up.url + "/v1/models").json()["data"] if m["id"] == llm)


def test_down_stops_every_process_actor_and_reservation(cluster):
    status = cluster.command("status")
    assert status.returncode == 0, status.stderr
    assert "| mesh1 | ready | llm-2 |" in status.stdout
    instances = cluster.cluster()["instances"]
    groups = [i["pid"] for i in instances]
    members = [p for g in groups for p in group_alive(g)]
    actors = [i["host_pid"] for i in instances]
    assert len(members) >= 3 * 3 and all(actors)
    down = cluster.command("down")
    assert (down.returncode, down.stdout.splitlines()[-1]) == (0, "cluster 'test' stopped"), down.stderr
    assert cluster.proc.wait(60) == 0
    assert wait_gone(members + actors) == []
    assert all(shm_segments(f"muxserve{g}-") == set() for g in groups)
    assert not (Path(cluster.env["MUXSERVE_CLUSTER_DIR"]) / "test.json").exists()
    assert [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "muxserve-test"] == []
    assert {pg["state"] for pg in ray.util.placement_group_table().values()} <= {"REMOVED"}
    assert "cluster stopped" in cluster.log_text()


def test_offline_replay_across_two_nodes_merges_one_stats_file(ray_cluster, world, tmp_path):
    stats = tmp_path / "stats.json"
    proc = subprocess.run([sys.executable, "-m", "muxserve.launch", str(world.placement), "--nnodes", "2",
                           "--node-rank", "0", "--master-addr", ray_cluster.address, "--workload-file",
                           str(world.workload), "--stats-file", str(stats), "--device", "cpu", "--no-slo",
                           "--log-dir", str(tmp_path / "logs")],
                          cwd=REPO, env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    doc = json.loads(stats.read_text())
    assert [r["idx"] for r in doc["requests"]] == [r.idx for r in world.requests]
    for rec in doc["requests"]:
        assert rec["output_token_ids"] == world.expected[rec["idx"]], rec["idx"]
        assert rec["instance"] == MESH_OF[rec["model"]]
        assert rec["arrival"] <= rec["submit"] <= rec["prefill_end"] <= rec["end"]
    meshes = {m["mesh"]: m for m in doc["meshes"]}
    assert {m: meshes[m]["num_requests"] for m in meshes} == {"mesh0": 12, "mesh1": 6, "mesh2": 6}
    assert meshes["mesh1"]["node_id"] == meshes["mesh2"]["node_id"] != meshes["mesh0"]["node_id"]
    assert doc["summary"]["overall"]["num_finished"] == 24 and sorted(doc["summary"]["per_model"]) == sorted(MESH_OF)
    assert all(s["scheduler"]["decode_jobs"] > 0 for s in doc["summary"]["per_model"].values())
    assert "Name: llm-3" in proc.stdout and "Summary:" in proc.stdout
    assert "mesh0 done on node" in proc.stderr
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and "muxserve.launch /tmp/muxserve-mesh"
                 in cmdline(int(p.name))]
    assert leftovers == []


def test_cluster_up_without_an_address_runs_and_stops_a_ray_of_its_own(world, tmp_path):
    from server.helpers import descendants

    placement = write_placement(tmp_path, world.models, meshes=[(0, 0, ["llm-2"], 1)])
    env = cluster_env(tmp_path / "state")
    env.pop("RAY_ADDRESS", None)
    up = cluster_up(placement, tmp_path, env, "--", "--device", "cpu", name="solo")
    try:
        processes = descendants(up.proc.pid)
        names = " ".join(cmdline(p) for p in processes)
        assert "gcs_server" in names and "raylet" in names and "muxserve.serve" in names
        r = world.by_llm("llm-2")[0]
        resp = httpx.post(up.url + "/v1/completions", timeout=60, json={
            "model": "llm-2", "prompt": r.prompt_token_ids, "max_tokens": r.output_len, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True})
        assert resp.json()["choices"][0]["token_ids"] == world.expected[r.idx]
        serve = up.cluster()["instances"][0]["pid"]
        down = up.command("down")
        assert down.returncode == 0, down.stderr
        assert up.proc.wait(60) == 0
    finally:
        up.kill()
    assert wait_gone(processes, 30) == [], [cmdline(p) for p in processes]
    assert shm_segments(f"muxserve{serve}-") == set()
    assert "connected to a Ray started on this machine: 1 node, 1 GPU" in up.log_text()


def test_a_mesh_that_cannot_start_stops_the_whole_cluster(ray_cluster, world, tmp_path):
    models = {**world.models, "llm-9": tmp_path / "no-such-model"}
    placement = write_placement(tmp_path, models, meshes=[(0, 0, ["llm-2"], 1), (1, 1, ["llm-9"], 1)])
    env = ray_cluster.env
    with pytest.raises(RuntimeError) as err:
        cluster_up(placement, tmp_path, env, "--address", ray_cluster.address, "--", "--device", "cpu", name="broken")
    message = str(err.value)
    assert message.startswith("cluster up exited with 1:")
    assert "error: mesh1 on node " in message
    assert "failed to start: exited with code 2: error: " in message and "no-such-model" in message
    assert "cluster stopped" in message
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and str(placement) in cmdline(int(p.name))]
    assert leftovers == []
    assert [a for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "muxserve-broken"] == []
    # the other mesh was stopped with Ctrl-C (SIGINT reaches instances started from a Ray worker),
    # not by the SIGTERM that follows when it does not stop in time
    assert "SIGTERM" not in (tmp_path / "logs" / "mesh0" / "server.log").read_text()
