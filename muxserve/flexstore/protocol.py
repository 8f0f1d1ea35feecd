"""FlexStore's request/response messages: msgspec Structs, a tagged union, encoded with msgpack.

Every request gets exactly one reply; a failure is an :class:`Error` reply, never a dropped
connection. Structs are ``array_like`` (a msgpack array ``[tag, field, ...]``) to keep the hot
path (``Allocate`` -> ``Allocated``) small and fast.
"""

from __future__ import annotations

import msgspec

from muxserve.engine.model_config import ModelSpec
from muxserve.flexstore.device_memory import RangeDescriptor


class _Msg(msgspec.Struct, array_like=True, tag=True, frozen=True, omit_defaults=True):
    pass


# -- requests ----------------------------------------------------------------------------------
class Ping(_Msg):
    """Readiness probe."""


class GetInfo(_Msg):
    """Pool geometry and the models served."""


class Attach(_Msg):
    """Ask for the handles a runtime needs to map one model's weights (``rank``'s shard) and its device's pool."""

    model: str
    rank: int = 0


class Allocate(_Msg):
    """Give each ``(request id, tokens it will hold)`` the pages it misses (see ``PageAllocator``)."""

    model: str
    requests: list[tuple[str, int]]


class CanAllocate(_Msg):
    model: str
    requests: list[tuple[str, int]]


class Free(_Msg):
    """Return every page of finished or aborted requests."""

    model: str
    request_ids: list[str]


class PagesOf(_Msg):
    model: str
    request_id: str


class GetStats(_Msg):
    pass


class Shutdown(_Msg):
    """Reply, then release every segment and exit."""


class Offload(_Msg):
    """Give an elastic LLM's device memory back to the budget (its host copy stays); refused while
    any of its requests holds pages."""

    model: str


class Wake(_Msg):
    """Map an offloaded LLM's weights again and copy them in from the host copy. Room comes from
    free budget, then whole free KV granules, then by preempting other LLMs' newest requests,
    never one of ``protected`` (``(model, request id)`` inside in-flight jobs)."""

    model: str
    protected: list[tuple[str, str]] = []


Request = Ping | GetInfo | Attach | Allocate | CanAllocate | Free | PagesOf | GetStats | Shutdown | Offload | Wake


# -- pieces of replies -------------------------------------------------------------------------
class CudaIpcHandle(msgspec.Struct, array_like=True, frozen=True):
    """What ``UntypedStorage._share_cuda_()`` returns, to rebuild the storage in another process."""

    device: int
    handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool


class Segment(msgspec.Struct, array_like=True, frozen=True):
    """A flat byte buffer: a POSIX shared-memory name (CPU) or a CUDA IPC handle (GPU)."""

    kind: str  # "shm" or "cuda"
    nbytes: int
    name: str = ""  # shm: the segment's name, without the leading "/"
    cuda: CudaIpcHandle | None = None


class TensorSpec(msgspec.Struct, array_like=True, frozen=True):
    """One parameter inside a weight segment."""

    name: str  # e.g. "layers.0.self_attn.qkv_proj.weight"
    shape: tuple[int, ...]
    offset: int  # bytes from the segment's start


class LayoutInfo(msgspec.Struct, array_like=True, frozen=True):
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    page_bytes: int
    page_tokens: int
    pages_per_block: int


class ModelInfo(msgspec.Struct, array_like=True, frozen=True):
    name: str
    folder: str
    dtype: str
    layout: LayoutInfo
    max_tokens: int  # tokens one request could hold with the whole pool
    weight_bytes: int  # of every rank together
    tensor_parallel_size: int = 1
    devices: tuple[int, ...] = (0,)  # mesh position of each rank
    residency: str = "pinned"  # or "elastic"
    state: str = "resident"  # residency.WeightState: resident, offloading, offloaded, waking


class ModelStats(msgspec.Struct, array_like=True, frozen=True):
    name: str
    requests: int  # requests holding pages now
    pages: int  # pages held now
    preemptions: int  # requests preempted since start (by the pool running out or by a wake)
    state: str = "resident"
    offloads: int = 0  # since start
    wakes: int = 0


