"""One runtime process (``python -m muxserve.flexserver``) against a real FlexStore, driven by hand:
it attaches with the secret from its environment, runs jobs exactly, refuses to run without the
secret, reports a refused one and dies with its parent."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from processes import alive, wait_until

from muxserve.engine import LLM, SamplingParams
from muxserve.flexstore import FlexStoreConfig, FlexStoreProcess, ModelEntry
from muxserve.flexstore.auth import SECRET_ENV
from muxserve.ipc import runtime as M

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
PROMPT = [5, 17, 99, 3, 250, 41, 7, 8, 300, 12]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runtime")
    config = FlexStoreConfig(models=(ModelEntry("m", str(tiny_model("llama-gqa-hd64"))),),
                             address=f"ipc://{tmp}/flexstore", kv_cache_bytes=64 * 16384, shm_prefix="muxserve-rt-test")
    process = FlexStoreProcess(config, log_file=tmp / "flexstore.log", env=ENV).start()
    yield process
    assert process.stop() == 0


class Scheduler:
    """The launcher's side of one runtime: a PUSH socket for jobs, a PULL socket for what it says."""

    def __init__(self, tmp: Path):
        ctx = zmq.Context.instance()
        self.jobs, self.results = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        self.jobs.setsockopt(zmq.LINGER, 0)
        self.results.setsockopt(zmq.LINGER, 0)
        self.jobs_address, self.results_address = f"ipc://{tmp}/jobs", f"ipc://{tmp}/results"
        self.jobs.bind(self.jobs_address)
        self.results.bind(self.results_address)

    def start(self, store, phase: str, env: dict[str, str], parent_cmd: list[str] | None = None) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "muxserve.flexserver", "--llm", "m", "--phase", phase, "--flexstore",
               store.config.address, "--jobs", self.jobs_address, "--results", self.results_address]
        return subprocess.Popen([*(parent_cmd or []), *cmd], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)

    def receive(self, timeout_s: float = 120):
        assert self.results.poll(int(timeout_s * 1000)), "the runtime said nothing"
        return M.decode_from_runtime(self.results.recv())

    def close(self):
        self.jobs.close()
        self.results.close()


def test_a_runtime_attaches_with_the_secret_and_runs_jobs_exactly(store, tiny_model, tmp_path):
    [offline] = LLM(str(tiny_model("llama-gqa-hd64")), kv_cache_bytes=64 * 16384).generate(
        [PROMPT], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    sched = Scheduler(tmp_path)
    proc = sched.start(store, "decode", {**ENV, SECRET_ENV: store.secret})
    try:
        ready = sched.receive()
        assert ready == M.Ready("m/decode", proc.pid)
        with store.client() as client:
            pages = client.allocate("m", [("r", len(PROMPT) + 3)]).new_pages["r"]  # one block: 4 pages
            tokens = []
            seqs = [M.SeqInput("r", PROMPT, len(PROMPT), 0, pages)]
            for step in range(3):  # the decode runtime runs a prefill job too (the protocol allows it)
                sched.jobs.send(M.encode(M.Job(step, "prefill" if step == 0 else "decode", seqs)))
                result = sched.receive()
                assert (result.job_id, result.runtime) == (step, "m/decode")
                tokens += result.tokens
                seqs = [M.SeqInput("r", result.tokens, len(PROMPT) + step + 1, len(pages), [],
                                   num_output_tokens=step + 1)]
            assert tokens == offline.token_ids
            assert client.free("m", ["r"]) == 4
        sched.jobs.send(M.encode(M.Shutdown()))
        assert proc.wait(60) == 0
    finally:
        proc.kill()
        sched.close()


def test_a_runtime_with_a_wrong_secret_reports_the_refusal_and_exits(store, tmp_path):
    sched = Scheduler(tmp_path)
    start = time.monotonic()
    proc = sched.start(store, "prefill", {**ENV, SECRET_ENV: "wrong"})
    try:
        failure = sched.receive()
        assert failure == M.Failure("m/prefill", f"FlexStoreAuthError: FlexStore at {store.config.address} "
                                                 "refused this client: it presented no secret or a wrong one")
        assert proc.wait(60) == 1
        assert time.monotonic() - start < 25  # at once, not after the client's 30 s timeout
    finally:
        proc.kill()
        sched.close()


def test_a_runtime_without_a_secret_does_not_start(store, tmp_path):
    sched = Scheduler(tmp_path)
    proc = sched.start(store, "prefill", {k: v for k, v in ENV.items() if k != SECRET_ENV})
    try:
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 2
        assert f"the environment variable {SECRET_ENV} must hold FlexStore's secret" in out
    finally:
        sched.close()


def test_a_runtime_dies_with_its_parent(store, tmp_path):
    sched = Scheduler(tmp_path)
    # the parent starts the runtime, says its pid, then waits to be killed
    parent_cmd = [sys.executable, "-c", "import subprocess, sys, time; p = subprocess.Popen(sys.argv[1:]); "
                                        "print(p.pid, flush=True); time.sleep(600)"]
    parent = sched.start(store, "prefill", {**ENV, SECRET_ENV: store.secret}, parent_cmd)
    try:
        runtime = int(parent.stdout.readline())
        assert isinstance(sched.receive(), M.Ready)
        parent.kill()  # SIGKILL: nothing of the parent runs any more
        parent.wait()
        assert wait_until(lambda: not alive(runtime), 10)
    finally:
        parent.kill()
        sched.close()
