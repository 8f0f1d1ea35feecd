"""Hostile and careless requests against a real server with an API key (MUXSERVE_API_KEY): each one
gets an OpenAI-style JSON error naming the field, and the server keeps answering /health and
generating exactly what it generated before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from muxserve.engine import LLM, SamplingParams
from muxserve.serve import build_parser
from muxserve.workload.workload_file import WorkloadRequest, write_workload

from .helpers import REPO, start_server, write_config

pytestmark = pytest.mark.timeout(300)

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROBE = [791, 4299, 5443, 38, 6012]  # a greedy request whose tokens must not change
LIMIT = 4 << 20  # the default --max-request-bytes


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tok_folder):
    tmp = tmp_path_factory.mktemp("hardening")
    config = write_config(tmp / "cfg.yaml", {"tiny": str(tiny_tok_folder)}, kv_cache_bytes=64 << 20)
    srv = start_server(config, tmp, env={"MUXSERVE_API_KEY": KEY})
    yield srv
    code = srv.stop()
    assert code == 0, srv.log_tail()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120, headers=AUTH) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def tiny_llm(tiny_tok_folder):
    return LLM(str(tiny_tok_folder), kv_cache_bytes=16 << 20)


@pytest.fixture(scope="module")
def probe_ids(tiny_llm) -> list[int]:
    [out] = tiny_llm.generate([PROBE], SamplingParams(max_tokens=8, temperature=0))
    return out.token_ids


def assert_still_serving(client, probe_ids) -> None:
    health = client.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROBE, "max_tokens": 8, "temperature": 0,
                                             "return_token_ids": True})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == probe_ids


def error(status: int, message: str, param: str | None, type_: str = "BadRequestError") -> tuple[int, dict]:
    return status, {"error": {"message": message, "type": type_, "param": param, "code": status}}


# -- seeds ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, seed, message", [
    ("completions", 2**70, "invalid value for seed: 1180591620717411303424 (Input should be less than or equal to "
                           "9223372036854775807)"),
    ("completions", 2**64 - 1, "invalid value for seed: 18446744073709551615 (Input should be less than or equal "
                               "to 9223372036854775807)"),
    ("completions", 2**63, "invalid value for seed: 9223372036854775808 (Input should be less than or equal to "
                           "9223372036854775807)"),
    ("chat", -(2**63) - 1, "invalid value for seed: -9223372036854775809 (Input should be greater than or equal "
                           "to -9223372036854775808)"),
])
def test_seeds_outside_the_signed_64_bit_range_are_refused(oai, client, probe_ids, kind, seed, message):
    with pytest.raises(openai.BadRequestError) as err:
        if kind == "chat":
            oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                        seed=seed)
        else:
            oai.completions.create(model="tiny", prompt="hi", max_tokens=4, seed=seed)
    assert err.value.status_code == 400
    assert err.value.body == {"message": message, "type": "BadRequestError", "param": "seed", "code": 400}
    assert_still_serving(client, probe_ids)


def test_distinct_seeds_draw_distinct_tokens_and_equal_seeds_equal_ones(oai, tiny_llm):
    # -1, 2**63 - 1 and -2**63 were one stream when the sampler reduced keys mod 2**63.
    prompt = [11, 22, 33]
    seeds = (-1, 2**63 - 1, -(2**63), 0)
    served = {}
    for seed in seeds:
        out = oai.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=seed,
                                     extra_body={"ignore_eos": True, "return_token_ids": True})
        served[seed] = out.choices[0].model_extra["token_ids"]
        [offline] = tiny_llm.generate([prompt], SamplingParams(max_tokens=12, temperature=1.0, seed=seed,
                                                               ignore_eos=True))
        assert served[seed] == offline.token_ids, seed  # the server samples what the engine samples
    assert len({tuple(t) for t in served.values()}) == len(seeds), served
    again = oai.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=1.0, seed=-1,
                                   extra_body={"ignore_eos": True, "return_token_ids": True})
    assert again.choices[0].model_extra["token_ids"] == served[-1]


# -- bodies no field may hold ---------------------------------------------------------------------
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
CMPL = {"model": "tiny", "prompt": "hi", "max_tokens": 4}


def _json(body) -> bytes:
    return json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as the escape \ud800


@pytest.mark.parametrize("path, content, expected", [
    ("/v1/completions", _json({**CMPL, "prompt": "\ud800 x"}),
     error(400, "prompt is not valid Unicode: it holds a lone surrogate '\\ud800' at index 0", "prompt")),
    ("/v1/completions", _json({**CMPL, "prompt": ["ok", "\udfff"]}),
     error(400, "prompt[1] is not valid Unicode: it holds a lone surrogate '\\udfff' at index 0", "prompt[1]")),
    ("/v1/chat/completions", _json({**CHAT, "messages": [{"role": "user", "content": "a\ud800"}]}),
     error(400, "messages[0].content is not valid Unicode: it holds a lone surrogate '\\ud800' at index 1",
           "messages[0].content")),
    ("/v1/chat/completions", _json({**CHAT, "stop": ["\udc00"]}),
     error(400, "stop[0] is not valid Unicode: it holds a lone surrogate '\\udc00' at index 0", "stop[0]")),
    ("/v1/completions", _json({**CMPL, "model": "\ud800"}),
     error(400, "model is not valid Unicode: it holds a lone surrogate '\\ud800' at index 0", "model")),
    ("/v1/completions", _json({**CMPL, "\ud800": 1}),
     error(400, "the request body holds a field name that is not valid Unicode: '\\ud800'", None)),
    ("/v1/completions", b"", error(400, "the request body is missing: send a JSON object with Content-Type: "
                                        "application/json", None)),
    ("/v1/chat/completions", b"null", error(400, "the request body is missing: send a JSON object with "
                                                 "Content-Type: application/json", None)),
    ("/v1/completions", b"[1, 2]", error(400, "the request body must be a JSON object, got an array [1, 2]", None)),
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi"', error(
        400, "the request body is not valid JSON: Expecting ',' delimiter", None)),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, error(400, "There was an error parsing the body", None)),
    # JSON types are strict: false is not the token id 0, true is not top_k 1
    ("/v1/completions", _json({**CMPL, "prompt": [[False]]}),
     error(400, "invalid value for prompt: [[False]] (Input should be a valid string)", "prompt")),
    ("/v1/completions", _json({**CMPL, "top_k": True}),
     error(400, "invalid value for top_k: True (Input should be a valid integer)", "top_k")),
    ("/v1/chat/completions", _json({**CHAT, "stream": "yes"}),
     error(400, "invalid value for stream: 'yes' (Input should be a valid boolean)", "stream")),
])
def test_malformed_bodies_get_a_json_400(client, probe_ids, path, content, expected):
    r = client.post(path, content=content, headers={"Content-Type": "application/json"})
    assert (r.status_code, r.json()) == expected
    assert_still_serving(client, probe_ids)


def test_a_body_that_is_not_json_is_refused(client):
    r = client.post("/v1/completions", content=json.dumps(CMPL), headers={"Content-Type": "text/plain"})
    assert (r.status_code, r.json()) == error(400, "the request body must be a JSON object sent with Content-Type: "
                                                   "application/json", None)


# -- fields that are not implemented --------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("field, value, message", [
    ("functions", [{"name": "f"}], "functions is not supported (this server calls tools: use tools), got "
                                   "[{'name': 'f'}]"),
    ("function_call", "auto", "function_call must be \"none\" or absent (this server calls tools: use "
                              "tool_choice), got 'auto'"),
    ("presence_penalty", 0.5, "presence_penalty is not supported (must be 0), got 0.5"),
    ("guided_decoding_backend", "outlines", "guided_decoding_backend must be xgrammar (the only one here), got "
                                            "'outlines'"),
])
def test_unimplemented_fields_are_refused_not_ignored(oai, client, probe_ids, field, value, message):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="tiny", messages=CHAT["messages"], max_tokens=4, extra_body={field: value})
    assert err.value.body == {"message": message, "type": "BadRequestError", "param": field, "code": 400}
    r = client.post("/v1/completions", json={**CMPL, field: value})
    assert (r.status_code, r.json()["error"]["message"]) == (400, message)
    assert_still_serving(client, probe_ids)


def test_fields_that_ask_for_nothing_are_accepted(oai, tiny_llm):
    messages = [{"role": "user", "content": "Name a color."}]
    [offline] = tiny_llm.chat([messages], SamplingParams(max_tokens=6, temperature=0))
    out = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                      tool_choice="none", response_format={"type": "text"},
                                      extra_body={"tools": [], "logit_bias": {}, "guided_json": None})
    assert out.choices[0].message.content == offline.text


def test_top_k_beyond_64_bits_is_refused(client, probe_ids):
    r = client.post("/v1/completions", json={**CMPL, "top_k": 2**64})
    assert (r.status_code, r.json()) == error(400, "invalid value for top_k: 18446744073709551616 (Input should be "
                                                   "less than or equal to 9223372036854775807)", "top_k")
    assert_still_serving(client, probe_ids)


# -- the API key ----------------------------------------------------------------------------------
def test_the_api_key_guards_v1_and_leaves_health_version_and_metrics_open(server, oai, tiny_llm, probe_ids):
    out = oai.completions.create(model="tiny", prompt=PROBE, max_tokens=8, temperature=0)
    [offline] = tiny_llm.generate([PROBE], SamplingParams(max_tokens=8, temperature=0))
    assert out.choices[0].text == offline.text
    for key in ("wrong-key", KEY + "x", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as err:
            openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0).models.list()
        assert err.value.body == {"message": "the API key is incorrect", "type": "AuthenticationError",
                                  "param": None, "code": 401}
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        missing = error(401, "the API key is missing: send the header 'Authorization: Bearer <key>'", None,
                        "AuthenticationError")
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")):
            r = anonymous.request(method, path, json=CMPL)
            assert (r.status_code, r.json()) == missing, path
            assert r.headers["www-authenticate"] == "Bearer"
        r = anonymous.get("/v1/models", headers={"Authorization": f"Basic {KEY}"})
        assert (r.status_code, r.json()) == missing
        assert anonymous.get("/health").json() == {"status": "ok"}
        assert anonymous.get("/version").json() == {"version": "0.1.0"}
        r = anonymous.get("/metrics")
        assert r.status_code == 200 and "vllm:num_requests_running" in r.text
        r = anonymous.post("/v1/completions", json={"model": "tiny", "prompt": PROBE, "max_tokens": 8,
                                                    "temperature": 0, "return_token_ids": True}, headers=AUTH)
        assert r.json()["choices"][0]["token_ids"] == probe_ids


def test_the_api_key_flag_and_environment_variable(monkeypatch):
    monkeypatch.delenv("MUXSERVE_API_KEY", raising=False)
    assert build_parser().parse_args(["cfg.yaml"]).api_key is None
    assert build_parser().parse_args(["cfg.yaml", "--api-key", "k1"]).api_key == "k1"
    monkeypatch.setenv("MUXSERVE_API_KEY", "k2")
    assert build_parser().parse_args(["cfg.yaml"]).api_key == "k2"
    assert build_parser().parse_args(["cfg.yaml", "--api-key", "k1"]).api_key == "k1"


@pytest.mark.parametrize("flags, message", [
    (["--api-key", " key"], "error: --api-key (or MUXSERVE_API_KEY) must be non-empty printable text without spaces "
                            "around it"),
    (["--api-key", ""], "error: --api-key (or MUXSERVE_API_KEY) must be non-empty printable text without spaces "
                        "around it"),
    (["--max-request-bytes", "0"], "error: --max-request-bytes must be >= 1, got 0"),
])
def test_bad_flags_are_refused_before_anything_starts(tmp_path, tiny_tok_folder, flags, message):
    config = write_config(tmp_path / "cfg.yaml", {"tiny": str(tiny_tok_folder)})
    proc = subprocess.run([sys.executable, "-m", "muxserve.serve", str(config), *flags], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr.strip().splitlines()[-1]) == (2, message)


# -- size and time --------------------------------------------------------------------------------
class HealthProbe:
    """Polls /health on its own connection; records (start, latency) of every answer and every failure."""

    def __init__(self, url: str):
        self.url, self.samples, self.failures = url, [], []
        self._stop, self._first = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    status = c.get("/health").status_code
                except httpx.HTTPError as e:
                    status = repr(e)
                if status == 200:
                    self.samples.append((start, time.monotonic() - start))
                else:
                    self.failures.append(status)
                self._first.set()
                time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        assert self._first.wait(30), "/health did not answer within 30 s"
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def during(self, start: float, end: float) -> list[float]:
        return [latency for t, latency in self.samples if start <= t and t + latency <= end]


def test_a_20_mb_body_gets_413_at_once(server, client, probe_ids):
    body = _json({**CMPL, "prompt": "a" * (20 << 20)})
    with HealthProbe(server.url) as probe:
        start = time.monotonic()
        r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
        declared = time.monotonic() - start

        def chunks():  # no Content-Length: the server counts what arrives
            for i in range(0, len(body), 1 << 20):
                yield body[i:i + (1 << 20)]

        start = time.monotonic()
        chunked = client.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        streamed = time.monotonic() - start
    assert (r.status_code, r.json()) == error(
        413, f"the request body of {len(body)} bytes is larger than the limit of {LIMIT} bytes (--max-request-bytes)",
        None, "RequestTooLargeError")
    assert (chunked.status_code, chunked.json()) == error(
        413, f"the request body is larger than the limit of {LIMIT} bytes (--max-request-bytes)", None,
        "RequestTooLargeError")
    assert declared < 5 and streamed < 5, (declared, streamed)
    assert not probe.failures and probe.samples, (probe.failures, probe.samples)
    assert max(latency for _, latency in probe.samples) < 1.0
    assert_still_serving(client, probe_ids)


def test_health_answers_while_a_large_prompt_is_tokenized(server, client, tiny_tok_folder, probe_ids):
    from transformers import AutoTokenizer

    text = "The quick brown fox jumps over the lazy dog; " * 80_000  # 3.6 MB: under the limit
    expected = len(AutoTokenizer.from_pretrained(tiny_tok_folder).encode(text))
    with HealthProbe(server.url) as probe:
        time.sleep(0.2)
        start = time.monotonic()
        r = client.post("/v1/completions", json={"model": "tiny", "prompt": text})
        end = time.monotonic()
    assert (r.status_code, r.json()) == error(
        400, f"This model's maximum context length is 512 tokens. However, your prompt has {expected} tokens; "
             "reduce the length of the prompt.", "prompt")
    assert not probe.failures, probe.failures
    during = probe.during(start, end)
    # Tokenizing takes seconds here; on the event loop it left /health unanswered all that time.
    assert end - start > 1.0 and len(during) >= 5, (end - start, during)
    assert max(during) < 1.0, during
    assert_still_serving(client, probe_ids)


# -- the schema and HTTP details ------------------------------------------------------------------
def test_openapi_declares_what_the_server_answers(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    error_ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert sorted(responses) == ["200", "400", "401", "404", "413", "500", "503"], path
        for status in ("400", "401", "404", "413", "500", "503"):
            assert responses[status]["content"] == {"application/json": {"schema": error_ref}}, (path, status)
        assert sorted(responses["200"]["content"]) == ["application/json", "text/event-stream"]
        assert paths[path]["post"]["security"] == [{"HTTPBearer": []}]
    assert sorted(paths["/v1/models"]["get"]["responses"]) == ["200", "401", "500"]
    assert paths["/health"]["get"]["responses"]["200"]["content"] == {
        "application/json": {"schema": {"$ref": "#/components/schemas/Health"}}}
    assert sorted(paths["/health"]["get"]["responses"]) == ["200", "503"]
    assert paths["/metrics"]["get"]["responses"]["200"]["content"] == {"text/plain": {"schema": {"type": "string"}}}
    assert "security" not in paths["/health"]["get"] and "security" not in paths["/metrics"]["get"]
    components = schema["components"]
    assert components["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert components["schemas"]["ErrorDetail"]["required"] == ["message", "type", "param", "code"]
    seed = components["schemas"]["CompletionRequest"]["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (-(2**63), 2**63 - 1)
    assert "422" not in json.dumps(paths) and "HTTPValidationError" not in components["schemas"]


def test_a_wrong_method_gets_405_with_allow(client):
    r = client.get("/v1/completions")
    assert (r.status_code, r.json()) == error(405, "Method Not Allowed", None, "MethodNotAllowedError")
    assert r.headers["allow"] == "POST"
    r = client.post("/health")
    assert (r.status_code, r.headers["allow"]) == (405, "GET")


def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(server, client, probe_ids, tmp_path):
    pytest.importorskip("schemathesis")
    # Every check but positive_data_acceptance: the schema cannot state every rule a valid request
    # follows (token ids within the vocabulary, a prompt and max_tokens that fit the context).
    proc = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
         "-H", f"Authorization: Bearer {KEY}", "--checks", "all", "--exclude-checks", "positive_data_acceptance",
         "--max-examples", "120", "--workers", "1", "--seed", "1", "--request-timeout", "60", "--continue-on-failure"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert "8 selected / 8 total" in proc.stdout and " passed" in proc.stdout
    assert_still_serving(client, probe_ids)


def test_bench_serve_sends_the_api_key(server, tmp_path):
    reqs = [WorkloadRequest(i, "tiny", 0.0, [i + 1, i + 2, i + 3], 4) for i in range(3)]
    workload = tmp_path / "workload.json"
    write_workload(workload, {}, reqs)
    out = tmp_path / "bench.json"
    command = [sys.executable, "benchmark/serve/bench_serve.py", "--base-url", server.url, "--workload-file",
               str(workload), "--result-file", str(out)]
    env = {k: v for k, v in os.environ.items() if k not in ("MUXSERVE_API_KEY", "OPENAI_API_KEY")}
    proc = subprocess.run(command, cwd=REPO, env={**env, "MUXSERVE_API_KEY": KEY}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"], result["total_output_tokens"]) == (3, 0, 12)
    subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (0, 3)  # without the key: 401s
