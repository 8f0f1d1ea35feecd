"""Typed messages between the scheduler and the runtimes (msgpack over ZeroMQ), and the channels that carry them.

The scheduler sends a ``Job`` (one prefill or decode step of one LLM); the runtime answers with
a ``JobResult`` holding one sampled token per sequence, and, for the sequences that ask, its
log-probabilities, their prompt's (``echo``), and whether its grammar (structured output) ended.
Page ids travel incrementally: a sequence carries the pages appended since ``page_offset``;
offset 0 replaces the whole table (a first step, or a recompute after preemption). The instance
binds every socket (``JobSender``, ``ResultReceiver``); a runtime connects to them (``JobReceiver``, ``ResultSender``).
"""

from __future__ import annotations

import enum

import msgspec
import zmq


class Phase(str, enum.Enum):
    """The two steps of a request, and the two runtimes of an LLM: on the wire, its value."""

    PREFILL = "prefill"
    DECODE = "decode"


class TokenLogprob(msgspec.Struct, array_like=True):
    """The log-probability of one token, its rank (1 = most likely) and the most likely alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int] = []
    top_logprobs: list[float] = []


class SeqInput(msgspec.Struct, array_like=True):
    req_id: str
    token_ids: list[int]  # prefill: every token to (re)compute; decode: the last sampled token
    num_tokens: int  # context length after this step
    page_offset: int  # where new_pages go in the runtime's page list of this request
    new_pages: list[int]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    num_output_tokens: int = 0  # tokens generated so far (seeds each sampling step)
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and k alternatives
    prompt_logprobs: int | None = None  # prefill of a request that asked for echo's prompt logprobs
    guided: list[str] | None = None  # structured.GuidedSpec.to_wire() of its grammar
    output_token_ids: list[int] | None = None  # every generated token, for a runtime new to a guided request
    logit_bias: dict[int, float] | None = None


class Job(msgspec.Struct, tag="job"):
    job_id: int
    phase: Phase
    seqs: list[SeqInput]
    release: list[str] = []  # requests whose page lists the runtime can drop
    # Under a memory budget (elastic residency): the runtime first follows FlexStore's KV range
    # and its LLM's weights range up to these epochs (0: nothing to follow).
    kv_epoch: int = 0
    weights_epoch: int = 0


class Sync(msgspec.Struct, tag="sync"):
    """A residency notice: follow FlexStore's ranges up to these epochs now (an offload or a wake
    changed them), then answer ``Synced``; device memory goes back once every process unmapped it."""

    notice_id: int
    kv_epoch: int = 0
    weights_epoch: int = 0


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class JobResult(msgspec.Struct, tag="result"):
    job_id: int
    runtime: str
    tokens: list[int]
    step_seconds: float
    logprobs: list[TokenLogprob | None] = []  # per sequence, when any asked (else empty)
    prompt_logprobs: list[list[TokenLogprob | None] | None] = []  # per sequence, when any asked
    grammar_done: list[int] = []  # indices of the sequences whose grammar is complete with this token


class Ready(msgspec.Struct, tag="ready"):
    runtime: str
    pid: int


class Failure(msgspec.Struct, tag="failure"):
    runtime: str
    message: str


class Synced(msgspec.Struct, tag="synced"):
    """A runtime's answer to ``Sync``."""

    notice_id: int
    runtime: str
    seconds: float


ToRuntime = Job | Shutdown | Sync
FromRuntime = JobResult | Ready | Failure | Synced

_encoder = msgspec.msgpack.Encoder()
_to_runtime = msgspec.msgpack.Decoder(ToRuntime)
_from_runtime = msgspec.msgpack.Decoder(FromRuntime)


def encode(msg) -> bytes:
    return _encoder.encode(msg)


def decode_to_runtime(data: bytes) -> Job | Shutdown | Sync:
    return _to_runtime.decode(data)


def decode_from_runtime(data: bytes) -> JobResult | Ready | Failure | Synced:
    return _from_runtime.decode(data)


class JobSender:
    """The instance's end of one (LLM, phase) runtime's jobs: a PUSH socket per tensor-parallel rank,
    each rank getting every job. A send never blocks: a rank that is gone leaves ``undelivered`` set."""

    def __init__(self, context: zmq.Context, addresses: list[str]):
        self.sockets = []
        for address in addresses:
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(address)
            self.sockets.append(sock)
        self.undelivered = False

    def send(self, message: Job | Shutdown | Sync) -> None:
        data = encode(message)
        for sock in self.sockets:
            try:
                sock.send(data, zmq.NOBLOCK)
            except zmq.Again:  # no connected peer: the process died (or never connected)
                self.undelivered = True

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)


class ResultReceiver:
    """The instance's end of every runtime's answers (results, readiness, failures)."""

    def __init__(self, context: zmq.Context, address: str):
        self.socket = context.socket(zmq.PULL)
        self.socket.bind(address)

    def wait(self, timeout_ms: int, wake_fd: int | None = None) -> bool:
        """Whether a message is waiting, after at most ``timeout_ms``; a readable ``wake_fd`` ends the wait early."""
        if wake_fd is None:
            return bool(self.socket.poll(timeout_ms))
        poller = zmq.Poller()
        poller.register(self.socket, zmq.POLLIN)
        poller.register(wake_fd, zmq.POLLIN)
        return self.socket in dict(poller.poll(timeout_ms))

    def receive(self) -> JobResult | Ready | Failure | Synced:
        return decode_from_runtime(self.socket.recv())

    def close(self) -> None:
        self.socket.close(linger=0)


class JobReceiver:
    """A runtime's end of its jobs."""

    def __init__(self, context: zmq.Context, address: str):
        self.socket = context.socket(zmq.PULL)
        self.socket.connect(address)

    def receive(self) -> Job | Shutdown | Sync:
        return decode_to_runtime(self.socket.recv())

    def close(self) -> None:
        self.socket.close(linger=0)


class ResultSender:
    """A runtime's end of its answers; what is queued still goes out for 2 s after close."""

    def __init__(self, context: zmq.Context, address: str):
        self.socket = context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.connect(address)

    def send(self, message: JobResult | Ready | Failure | Synced) -> None:
        self.socket.send(encode(message))

    def close(self) -> None:
        self.socket.close()
