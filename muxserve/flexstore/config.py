"""What one FlexStore serves: its models, its device, its KV pool size and its address."""

from __future__ import annotations

import re

import msgspec

from muxserve.engine.kv_cache import DEFAULT_PAGE_BYTES
from muxserve.engine.loader import LOAD_FORMATS
from muxserve.ipc.devices import DTYPES

_ADDRESS = re.compile(r"^(tcp://\S+:\d+|ipc://\S+|inproc://\S+)$")
_SHM_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ModelEntry(msgspec.Struct, frozen=True):
    """One LLM of the instance.

    Args:
        name: the id that clients use (unique per FlexStore).
        model: a known short name, a Hugging Face folder or a ``.gguf`` file (see ``model_hub``).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        load_format: ``auto`` reads the checkpoint; ``random`` fills the weights from ``seed``
            (the folder then needs only ``config.json``; for benchmarks of real shapes).
        seed: seed of the random weights.
        tensor_parallel_size: ranks of the model; FlexStore stores each rank's shard once.
        devices: the mesh position (device index) of each rank, e.g. ``(0, 1)``.
        residency: ``pinned`` (weights on the device for good) or ``elastic`` (weights in a range of
            the memory budget with a host copy: FlexStore offloads and wakes them on request).
    """

    name: str
    model: str
    dtype: str = "float32"
    load_format: str = "auto"
    seed: int = 0
    tensor_parallel_size: int = 1
    devices: tuple[int, ...] = (0,)
    residency: str = "pinned"

    def __post_init__(self) -> None:
        if self.residency not in ("pinned", "elastic"):
            raise ValueError(f"residency of model {self.name!r} must be 'pinned' or 'elastic', got {self.residency!r}")
        if self.residency == "elastic" and self.tensor_parallel_size > 1:
            raise ValueError(f"model {self.name!r}: residency 'elastic' is for LLMs without tensor parallelism")
        if not self.name or any(c.isspace() for c in self.name):
            raise ValueError(f"model name {self.name!r} must be non-empty and have no spaces")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format {self.load_format!r} of model {self.name!r}; choose from {LOAD_FORMATS}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size of model {self.name!r} must be >= 1, "
                             f"got {self.tensor_parallel_size}")
        if len(self.devices) != self.tensor_parallel_size or len(set(self.devices)) != len(self.devices):
            raise ValueError(f"model {self.name!r}: devices {list(self.devices)} must name "
                             f"{self.tensor_parallel_size} distinct device(s), one per tensor-parallel rank")


class FlexStoreConfig(msgspec.Struct, frozen=True):
    """Settings of one FlexStore process: one mesh of ``num_devices`` GPUs (or CPU stand-ins).

    ``device`` is ``cpu`` or the mesh's first GPU (``cuda`` = ``cuda:0``); position ``i`` of the
    mesh is ``cuda:<first + i>``. On CPU every position is the CPU, with a pool of its own, so a
    tensor-parallel model behaves as on GPUs. Every position gets a pool of the same number of
    pages and page ids are global (one allocator): a request of a tensor-parallel model holds the
    same page ids on each of its ranks' devices, each storing that rank's kv heads.

    ``kv_cache_bytes`` sizes each pool when given. Otherwise the pool takes 512 MiB on CPU and,
    as in the original, ``gpu_memory_utilization`` x the GPU's *total* memory on a GPU (rounded
    down to a multiple of 128 pages); the weights and every runtime's activations must fit in
    the rest.

    ``memory_budget_bytes`` (with an elastic LLM) is the device memory for weights and KV together,
    instead of ``kv_cache_bytes`` plus every LLM's weights: the weights of all LLMs may exceed it.
    Elastic LLMs start resident in the order given while their weights fit (leaving a granule for
    KV); the others start offloaded, woken on demand.
    """

    models: tuple[ModelEntry, ...]
    address: str
    device: str = "cpu"
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.5
    page_bytes: int = DEFAULT_PAGE_BYTES
    shm_prefix: str = "muxserve"
    num_devices: int = 1
    granule_bytes: int = 2 * 1024 * 1024  # mapping unit of the memory budget (elastic LLMs only)
    reserve_granules: int = 32  # whole free KV granules kept mapped ahead of growth (elastic LLMs only)
    memory_budget_bytes: int | None = None  # weights + KV of the device (elastic LLMs only); see above

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("FlexStore needs at least one model")
        if self.num_devices < 1:
            raise ValueError(f"num_devices must be >= 1, got {self.num_devices}")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"device {self.device!r} must be cpu, cuda or cuda:N")
        for m in self.models:
            outside = [d for d in m.devices if d >= self.num_devices]
            if outside:
                raise ValueError(f"model {m.name!r} is placed on devices {outside} outside the mesh of "
                                 f"{self.num_devices} device(s)")
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names: {dupes}")
        if not _ADDRESS.match(self.address):
            raise ValueError(f"address {self.address!r} is not a ZeroMQ endpoint like tcp://127.0.0.1:5555 or ipc:///tmp/fs")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if self.page_bytes < 64 or self.page_bytes % 64:
            raise ValueError(f"page_bytes must be a positive multiple of 64, got {self.page_bytes!r}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < self.page_bytes:
            raise ValueError(f"kv_cache_bytes ({self.kv_cache_bytes}) is smaller than one page ({self.page_bytes})")
        if self.granule_bytes < self.page_bytes or self.granule_bytes % self.page_bytes:
            raise ValueError(f"granule_bytes ({self.granule_bytes}) must be a multiple of page_bytes "
                             f"({self.page_bytes})")
        if self.reserve_granules < 0:
            raise ValueError(f"reserve_granules must be >= 0, got {self.reserve_granules}")
        if self.memory_budget_bytes is not None:
            if not self.elastic:
                raise ValueError("memory_budget_bytes needs an LLM with residency 'elastic'")
            if self.memory_budget_bytes < self.granule_bytes:
                raise ValueError(f"memory_budget_bytes ({self.memory_budget_bytes}) holds no granule of "
                                 f"{self.granule_bytes} B")
        if self.elastic and self.num_devices > 1:
            raise ValueError(f"elastic residency needs a single-device FlexStore, not a mesh of {self.num_devices}")
        if not _SHM_PREFIX.match(self.shm_prefix):
            raise ValueError(f"shm_prefix {self.shm_prefix!r} must be 1-64 letters, digits, '_', '.' or '-'")


    @property
    def elastic(self) -> bool:
        """Whether any model is elastic: then weights and KV share one memory budget (``budget.py``)."""
        return any(m.residency == "elastic" for m in self.models)

    def device_names(self) -> list[str]:
        """The torch device of each mesh position."""
        if self.device == "cpu":
            return ["cpu"] * self.num_devices
        first = int(self.device.partition(":")[2] or 0)
        return [f"cuda:{first + i}" for i in range(self.num_devices)]


def parse_model_arg(text: str, default_dtype: str = "float32") -> ModelEntry:
    """``NAME=MODEL[:DTYPE]`` (the CLI's ``--model``) -> ModelEntry; ``MODEL`` may be ``random:FOLDER``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--model {text!r}: expected NAME=MODEL[:DTYPE], e.g. llm-0=smollm2-135m:bfloat16")
    dtype = default_dtype
    head, colon, tail = rest.rpartition(":")
    if colon and tail in DTYPES:
        rest, dtype = head, tail
    load_format = "auto"
    if rest.startswith("random:"):
        rest, load_format = rest[len("random:"):], "random"
    return ModelEntry(name=name, model=rest, dtype=dtype, load_format=load_format)

