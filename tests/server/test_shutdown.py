"""SIGTERM drains: the streaming request completes, new ones get 503, then every process is gone."""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from .helpers import alive, descendants, shm_segments, sse_events, start_server, write_config

pytestmark = pytest.mark.timeout(300)

MAX_TOKENS = 450


def test_sigterm_drains_then_stops_every_process(tmp_path, tiny_tok_folder):
    config = write_config(tmp_path / "cfg.yaml", {"tiny": str(tiny_tok_folder)}, kv_cache_bytes=16 << 20)
    server = start_server(config, tmp_path)
    pid = server.proc.pid
    try:
        children = descendants(pid)
        assert len(children) >= 3  # FlexStore and two runtimes
        assert shm_segments(f"muxserve{pid}")  # FlexStore's weights and pool
        body = {"model": "tiny", "prompt": [7, 8, 9], "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            with client.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                first = next(line for line in lines if line.startswith("data: "))
                server.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                with httpx.Client(base_url=server.url, timeout=10) as other:
                    while other.get("/health").status_code != 503:
                        assert time.monotonic() < deadline, "still healthy after SIGTERM"
                        time.sleep(0.02)
                    refused = other.post("/v1/completions", json={"model": "tiny", "prompt": "hi"})
                events = sse_events([first, *lines])
        assert (refused.status_code, refused.json()) == (503, {"error": {
            "message": "the server is shutting down", "type": "ServiceUnavailableError", "param": None,
            "code": 503}})
        assert events[-1] == "[DONE]"  # the running request was drained, not cut
        assert len(events) - 1 == MAX_TOKENS
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(60) == 0, server.log_tail()
    finally:
        server.stop()
    deadline = time.monotonic() + 10
    while any(alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [c for c in children if alive(c)], server.log_tail()
    assert shm_segments(f"muxserve{pid}") == set()
    assert "drained; stopping" in server.log_tail(20000)
