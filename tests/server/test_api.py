"""End to end: ``python -m muxserve.serve`` with two LLMs, through raw HTTP and the official openai client.

``tiny``: a 2-layer random Llama that carries SmolLM2's tokenizer (fast, real text, random words);
``smol``: the embedded SmolLM2-135M-Instruct (real answers, slower: short outputs only).
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import httpx
import openai
import pytest

from muxserve.engine import LLM, SamplingParams
from muxserve.server.detokenizer import IncrementalDetokenizer
from muxserve.workload.workload_file import WorkloadRequest, write_workload

from .helpers import REPO, metric_samples, sse_events, start_server, write_config

pytestmark = pytest.mark.timeout(300)

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tok_folder):
    tmp = tmp_path_factory.mktemp("server")
    config = write_config(tmp / "cfg.yaml", {"tiny": str(tiny_tok_folder), "smol": "smollm2-135m"})
    srv = start_server(config, tmp)
    yield srv
    code = srv.stop()
    assert code == 0, srv.log_tail()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")


@pytest.fixture(scope="module")
def tiny_llm(tiny_tok_folder):
    return LLM(str(tiny_tok_folder), kv_cache_bytes=16 << 20)


def complete(client, **body) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream(client, path: str, body: dict) -> list:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def metrics(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return metric_samples(r.text)


def m(samples, name, model, **labels) -> float:
    return samples[(name, tuple(sorted({"model_name": model, **labels}.items())))]


# -- discovery ------------------------------------------------------------------------------------
def test_models_lists_every_llm(client, oai):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [(d["id"], d["object"], d["root"], d["max_model_len"]) for d in body["data"]] == [
        ("tiny", "model", body["data"][0]["root"], 512), ("smol", "model", "smollm2-135m", 8192)]
    assert [m.id for m in oai.models.list()] == ["tiny", "smol"]
    assert client.get("/health").status_code == 200
    assert client.get("/version").json() == {"version": "0.1.0"}


# -- completions ----------------------------------------------------------------------------------
def test_greedy_completion_equals_offline_engine(client, oai, tiny_llm):
    prompt = "The quick brown fox jumps over"
    [offline] = tiny_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))
    body = complete(client, model="tiny", prompt=prompt, max_tokens=12, temperature=0, return_token_ids=True)
    [choice] = body["choices"]
    assert choice["prompt_token_ids"] == offline.prompt_token_ids
    assert choice["token_ids"] == offline.token_ids
    assert choice["text"] == offline.text
    assert choice["finish_reason"] == "length"
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert body["usage"] == {"prompt_tokens": len(offline.prompt_token_ids), "completion_tokens": 12,
                             "total_tokens": len(offline.prompt_token_ids) + 12}
    # token ids as the prompt (what benchmarks send), through the official client
    ids = offline.prompt_token_ids
    out = oai.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert out.choices[0].text == offline.text
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ids), 12)


def test_completion_max_tokens_defaults_to_16_and_null_means_the_rest_of_the_context(client):
    body = complete(client, model="tiny", prompt=[4, 5, 6], temperature=0)
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (16, "length")
    body = complete(client, model="tiny", prompt=[4] * 500, max_tokens=None, temperature=0)
    assert (body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]) == (12, "length")


def test_streaming_chunks_concatenate_to_the_non_streaming_text(client, tiny_llm):
    for seed, n in ((1, 20), (2, 33)):
        rng = random.Random(seed)
        ids = [rng.randrange(49152) for _ in range(rng.randrange(3, 30))]
        whole = complete(client, model="tiny", prompt=ids, max_tokens=n, temperature=0)["choices"][0]["text"]
        events = stream(client, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": n,
                                                     "temperature": 0, "stream_options": {"include_usage": True}})
        assert events[-1] == "[DONE]"
        usage, chunks = events[-2], events[:-2]
        assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n,
                                                             "total_tokens": len(ids) + n}
        assert len(chunks) == n  # one chunk per token
        assert all(c["object"] == "text_completion" and c["usage"] is None for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == whole
        assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (n - 1) + ["length"]
        # an incomplete character is never sent: every chunk is whole text
        assert all("\ufffd" not in c["choices"][0]["text"] or "\ufffd" in whole for c in chunks)
        [offline] = tiny_llm.generate([ids], SamplingParams(max_tokens=n, temperature=0))
        assert whole == offline.text


def test_stop_strings_cut_the_text_before_the_stop(client, tiny_tok_folder):
    ids = [791, 4299, 5443, 38, 6012, 17, 1208]
    free = complete(client, model="tiny", prompt=ids, max_tokens=24, temperature=0, return_token_ids=True)
    text, tokens = free["choices"][0]["text"], free["choices"][0]["token_ids"]
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text.find(stop)
    assert cut > 0
    # the token that completes the stop string ends the request: count them with the detokenizer
    from transformers import AutoTokenizer

    detok = IncrementalDetokenizer(AutoTokenizer.from_pretrained(tiny_tok_folder), ids, [stop])
    used = next(i + 1 for i, t in enumerate(tokens) if (detok.add(t), detok.stopped)[1])

    body = complete(client, model="tiny", prompt=ids, max_tokens=24, temperature=0, stop=[stop, "never-there"])
    [choice] = body["choices"]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (text[:cut], "stop", stop)
    assert body["usage"]["completion_tokens"] == used

    events = stream(client, "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 24,
                                                 "temperature": 0, "stop": stop})
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == text[:cut]
    assert len(events) - 1 == used and events[-2]["choices"][0]["finish_reason"] == "stop"


# -- chat -----------------------------------------------------------------------------------------
def test_chat_uses_the_template_and_matches_offline(client, oai, smollm2_llm):
    [offline] = smollm2_llm.chat(QUESTION, SamplingParams(max_tokens=12, temperature=0))
    r = client.post("/v1/chat/completions", json={"model": "smol", "messages": QUESTION, "max_tokens": 12,
                                                  "temperature": 0, "return_token_ids": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["prompt_token_ids"] == offline.prompt_token_ids  # the model's chat template
    [choice] = body["choices"]
    assert choice["token_ids"] == offline.token_ids
    assert choice["message"] == {"role": "assistant", "content": offline.text}
    assert "Paris" in offline.text and choice["finish_reason"] == offline.finish_reason == "stop"
    assert body["usage"]["prompt_tokens"] == len(offline.prompt_token_ids)
    assert body["usage"]["completion_tokens"] == len(offline.token_ids)

    chunks = list(oai.chat.completions.create(model="smol", messages=QUESTION, max_tokens=12, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == offline.text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


# -- errors ---------------------------------------------------------------------------------------
def _error(status, message, param, type_):
    return status, {"error": {"message": message, "type": type_, "param": param, "code": status}}


@pytest.mark.parametrize("path, body, expected", [
    ("/v1/completions", {"model": "nope", "prompt": "hi"},
     _error(404, "The model `nope` does not exist.", "model", "NotFoundError")),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": QUESTION},
     _error(404, "The model `gpt-4` does not exist.", "model", "NotFoundError")),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1},
     _error(400, "temperature must be in [0, 100], got -1.0", "temperature", "BadRequestError")),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 1.5},
     _error(400, "top_p must be in (0, 1], got 1.5", "top_p", "BadRequestError")),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0},
     _error(400, "max_tokens must be an integer >= 1, got 0", "max_tokens", "BadRequestError")),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 17},
     _error(400, "n must be in [1, 16], got 17", "n", "BadRequestError")),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stop": ["", "x"]},
     _error(400, "stop strings must not be empty, got ['', 'x']", "stop", "BadRequestError")),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": "many"},
     _error(400, "invalid value for max_tokens: 'many' (Input should be a valid integer)", "max_tokens",
            "BadRequestError")),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 600},
     _error(400, "This model's maximum context length is 512 tokens. However, your prompt has 600 tokens; "
                 "reduce the length of the prompt.", "prompt", "BadRequestError")),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 500, "max_tokens": 20},
     _error(400, "This model's maximum context length is 512 tokens. However, you requested 520 tokens (500 in "
                 "the prompt, 20 in the completion).", "max_tokens", "BadRequestError")),
    ("/v1/completions", {"model": "tiny", "prompt": [3, 49152]},
     _error(400, "prompt token ids [49152] are outside the vocabulary of `tiny` [0, 49152)", "prompt",
            "BadRequestError")),
    ("/v1/chat/completions", {"model": "smol"},
     _error(400, "field 'messages' is required", "messages", "BadRequestError")),
])
def test_errors_have_the_openai_shape(client, path, body, expected):
    r = client.post(path, json=body)
    assert (r.status_code, r.json()) == expected


def test_errors_through_the_openai_client(oai):
    with pytest.raises(openai.NotFoundError) as err:
        oai.completions.create(model="nope", prompt="hi", max_tokens=2)
    assert err.value.status_code == 404
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, n=17)


# -- metrics and abort ----------------------------------------------------------------------------
def test_metrics_have_vllm_names_per_model_and_counters_move(client):
    before = metrics(client)
    for model in ("tiny", "smol"):
        for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                     "muxserve:kv_cache_used_pages", "muxserve:kv_cache_free_pages", "vllm:prompt_tokens_total",
                     "vllm:generation_tokens_total", "vllm:num_preemptions_total",
                     "vllm:time_to_first_token_seconds_count", "vllm:inter_token_latency_seconds_count",
                     "vllm:request_time_per_output_token_seconds_count", "vllm:e2e_request_latency_seconds_count",
                     "vllm:request_queue_time_seconds_count"):
            assert (name, (("model_name", model),)) in before, name
        # a histogram's +Inf bucket counts every observation
        assert (m(before, "vllm:time_to_first_token_seconds_bucket", model, le="+Inf")
                == m(before, "vllm:time_to_first_token_seconds_count", model))
    body = complete(client, model="tiny", prompt=[1, 2, 3, 4, 5], max_tokens=7, temperature=0)
    assert body["usage"]["completion_tokens"] == 7
    after = metrics(client)
    for name, delta in (("vllm:prompt_tokens_total", 5), ("vllm:generation_tokens_total", 7),
                        ("vllm:time_to_first_token_seconds_count", 1), ("vllm:inter_token_latency_seconds_count", 6),
                        ("vllm:e2e_request_latency_seconds_count", 1),
                        ("vllm:request_time_per_output_token_seconds_count", 1)):
        assert m(after, name, "tiny") - m(before, name, "tiny") == delta, name
        assert m(after, name, "smol") == m(before, name, "smol"), name
    assert (m(after, "vllm:time_to_first_token_seconds_bucket", "tiny", le="+Inf")
            - m(before, "vllm:time_to_first_token_seconds_bucket", "tiny", le="+Inf")) == 1
    assert (m(after, "vllm:request_success_total", "tiny", finished_reason="length")
            - m(before, "vllm:request_success_total", "tiny", finished_reason="length")) == 1
    total = after[("muxserve:kv_cache_total_pages", ())]
    assert total == (256 << 20) // 16384
    assert m(after, "muxserve:kv_cache_free_pages", "tiny") == total  # idle: every page is free
    assert m(after, "vllm:num_requests_running", "tiny") == 0


def _wait_idle(client, model: str, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = metrics(client)
        if m(s, "muxserve:kv_cache_used_pages", model) == 0 and m(s, "vllm:num_requests_running", model) == 0:
            return s
        assert time.monotonic() < deadline, f"{model} still holds pages or requests: {s}"
        time.sleep(0.1)


def test_client_disconnect_mid_stream_aborts_and_frees_pages(client, server):
    idle = _wait_idle(client, "smol")
    total = idle[("muxserve:kv_cache_total_pages", ())]
    body = {"model": "smol", "prompt": "Tell me a long story about a dragon.", "max_tokens": 300,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as other:
        with other.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            got = []
            for line in lines:
                if line.startswith("data: "):
                    got.append(line)
                    if len(got) == 3:
                        break
            busy = metrics(client)
            assert m(busy, "muxserve:kv_cache_used_pages", "smol") > 0
            assert m(busy, "vllm:num_requests_running", "smol") == 1
        # leaving the block closes the connection mid-stream
    after = _wait_idle(client, "smol")
    assert m(after, "muxserve:kv_cache_free_pages", "smol") == total
    assert (m(after, "vllm:request_success_total", "smol", finished_reason="abort")
            - m(idle, "vllm:request_success_total", "smol", finished_reason="abort")) == 1
    generated = m(after, "vllm:generation_tokens_total", "smol") - m(idle, "vllm:generation_tokens_total", "smol")
    assert 3 <= generated < 300


def test_client_disconnect_while_waiting_for_a_non_streaming_answer_aborts(client, server):
    idle = _wait_idle(client, "smol")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", timeout=1.5,
                   json={"model": "smol", "prompt": "Count to one thousand:", "max_tokens": 300, "ignore_eos": True})
    after = _wait_idle(client, "smol")
    assert (m(after, "vllm:request_success_total", "smol", finished_reason="abort")
            - m(idle, "vllm:request_success_total", "smol", finished_reason="abort")) == 1


# -- load -----------------------------------------------------------------------------------------
def test_fifty_concurrent_streams_all_complete_with_exact_counts(server, tiny_llm):
    rng = random.Random(5)
    jobs = []
    for i in range(50):
        model = "tiny" if i % 2 == 0 else "smol"
        ids = [rng.randrange(1, 49152) for _ in range(rng.randrange(2, 24))]
        jobs.append((model, ids, rng.randrange(3, 24) if model == "tiny" else rng.randrange(2, 6)))

    async def one(c: openai.AsyncOpenAI, model, ids, n):
        chunks = await c.completions.create(model=model, prompt=ids, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True, "return_token_ids": True})
        tokens, usage, text = [], None, ""
        async for chunk in chunks:
            if chunk.choices:
                tokens.extend(chunk.choices[0].model_extra["token_ids"])
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage
        return tokens, usage, text

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                                      timeout=240) as c:
            return await asyncio.gather(*(one(c, *job) for job in jobs))

    results = asyncio.run(run_all())
    offline = tiny_llm.engine
    seqs = {i: offline.add_request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
            for i, (model, ids, n) in enumerate(jobs) if model == "tiny"}
    while offline.has_unfinished():
        offline.step()
    for i, ((model, ids, n), (tokens, usage, _)) in enumerate(zip(jobs, results)):
        assert len(tokens) == n and usage.completion_tokens == n and usage.prompt_tokens == len(ids), i
        if model == "tiny":
            assert tokens == list(seqs[i].output_token_ids), i


def test_bench_serve_replays_a_workload(server, tmp_path):
    rng = random.Random(3)
    reqs = [WorkloadRequest(i, "tiny" if i % 3 else "smol", round(0.05 * i, 3),
                            [rng.randrange(1, 49152) for _ in range(rng.randrange(4, 20))], rng.randrange(2, 8))
            for i in range(9)]
    workload = tmp_path / "workload.json"
    write_workload(workload, {}, reqs)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmark/serve/bench_serve.py", "--base-url", server.url,
                           "--workload-file", str(workload), "--result-file", str(out), "--max-concurrency", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"], result["wrong_output_len"]) == (9, 0, 0)
    assert result["total_output_tokens"] == sum(r.output_len for r in reqs)
    assert result["total_input_tokens"] == sum(len(r.prompt_token_ids) for r in reqs)
    assert sorted(result["per_model"]) == ["smol", "tiny"]
    assert result["per_model"]["smol"]["completed"] == 3
    for key in ("request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                "mean_tpot_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms"):
        assert result[key] > 0, key
    for line in ("Serving Benchmark Result: tiny", "Successful requests:", "Output token throughput (tok/s):",
                 "Mean TTFT (ms):", "Median TPOT (ms):", "P99 ITL (ms):"):
        assert line in proc.stdout


def test_bench_serve_refuses_non_loopback_targets(tmp_path):
    proc = subprocess.run([sys.executable, "benchmark/serve/bench_serve.py", "--base-url", "http://10.1.2.3:8000",
                           "--workload-file", str(tmp_path / "missing.json")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "loopback" in proc.stderr
