"""CUDA virtual memory management for :class:`~muxserve.flexstore.device_memory.DeviceRange` (GPU).

Each process reserves its own address range once (``cuMemAddressReserve``); addresses differ
between processes but never change within one, which is what CUDA graphs need. The owner backs a
chunk with ``cuMemCreate`` (exportable as a POSIX file descriptor), ``cuMemMap`` and
``cuMemSetAccess``, and exports it with ``cuMemExportToShareableHandle``; another process imports
the fd (``cuMemImportFromShareableHandle``) and maps it at its own range. Unmapping is
``cuMemUnmap`` in every process plus ``cuMemRelease`` of the owner's handle; the memory returns
to the device when the last process has unmapped it.

The tensor over the range wraps the reserved address through ``__cuda_array_interface__``; the
object behind it keeps the reservation alive as long as the tensor (and its views) live.
"""

from __future__ import annotations

import functools
import os

import torch
from cuda.bindings import driver as cu

from muxserve.flexstore.device_memory import Chunk, DeviceRange, RangeDescriptor, check_geometry

_POSIX_FD = cu.CUmemAllocationHandleType.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR


class CudaError(RuntimeError):
    """A CUDA driver call failed; the message names the call and the error."""


def _check(result: tuple, what: str):
    err, *rest = result
    if err != cu.CUresult.CUDA_SUCCESS:
        status, name = cu.cuGetErrorName(err)
        name = name.decode() if status == cu.CUresult.CUDA_SUCCESS and isinstance(name, bytes) else str(err)
        raise CudaError(f"{what} failed: {name}")
    return rest[0] if len(rest) == 1 else None


@functools.cache
def _primary_context(index: int):
    torch.cuda.init()  # torch's runtime and these driver calls share the device's primary context
    _check(cu.cuInit(0), "cuInit")
    device = _check(cu.cuDeviceGet(index), "cuDeviceGet")
    return _check(cu.cuDevicePrimaryCtxRetain(device), "cuDevicePrimaryCtxRetain")


def _use_device(index: int) -> None:
    """Make the device's primary context current in this thread (driver calls need one)."""
    _check(cu.cuCtxSetCurrent(_primary_context(index)), "cuCtxSetCurrent")


def _prop(index: int, exportable: bool):
    prop = cu.CUmemAllocationProp()
    prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
    prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    prop.location.id = index
    if exportable:
        prop.requestedHandleTypes = _POSIX_FD
    return prop


def _access(index: int) -> list:
    desc = cu.CUmemAccessDesc()
    desc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
    desc.location.id = index
    desc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
    return [desc]


def granularity(index: int) -> int:
    """The device's minimum mapping granularity (2 MiB on Hopper)."""
    _use_device(index)
    flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
    return int(_check(cu.cuMemGetAllocationGranularity(_prop(index, True), flag), "cuMemGetAllocationGranularity"))


class _Reservation:
    """A reserved address range; freed when the last object referring to it (range, tensors) goes."""

    def __init__(self, nbytes: int, alignment: int, index: int):
        self.nbytes, self.index = nbytes, index
        self.va = int(_check(cu.cuMemAddressReserve(nbytes, alignment, 0, 0), "cuMemAddressReserve"))

    def __del__(self) -> None:
        if getattr(self, "va", 0):
            try:
                _use_device(self.index)
                cu.cuMemAddressFree(self.va, self.nbytes)
            except Exception:  # interpreter shutdown: the process is going anyway
                pass
            self.va = 0


class _CudaArray:
    """What ``torch.as_tensor`` reads to wrap the range without a copy; the tensor keeps it alive."""

    def __init__(self, reservation: _Reservation):
        self._reservation = reservation
        self.__cuda_array_interface__ = {"shape": (reservation.nbytes,), "typestr": "|u1",
                                         "data": (reservation.va, False), "strides": None, "version": 3}


