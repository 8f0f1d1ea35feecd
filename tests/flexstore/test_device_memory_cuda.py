"""Device ranges on a GPU (CUDA virtual memory): sharing between processes, CUDA graphs over a
remapped range, the pinned host copy and the copy-in bandwidth. Skipped without CUDA."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import msgspec
import pytest
import torch

from muxserve.flexstore.auth import SECRET_ENV
from muxserve.flexstore.device_memory import RangeServer, create_range
from muxserve.flexstore.fd_passing import FdServer
from muxserve.flexstore.host_copy import HostCopy, copy_in, map_and_copy_in
from muxserve.flexstore.segments import list_shm

from .helpers import CHILD_ENV
from .test_device_memory import SECRET, WORKERS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
G = 2 << 20  # the mapping granularity of current GPUs
CUDA = torch.device("cuda", 0)


@pytest.fixture
def rng():
    r = create_range(f"cuda-{uuid.uuid4().hex[:8]}", 8 * G, CUDA, G)
    yield r
    r.close()


@pytest.fixture
def server(rng, tmp_path):
    with FdServer(tmp_path / "fd.sock", SECRET, RangeServer([rng])).start() as srv:
        yield srv


def spawn(command: str, rng, server, *args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKERS), command, msgspec.json.encode(rng.descriptor).decode(),
                             server.path, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**CHILD_ENV, SECRET_ENV: SECRET})


def said(worker: subprocess.Popen) -> dict:
    line = worker.stdout.readline()
    if not line:
        worker.wait(timeout=30)
        raise AssertionError(worker.stderr.read()[-3000:])
    return json.loads(line)


def go_on(worker: subprocess.Popen) -> None:
    worker.stdin.write("go\n")
    worker.stdin.flush()


def device_used() -> int:
    """Device memory in use, less what torch's caching allocator holds."""
    free, total = torch.cuda.mem_get_info(CUDA)
    return total - free - torch.cuda.memory_reserved(CUDA)


def test_export_and_import_between_processes(rng, server):
    probe = torch.full((G,), 9, dtype=torch.uint8, device=CUDA)  # warm up what the checks below use
    torch.equal(probe, probe)
    torch.cuda.synchronize()
    before = device_used()
    rng.map(0)
    rng.map(2, 2)
    assert device_used() - before == 3 * G
    rng.tensor[:G] = 7
    torch.cuda.synchronize()
    worker = spawn("attach-rw", rng, server, 0, 3, 9)
    try:
        first = said(worker)
        assert (first["read_first"], first["read_sum"], first["chunks"]) == (7, 7 * G, [[0, 1], [2, 2]])
        assert torch.equal(rng.tensor[3 * G: 4 * G], probe)  # the worker's write, seen by the owner
        rng.unmap(2)
        rng.map(6)
        go_on(worker)
        second = said(worker)
        assert second == {"address": first["address"], "full": False, "chunks": [[0, 1], [6, 1]]}
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
        worker.wait()
    rng.unmap_all()
    deadline = time.monotonic() + 10  # the worker's context goes with its process, a moment after exit
    while device_used() > before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert device_used() <= before  # every chunk is back on the device once both processes unmapped it


def test_graph_replays_the_new_contents_after_a_remap(rng, server):
    rng.map_granules([0, 1])
    rng.tensor[:G].view(torch.float32).fill_(1.0)
    torch.cuda.synchronize()
    worker = spawn("graph-replay", rng, server)
    try:
        first = said(worker)
        assert first["sum"] == G // 4 * 1.0
        address = rng.tensor.data_ptr()
        rng.unmap(0)  # offload ...
        rng.map(0)  # ... and wake: new memory under the same addresses
        rng.tensor[:G].view(torch.float32).fill_(3.0)
        torch.cuda.synchronize()
        go_on(worker)
        second = said(worker)
        assert second == {"address": first["address"], "sum": G // 4 * 3.0}
        assert rng.tensor.data_ptr() == address
        assert worker.wait(timeout=60) == 0
    finally:
        worker.kill()
        worker.wait()


def test_graph_in_the_owner_replays_over_a_remapped_range(rng):
    rng.map_all(1)
    x = rng.tensor[:G].view(torch.float32)
    x.fill_(1.0)
    out = torch.zeros(1, device=CUDA)
    out.copy_(x.sum().view(1))  # warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(x.sum().view(1))
    graph.replay()
    assert out.item() == G // 4
    rng.unmap(0)
    rng.map(0)
    x.fill_(2.0)
    graph.replay()
    assert out.item() == G // 4 * 2


def test_pinned_host_copy_wakes_a_range_at_pinned_bandwidth():
    name = f"cuda-host-{uuid.uuid4().hex[:8]}"
    size = 1 << 30
    host = HostCopy.create(name, size)
    weights = create_range(name + "-w", size, CUDA, G)
    try:
        host.tensor[: 1 << 20].copy_(torch.arange(1 << 20) % 253)
        host.pin()
        assert host.pinned and host.tensor.is_pinned()
        map_and_copy_in(weights, host.tensor)
        torch.cuda.synchronize()
        assert torch.equal(weights.tensor[: 1 << 20].cpu(), host.tensor[: 1 << 20])
        baseline_src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
        baseline_dst = torch.empty(size, dtype=torch.uint8, device=CUDA)

        def plain() -> float:
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            baseline_dst.copy_(baseline_src, non_blocking=True)
            end.record()
            end.synchronize()
            return size / (start.elapsed_time(end) / 1e3) / 1e9

        plain_gbps = max(plain() for _ in range(3))
        ours = max(copy_in(weights.tensor, host.tensor).gb_per_s for _ in range(3))
        assert ours >= 0.8 * plain_gbps, (ours, plain_gbps)
    finally:
        weights.close()
        host.close()
    assert list_shm(name) == set()
