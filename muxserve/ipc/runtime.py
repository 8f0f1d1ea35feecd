"""Typed messages between the scheduler and the runtimes (msgpack over ZeroMQ).

The scheduler sends a ``Job`` (one prefill or decode step of one LLM); the runtime answers with
a ``JobResult`` holding one sampled token per sequence. Page ids travel incrementally: a
sequence carries the pages appended since ``page_offset``; offset 0 replaces the whole table
(a first step, or a recompute after preemption).
"""

from __future__ import annotations

import enum

import msgspec


class Phase(str, enum.Enum):
    """The two steps of a request, and the two runtimes of an LLM: on the wire, its value."""

    PREFILL = "prefill"
    DECODE = "decode"


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


class Job(msgspec.Struct, tag="job"):
    job_id: int
    phase: Phase
    seqs: list[SeqInput]
    release: list[str] = []  # requests whose page lists the runtime can drop


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class JobResult(msgspec.Struct, tag="result"):
    job_id: int
    runtime: str
    tokens: list[int]
    step_seconds: float


class Ready(msgspec.Struct, tag="ready"):
    runtime: str
    pid: int


class Failure(msgspec.Struct, tag="failure"):
    runtime: str
    message: str


ToRuntime = Job | Shutdown
FromRuntime = JobResult | Ready | Failure

_encoder = msgspec.msgpack.Encoder()
_to_runtime = msgspec.msgpack.Decoder(ToRuntime)
_from_runtime = msgspec.msgpack.Decoder(FromRuntime)


def encode(msg) -> bytes:
    return _encoder.encode(msg)


def decode_to_runtime(data: bytes) -> Job | Shutdown:
    return _to_runtime.decode(data)


def decode_from_runtime(data: bytes) -> JobResult | Ready | Failure:
    return _from_runtime.decode(data)
