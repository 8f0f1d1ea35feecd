"""Address ranges reserved once and backed by memory granule by granule, shared between processes.

Under the memory budget (``budget.py``) every range FlexStore hands out (the KV pool, each
elastic LLM's weights) is a :class:`DeviceRange`: reserved once at its full size, then mapped
and unmapped in **chunks** of whole granules at fixed offsets. ``range.tensor`` is a 1-D uint8
tensor over the whole range whose address never changes while the range lives, so views of it
(model parameters, the KV pool) and CUDA graphs captured over them stay valid across an unmap
and a later map (the contents of a remapped chunk start out zero on CPU, undefined on GPU).

Two implementations behind this one interface:

* CPU (:class:`ShmRange`): one POSIX shared-memory file per range, mapped once by every process.
  Map = ``posix_fallocate`` of the chunk (memory is reserved now, so a full ``/dev/shm`` fails
  here, not with a SIGBUS later); unmap = ``madvise(MADV_REMOVE)``, which punches a hole in the
  file: the memory goes back to the system for every process at once.
* GPU (:class:`~muxserve.flexstore.cuda_vmm.CudaRange`): CUDA virtual memory management. Each
  process reserves its own address range; the owner creates physical memory per chunk and
  exports it as POSIX file descriptors; other processes import and map it at their range.

Sharing: the owner counts changes in an ``epoch``; an attached range asks for
:meth:`DeviceRange.changes_since` its epoch (over the fd socket, see ``RangeServer``/``sync_range``)
and applies them, so a runtime maps what FlexStore mapped and unmaps what it unmapped. Memory
of an unmapped chunk returns to the device only when every process has unmapped it.
"""

from __future__ import annotations

import mmap
import os
import threading
from abc import ABC, abstractmethod
from collections import deque
from multiprocessing import resource_tracker
from pathlib import Path

import msgspec
import torch

from muxserve.flexstore.fd_passing import request_fds

try:
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

REMOVED_LOG = 4096  # unmapped chunk ids remembered for incremental syncs; older epochs get the full state


class RangeDescriptor(msgspec.Struct, array_like=True, frozen=True):
    """What another process needs to attach a range."""

    kind: str  # "shm" or "cuda"
    name: str  # unique in the instance; the shm file's name on CPU
    nbytes: int
    granule_bytes: int
    device: int = 0  # CUDA device index (the owner's)

    @property
    def num_granules(self) -> int:
        return self.nbytes // self.granule_bytes


class Chunk(msgspec.Struct, array_like=True, frozen=True):
    """Granules ``[start, start + count)`` backed by one piece of memory, mapped at ``epoch``."""

    id: int
    start: int
    count: int
    epoch: int


