"""Elastic residency over HTTP with a real server and the official openai client: states in
/v1/models, sleep and wake, a request that wakes a sleeping LLM with the tokens of a resident
run, the errors, and the residency metrics."""

from __future__ import annotations

import httpx
import openai
import pytest
import yaml

from .helpers import metric_samples, start_server, write_config

pytestmark = pytest.mark.timeout(600)
PROMPT = [5, 17, 29, 41, 53, 65, 77, 89]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tok_folder):
    tmp = tmp_path_factory.mktemp("residency")
    config = write_config(tmp / "cfg.yaml", {"pinned": str(tiny_tok_folder), "elastic": str(tiny_tok_folder)},
                          kv_cache_bytes=8 << 20)
    doc = yaml.safe_load(config.read_text())
    doc["models"][1]["residency"] = "elastic"
    config.write_text(yaml.safe_dump(doc))
    srv = start_server(config, tmp)
    yield srv
    assert srv.stop() == 0


def _states(client: openai.OpenAI) -> dict[str, tuple[str, str]]:
    return {m.id: (m.residency, m.state) for m in client.models.list().data}


def _complete(client: openai.OpenAI) -> list[str]:
    r = client.completions.create(model="elastic", prompt=PROMPT, max_tokens=12, temperature=0,
                                  logprobs=0, extra_body={"ignore_eos": True})
    return r.choices[0].logprobs.tokens


def test_sleep_wake_and_a_request_that_wakes(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    http = httpx.Client(base_url=server.url, timeout=60)
    assert _states(client) == {"pinned": ("pinned", "resident"), "elastic": ("elastic", "resident")}
    resident_tokens = _complete(client)

    slept = http.post("/v1/models/elastic/sleep").json()
    assert (slept["id"], slept["state"], slept["changed"]) == ("elastic", "offloaded", True)
    assert slept["bytes"] > 0 and slept["seconds"] > 0
    assert _states(client)["elastic"] == ("elastic", "offloaded")
    again = http.post("/v1/models/elastic/sleep").json()
    assert (again["state"], again["changed"], again["bytes"]) == ("offloaded", False, 0)

    # the request wakes it and gets the tokens of the resident run
    assert _complete(client) == resident_tokens
    assert _states(client)["elastic"] == ("elastic", "resident")

    assert http.post("/v1/models/elastic/sleep").json()["changed"] is True
    woken = http.post("/v1/models/elastic/wake").json()
    assert (woken["state"], woken["changed"]) == ("resident", True) and woken["bytes"] > 0
    assert http.post("/v1/models/elastic/wake").json()["changed"] is False
    assert _complete(client) == resident_tokens

    samples = metric_samples(http.get("/metrics").text)
    label = (("model_name", "elastic"),)
    assert samples[("muxserve:llm_offloads_total", label)] == 2
    assert samples[("muxserve:llm_wakes_total", label)] == 2
    assert samples[("muxserve:llm_wake_seconds_count", label)] == 2
    assert samples[("muxserve:llm_resident", label)] == 1
    assert samples[("muxserve:llm_resident_weight_bytes", label)] > 0
    assert samples[("muxserve:llm_wakes_total", (("model_name", "pinned"),))] == 0


def test_errors_name_the_model(server):
    http = httpx.Client(base_url=server.url, timeout=60)
    r = http.post("/v1/models/pinned/sleep")
    assert (r.status_code, r.json()["error"]["message"], r.json()["error"]["param"]) == (
        400, "`pinned` is pinned to the device (residency: pinned in the model config); only elastic LLMs sleep "
             "and wake", "model")
    r = http.post("/v1/models/nope/wake")
    assert (r.status_code, r.json()["error"]["message"]) == (404, "The model `nope` does not exist.")
    r = http.get("/v1/models/elastic/sleep")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_sleep_with_a_request_in_flight_is_a_conflict(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    http = httpx.Client(base_url=server.url, timeout=60)
    stream = client.completions.create(model="elastic", prompt=PROMPT, max_tokens=480, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)  # prefilled: the request holds pages until its 480th token
    r = http.post("/v1/models/elastic/sleep")
    assert (r.status_code, r.json()["error"]["message"]) == (
        409, "'elastic' has requests waiting, running or holding pages: it is not offloaded")
    rest = list(chunks)  # the request is not disturbed: it runs to its length
    assert [c.choices[0].finish_reason for c in rest if c.choices and c.choices[0].finish_reason] == ["length"]
    assert http.post("/v1/models/elastic/sleep").json()["changed"] is True