class BudgetInfo(msgspec.Struct, array_like=True, frozen=True):
    """The memory budget of the device (elastic residency), in granules of ``granule_bytes``."""

    num_granules: int
    granule_bytes: int
    pinned_granules: int  # weights of pinned LLMs
    elastic_granules: int  # weights of elastic LLMs that hold theirs now
    kv_granules: int  # mapped KV granules
    free_granules: int  # held by nobody
    kv_whole_free: int = 0  # mapped KV granules without a page in use (a wake takes them first)


# -- replies -----------------------------------------------------------------------------------
class Pong(_Msg):
    pid: int


class Info(_Msg):
    device: str  # the mesh's first device
    num_pages: int  # per device (every device of the mesh has a pool of this many pages)
    page_bytes: int
    models: list[ModelInfo]
    num_devices: int = 1


class AttachInfo(_Msg):
    """Under a memory budget (an elastic LLM on the device) the pool is ``pool_range`` and an elastic
    LLM's weights are ``weights_range``: ranges mapped granule by granule, followed with
    ``device_memory.sync_range`` over the fd socket at ``fd_socket``; ``weights``/``pool`` are then None."""

    model: ModelInfo
    spec: ModelSpec
    device: str
    weights: Segment | None
    tensors: list[TensorSpec]
    pool: Segment | None
    num_pages: int
    weights_range: RangeDescriptor | None = None
    pool_range: RangeDescriptor | None = None
    fd_socket: str = ""


class Allocated(_Msg):
    """Only admitted requests that got pages appear in ``new_pages``; the client fills in the rest."""

    new_pages: dict[str, list[int]]
    preempted: list[str]
    kv_epoch: int = 0  # of the KV range after this allocation (a memory budget only)


class Answer(_Msg):
    """A scalar result (can_allocate -> bool, free -> pages returned)."""

    value: int


class Pages(_Msg):
    pages: list[int]


class Stats(_Msg):
    num_pages: int
    num_free: int
    models: list[ModelStats]
    kv_epoch: int = 0
    budget: BudgetInfo | None = None


class Offloaded(_Msg):
    model: str
    freed_bytes: int  # device memory given back to the budget
    seconds: float
    weights_epoch: int  # of the LLM's weight range: its runtimes unmap by syncing to it


class Woken(_Msg):
    """The LLM is resident again. ``preempted``: per LLM, the requests whose pages the wake took
    (oldest first), to be recomputed; its runtimes must sync to ``kv_epoch`` / ``weights_epoch``."""

    model: str
    seconds: float  # the whole wake
    copy_seconds: float  # host -> device copy of the weights
    nbytes: int
    preempted: dict[str, list[str]]
    kv_epoch: int
    weights_epoch: int


class Ok(_Msg):
    pass


class Error(_Msg):
    """``code`` is one of ERROR_CODES; ``message`` says what was wrong, naming the bad value.
    A ``refused`` offload or wake carries its figures in ``numbers`` (e.g. granules needed, free)."""

    code: str
    message: str
    numbers: dict[str, int] = {}


ERROR_CODES = ("malformed", "unknown_model", "unknown_request", "invalid", "refused", "internal")

Reply = Pong | Info | AttachInfo | Allocated | Answer | Pages | Stats | Ok | Error | Offloaded | Woken

_encoder = msgspec.msgpack.Encoder()
_request_decoder = msgspec.msgpack.Decoder(Request)
_reply_decoder = msgspec.msgpack.Decoder(Reply)


def encode(msg: _Msg) -> bytes:
    return _encoder.encode(msg)


def decode_request(data: bytes) -> Request:
    """Raises ``msgspec.DecodeError`` (incl. ``ValidationError``) for anything that is not a request."""
    return _request_decoder.decode(data)


def decode_reply(data: bytes) -> Reply:
    return _reply_decoder.decode(data)
