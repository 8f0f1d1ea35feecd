"""The /metrics page shows each LLM's residency (elastic LLMs: 0 while offloaded)."""

from __future__ import annotations

from muxserve.instance.instance import InstanceLoad, LLMLoad
from muxserve.server.metrics import ServerMetrics


def test_resident_gauge_follows_the_load_snapshot():
    metrics = ServerMetrics(["llm-0", "llm-1"])
    metrics.set_load(InstanceLoad({"llm-0": LLMLoad(1, 0, 4, 0), "llm-1": LLMLoad(0, 2, 0, 0, "offloaded")}, 10, 64))
    page = metrics.render().decode()
    assert 'muxserve:llm_resident{model_name="llm-0"} 1.0' in page
    assert 'muxserve:llm_resident{model_name="llm-1"} 0.0' in page