class RangeChanges(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """What an attached range must do to match the owner at ``epoch``. With ``full``, ``mapped``
    is every chunk and anything else must go; the owner sends one fd per ``mapped`` chunk (GPU)."""

    epoch: int
    full: bool
    mapped: list[Chunk]
    unmapped: list[int]  # chunk ids


class DeviceRange(ABC):
    """A reserved range of ``nbytes`` (whole granules) mapped in chunks; see the module docstring."""

    def __init__(self, descriptor: RangeDescriptor, owner: bool):
        check_geometry(descriptor)
        self.descriptor = descriptor
        self.owner = owner
        self.tensor: torch.Tensor  # (nbytes,) uint8, set by the implementation
        self.epoch = 0
        self._lock = threading.RLock()  # an fd-server thread may read while the owner maps
        self._chunks: dict[int, Chunk] = {}  # id -> chunk, in mapping order
        self._start_of: dict[int, int] = {}  # granule -> id of the chunk holding it
        self._removed: deque[tuple[int, int]] = deque(maxlen=REMOVED_LOG)  # (epoch, chunk id)
        self._memory: dict[int, object] = {}  # chunk id -> what the implementation needs to unmap it
        self._next_id = 1

    # -- figures ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.descriptor.name

    @property
    def nbytes(self) -> int:
        return self.descriptor.nbytes

    @property
    def granule_bytes(self) -> int:
        return self.descriptor.granule_bytes

    @property
    def num_granules(self) -> int:
        return self.descriptor.num_granules

    def chunks(self) -> list[Chunk]:
        with self._lock:
            return sorted(self._chunks.values(), key=lambda c: c.start)

    def is_mapped(self, granule: int) -> bool:
        return granule in self._start_of

    @property
    def mapped_bytes(self) -> int:
        return len(self._start_of) * self.granule_bytes

    # -- owner: map and unmap ---------------------------------------------------------------
    def map(self, start: int, count: int = 1) -> Chunk:
        """Back granules ``[start, start + count)`` with new memory (one chunk)."""
        self._require_owner("map")
        with self._lock:
            if count < 1 or start < 0 or start + count > self.num_granules:
                raise ValueError(f"granules [{start}, {start + count}) are outside range {self.name!r} of "
                                 f"{self.num_granules} granules")
            taken = [g for g in range(start, start + count) if g in self._start_of]
            if taken:
                raise ValueError(f"granules {taken[:8]} of range {self.name!r} are already mapped")
            memory = self._map_new(start, count)
            chunk = Chunk(self._next_id, start, count, self.epoch + 1)
            self._next_id += 1
            self._add(chunk, memory)
            return chunk

    def unmap(self, start: int) -> Chunk:
        """Unmap the chunk that starts at granule ``start``; its memory goes once every process unmapped it."""
        self._require_owner("unmap")
        with self._lock:
            chunk = self._chunk_at(start)
            self._unmap_physical(chunk, self._memory[chunk.id])
            self._remove(chunk, self.epoch + 1)
            return chunk

    def map_granules(self, granules: list[int]) -> None:
        """One chunk per granule (the KV pool's way: any granule can go on its own later)."""
        for g in granules:
            self.map(g, 1)

    def unmap_granules(self, granules: list[int]) -> None:
        for g in granules:
            self.unmap(g)

    def map_all(self, chunk_granules: int) -> list[Chunk]:
        """Map the whole range in chunks of ``chunk_granules`` (weights: few, large chunks)."""
        return [self.map(s, min(chunk_granules, self.num_granules - s))
                for s in range(0, self.num_granules, chunk_granules)]

    def unmap_all(self) -> int:
        """Unmap every chunk; returns the bytes unmapped."""
        nbytes = self.mapped_bytes
        for chunk in self.chunks():
            self.unmap(chunk.start)
        return nbytes

    # -- sharing ----------------------------------------------------------------------------
    def changes_since(self, epoch: int) -> RangeChanges:
        """Owner: what an attached range at ``epoch`` must do to catch up."""
        with self._lock:
            floor = self._removed[0][0] - 1 if len(self._removed) == self._removed.maxlen else 0
            if epoch <= 0 or epoch < floor or epoch > self.epoch:
                return RangeChanges(self.epoch, True, list(self._chunks.values()), [])
            mapped = []
            for chunk in reversed(self._chunks.values()):  # mapping order: newest last
                if chunk.epoch <= epoch:
                    break
                mapped.append(chunk)
            unmapped = []
            for when, chunk_id in reversed(self._removed):
                if when <= epoch:
                    break
                unmapped.append(chunk_id)
            return RangeChanges(self.epoch, False, mapped[::-1], unmapped[::-1])

    def export(self, chunks: list[Chunk]) -> list[int]:
        """Owner: one new file descriptor per chunk for another process (GPU); none on CPU."""
        return []

    def changes_and_fds(self, epoch: int) -> tuple[RangeChanges, list[int]]:
        """Owner: :meth:`changes_since` and the fds of its mapped chunks, consistent with each other."""
        with self._lock:
            changes = self.changes_since(epoch)
            return changes, self.export(changes.mapped)

    def apply(self, changes: RangeChanges, fds: list[int]) -> None:
        """Attached: unmap what the owner unmapped, map what it mapped (``fds``: one per mapped chunk
        when the implementation needs them). Every fd is consumed (closed)."""
        try:
            if self.owner:
                raise ValueError(f"range {self.name!r} is the owner's: it does not apply changes")
            if fds and len(fds) != len(changes.mapped):
                raise ValueError(f"{len(fds)} fds for {len(changes.mapped)} chunks of range {self.name!r}")
            with self._lock:
                listed = {c.id for c in changes.mapped}
                gone = [c for c in self._chunks.values() if c.id not in listed] if changes.full else \
                    [self._chunks[i] for i in changes.unmapped if i in self._chunks]
                for chunk in gone:
                    self._unmap_physical(chunk, self._memory[chunk.id])
                    self._remove(chunk, changes.epoch)
                for i, chunk in enumerate(changes.mapped):
                    if chunk.id not in self._chunks:
                        self._add(chunk, self._map_imported(chunk, fds[i] if fds else -1))
                self.epoch = changes.epoch
        finally:
            for fd in fds:  # an import holds its own reference: the fds are done with
                os.close(fd)

    # -- implementation ---------------------------------------------------------------------
    @abstractmethod
    def _map_new(self, start: int, count: int) -> object:
        """Owner: create memory for the granules and map it; returns what ``_unmap_physical`` needs."""

    @abstractmethod
    def _map_imported(self, chunk: Chunk, fd: int) -> object:
        """Attached: map the owner's memory of ``chunk`` (``fd`` from ``export``, or -1; ``apply`` closes it)."""

    @abstractmethod
    def _unmap_physical(self, chunk: Chunk, memory: object) -> None:
        """Unmap the chunk in this process (the owner also drops its memory)."""

    @abstractmethod
    def close(self) -> None:
        """Unmap everything in this process and release the range (owner: and its name)."""

    # -- bookkeeping ------------------------------------------------------------------------
    def _add(self, chunk: Chunk, memory: object) -> None:
        self._chunks[chunk.id] = chunk
        self._memory[chunk.id] = memory
        for g in range(chunk.start, chunk.start + chunk.count):
            self._start_of[g] = chunk.id
        self.epoch = max(self.epoch, chunk.epoch)

    def _remove(self, chunk: Chunk, epoch: int) -> None:
        del self._chunks[chunk.id]
        del self._memory[chunk.id]
        for g in range(chunk.start, chunk.start + chunk.count):
            del self._start_of[g]
        self.epoch = epoch
        if self.owner:
            self._removed.append((epoch, chunk.id))

    def _chunk_at(self, start: int) -> Chunk:
        chunk_id = self._start_of.get(start)
        chunk = self._chunks.get(chunk_id) if chunk_id is not None else None
        if chunk is None or chunk.start != start:
            starts = sorted(c.start for c in self._chunks.values())
            raise ValueError(f"no chunk of range {self.name!r} starts at granule {start}; chunks start at "
                             f"{starts[:16]}{' ...' if len(starts) > 16 else ''}")
        return chunk

    def _require_owner(self, action: str) -> None:
        if not self.owner:
            raise ValueError(f"only the owner of range {self.name!r} can {action} memory; an attached range "
                             f"follows it with sync_range")

    def __enter__(self) -> DeviceRange:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShmRange(DeviceRange):
    """CPU: one shared-memory file per range; see the module docstring."""

    def __init__(self, descriptor: RangeDescriptor, owner: bool, mapping: mmap.mmap, fd: int | None):
        super().__init__(descriptor, owner)
        self._mapping = mapping
        self._fd = fd  # the owner keeps it, to reserve memory with posix_fallocate
        self.tensor = torch.frombuffer(mapping, dtype=torch.uint8)
        self._closed = False

    @classmethod
    def create(cls, name: str, nbytes: int, granule_bytes: int) -> ShmRange:
        """A new range; nothing mapped yet (the file is sparse). The resource tracker unlinks its
        name if this process dies without :meth:`close`."""
        descriptor = check_geometry(RangeDescriptor("shm", name, nbytes, granule_bytes))
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        resource_tracker.register("/" + name, "shared_memory")
        try:
            os.ftruncate(fd, nbytes)
            mapping = mmap.mmap(fd, nbytes)
        except BaseException:
            os.close(fd)
            _unlink(name)
            raise
        return cls(descriptor, True, mapping, fd)

    @classmethod
    def attach(cls, descriptor: RangeDescriptor) -> ShmRange:
        """Map a range another process created; never registers or unlinks its name."""
        fd = _posixshmem.shm_open("/" + descriptor.name, os.O_RDWR, mode=0o600)
        try:
            size = os.fstat(fd).st_size
            if size != descriptor.nbytes:
                raise ValueError(f"shared memory {descriptor.name!r} has {size} bytes, expected {descriptor.nbytes}")
            mapping = mmap.mmap(fd, descriptor.nbytes)
        finally:
            os.close(fd)
        return cls(descriptor, False, mapping, None)

    def allocated_bytes(self) -> int:
        """Memory the file holds now (its allocated blocks): what mapping reserved, less what was unmapped."""
        if self._fd is not None:
            return os.fstat(self._fd).st_blocks * 512
        fd = _posixshmem.shm_open("/" + self.name, os.O_RDONLY, mode=0o600)
        try:
            return os.fstat(fd).st_blocks * 512
        finally:
            os.close(fd)

    def _map_new(self, start: int, count: int) -> None:
        g = self.granule_bytes
        try:
            os.posix_fallocate(self._fd, start * g, count * g)  # tmpfs pages come zero-filled
        except OSError as exc:
            raise MemoryError(f"cannot back {count * g} bytes of range {self.name!r} in /dev/shm "
                              f"({exc.strerror})") from None

    def _map_imported(self, chunk: Chunk, fd: int) -> None:
        pass  # the file is shared: the owner's fallocate backed it for everyone

    def _unmap_physical(self, chunk: Chunk, memory: object) -> None:
        if self.owner:  # a hole in the file: the memory goes for every process that maps it
            g = self.granule_bytes
            self._mapping.madvise(mmap.MADV_REMOVE, chunk.start * g, chunk.count * g)

    def close(self) -> None:
        """Owner: unlink the name (the memory goes with the last mapping). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.owner:
            _unlink(self.name)
            os.close(self._fd)
        self.tensor = None  # type: ignore[assignment]
        try:
            self._mapping.close()
        except BufferError:  # views of the tensor still alive: the mapping goes with the last one
            pass


def create_range(name: str, nbytes: int, device: torch.device, granule_bytes: int) -> DeviceRange:
    """A new range owned by this process: shared memory on CPU, CUDA virtual memory on a GPU."""
    if device.type == "cuda":
        from muxserve.flexstore.cuda_vmm import CudaRange

        return CudaRange.create(name, nbytes, device, granule_bytes)
    return ShmRange.create(name, nbytes, granule_bytes)


def attach_range(descriptor: RangeDescriptor, device: torch.device | None = None) -> DeviceRange:
    """Attach a range another process owns (then :func:`sync_range` maps what it mapped)."""
    if descriptor.kind == "cuda":
        from muxserve.flexstore.cuda_vmm import CudaRange

        return CudaRange.attach(descriptor, device)
    if descriptor.kind == "shm":
        return ShmRange.attach(descriptor)
    raise ValueError(f"unknown range kind {descriptor.kind!r}")


# -- sharing over the fd socket ----------------------------------------------------------------
class SyncRequest(msgspec.Struct, array_like=True, frozen=True):
    name: str
    epoch: int


class SyncError(msgspec.Struct, array_like=True, frozen=True, tag=True):
    message: str


_Reply = RangeChanges | SyncError


class RangeServer:
    """The owner's side: an ``FdServer`` handler answering :class:`SyncRequest` for its ranges."""

    def __init__(self, ranges: list[DeviceRange] = ()):
        self.ranges = {r.name: r for r in ranges}

    def add(self, rng: DeviceRange) -> None:
        self.ranges[rng.name] = rng

    def __call__(self, request: bytes) -> tuple[bytes, list[int]]:
        try:
            req = msgspec.msgpack.decode(request, type=SyncRequest)
        except msgspec.DecodeError as exc:
            return msgspec.msgpack.encode(SyncError(f"malformed sync request: {exc}")), []
        rng = self.ranges.get(req.name)
        if rng is None:
            return msgspec.msgpack.encode(SyncError(f"unknown range {req.name!r}; known: {sorted(self.ranges)}")), []
        changes, fds = rng.changes_and_fds(req.epoch)
        return msgspec.msgpack.encode(changes), fds


def sync_range(rng: DeviceRange, socket_path: str | Path, secret: str) -> RangeChanges:
    """Attached: bring ``rng`` up to its owner's mappings (ask the owner's fd server, then apply)."""
    reply, fds = request_fds(socket_path, secret, msgspec.msgpack.encode(SyncRequest(rng.name, rng.epoch)))
    try:
        changes = msgspec.msgpack.decode(reply, type=_Reply)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    if isinstance(changes, SyncError):
        for fd in fds:
            os.close(fd)
        raise ValueError(changes.message)
    rng.apply(changes, fds)
    return changes


def check_geometry(descriptor: RangeDescriptor) -> RangeDescriptor:
    if descriptor.granule_bytes < 1 or descriptor.nbytes < descriptor.granule_bytes or \
            descriptor.nbytes % descriptor.granule_bytes:
        raise ValueError(f"range {descriptor.name!r} of {descriptor.nbytes} B is not a positive number of "
                         f"{descriptor.granule_bytes}-byte granules")
    return descriptor


def _unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        pass
    resource_tracker.unregister("/" + name, "shared_memory")
