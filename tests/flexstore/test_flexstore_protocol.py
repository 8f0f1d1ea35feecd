"""The FlexStore protocol over a real socket: exact replies, exact errors, and a server that survives them."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from muxserve.engine.kv_cache import Allocation
from muxserve.flexstore import FlexStoreError
from muxserve.flexstore import protocol as P
from muxserve.flexstore.auth import present_secret

SERVED = "['llama-a', 'llama-c', 'qwen-b']"


def still_serving(client, model="llama-c"):
    """The server answers and allocates correctly after whatever came before."""
    assert client.ping() > 0
    free = client.num_free
    got = client.allocate(model, [("probe", 2)])  # llama-c: 2 tokens per page, 2 pages per block
    assert len(got.new_pages["probe"]) == 2 and got.preempted == []
    assert client.free(model, ["probe"]) == 2
    assert client.num_free == free


def test_info_and_exact_page_ids(client):
    info = client.info()
    assert (info.device, info.num_pages, info.page_bytes) == ("cpu", 256, 1024)
    assert [(m.name, m.layout.page_tokens, m.layout.pages_per_block, m.max_tokens) for m in info.models] == [
        ("llama-a", 8, 4, 512), ("qwen-b", 4, 3, 340), ("llama-c", 2, 2, 256)]
    assert client.models == ["llama-a", "qwen-b", "llama-c"]
    assert client.max_tokens("qwen-b") == 340

    # A fresh pool hands out 0, 1, 2, ... in batch order; only missing pages are added later.
    got = client.allocate("llama-a", [("a", 9), ("b", 1)])  # 2 blocks x 4 pages, then 1 block
    assert got == Allocation({"a": [0, 1, 2, 3, 4, 5, 6, 7], "b": [8, 9, 10, 11]}, [])
    got = client.allocate("llama-a", [("b", 8), ("a", 17)])  # b: no new page; a: a third block
    assert got == Allocation({"b": [], "a": [12, 13, 14, 15]}, [])
    assert client.pages_of("llama-a", "a") == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]
    assert client.can_allocate("qwen-b", [("x", 4 * 80)]) and not client.can_allocate("qwen-b", [("x", 4 * 81)])
    assert client.used_by("llama-a") == 16 and client.num_free == 240
    stats = client.stats()
    assert [(m.name, m.requests, m.pages) for m in stats.models] == [("llama-a", 2, 16), ("qwen-b", 0, 0),
                                                                     ("llama-c", 0, 0)]
    assert client.free("llama-a", ["a", "b"]) == 16
    assert client.num_free == 256 and not client.owns("llama-a", "a")


def test_preemption_over_the_socket(client):
    # qwen-b: 3 pages per 4-token block; 256 pages = 85 blocks. Three requests of 30 blocks fit 2.
    got = client.allocate("qwen-b", [("p1", 120), ("p2", 120), ("p3", 120)])
    assert list(got.new_pages) == ["p1", "p2"] and got.preempted == ["p3"]
    assert [len(p) for p in got.new_pages.values()] == [90, 90]
    # Growing p1 by a lot preempts p2 (the tail), whose pages pay for p1's.
    got = client.allocate("qwen-b", [("p1", 240), ("p2", 124)])
    assert got.preempted == ["p2"] and len(got.new_pages["p1"]) == 90
    assert client.stats().models[1].preemptions == 2
    assert client.free("qwen-b", ["p1"]) == 180 and client.num_free == 256


@pytest.mark.parametrize("request_, code, message", [
    (P.Allocate("nope", [("r1", 4)]), "unknown_model", f"unknown model 'nope'; served: {SERVED}"),
    (P.Free("nope", ["r1"]), "unknown_model", f"unknown model 'nope'; served: {SERVED}"),
    (P.Attach("nope"), "unknown_model", f"unknown model 'nope'; served: {SERVED}"),
    (P.Free("llama-a", ["ghost"]), "unknown_request",
     "requests ['ghost'] of model 'llama-a' own no pages (unknown or already freed)"),
    (P.PagesOf("llama-a", "ghost"), "unknown_request", "request 'ghost' of model 'llama-a' owns no pages"),
    (P.Allocate("llama-a", [("r1", 4), ("r1", 8)]), "invalid",
     "duplicate request ids in one allocation for model 'llama-a'"),
    (P.Allocate("llama-a", [("r1", -1)]), "invalid", "negative token count in allocation for model 'llama-a'"),
])
def test_error_replies(client, request_, code, message):
    with pytest.raises(FlexStoreError) as excinfo:
        client.call(request_)
    assert (excinfo.value.code, excinfo.value.message) == (code, message)
    assert str(excinfo.value) == message
    still_serving(client)


def test_double_free(client):
    client.allocate("llama-c", [("twice", 5)])
    assert client.free("llama-c", ["twice"]) == 6
    with pytest.raises(FlexStoreError) as excinfo:
        client.free("llama-c", ["twice"])
    assert excinfo.value.code == "unknown_request"
    assert excinfo.value.message == "requests ['twice'] of model 'llama-c' own no pages (unknown or already freed)"
    still_serving(client)


@pytest.mark.parametrize("data, fragment", [
    (b"\xc1", "(byte 0)"),  # where the bytes stop being MessagePack
    (b"", ""),
    (b"hello, flexstore", ""),
    (msgspec.msgpack.encode(["Bogus"]), "'Bogus'"),  # the unknown request
    (msgspec.msgpack.encode(["Allocate", "llama-a", "x"]), "[2]"),  # the field of the wrong type ...
    (msgspec.msgpack.encode(["Allocate", "llama-a", [["r1", "ten"]]]), "[2][0][1]"),  # ... however deep
    (msgspec.msgpack.encode(["Free", "llama-a"]), "3"),  # the fields a Free needs
])
def test_garbage_bytes(client, data, fragment):
    reply = client.call_raw(data)
    assert isinstance(reply, P.Error) and reply.code == "malformed"
    assert reply.message.startswith("malformed request: ") and fragment in reply.message, reply.message
    still_serving(client)


def test_garbage_frames_from_a_raw_socket(shared_store, client):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    present_secret(sock, shared_store.secret)
    sock.connect(shared_store.config.address)
    try:
        sock.send_multipart([b"", b"\x00\xff", b"two frames"])  # REQ-style envelope, two body frames
        assert sock.poll(10_000)
        frames = sock.recv_multipart()
        assert frames[0] == b"" and P.decode_reply(frames[1]) == P.Error(
            code="malformed", message="malformed request: expected 1 frame, got 2")
        sock.send(msgspec.msgpack.encode(["Ping"]))  # DEALER without a delimiter works too
        assert sock.poll(10_000)
        assert isinstance(P.decode_reply(sock.recv()), P.Pong)
    finally:
        sock.close()
    still_serving(client)
