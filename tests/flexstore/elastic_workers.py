"""Processes for the device-memory tests: ``python elastic_workers.py COMMAND ARGS...``.

Each prints one JSON line on stdout when its work is done; the secret comes from the environment.
"""

from __future__ import annotations

import json
import os
import sys
import time

import msgspec
import torch


def attach_rw(descriptor_json: str, socket_path: str, read_granule: str, write_granule: str, value: str):
    """Attach a range, follow the owner's mappings, read one granule, fill another with ``value``,
    then (after the owner says so on stdin) follow again and report the chunks."""
    from muxserve.flexstore.auth import SECRET_ENV
    from muxserve.flexstore.device_memory import RangeDescriptor, attach_range, sync_range

    descriptor = msgspec.json.decode(descriptor_json, type=RangeDescriptor)
    rng = attach_range(descriptor)
    secret = os.environ[SECRET_ENV]
    sync_range(rng, socket_path, secret)
    g = descriptor.granule_bytes
    read, write = int(read_granule), int(write_granule)
    seen = rng.tensor[read * g:(read + 1) * g].clone().cpu()
    rng.tensor[write * g:(write + 1) * g] = int(value)
    if rng.tensor.is_cuda:
        torch.cuda.synchronize()
    address = rng.tensor.data_ptr()
    print(json.dumps({"address": address, "read_sum": int(seen.sum()), "read_first": int(seen[0]),
                      "chunks": [[c.start, c.count] for c in rng.chunks()]}), flush=True)
    sys.stdin.readline()  # the owner changed its mappings
    changes = sync_range(rng, socket_path, secret)
    print(json.dumps({"address": rng.tensor.data_ptr(), "full": changes.full,
                      "chunks": [[c.start, c.count] for c in rng.chunks()]}), flush=True)
    rng.close()


def graph_replay(descriptor_json: str, socket_path: str):
    """Attach a CUDA range, capture a graph that sums its first granule (float32), replay it; after
    the owner remapped that granule with new contents (stdin), follow the owner and replay again."""
    from muxserve.flexstore.auth import SECRET_ENV
    from muxserve.flexstore.device_memory import RangeDescriptor, attach_range, sync_range

    descriptor = msgspec.json.decode(descriptor_json, type=RangeDescriptor)
    rng = attach_range(descriptor)
    secret = os.environ[SECRET_ENV]
    sync_range(rng, socket_path, secret)
    x = rng.tensor[:descriptor.granule_bytes].view(torch.float32)
    out = torch.zeros(1, device=rng.tensor.device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch asks
        out.copy_(x.sum().view(1))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(x.sum().view(1))
    graph.replay()
    torch.cuda.synchronize()
    print(json.dumps({"address": rng.tensor.data_ptr(), "sum": out.item()}), flush=True)
    sys.stdin.readline()
    sync_range(rng, socket_path, secret)  # the old memory unmapped, the new one mapped at the same address
    graph.replay()
    torch.cuda.synchronize()
    print(json.dumps({"address": rng.tensor.data_ptr(), "sum": out.item()}), flush=True)
    rng.close()


def own(name: str):
    """Own a mapped range and a host copy, say their names, then wait to be killed."""
    from multiprocessing import resource_tracker

    from muxserve.flexstore.device_memory import create_range
    from muxserve.flexstore.host_copy import HostCopy

    granule = 1 << 20
    rng = create_range(name + "-range", 8 * granule, torch.device("cpu"), granule)
    rng.map(0, 3)
    rng.tensor[: 3 * granule] = 5
    host = HostCopy.create(name + "-host", 2 * granule)
    tracker = resource_tracker._resource_tracker._pid  # the helper that unlinks our names if we die
    print(json.dumps({"names": [rng.name, host.segment.descriptor.name], "tracker": tracker}), flush=True)
    time.sleep(600)


if __name__ == "__main__":
    {"attach-rw": attach_rw, "graph-replay": graph_replay, "own": own}[sys.argv[1]](*sys.argv[2:])
