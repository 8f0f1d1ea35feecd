"""/metrics of the cluster: every ready instance's Prometheus page, each series with an
``instance`` label (mesh0, mesh1, ...), plus the cluster's own series per instance:
``muxserve:cluster_instance_ready`` (1 when it serves) and ``muxserve:cluster_instance_restarts``."""

from __future__ import annotations

import asyncio
import logging

import httpx
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from muxserve.cluster.routes import InstanceView, RouteTable

logger = logging.getLogger("muxserve.cluster")
CONTENT_TYPE = CONTENT_TYPE_LATEST


def relabel(pages: dict[str, str]) -> list[Metric]:
    """Families of several Prometheus pages merged by name, each sample labelled with its page's key."""
    merged: dict[str, Metric] = {}
    for instance, text in pages.items():
        for family in text_string_to_metric_families(text):
            samples = [s._replace(labels={**s.labels, "instance": instance}) for s in family.samples]
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged[family.name].samples.extend(samples)
    return list(merged.values())


def cluster_families(routes: RouteTable) -> list[Metric]:
    ready = GaugeMetricFamily("muxserve:cluster_instance_ready", "1 when the instance serves, else 0.",
                              labels=["instance", "state"])
    restarts = CounterMetricFamily("muxserve:cluster_instance_restarts",
                                   "Restarts of the instance after it died.", labels=["instance"])
    for view in routes.instances.values():
        ready.add_metric([view.name, view.state], 1.0 if view.state == "ready" else 0.0)
        restarts.add_metric([view.name], float(view.restarts))
    return [ready, restarts]


class _Families:
    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self):
        return iter(self.families)


async def _fetch(client: httpx.AsyncClient, view: InstanceView, headers: dict) -> str | None:
    try:
        resp = await client.get(f"{view.url}/metrics", headers=headers, timeout=10)
        resp.raise_for_status()
        return resp.text
    except httpx.HTTPError as e:  # an instance going away is left out of this scrape
        logger.warning("metrics of %s not read: %s", view.name, e)
        return None


async def aggregate_metrics(client: httpx.AsyncClient, routes: RouteTable, headers: dict) -> bytes:
    views = [v for v in routes.instances.values() if v.state == "ready" and v.url]
    texts = await asyncio.gather(*(_fetch(client, v, headers) for v in views))
    pages = {v.name: t for v, t in zip(views, texts) if t is not None}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(relabel(pages) + cluster_families(routes)))
    return generate_latest(registry)
