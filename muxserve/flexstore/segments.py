"""Flat byte buffers that other processes map without a copy.

* CPU: a named POSIX shared-memory object (``/dev/shm/<name>``). The owner creates, reserves
  (``posix_fallocate``, so a full ``/dev/shm`` fails here with a clear error instead of a
  SIGBUS later) and finally unlinks it. The owner registers the name with Python's
  ``resource_tracker``, whose helper process unlinks it if the owner is SIGKILLed. Attaching
  processes open the name with ``shm_open`` + ``mmap`` directly, *not* through
  ``SharedMemory``: on Python < 3.13 that class registers every opened segment with the
  tracker, which then unlinks (and warns about) a segment it does not own when the runtime
  exits.
* GPU: one CUDA allocation shared with CUDA IPC (``UntypedStorage._share_cuda_``, rebuilt with
  ``torch.multiprocessing.reductions.rebuild_cuda_tensor``), shared anew for every attaching
  runtime so that torch's IPC reference counting keeps the memory alive while one maps it.

Either way the user sees a 1-D ``uint8`` tensor and a :class:`~muxserve.flexstore.protocol.Segment`
descriptor that travels in the protocol.
"""

from __future__ import annotations

import logging
import mmap
import os
from multiprocessing import resource_tracker

import torch

from muxserve.flexstore.protocol import CudaIpcHandle, Segment

try:  # POSIX shared memory primitives (what multiprocessing.shared_memory uses)
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

logger = logging.getLogger(__name__)
SHM_DIR = "/dev/shm"


class SharedSegment:
    """A byte buffer in this process, owned (created here) or attached (created elsewhere)."""

    def __init__(self, tensor: torch.Tensor, descriptor: Segment, owner: bool, mapping: mmap.mmap | None = None):
        self.tensor = tensor  # (nbytes,) uint8
        self.descriptor = descriptor
        self.owner = owner
        self._mapping = mapping
        self._released = False

    @property
    def nbytes(self) -> int:
        return self.descriptor.nbytes

    # -- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, nbytes: int, device: torch.device, name: str, zero: bool = False) -> SharedSegment:
        """A new buffer of ``nbytes``; ``name`` names the shm object on CPU (ignored on GPU)."""
        if nbytes < 1:
            raise ValueError(f"segment {name!r} must have at least one byte, got {nbytes}")
        if device.type == "cuda":
            return cls._create_cuda(nbytes, device, zero)
        return cls._create_shm(nbytes, name)

    @classmethod
    def _create_shm(cls, nbytes: int, name: str) -> SharedSegment:
        if _posixshmem is None:  # pragma: no cover
            raise RuntimeError("POSIX shared memory is not available on this platform")
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        resource_tracker.register("/" + name, "shared_memory")
        try:
            try:
                os.posix_fallocate(fd, 0, nbytes)  # tmpfs pages are zero-filled
            except OSError as exc:
                raise MemoryError(f"cannot reserve {nbytes} bytes of shared memory for {name!r} in {SHM_DIR} "
                                  f"({exc.strerror}); free space there or lower the KV cache size") from None
            mapping = mmap.mmap(fd, nbytes)
        except BaseException:
            _unlink_shm(name)
            raise
        finally:
            os.close(fd)
        tensor = torch.frombuffer(mapping, dtype=torch.uint8)
        return cls(tensor, Segment(kind="shm", nbytes=nbytes, name=name), owner=True, mapping=mapping)

    @classmethod
    def _create_cuda(cls, nbytes: int, device: torch.device, zero: bool) -> SharedSegment:
        tensor = (torch.zeros if zero else torch.empty)(nbytes, dtype=torch.uint8, device=device)
        return cls(tensor, Segment(kind="cuda", nbytes=nbytes), owner=True)

    def share(self) -> Segment:
        """The descriptor to send to one attaching process.

        CUDA: a fresh ``_share_cuda_()`` per consumer, as torch.multiprocessing does per send:
        each gets its own IPC reference counter (released when that consumer drops the
        mapping) and an event recorded after every write issued so far.
        """
        if self.descriptor.kind != "cuda":
            return self.descriptor
        before = list_shm()
        (dev, handle, size, offset, ref_handle, ref_offset, event, sync) = self.tensor.untyped_storage()._share_cuda_()
        _adopt_torch_ipc_files(list_shm() - before)
        ipc = CudaIpcHandle(device=int(dev), handle=bytes(handle), storage_size_bytes=int(size),
                            storage_offset_bytes=int(offset), ref_counter_handle=bytes(ref_handle),
                            ref_counter_offset=int(ref_offset), event_handle=None if event is None else bytes(event),
                            event_sync_required=bool(sync))
        return Segment(kind="cuda", nbytes=self.descriptor.nbytes, cuda=ipc)

    # -- attaching --------------------------------------------------------------------------
    @classmethod
    def attach(cls, descriptor: Segment) -> SharedSegment:
        """Map a segment that another process created. Never unlinks, never registers it."""
        if descriptor.kind == "shm":
            return cls._attach_shm(descriptor)
        if descriptor.kind == "cuda":
            return cls._attach_cuda(descriptor)
        raise ValueError(f"unknown segment kind {descriptor.kind!r}")

    @classmethod
    def _attach_shm(cls, descriptor: Segment) -> SharedSegment:
        if _posixshmem is None:  # pragma: no cover
            raise RuntimeError("POSIX shared memory is not available on this platform")
        fd = _posixshmem.shm_open("/" + descriptor.name, os.O_RDWR, mode=0o600)
        try:
            size = os.fstat(fd).st_size
            if size < descriptor.nbytes:
                raise ValueError(f"shared memory {descriptor.name!r} has {size} bytes, expected {descriptor.nbytes}")
            mapping = mmap.mmap(fd, descriptor.nbytes)
        finally:
            os.close(fd)
        return cls(torch.frombuffer(mapping, dtype=torch.uint8), descriptor, owner=False, mapping=mapping)

    @classmethod
    def _attach_cuda(cls, descriptor: Segment) -> SharedSegment:
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        h = descriptor.cuda
        if h is None:
            raise ValueError("cuda segment without an IPC handle")
        tensor = rebuild_cuda_tensor(
            torch.Tensor, (descriptor.nbytes,), (1,), 0, torch.UntypedStorage, torch.uint8, h.device,
            h.handle, h.storage_size_bytes, h.storage_offset_bytes, False, h.ref_counter_handle,
            h.ref_counter_offset, h.event_handle, h.event_sync_required)
        return cls(tensor, descriptor, owner=False)

    # -- release ----------------------------------------------------------------------------
    def release(self) -> None:
        """Owner: unlink the name / drop the allocation. Attached: drop this process's mapping.

        Idempotent. Tensors viewing the buffer that are still alive elsewhere keep their pages
        mapped until they die; the shm *name* is gone right away either way.
        """
        if self._released:
            return
        self._released = True
        if self.owner and self.descriptor.kind == "shm":
            _unlink_shm(self.descriptor.name)
        self.tensor = None  # type: ignore[assignment]
        if self._mapping is not None:
            try:
                self._mapping.close()
            except BufferError:  # views of it still alive: the mapping goes with the last one
                pass
            self._mapping = None
        if self.owner and self.descriptor.kind == "cuda":
            torch.cuda.ipc_collect()


