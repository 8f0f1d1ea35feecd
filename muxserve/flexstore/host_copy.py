"""The host copy of an elastic LLM's weights, and the copy that wakes it.

A :class:`HostCopy` is one POSIX shared-memory segment with the weights in the layout of their
device range (``weights.plan_layout``: the same offsets), loaded once at start; any process maps
it without reading the checkpoint again. On a GPU machine the process that copies registers the
mapping with ``cudaHostRegister`` (pinned: DMA at full PCIe speed, no staging copy). Weights are
never written while offloaded, so offloading copies nothing back.

:func:`copy_in` moves bytes host -> device in chunks on a dedicated CUDA stream and returns when
the last chunk has landed (an event); :func:`map_and_copy_in` wakes a range: it maps the range
chunk by chunk just ahead of the copy, so mapping the next chunk overlaps copying the last one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from muxserve.flexstore.device_memory import DeviceRange
from muxserve.flexstore.protocol import Segment
from muxserve.flexstore.segments import SharedSegment

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
DEFAULT_MAP_GRANULES = 256  # 512 MiB of 2 MiB granules per mapped chunk of weights
_HOST_REGISTER_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process


@dataclass(frozen=True)
class CopyReport:
    nbytes: int
    seconds: float  # from the first chunk issued until the last one landed
    chunks: int

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


class HostCopy:
    """An LLM's weights in shared host memory; see the module docstring."""

    def __init__(self, segment: SharedSegment):
        self.segment = segment
        self._pinned = False

    @classmethod
    def create(cls, name: str, nbytes: int) -> HostCopy:
        """A new zeroed segment of ``nbytes`` (reserved now: a full /dev/shm fails here)."""
        return cls(SharedSegment.create(nbytes, torch.device("cpu"), name))

    @classmethod
    def attach(cls, descriptor: Segment) -> HostCopy:
        return cls(SharedSegment.attach(descriptor))

    @property
    def tensor(self) -> torch.Tensor:
        return self.segment.tensor  # (nbytes,) uint8

    @property
    def nbytes(self) -> int:
        return self.segment.nbytes

    @property
    def pinned(self) -> bool:
        return self._pinned

    def pin(self) -> None:
        """Page-lock the mapping in this process for DMA (GPU machines; once, at start)."""
        if self._pinned:
            return
        err = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), self.nbytes, _HOST_REGISTER_PORTABLE)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {self.nbytes} B of host weights {self.segment.descriptor.name!r} "
                               f"failed: CUDA error {int(err)}")
        self._pinned = True

    def close(self) -> None:
        """Unpin and release (the owner also unlinks the name). Idempotent."""
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self._pinned = False
        self.segment.release()


def copy_in(dst: torch.Tensor, src: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            stream: torch.cuda.Stream | None = None,
            before_chunk: Callable[[int, int], None] | None = None) -> CopyReport:
    """Copy ``src`` (host, 1-D uint8) into the start of ``dst`` (1-D uint8) in chunks; returns when done.

    On a GPU the chunks go on ``stream`` (a new stream if None), after the work already queued on
    the device's current stream; ``before_chunk(start, end)`` runs before each chunk is issued.
    """
    for t, what in ((dst, "destination"), (src, "source")):
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise ValueError(f"the copy's {what} must be a 1-D uint8 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if src.is_cuda:
        raise ValueError(f"the copy's source must be in host memory, got {src.device}")
    n = src.numel()
    if n > dst.numel():
        raise ValueError(f"source of {n} B does not fit the destination of {dst.numel()} B")
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    starts = range(0, n, chunk_bytes)
    began = time.perf_counter()
    if dst.is_cuda:
        stream = stream if stream is not None else torch.cuda.Stream(dst.device)
        stream.wait_stream(torch.cuda.current_stream(dst.device))
        with torch.cuda.stream(stream):
            for a in starts:
                b = min(a + chunk_bytes, n)
                if before_chunk is not None:
                    before_chunk(a, b)
                dst[a:b].copy_(src[a:b], non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()
    else:
        for a in starts:
            b = min(a + chunk_bytes, n)
            if before_chunk is not None:
                before_chunk(a, b)
            dst[a:b].copy_(src[a:b])
    return CopyReport(n, time.perf_counter() - began, len(starts))


def map_and_copy_in(rng: DeviceRange, src: torch.Tensor, map_granules: int = DEFAULT_MAP_GRANULES,
                    chunk_bytes: int = DEFAULT_CHUNK_BYTES, stream: torch.cuda.Stream | None = None) -> CopyReport:
    """Wake an unmapped range: map it in chunks of ``map_granules`` (each just before the first copy
    into it) and copy ``src`` in; the granules past ``src`` are mapped too. Returns the copy's report."""
    if rng.chunks():
        raise ValueError(f"range {rng.name!r} is already (partly) mapped")
    if map_granules < 1:
        raise ValueError(f"map_granules must be >= 1, got {map_granules}")
    granule, total = rng.granule_bytes, rng.num_granules
    mapped = 0  # granules [0, mapped) are mapped

    def map_through(end: int) -> None:
        nonlocal mapped
        last = -(-end // granule)  # granules that [0, end) touches
        while mapped < last:
            count = min(map_granules, total - mapped)
            rng.map(mapped, count)
            mapped += count

    report = copy_in(rng.tensor, src, chunk_bytes, stream, lambda a, b: map_through(b))
    map_through(rng.nbytes)
    return report
