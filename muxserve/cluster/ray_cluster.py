"""Driver side of Ray: connect (or start a one-machine Ray), check that the placement fits the
nodes, reserve each placement node's GPUs with a placement group, and start work on them.

Each node of the placement becomes one STRICT_PACK placement group whose bundles are its meshes'
GPUs, so meshes that the placement put on one machine stay on one Ray node and a mesh never spans
two; the actor or task of a mesh then runs in its bundle, and Ray sets ``CUDA_VISIBLE_DEVICES``
to the GPUs it reserved.
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

from muxserve.cluster.spec import ClusterSpec, MeshSpec
from muxserve.errors import ClusterError

logger = logging.getLogger("muxserve.cluster")

DEFAULT_RAY_PORT = 6379
LOCAL_OBJECT_STORE_BYTES = 256 << 20  # only configs, status and statistics travel through it


def import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("the cluster commands need Ray: pip install -r requirements-cluster.txt "
                           "(or pip install 'ray==2.60.0')") from None
    return ray


def ray_address(address: str) -> str:
    """``host`` or ``host:port`` (default port 6379, what ``ray start --head`` listens on)."""
    return address if ":" in address else f"{address}:{DEFAULT_RAY_PORT}"


def check_reachable(address: str, source: str, timeout_s: float = 5.0) -> None:
    """Fail fast (ray.init waits minutes on an address where nothing listens)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or not host:
        raise ClusterError(f"Ray address {address!r} (from {source}) is not host:port")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address} (from {source}): {e}; start it with "
                           f"`ray start --head --port {port}` on that machine") from None


def connect(address: str | None, source: str, namespace: str, local_gpus: int | None) -> str:
    """Join the Ray cluster at ``address`` or, without one, start Ray on this machine only
    (stopped again by ``ray.shutdown()``). Returns a description for the log."""
    ray = import_ray()
    common = dict(namespace=namespace, log_to_driver=False, logging_level=logging.WARNING,
                  configure_logging=False)
    if address:
        address = ray_address(address)
        check_reachable(address, source)
        ray.init(address=address, **common)
        where = f"Ray at {address}"
    else:
        # "local": a Ray of our own, even where `ray start` runs a cluster on this machine
        ray.init(address="local", num_gpus=local_gpus, include_dashboard=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
        where = "a Ray started on this machine"
    nodes = alive_nodes()
    gpus = sum(n["Resources"].get("GPU", 0) for n in nodes)
    return f"{where}: {_count(len(nodes), 'node')}, {_count(gpus, 'GPU')}"


def _count(n: float, what: str) -> str:
    return f"{n:g} {what}" + ("" if n == 1 else "s")


def alive_nodes() -> list[dict]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def wait_for_nodes(count: int, timeout_s: float, address: str) -> None:
    """Wait until ``count`` nodes have joined (``ray start --address`` on each)."""
    deadline, last = time.monotonic() + timeout_s, -1
    while True:
        n = len(alive_nodes())
        if n >= count:
            return
        if n != last:
            logger.info("waiting for %d nodes to join the Ray cluster at %s (%d now; on each node: "
                        "ray start --address %s)", count, address, n, address)
            last = n
        if time.monotonic() > deadline:
            raise ClusterError(f"--nnodes {count}: only {n} nodes joined the Ray cluster at {address} "
                               f"within {timeout_s:.0f} s")
        time.sleep(1.0)


def fit_nodes(needs: dict[int, int], capacities: list[float]) -> bool:
    """Best fit, largest need first: can each placement node's GPUs go on one Ray node?"""
    free = sorted(capacities)
    for need in sorted(needs.values(), reverse=True):
        for i, cap in enumerate(free):
            if cap >= need:
                free[i] = cap - need
                free.sort()
                break
        else:
            return False
    return True


def check_capacity(spec: ClusterSpec) -> None:
    needs = {node: sum(m.num_gpus for m in meshes) for node, meshes in spec.nodes().items()}
    nodes = alive_nodes()
    caps = [n["Resources"].get("GPU", 0.0) for n in nodes]
    if not fit_nodes(needs, caps):
        wanted = ", ".join(f"node {k}: {v}" for k, v in needs.items())
        have = ", ".join(f"{n['NodeManagerAddress']}: {n['Resources'].get('GPU', 0):g}" for n in nodes)
        raise ClusterError(f"the placement {spec.source} needs GPUs on one machine per placement node ({wanted}); "
                           f"the Ray nodes have {have} (on a machine without GPUs declare CPU stand-ins with "
                           "`ray start --num-gpus N` or --num-gpus)")


@dataclass
class Reservation:
    """The placement groups of a cluster and where each mesh's bundle is."""

    groups: dict[int, object]  # placement node -> PlacementGroup
    bundles: dict[str, tuple[int, int]]  # mesh name -> (placement node, bundle index)

    def strategy(self, mesh: MeshSpec):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        node, index = self.bundles[mesh.name]
        return PlacementGroupSchedulingStrategy(self.groups[node], placement_group_bundle_index=index)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            try:
                remove_placement_group(group)
            except Exception:
                logger.debug("removing a placement group failed", exc_info=True)
        self.groups.clear()


def reserve(spec: ClusterSpec, timeout_s: float) -> Reservation:
    """One placement group per placement node; waits until Ray has reserved them all."""
    import ray
    from ray.util.placement_group import placement_group

    check_capacity(spec)
    res = Reservation({}, {})
    for node, meshes in spec.nodes().items():
        res.groups[node] = placement_group([{"GPU": m.num_gpus} for m in meshes], strategy="STRICT_PACK")
        for i, m in enumerate(meshes):
            res.bundles[m.name] = (node, i)
    ready, _ = ray.wait([g.ready() for g in res.groups.values()], num_returns=len(res.groups), timeout=timeout_s)
    if len(ready) < len(res.groups):
        res.remove()
        raise ClusterError(f"Ray could not reserve the GPUs of the placement within {timeout_s:.0f} s "
                           "(are other jobs holding them?)")
    return res


def describe(status: dict) -> str:
    gpus = ",".join(status.get("gpus") or []) or "-"
    return f"node {status.get('node_ip')} [{(status.get('node_id') or '')[:8]}] GPUs {gpus}"
