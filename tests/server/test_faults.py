"""Faults under load of ``muxserve serve``, with real processes and the official openai client: a killed
runtime is restarted and its LLM's requests still complete token for token, one that keeps dying
fails its LLM alone (503 naming it), a killed FlexStore ends the server at once, a killed server
leaves nothing behind."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import re
import signal
import time

import httpx
import openai
import pytest
from processes import assert_nothing_left, descendants, flexstore_pid, runtime_pid, wait_until

from muxserve.engine import LLM, SamplingParams

from .helpers import metric_samples, sse_events, start_server, write_config

pytestmark = pytest.mark.timeout(600)


def jobs_for(models: list[str], per_model: int, seed: int = 3) -> list[tuple[str, list[int], int, bool]]:
    """(model, prompt ids, max_tokens, stream) for each request: half streaming, half not."""
    rng = random.Random(seed)
    return [(m, [rng.randrange(1, 49152) for _ in range(rng.randrange(3, 30))], rng.randrange(20, 60), i % 2 == 0)
            for i in range(per_model) for m in models]


def offline_tokens(folder, jobs) -> list[list[int]]:
    engine = LLM(str(folder), kv_cache_bytes=16 << 20).engine
    seqs = [engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for _, ids, n, _ in jobs]
    while engine.has_unfinished():
        engine.step()
    return [list(s.output_token_ids) for s in seqs]


async def _openai_one(client: openai.AsyncOpenAI, model, ids, n, stream) -> list[int] | BaseException:
    """The generated token ids, or the exception the client raised."""
    extra = {"ignore_eos": True, "return_token_ids": True}
    try:
        if not stream:
            out = await client.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0,
                                                  extra_body=extra)
            return out.choices[0].model_extra["token_ids"]
        tokens = []
        chunks = await client.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0, stream=True,
                                                 extra_body=extra)
        async for chunk in chunks:
            tokens.extend(chunk.choices[0].model_extra["token_ids"])
        return tokens
    except openai.OpenAIError as exc:
        return exc


def run_load(url: str, jobs, timeout: float = 240) -> concurrent.futures.Future:
    """Send every job at once through the openai client, on a thread; the future holds one result per job."""

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout) as c:
            return await asyncio.gather(*(_openai_one(c, *job) for job in jobs))

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(asyncio.run, run_all())
    pool.shutdown(wait=False)
    return future


def load_with_a_stuck_decode(server, pid: int, llm: str, jobs) -> concurrent.futures.Future:
    """Start the load while ``llm``'s decode runtime (``pid``) is stopped: its prefilled requests wait
    inside a decode job sent to it, which is lost when it is killed here."""
    os.kill(pid, signal.SIGSTOP)
    load = run_load(server.url, jobs)
    running = ("vllm:num_requests_running", (("model_name", llm),))
    assert wait_until(lambda: metric_samples(httpx.get(f"{server.url}/metrics", timeout=30).text)[running] > 0, 60)
    time.sleep(1.0)  # its decode job goes out as soon as SM units allow
    os.kill(pid, signal.SIGKILL)
    return load


def test_a_killed_runtime_costs_its_llm_a_restart_and_no_request(tmp_path, tiny_tok_folder):
    models = ["llm-0", "llm-1", "llm-2"]
    config = write_config(tmp_path / "cfg.yaml", {m: str(tiny_tok_folder) for m in models}, kv_cache_bytes=32 << 20)
    jobs = jobs_for(models, 8)
    expected = offline_tokens(tiny_tok_folder, jobs)
    server = start_server(config, tmp_path)
    pid = server.proc.pid
    children = descendants(pid)
    try:
        victim = runtime_pid(pid, "llm-1", "decode")
        results = load_with_a_stuck_decode(server, victim, "llm-1", jobs).result(300)
        for i, (job, got) in enumerate(zip(jobs, results)):
            assert got == expected[i], f"request {i} of {job[0]} (stream={job[3]})"
        assert wait_until(lambda: "runtime llm-1/decode is back (restart 1)" in server.log_tail(100_000), 60)
        log = server.log_tail(100_000)
        assert "runtime llm-1/decode exited with code -9 (SIGKILL)" in log
        recomputed = re.search(r"(\d+) requests of llm-1 will be recomputed once llm-1/decode is back", log)
        assert recomputed and int(recomputed.group(1)) > 0  # it died with a job in flight
        assert httpx.get(f"{server.url}/health").status_code == 200
        new_runtime = runtime_pid(pid, "llm-1", "decode")
        assert new_runtime not in (None, victim)
        children |= {new_runtime}
        os.kill(pid, signal.SIGKILL)  # and a killed server leaves nothing behind
        server.proc.wait(30)
        assert_nothing_left(pid, children)
    finally:
        server.stop()


def test_when_restarts_are_exhausted_only_that_llm_fails_with_503_naming_it(tmp_path, tiny_tok_folder):
    config = write_config(tmp_path / "cfg.yaml", {m: str(tiny_tok_folder) for m in ("llm-0", "llm-1")},
                          kv_cache_bytes=32 << 20)
    jobs = jobs_for(["llm-0", "llm-1"], 6)
    expected = offline_tokens(tiny_tok_folder, jobs)
    server = start_server(config, tmp_path, "--max-runtime-restarts", "0")
    pid = server.proc.pid
    children = descendants(pid)
    try:
        results = load_with_a_stuck_decode(server, runtime_pid(pid, "llm-1", "decode"), "llm-1", jobs).result(300)
        message = ("LLM 'llm-1' failed: runtime llm-1/decode exited with code -9 (SIGKILL); runtimes are not "
                   "restarted (--max-runtime-restarts 0)")
        for i, ((model, _, _, stream), got) in enumerate(zip(jobs, results)):
            if model == "llm-0":
                assert got == expected[i], f"request {i} (stream={stream})"
            elif stream:  # the error chunk of the stream, raised by the openai client
                assert isinstance(got, openai.APIError) and got.message == message, (i, got)
            else:
                assert isinstance(got, openai.APIStatusError) and got.status_code == 503, (i, got)
                assert got.body == {"message": message, "type": "ServiceUnavailableError", "param": None,
                                    "code": 503}
        # a new request of llm-1 is refused the same way, over raw HTTP; llm-0 still serves
        with httpx.Client(base_url=server.url, timeout=60) as client:
            r = client.post("/v1/completions", json={"model": "llm-1", "prompt": [5, 6], "max_tokens": 3})
            assert (r.status_code, r.json()["error"]["message"]) == (503, message)
            with client.stream("POST", "/v1/completions", json={"model": "llm-1", "prompt": [5, 6],
                                                                "max_tokens": 3, "stream": True}) as s:
                events = sse_events(s.iter_lines())
            assert events == [{"error": {"message": message, "type": "ServiceUnavailableError", "param": None,
                                         "code": 503}}, "[DONE]"]
            r = client.post("/v1/completions", json={"model": "llm-0", "prompt": jobs[0][1], "max_tokens": jobs[0][2],
                                                     "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == expected[0]
            assert client.get("/health").status_code == 200
        assert runtime_pid(pid, "llm-1", "prefill") is None  # the failed LLM's processes are gone
        assert server.stop() == 0
        assert_nothing_left(pid, children)
    finally:
        server.stop()


def test_a_killed_flexstore_ends_the_server_at_once_and_every_client_gets_an_error(tmp_path, tiny_tok_folder):
    config = write_config(tmp_path / "cfg.yaml", {m: str(tiny_tok_folder) for m in ("llm-0", "llm-1")},
                          kv_cache_bytes=32 << 20)
    jobs = [(m, ids, 400, stream) for m, ids, _, stream in jobs_for(["llm-0", "llm-1"], 4)]
    server = start_server(config, tmp_path)
    pid = server.proc.pid
    children = descendants(pid)
    try:
        load = run_load(server.url, jobs)
        time.sleep(1.5)  # streams are flowing
        store = flexstore_pid(pid)
        os.kill(store, signal.SIGKILL)
        killed = time.monotonic()
        assert server.proc.wait(30) == 1
        assert time.monotonic() - killed < 10
        results = load.result(60)
        died = (f"FlexStore (pid {store}), which holds the weights and the KV pool of every LLM, exited with code "
                f"-9 (SIGKILL); the instance cannot go on without it")
        for i, ((_, _, _, stream), got) in enumerate(zip(jobs, results)):
            assert isinstance(got, openai.APIError), (i, got)  # an error, not a hang
            if stream:
                assert got.message.startswith(f"the engine failed: FlexStoreExited: {died}"), got.message
            else:
                assert isinstance(got, openai.InternalServerError) and got.status_code == 500
                assert got.body["message"].startswith(f"the engine failed: FlexStoreExited: {died}")
        assert f"error: the engine failed ({died}" in server.log_tail(100_000)
        assert_nothing_left(pid, children)
    finally:
        server.stop()
