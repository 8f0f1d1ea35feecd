"""Every way FlexStore can end releases every shared-memory segment it made.

Each test gives its FlexStore a unique ``shm_prefix`` and lists /dev/shm before, during and after,
so that other programs creating segments at the same time cannot make the check pass or fail.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from muxserve.flexstore.segments import list_shm

from .helpers import CHILD_ENV, ipc_address, make_config, start_flexstore, worker_cmd, worker_env


def _config(tiny_models, tmp_path: Path):
    return make_config(tiny_models, ipc_address(tmp_path), names=["llama-c"],
                       shm_prefix=f"fstest-{uuid.uuid4().hex[:8]}")


def _wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _started(tiny_models, tmp_path):
    config = _config(tiny_models, tmp_path)
    before = list_shm()
    store = start_flexstore(config, tmp_path / "flexstore.log")
    mine = list_shm(config.shm_prefix)
    assert len(mine) == 2 and not (mine & before)  # llama-c's weights and the pool
    return config, store, mine


def test_client_killed_then_normal_shutdown(tiny_models, tmp_path):
    config, store, mine = _started(tiny_models, tmp_path)
    holder = subprocess.Popen(worker_cmd("hold", config.address, "llama-c", "held", 6), stdout=subprocess.PIPE,
                              text=True, env=worker_env(store))
    try:
        held = json.loads(holder.stdout.readline())["pages"]
        assert len(held) == 6
    finally:
        holder.kill()  # SIGKILL: the runtime dies holding mappings and pages
        holder.wait()
    with store.client() as client:  # FlexStore is unaffected
        assert client.pages_of("llama-c", "held") == held
        assert client.free("llama-c", ["held"]) == 6
    assert list_shm(config.shm_prefix) == mine
    assert store.stop() == 0
    assert list_shm(config.shm_prefix) == set()
    assert not Path(config.address.removeprefix("ipc://")).exists()  # the socket file too


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 128 + signal.SIGINT), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_signal_releases_everything(tiny_models, tmp_path, signum, code):
    config, store, _ = _started(tiny_models, tmp_path)
    with store.client() as client:
        client.attach("llama-c").close()  # mapped and unmapped here: attaching must not unlink
    assert len(list_shm(config.shm_prefix)) == 2
    os.kill(store.pid, signum)
    assert store.proc.wait(20) == code
    assert list_shm(config.shm_prefix) == set()
    assert "released 2 shared segments" in (tmp_path / "flexstore.log").read_text()


def test_sigkilled_flexstore_is_cleaned_by_the_resource_tracker(tiny_models, tmp_path):
    config, store, _ = _started(tiny_models, tmp_path)
    store.kill()  # SIGKILL: no handler runs; the tracker process unlinks what the owner registered
    assert _wait_until(lambda: not list_shm(config.shm_prefix)), list_shm(config.shm_prefix)


def test_flexstore_exits_with_its_parent(tiny_models, tmp_path):
    config = _config(tiny_models, tmp_path)
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, msgspec\n"
        "from muxserve.flexstore import FlexStoreConfig, FlexStoreProcess\n"
        "config = msgspec.json.decode(sys.argv[1], type=FlexStoreConfig)\n"
        "store = FlexStoreProcess(config, log_file=sys.argv[2]).start()\n"
        "print(store.pid, flush=True)\n"
        "time.sleep(600)\n"), __import__("msgspec").json.encode(config).decode(), str(tmp_path / "fs.log")],
        stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        child = int(parent.stdout.readline())
        assert len(list_shm(config.shm_prefix)) == 2
    finally:
        parent.kill()  # the launcher dies without stopping its FlexStore
        parent.wait()
    assert _wait_until(lambda: not _alive(child) and not list_shm(config.shm_prefix))
    assert "parent process" in (tmp_path / "fs.log").read_text()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
