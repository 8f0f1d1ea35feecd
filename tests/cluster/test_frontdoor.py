"""The front door against fake instances (no Ray, no engine): routing by model, answers passed on
byte for byte, 503 with Retry-After, the merged /v1/models and /metrics, the API key."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import msgspec
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client.parser import text_string_to_metric_families
from starlette.responses import StreamingResponse

from muxserve.cluster.frontdoor import FrontDoorState, create_app, refresh_models
from muxserve.cluster.routes import RouteTable
from muxserve.cluster.spec import ClusterSpec, MeshSpec
from muxserve.config import MuxServeConfig

SSE = [b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"choices":[{"text":"b"}]}\n\n', b"data: [DONE]\n\n"]
BAD = (b'{"error":{"message":"temperature must be in [0, 100], got -1.0","type":"BadRequestError",'
       b'"param":"temperature","code":400}}')


def fake_instance(name: str, llms: list[str]) -> FastAPI:
    """What the front door needs of ``muxserve serve``: it echoes what it received."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "root": f"/models/{m}",
                                            "max_model_len": 256} for m in llms]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.body()
        doc = json.loads(body)
        if doc.get("temperature", 0) < 0:
            return Response(BAD, status_code=400, media_type="application/json")
        if doc.get("stream"):
            async def chunks():
                for chunk in SSE:
                    yield chunk
            return StreamingResponse(chunks(), media_type="text/event-stream")
        return {"served_by": name, "body": body.decode(), "auth": request.headers.get("authorization")}

    @app.get("/metrics")
    async def metrics():
        lines = ["# HELP vllm:generation_tokens_total Tokens generated.", "# TYPE vllm:generation_tokens_total counter"]
        lines += [f'vllm:generation_tokens_total{{model_name="{m}"}} {10 * (i + 1)}.0' for i, m in enumerate(llms)]
        return Response("\n".join(lines) + "\n", media_type="text/plain")

    return app


class ByHost:
    """One ASGI app per Host header: the instances' addresses."""

    def __init__(self, apps: dict[str, FastAPI]):
        self.apps = apps

    async def __call__(self, scope, receive, send):
        host = dict(scope["headers"])[b"host"].decode()
        await self.apps[host](scope, receive, send)


def spec() -> ClusterSpec:
    def mesh(i, llms):
        config = msgspec.convert({"models": [{"name": n, "model": f"/models/{n}"} for n in llms]}, MuxServeConfig)
        return MeshSpec(i, i, 1, tuple(llms), None, config)

    return ClusterSpec(None, (mesh(0, ["a", "b"]), mesh(1, ["c"])))


def front(api_key=None):
    routes = RouteTable(spec())
    routes.update("mesh0", {"state": "ready", "url": "http://inst0", "start_s": 12.0})
    routes.update("mesh1", {"state": "ready", "url": "http://inst1", "start_s": 20.0})
    state = FrontDoorState(routes, api_key=api_key, instance_key="secret")
    apps = {"inst0": fake_instance("inst0", ["a", "b"]), "inst1": fake_instance("inst1", ["c"])}
    state.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=ByHost(apps)))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(state)), base_url="http://front")
    return state, client


def run(coro):
    return asyncio.run(coro)


def test_requests_go_to_the_instance_of_their_model_untouched():
    async def go():
        state, client = front()
        body = b'{"model": "c", "prompt": [1, 2], "max_tokens": 3}'
        r = await client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        a = await client.post("/v1/completions", json={"model": "b", "prompt": "x"})
        return r, a

    r, a = run(go())
    assert r.status_code == 200 and r.headers["x-muxserve-instance"] == "mesh1"
    assert r.json() == {"served_by": "inst1", "body": '{"model": "c", "prompt": [1, 2], "max_tokens": 3}',
                        "auth": "Bearer secret"}
    assert a.json()["served_by"] == "inst0" and a.headers["x-muxserve-instance"] == "mesh0"


def test_streams_and_errors_come_back_as_the_instance_sent_them():
    async def go():
        _, client = front()
        stream = await client.post("/v1/completions", json={"model": "a", "stream": True})
        bad = await client.post("/v1/completions", json={"model": "a", "temperature": -1})
        return stream, bad

    stream, bad = run(go())
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    assert stream.content == b"".join(SSE)
    assert (bad.status_code, bad.content) == (400, BAD)


@pytest.mark.parametrize("body, status, message, param", [
    (b'{"model": "gpt-4", "prompt": "x"}', 404, "The model `gpt-4` does not exist.", "model"),
    (b'{"prompt": "x"}', 400, "field 'model' is required (a string)", "model"),
    (b'{"model": ', 400, "the request body is not valid JSON: Expecting value: line 1 column 11 (char 10)", None),
])
def test_front_door_errors_have_openai_shape(body, status, message, param):
    async def go():
        _, client = front()
        return await client.post("/v1/chat/completions", content=body)

    r = run(go())
    types = {400: "BadRequestError", 404: "NotFoundError"}
    assert (r.status_code, r.json()) == (status, {"error": {"message": message, "type": types[status],
                                                            "param": param, "code": status}})