# Names of the reference-counter files that torch's CUDA IPC made in /dev/shm for this process.
_torch_ipc_files: set[str] = set()


def _adopt_torch_ipc_files(new: set[str]) -> None:
    """Take ownership of the /dev/shm file(s) a ``_share_cuda_()`` call just created.

    torch keeps its CUDA IPC reference counters in a shared-memory file named after the
    producer's pid and never unlinks the one in use, not even at exit. FlexStore registers
    it with the resource tracker (so a SIGKILL still cleans up) and unlinks it on shutdown.
    Consumers that still map it keep working: only the name goes.
    """
    pid = os.getpid()
    for name in new:
        if f".{pid:x}." in name or f"_{pid}_" in name:  # torch: cuda.shm.<dev>.<pid hex>.<n> / torch_<pid>_<n>
            _torch_ipc_files.add(name)
            resource_tracker.register("/" + name, "shared_memory")


def release_torch_ipc_files() -> None:
    """Unlink the torch IPC files adopted by this process (call once no more attaches are served)."""
    while _torch_ipc_files:
        _unlink_shm(_torch_ipc_files.pop())


def _unlink_shm(name: str) -> None:
    try:
        _posixshmem.shm_unlink("/" + name)
    except FileNotFoundError:
        logger.warning("shared memory %r was already unlinked", name)
    resource_tracker.unregister("/" + name, "shared_memory")


def list_shm(prefix: str = "") -> set[str]:
    """Names under /dev/shm starting with ``prefix`` (for tests and leak checks)."""
    try:
        return {n for n in os.listdir(SHM_DIR) if n.startswith(prefix)}
    except FileNotFoundError:  # pragma: no cover - no /dev/shm (macOS)
        return set()
