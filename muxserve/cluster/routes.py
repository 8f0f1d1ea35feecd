"""Which instance serves which LLM, and in what state each instance is (updated by the
controller from the actors' status; read by the front door). No Ray here."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from muxserve.cluster.spec import ClusterSpec

STATES = ("starting", "ready", "restarting", "failed", "stopping", "stopped")
DEFAULT_RETRY_S = 30  # Retry-After before an instance has been seen starting


@dataclass
class InstanceView:
    name: str  # mesh0, mesh1, ...
    node: int  # the placement's node
    llms: tuple[str, ...]
    roots: dict[str, str]  # LLM -> the config's model
    state: str = "starting"
    url: str | None = None
    node_ip: str | None = None
    node_id: str | None = None
    gpus: list[str] = field(default_factory=list)
    pid: int | None = None  # the instance's process (its process group)
    host_pid: int | None = None  # the Ray actor's process on the node
    restarts: int = 0  # of the instance, over the actor's restarts too
    restart_base: int = 0  # restarts before the actor's current process
    error: str | None = None
    start_s: float | None = None  # how long its last start took
    since: float = field(default_factory=time.time)  # wall time of the last state change
    models: list[dict] | None = None  # its /v1/models entries, fetched when it got ready

    def retry_after(self) -> int:
        """Seconds a client should wait: the time a start took, minus what has passed already."""
        expected = self.start_s or DEFAULT_RETRY_S
        return max(1, math.ceil(expected - (time.time() - self.since)))

    def public(self) -> dict:
        return {"instance": self.name, "state": self.state, "llms": list(self.llms), "placement_node": self.node,
                "node_ip": self.node_ip, "node_id": self.node_id, "gpus": self.gpus, "url": self.url,
                "pid": self.pid, "host_pid": self.host_pid, "restarts": self.restarts, "start_s": self.start_s,
                "error": self.error}


class RouteTable:
    def __init__(self, spec: ClusterSpec):
        self.instances = {m.name: InstanceView(m.name, m.node, m.llms, m.models()) for m in spec.meshes}
        self._by_llm = {llm: self.instances[m.name] for m in spec.meshes for llm in m.llms}

    def instance_of(self, llm: str) -> InstanceView | None:
        return self._by_llm.get(llm)

    @property
    def llms(self) -> list[str]:
        return list(self._by_llm)

    def update(self, name: str, status: dict) -> tuple[str, str]:
        """Apply an actor's status; returns (old state, new state)."""
        view = self.instances[name]
        old = view.state
        url = status.get("url")
        if url != view.url:
            view.models = None  # a new start: fetch its model list again
        host = status.get("host_pid")
        if host is not None and view.host_pid is not None and host != view.host_pid:
            view.restart_base = view.restarts + 1  # Ray restarted the actor (and so the instance)
        for key in ("state", "url", "node_ip", "node_id", "gpus", "pid", "host_pid", "error", "start_s", "since"):
            if key in status:
                setattr(view, key, status[key])
        if "restarts" in status:
            view.restarts = view.restart_base + status["restarts"]
        return old, view.state

    def model_entries(self, created: int) -> list[dict]:
        """Every LLM of the cluster as /v1/models shows it, with its instance and state."""
        out = []
        for view in self.instances.values():
            known = {m.get("id"): m for m in view.models or []}
            for llm in view.llms:
                entry = dict(known.get(llm) or {"id": llm, "object": "model", "created": created,
                                                "owned_by": "muxserve", "root": view.roots.get(llm),
                                                "parent": None, "permission": []})
                entry.update(instance=view.name, state=view.state)
                out.append(entry)
        return out