def test_an_llm_whose_instance_restarts_answers_503_with_retry_after():
    async def go():
        state, client = front()
        state.routes.update("mesh1", {"state": "restarting", "url": None, "since": time.time() - 5.2})
        down = await client.post("/v1/completions", json={"model": "c"})
        other = await client.post("/v1/completions", json={"model": "a"})
        models = await client.get("/v1/models")
        return down, other, models

    down, other, models = run(go())
    assert down.status_code == 503 and down.headers["retry-after"] == "15"  # a start took 20 s, 5.2 s passed
    assert down.json()["error"] == {
        "message": "LLM `c` is unavailable: its instance mesh1 is restarting; retry in 15 s",
        "type": "ServiceUnavailableError", "param": None, "code": 503}
    assert other.status_code == 200  # the other instance keeps serving
    assert [(m["id"], m["instance"], m["state"]) for m in models.json()["data"]] == [
        ("a", "mesh0", "ready"), ("b", "mesh0", "ready"), ("c", "mesh1", "restarting")]


def test_an_instance_that_does_not_answer_gives_503():
    async def go():
        state, client = front()

        def refuse(request):
            raise httpx.ConnectError("connection refused", request=request)

        state.client = httpx.AsyncClient(transport=httpx.MockTransport(refuse))
        state.routes.update("mesh0", {"since": time.time() - 2.5})  # a start took 12 s
        return await client.post("/v1/completions", json={"model": "a"})

    r = run(go())
    assert r.status_code == 503 and r.headers["retry-after"] == "10"
    assert r.json()["error"]["message"] == ("LLM `a` is unavailable: its instance mesh0 did not answer (ConnectError); "
                                            "retry in 10 s")


def test_models_lists_every_llm_with_instance_and_state():
    async def go():
        state, client = front()
        await refresh_models(state, state.routes.instances["mesh0"])  # what the controller does when ready
        return await client.get("/v1/models")

    data = run(go()).json()["data"]
    assert [(m["id"], m["instance"], m["state"], m["root"]) for m in data] == [
        ("a", "mesh0", "ready", "/models/a"), ("b", "mesh0", "ready", "/models/b"),
        ("c", "mesh1", "ready", "/models/c")]
    assert data[0]["max_model_len"] == 256  # the instance's own entry
    assert "max_model_len" not in data[2]  # not fetched yet: from the placement


def test_metrics_join_the_instances_with_an_instance_label():
    async def go():
        state, client = front()
        state.routes.update("mesh1", {"restarts": 2})
        return await client.get("/metrics")

    r = run(go())
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(r.text) for s in f.samples}
    assert samples[("vllm:generation_tokens_total", (("instance", "mesh0"), ("model_name", "a")))] == 10.0
    assert samples[("vllm:generation_tokens_total", (("instance", "mesh0"), ("model_name", "b")))] == 20.0
    assert samples[("vllm:generation_tokens_total", (("instance", "mesh1"), ("model_name", "c")))] == 10.0
    assert samples[("muxserve:cluster_instance_ready", (("instance", "mesh1"), ("state", "ready")))] == 1.0
    assert samples[("muxserve:cluster_instance_restarts_total", (("instance", "mesh1"),))] == 2.0
    assert r.text.count("# TYPE vllm:generation_tokens_total counter") == 1


def test_api_key_guards_v1_and_cluster():
    async def go():
        _, client = front(api_key="k1")
        no = await client.post("/v1/completions", json={"model": "a"})
        wrong = await client.get("/v1/models", headers={"Authorization": "Bearer k2"})
        ok = await client.get("/cluster", headers={"Authorization": "Bearer k1"})
        health = await client.get("/health")
        return no, wrong, ok, health

    no, wrong, ok, health = run(go())
    assert (no.status_code, no.json()["error"]["message"]) == (401, "Incorrect API key provided.")
    assert wrong.status_code == 401
    assert ok.status_code == 200 and ok.json()["llms"] == {"a": "mesh0", "b": "mesh0", "c": "mesh1"}
    assert health.status_code == 200


def test_restarts_count_across_a_restarted_actor():
    routes = RouteTable(spec())
    routes.update("mesh1", {"state": "ready", "host_pid": 10, "restarts": 0})
    routes.update("mesh1", {"state": "ready", "host_pid": 10, "restarts": 2})  # the actor restarted its instance
    assert routes.update("mesh1", {"state": "restarting", "url": None}) == ("ready", "restarting")  # actor gone
    routes.update("mesh1", {"state": "starting", "host_pid": 11, "restarts": 0})  # Ray started it again
    assert routes.instances["mesh1"].restarts == 3
    routes.update("mesh1", {"state": "ready", "host_pid": 11, "restarts": 1})
    assert routes.instances["mesh1"].restarts == 4


class _BrokenStream(httpx.AsyncByteStream):
    """The first SSE chunk, then the connection drops (the instance died mid-stream)."""

    async def __aiter__(self):
        yield SSE[0]
        raise httpx.ReadError("connection reset by peer")


def test_a_stream_cut_by_a_dying_instance_ends_with_an_error_event():
    async def go():
        state, client = front()
        state.routes.update("mesh0", {"since": time.time() - 2.5})  # a start took 12 s

        def handler(request):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_BrokenStream())

        state.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        return await client.post("/v1/completions", json={"model": "a", "stream": True})

    r = run(go())
    assert r.status_code == 200
    error = {"error": {"message": "LLM `a` is unavailable: its instance mesh0 did not answer (ReadError); "
                                  "retry in 10 s",
                       "type": "ServiceUnavailableError", "param": None, "code": 503}}
    assert r.content == SSE[0] + b"data: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\ndata: [DONE]\n\n"