class CudaRange(DeviceRange):
    """GPU range: CUDA virtual memory; see the module docstring."""

    def __init__(self, descriptor: RangeDescriptor, owner: bool, device: torch.device):
        super().__init__(descriptor, owner)
        if device.type != "cuda" or device.index is None:
            raise ValueError(f"a CUDA range needs a device like cuda:0, got {device}")
        self.device = device
        _use_device(device.index)
        minimum = granularity(device.index)
        if descriptor.granule_bytes % minimum:
            raise ValueError(f"granule of {descriptor.granule_bytes} B is not a multiple of {device}'s mapping "
                             f"granularity {minimum} B")
        self._reservation = _Reservation(descriptor.nbytes, minimum, device.index)
        self.tensor = self._wrap()
        self._closed = False

    @classmethod
    def create(cls, name: str, nbytes: int, device: torch.device, granule_bytes: int) -> CudaRange:
        device = torch.device(device)
        index = torch.cuda.current_device() if device.index is None else device.index
        descriptor = check_geometry(RangeDescriptor("cuda", name, nbytes, granule_bytes, index))
        return cls(descriptor, True, torch.device("cuda", index))

    @classmethod
    def attach(cls, descriptor: RangeDescriptor, device: torch.device | None = None) -> CudaRange:
        return cls(descriptor, False, device if device is not None else torch.device("cuda", descriptor.device))

    @property
    def address(self) -> int:
        """This process's base address of the range (fixed for the range's life)."""
        return self._reservation.va

    def _wrap(self) -> torch.Tensor:
        # torch asks the driver which device a pointer belongs to, which fails for an address with
        # nothing mapped: back the first granule with scratch memory while the tensor is made.
        va, size, index = self._reservation.va, self.granule_bytes, self.device.index
        handle = _check(cu.cuMemCreate(size, _prop(index, False), 0), "cuMemCreate")
        try:
            _check(cu.cuMemMap(va, size, 0, handle, 0), "cuMemMap")
            try:
                _check(cu.cuMemSetAccess(va, size, _access(index), 1), "cuMemSetAccess")
                return torch.as_tensor(_CudaArray(self._reservation), device=self.device)
            finally:
                _check(cu.cuMemUnmap(va, size), "cuMemUnmap")
        finally:
            _check(cu.cuMemRelease(handle), "cuMemRelease")

    def _map_at(self, start: int, count: int, handle) -> None:
        va, size = self._reservation.va + start * self.granule_bytes, count * self.granule_bytes
        _check(cu.cuMemMap(va, size, 0, handle, 0), "cuMemMap")
        try:
            _check(cu.cuMemSetAccess(va, size, _access(self.device.index), 1), "cuMemSetAccess")
        except BaseException:
            cu.cuMemUnmap(va, size)
            raise

    def _map_new(self, start: int, count: int):
        _use_device(self.device.index)
        handle = _check(cu.cuMemCreate(count * self.granule_bytes, _prop(self.device.index, True), 0), "cuMemCreate")
        try:
            self._map_at(start, count, handle)
        except BaseException:
            cu.cuMemRelease(handle)
            raise
        return handle  # kept: exports need it; released at unmap

    def _map_imported(self, chunk: Chunk, fd: int) -> None:
        _use_device(self.device.index)
        handle = _check(cu.cuMemImportFromShareableHandle(fd, _POSIX_FD), "cuMemImportFromShareableHandle")
        try:
            self._map_at(chunk.start, chunk.count, handle)
        finally:
            _check(cu.cuMemRelease(handle), "cuMemRelease")  # the mapping holds the memory

    def _unmap_physical(self, chunk: Chunk, memory) -> None:
        _use_device(self.device.index)
        torch.cuda.synchronize(self.device)  # no kernel of this process may still touch it
        va = self._reservation.va + chunk.start * self.granule_bytes
        _check(cu.cuMemUnmap(va, chunk.count * self.granule_bytes), "cuMemUnmap")
        if memory is not None:
            _check(cu.cuMemRelease(memory), "cuMemRelease")

    def export(self, chunks: list[Chunk]) -> list[int]:
        _use_device(self.device.index)
        fds: list[int] = []
        try:
            for chunk in chunks:
                fd = _check(cu.cuMemExportToShareableHandle(self._memory[chunk.id], _POSIX_FD, 0),
                            "cuMemExportToShareableHandle")
                fds.append(int(fd))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def close(self) -> None:
        """Unmap every chunk in this process; the address range goes with the last tensor over it."""
        if self._closed:
            return
        self._closed = True
        with self._lock:
            for chunk in list(self._chunks.values()):
                self._unmap_physical(chunk, self._memory[chunk.id])
                self._remove(chunk, self.epoch + 1)
        self.tensor = None  # type: ignore[assignment]
        self._reservation = None  # type: ignore[assignment]
