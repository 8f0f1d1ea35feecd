"""Prometheus metrics with vLLM's names and a ``model_name`` label per LLM, on one /metrics page.

vLLM's series (``vllm:`` prefix) keep their meaning so existing dashboards work per model; what
vLLM has no name for (pages of the shared pool) uses the ``muxserve:`` prefix. Only the engine
thread writes them; the HTTP thread renders them (prometheus_client is thread-safe).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from muxserve.engine.sequence import FinishReason
from muxserve.instance.instance import InstanceLoad
from muxserve.instance.residency import ResidencyEvent
from muxserve.scheduler.state import Request

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TOKEN_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
WAKE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
FINISH_REASONS = tuple(str(r) for r in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.ABORT))
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model_names: list[str], weight_bytes: dict[str, int] | None = None):
        r = self.registry = CollectorRegistry(auto_describe=True)
        label = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests prefilled or in a job (per LLM).", label,
                             registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for admission (per LLM).", label,
                             registry=r)
        self.kv_usage = Gauge("vllm:kv_cache_usage_perc",
                              "Fraction of the shared KV pool held by the LLM (0-1).", label, registry=r)
        self.used_pages = Gauge("muxserve:kv_cache_used_pages", "KV pages held by the LLM's requests.", label,
                                registry=r)
        self.free_pages = Gauge("muxserve:kv_cache_free_pages",
                                "Free KV pages of the shared pool (any LLM may take them).", label, registry=r)
        self.total_pages = Gauge("muxserve:kv_cache_total_pages", "KV pages of the shared pool.", registry=r)
        self.resident = Gauge("muxserve:llm_resident",
                              "1 while the LLM's weights are on the device, 0 while offloaded (residency: elastic).",
                              label, registry=r)
        self.resident_weight_bytes = Gauge("muxserve:llm_resident_weight_bytes",
                                           "Bytes of the LLM's weights on the device now.", label, registry=r)
        self.offloads = Counter("muxserve:llm_offloads", "Offloads of the LLM's weights to host memory.", label,
                                registry=r)
        self.wakes = Counter("muxserve:llm_wakes", "Wakes of the LLM (weights copied back to the device).", label,
                             registry=r)
        self.wake_seconds = Histogram("muxserve:llm_wake_seconds", "Time of one wake (map, copy, preemption).",
                                      label, buckets=WAKE_BUCKETS, registry=r)
        self._residency_events_seen = 0
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens prefilled.", label, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", label, registry=r)
        self.success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                               label + ["finished_reason"], registry=r)
        self.preemptions = Counter("vllm:num_preemptions", "Requests preempted (pages taken back).", label,
                                   registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", label,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between two tokens of a request.", label,
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("vllm:request_time_per_output_token_seconds",
                              "Per request: (e2e latency - TTFT) / (output tokens - 1).", label,
                              buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", label,
                             buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.", label,
                               buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.request_prompt = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.", label,
                                        buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self.request_generation = Histogram("vllm:request_generation_tokens", "Generated tokens per request.",
                                            label, buckets=TOKEN_COUNT_BUCKETS, registry=r)
        self._preemptions_seen: dict[str, int] = {}
        self._weight_bytes = weight_bytes or {}
        for name in model_names:  # every series exists from the start, at 0
            for metric in (self.running, self.waiting, self.kv_usage, self.used_pages, self.free_pages,
                           self.prompt_tokens, self.generation_tokens, self.preemptions, self.ttft, self.itl,
                           self.tpot, self.e2e, self.queue, self.request_prompt, self.request_generation,
                           self.resident_weight_bytes, self.offloads, self.wakes, self.wake_seconds):
                metric.labels(model_name=name)
            for reason in FINISH_REASONS:
                self.success.labels(model_name=name, finished_reason=reason)
            self._preemptions_seen[name] = 0

    # -- engine thread --------------------------------------------------------------------------
    def on_token(self, req: Request, now: float, last_token_time: float | None) -> None:
        m = req.llm
        self.generation_tokens.labels(model_name=m).inc()
        if last_token_time is None:  # the first token: the prompt was prefilled
            self.prompt_tokens.labels(model_name=m).inc(len(req.prompt_token_ids))
            self.ttft.labels(model_name=m).observe(now - req.arrival)
            if req.submit is not None:
                self.queue.labels(model_name=m).observe(req.submit - req.arrival)
        else:
            self.itl.labels(model_name=m).observe(now - last_token_time)

    def on_finish(self, req: Request, reason: FinishReason, now: float, first_token_time: float | None) -> None:
        """A request ended (``reason``: stop, length or abort) after ``len(req.output_token_ids)`` tokens."""
        m = req.llm
        self.success.labels(model_name=m, finished_reason=str(reason)).inc()
        if reason is FinishReason.ABORT:
            return
        n = len(req.output_token_ids)
        self.e2e.labels(model_name=m).observe(now - req.arrival)
        self.request_prompt.labels(model_name=m).observe(len(req.prompt_token_ids))
        self.request_generation.labels(model_name=m).observe(n)
        if first_token_time is not None and n > 1:
            self.tpot.labels(model_name=m).observe((now - first_token_time) / (n - 1))

    def set_load(self, snapshot: InstanceLoad) -> None:
        free_pages, total_pages = snapshot.free_pages, snapshot.total_pages
        self.total_pages.set(total_pages)
        for name, load in snapshot.llms.items():
            self.running.labels(model_name=name).set(load.running)
            self.waiting.labels(model_name=name).set(load.waiting)
            self.used_pages.labels(model_name=name).set(load.used_pages)
            self.free_pages.labels(model_name=name).set(free_pages)
            self.kv_usage.labels(model_name=name).set(load.used_pages / total_pages if total_pages else 0.0)
            resident = load.state == "resident"
            self.resident.labels(model_name=name).set(1.0 if resident else 0.0)
            self.resident_weight_bytes.labels(model_name=name).set(self._weight_bytes.get(name, 0) if resident else 0)
            new = load.preemptions - self._preemptions_seen.get(name, 0)
            if new > 0:
                self.preemptions.labels(model_name=name).inc(new)
                self._preemptions_seen[name] = load.preemptions

    # -- HTTP thread ----------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)

    def set_residency(self, events: tuple[ResidencyEvent, ...]) -> None:
        """Count the offloads and wakes of ``events`` (every one since start) not counted yet."""
        for event in events[self._residency_events_seen:]:
            if event.kind == "wake":
                self.wakes.labels(model_name=event.llm).inc()
                self.wake_seconds.labels(model_name=event.llm).observe(event.seconds)
            else:
                self.offloads.labels(model_name=event.llm).inc()
        self._residency_events_seen = len(events)
