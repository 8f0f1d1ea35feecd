"""A fault while handling one request fails that request only: a real server with two planted
bugs (in a handler, and in the engine thread's handling of one request's tokens) keeps serving
every other request, and the failed one leaves no pages or queue entry behind."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from muxserve.engine import LLM, SamplingParams

from .helpers import metric_samples, sse_events, start_server, write_config

pytestmark = pytest.mark.timeout(300)

HANDLER_BUG = "raise in the handler"
ENGINE_BUG = 4242  # a prompt starting with this token id fails in the engine thread

PRELUDE = f"""
import muxserve.server.metrics as metrics
import muxserve.server.prompts as prompts

_completion_prompt = prompts.completion_prompt
def completion_prompt(body, model):
    if body.prompt == {HANDLER_BUG!r}:
        raise RuntimeError("planted handler bug")
    return _completion_prompt(body, model)
prompts.completion_prompt = completion_prompt

_on_token = metrics.ServerMetrics.on_token
def on_token(self, req, now, last):
    if req.prompt_token_ids[0] == {ENGINE_BUG} and len(req.output_token_ids) == 3:
        raise RuntimeError("planted engine-thread bug")
    return _on_token(self, req, now, last)
metrics.ServerMetrics.on_token = on_token
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tok_folder):
    tmp = tmp_path_factory.mktemp("containment")
    config = write_config(tmp / "cfg.yaml", {"tiny": str(tiny_tok_folder)}, kv_cache_bytes=64 << 20)
    srv = start_server(config, tmp, prelude=PRELUDE)
    yield srv
    code = srv.stop()
    assert code == 0, srv.log_tail()


@pytest.fixture(scope="module")
def tiny_llm(tiny_tok_folder):
    return LLM(str(tiny_tok_folder), kv_cache_bytes=16 << 20)


def offline_ids(llm, prompt, n) -> list[int]:
    [out] = llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    return out.token_ids


def body(prompt, n, **extra) -> dict:
    return {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}


def test_a_handler_bug_is_a_500_for_that_request_only(server, tiny_llm):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/completions", json=body(HANDLER_BUG, 4))
        assert (r.status_code, r.json()) == (500, {"error": {
            "message": "internal error while handling POST /v1/completions: RuntimeError: planted handler bug",
            "type": "InternalServerError", "param": None, "code": 500}})
        assert r.headers["connection"] == "close"  # uvicorn closes it after an unhandled exception
        assert c.get("/health").json() == {"status": "ok"}
        ok = c.post("/v1/completions", json=body([5, 6, 7], 6))
        assert ok.json()["choices"][0]["token_ids"] == offline_ids(tiny_llm, [5, 6, 7], 6)


def test_an_engine_thread_bug_fails_one_request_while_the_others_finish(server, tiny_llm):
    others = [([9, 10, 11], 40), ([12, 13], 30), ([14, 15, 16, 17], 50)]

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as c:
            good = [c.post("/v1/completions", json=body(p, n)) for p, n in others]
            bad = c.post("/v1/completions", json=body([ENGINE_BUG, 1, 2], 20))
            async with c.stream("POST", "/v1/completions", json=body([ENGINE_BUG, 3], 20, stream=True)) as s:
                streamed = sse_events([line async for line in s.aiter_lines()])
            return await asyncio.gather(bad, *good), streamed

    (bad, *good), streamed = asyncio.run(run())
    message = "internal error while handling the request: RuntimeError: planted engine-thread bug"
    assert (bad.status_code, bad.json()) == (500, {"error": {"message": message, "type": "InternalServerError",
                                                             "param": None, "code": 500}})
    # the stream had sent two tokens when its third failed: then the error chunk and [DONE]
    first_two = offline_ids(tiny_llm, [ENGINE_BUG, 3], 2)
    assert [e["choices"][0]["token_ids"] for e in streamed[:2]] == [[t] for t in first_two]
    assert streamed[2:] == [{"error": {"message": message, "type": "InternalServerError", "param": None,
                                       "code": 500}}, "[DONE]"]
    for r, (prompt, n) in zip(good, others):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == offline_ids(tiny_llm, prompt, n)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert c.get("/health").json() == {"status": "ok"}
        samples = metric_samples(c.get("/metrics").text)
        labels = (("model_name", "tiny"),)
        assert samples[("muxserve:kv_cache_used_pages", labels)] == 0  # the failed requests were aborted
        assert samples[("vllm:num_requests_running", labels)] == 0
        assert samples[("vllm:num_requests_waiting", labels)] == 0
        ok = c.post("/v1/completions", json=body([5, 6, 7], 6))
        assert ok.json()["choices"][0]["token_ids"] == offline_ids(tiny_llm, [5, 6, 7], 6)
