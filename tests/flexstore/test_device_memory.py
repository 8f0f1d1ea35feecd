"""Device ranges on CPU (shared memory), fd passing with the secret, the host copy and the copy in."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import msgspec
import pytest
import torch

from muxserve.engine.kv_cache import KVLayout, KVPool
from muxserve.flexstore import device_memory as dm
from muxserve.flexstore import host_copy
from muxserve.flexstore.auth import SECRET_ENV
from muxserve.flexstore.device_memory import Chunk, RangeChanges, RangeServer, ShmRange, attach_range, sync_range
from muxserve.flexstore.fd_passing import FdAuthError, FdServer, request_fds
from muxserve.flexstore.host_copy import HostCopy, copy_in, map_and_copy_in
from muxserve.flexstore.segments import list_shm

from .helpers import CHILD_ENV

WORKERS = Path(__file__).parent / "elastic_workers.py"
G = 1 << 20  # 1 MiB granules keep these ranges small
SECRET = "test-secret"


@pytest.fixture
def name():
    prefix = f"mux-elastic-{uuid.uuid4().hex[:8]}"
    yield prefix
    assert list_shm(prefix) == set()  # nothing left behind


@pytest.fixture
def rng(name):
    r = ShmRange.create(name, 8 * G, G)
    yield r
    r.close()


@pytest.fixture
def server(rng, tmp_path):
    with FdServer(tmp_path / "fd.sock", SECRET, RangeServer([rng])).start() as srv:
        yield srv


def rss_shmem() -> int:
    """Bytes of shared memory this process has touched (RssShmem of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssShmem in /proc/self/status")


# -- one range, one process --------------------------------------------------------------------
def test_map_backs_memory_and_unmap_gives_it_back(rng):
    assert rng.allocated_bytes() == 0 and rng.chunks() == []  # reserved, nothing backed
    rng.map(0, 4)
    assert rng.allocated_bytes() == 4 * G  # backed at map time, before any touch
    before = rss_shmem()
    rng.tensor[: 4 * G] = 3
    assert rss_shmem() - before >= 4 * G - 64 * 1024
    touched = rss_shmem()
    rng.unmap(0)
    assert rng.allocated_bytes() == 0  # the hole is punched: /dev/shm holds nothing of it
    assert touched - rss_shmem() >= 4 * G - 64 * 1024  # and this process's mapping lost the pages


def test_tensor_keeps_its_address_across_unmap_and_map(rng):
    address = rng.tensor.data_ptr()
    pool = KVPool(rng.tensor, page_bytes=1024)
    view = pool.view(KVLayout(2, 2, 16, torch.float32, 1024))  # a runtime's view, made once
    rng.map_granules([2, 3])
    view[2048:2050] = 1.5  # pages of granule 2
    rng.unmap_granules([2])
    rng.map(2)
    assert rng.tensor.data_ptr() == address and view.data_ptr() == address
    assert torch.count_nonzero(view[2048:2050]).item() == 0  # a remapped granule starts zeroed
    view[2048] = 2.0
    assert rng.tensor[2 * G: 2 * G + 4].view(torch.float32).item() == 2.0


def test_owner_bookkeeping_and_errors(rng):
    assert rng.map(0, 2) == Chunk(1, 0, 2, 1)
    rng.map_granules([4, 5])
    assert [(c.start, c.count) for c in rng.chunks()] == [(0, 2), (4, 1), (5, 1)]
    assert (rng.epoch, rng.mapped_bytes, rng.is_mapped(1), rng.is_mapped(2)) == (3, 4 * G, True, False)
    cases = [
        (lambda: rng.map(7, 2), f"granules [7, 9) are outside range {rng.name!r} of 8 granules"),
        (lambda: rng.map(1, 2), f"granules [1] of range {rng.name!r} are already mapped"),
        (lambda: rng.unmap(1), f"no chunk of range {rng.name!r} starts at granule 1; chunks start at [0, 4, 5]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == message
    assert rng.unmap_all() == 4 * G and rng.chunks() == [] and rng.epoch == 6
    with pytest.raises(ValueError, match=r"^range 'x' of 3000 B is not a positive number of 1024-byte granules$"):
        ShmRange.create("x", 3000, 1024)


def test_changes_since_is_incremental_until_the_log_runs_out(rng, monkeypatch):
    rng.map(0, 2)
    rng.map(3)
    full = rng.changes_since(0)
    assert full == RangeChanges(2, True, [Chunk(1, 0, 2, 1), Chunk(2, 3, 1, 2)], [])
    rng.unmap(0)
    rng.map(5, 2)
    assert rng.changes_since(2) == RangeChanges(4, False, [Chunk(3, 5, 2, 4)], [1])
    assert rng.changes_since(4) == RangeChanges(4, False, [], [])
    assert rng.changes_since(9).full  # an epoch the owner never had: start over
    monkeypatch.setattr(dm, "REMOVED_LOG", 2)
    small = ShmRange.create(rng.name + "-small", 8 * G, G)
    try:
        for g in range(4):
            small.map(g)
        for g in range(3):
            small.unmap(g)  # epochs 5, 6, 7; the log keeps 6 and 7
        assert small.changes_since(5) == RangeChanges(7, False, [], [2, 3])
        assert small.changes_since(4) == RangeChanges(7, True, [Chunk(4, 3, 1, 4)], [])
    finally:
        small.close()


# -- processes ---------------------------------------------------------------------------------
def test_second_process_maps_the_range_and_sees_writes_both_ways(rng, server):
    rng.map(0)
    rng.map(2, 2)
    rng.tensor[:G] = 7
    worker = subprocess.Popen([sys.executable, str(WORKERS), "attach-rw", msgspec.json.encode(rng.descriptor).decode(),
                               server.path, "0", "3", "9"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**CHILD_ENV, SECRET_ENV: SECRET})
    try:
        first = json.loads(worker.stdout.readline() or worker.stderr.read())
        assert (first["read_first"], first["read_sum"]) == (7, 7 * G)  # the owner's write, seen there
        assert first["chunks"] == [[0, 1], [2, 2]]
        assert torch.equal(rng.tensor[3 * G: 4 * G], torch.full((G,), 9, dtype=torch.uint8))  # and back here
        rng.unmap(2)
        rng.map(6)
        worker.stdin.write("go\n")
        worker.stdin.flush()
        second = json.loads(worker.stdout.readline() or worker.stderr.read())
        assert second == {"address": first["address"], "full": False, "chunks": [[0, 1], [6, 1]]}
        assert worker.wait(timeout=30) == 0
    finally:
        worker.kill()
        worker.wait()
    assert "resource_tracker" not in worker.stderr.read()  # the worker never claimed the owner's name


def test_killed_owner_leaves_no_segment_and_no_process(name):
    worker = subprocess.Popen([sys.executable, str(WORKERS), "own", name], stdout=subprocess.PIPE, text=True,
                              env=CHILD_ENV)
    try:
        said = json.loads(worker.stdout.readline())
        assert set(said["names"]) == list_shm(name) == {f"{name}-range", f"{name}-host"}
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    deadline = time.monotonic() + 20
    while (list_shm(name) or Path(f"/proc/{said['tracker']}").exists()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list_shm(name) == set()  # the resource tracker unlinked both names
    assert not Path(f"/proc/{said['tracker']}").exists()  # and is gone itself


# -- fd passing --------------------------------------------------------------------------------
def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_fds_and_large_replies_cross_with_the_secret(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"shared")
    calls = []

    def handler(request: bytes):
        calls.append(request)
        return request[::-1] * 3, [os.open(target, os.O_RDONLY) for _ in range(300)]

    with FdServer(tmp_path / "fd.sock", SECRET, handler).start() as srv:
        assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o600
        before = open_fds()
        request = bytes(range(256)) * 400  # 100 KiB: more than one piece each way
        reply, fds = request_fds(srv.path, SECRET, request)
        assert calls == [request] and reply == request[::-1] * 3 and len(fds) == 300
        inode = os.stat(target).st_ino
        assert {os.fstat(fd).st_ino for fd in fds} == {inode}
        assert os.pread(fds[299], 6, 0) == b"shared"
        for fd in fds:
            os.close(fd)
        assert open_fds() == before


def test_a_wrong_secret_gets_nothing(tmp_path):
    calls = []
    with FdServer(tmp_path / "fd.sock", SECRET, lambda r: (calls.append(r) or b"x", [os.open(os.devnull, 0)])).start() \
            as srv:
        before = open_fds()
        with pytest.raises(FdAuthError) as e:
            request_fds(srv.path, "not-the-secret", b"hello")
        assert str(e.value) == f"the fd server at {srv.path} refused the secret"
        assert calls == [] and open_fds() == before
        assert request_fds(srv.path, SECRET, b"hi")[0] == b"x"  # still serving
    with pytest.raises(ValueError, match="^an fd server needs a non-empty secret$"):
        FdServer(tmp_path / "other.sock", "", lambda r: (r, []))


def test_sync_errors_name_the_range(rng, server):
    other = ShmRange.create(rng.name + "-other", 2 * G, G)
    try:
        attached = attach_range(other.descriptor)
        with pytest.raises(ValueError) as e:
            sync_range(attached, server.path, SECRET)
        assert str(e.value) == f"unknown range {other.name!r}; known: [{rng.name!r}]"
        with pytest.raises(FdAuthError):
            sync_range(attached, server.path, "wrong")
        with pytest.raises(ValueError, match=r"^only the owner of range .* can map memory; an attached range "):
            attached.map(0)
        attached.close()
    finally:
        other.close()


# -- host copy ---------------------------------------------------------------------------------
def test_copy_in_is_exact_and_reports(name):
    host = HostCopy.create(name + "-host", 5 * G + 123)
    try:
        host.tensor.copy_(torch.arange(host.nbytes) % 251)
        dst = torch.zeros(8 * G, dtype=torch.uint8)
        chunks = []
        report = copy_in(dst, host.tensor, chunk_bytes=2 * G, before_chunk=lambda a, b: chunks.append((a, b)))
        assert (report.nbytes, report.chunks, report.seconds > 0) == (5 * G + 123, 3, True)
        assert chunks == [(0, 2 * G), (2 * G, 4 * G), (4 * G, 5 * G + 123)]
        assert torch.equal(dst[:host.nbytes], host.tensor) and dst[host.nbytes:].count_nonzero().item() == 0
        with pytest.raises(ValueError, match=r"^source of 5243003 B does not fit the destination of 4 B$"):
            copy_in(dst[:4], host.tensor)
        with pytest.raises(ValueError, match=r"^the copy's source must be a 1-D uint8 tensor, got torch.float32"):
            copy_in(dst, host.tensor.float())
    finally:
        host.close()


def test_map_and_copy_in_maps_each_chunk_just_before_its_copy(name, monkeypatch):
    host = HostCopy.create(name + "-host", 5 * G + 123)
    weights = ShmRange.create(name + "-weights", 7 * G, G)
    try:
        host.tensor.copy_(torch.arange(host.nbytes) % 249)
        events = []
        real_map, real_copy_in = weights.map, host_copy.copy_in
        weights.map = lambda start, count=1: events.append(("map", start, count)) or real_map(start, count)

        def recording_copy_in(dst, src, chunk_bytes, stream, before_chunk):
            def hook(a, b):
                before_chunk(a, b)
                events.append(("copy", a // G, -(-b // G)))  # the granules this chunk writes
            return real_copy_in(dst, src, chunk_bytes, stream, hook)

        monkeypatch.setattr(host_copy, "copy_in", recording_copy_in)
        report = map_and_copy_in(weights, host.tensor, map_granules=2, chunk_bytes=G)
        assert (report.nbytes, report.chunks) == (5 * G + 123, 6)
        assert events == [("map", 0, 2), ("copy", 0, 1), ("copy", 1, 2), ("map", 2, 2), ("copy", 2, 3),
                          ("copy", 3, 4), ("map", 4, 2), ("copy", 4, 5), ("copy", 5, 6), ("map", 6, 1)]
        assert torch.equal(weights.tensor[:host.nbytes], host.tensor)
        assert weights.allocated_bytes() == 7 * G
        with pytest.raises(ValueError, match=r"is already \(partly\) mapped$"):
            map_and_copy_in(weights, host.tensor)
        assert weights.unmap_all() == 7 * G and weights.allocated_bytes() == 0  # offload: nothing copied back
        map_and_copy_in(weights, host.tensor)  # and wake again, from the same host copy
        assert torch.equal(weights.tensor[:host.nbytes], host.tensor)
    finally:
        weights.close()
        host.close()
