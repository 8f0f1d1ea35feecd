"""The mesh actors seen from the driver: start them in their bundles, wait until every instance
serves, keep the RouteTable current while serving, stop them all."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from muxserve.cluster.frontdoor import FrontDoorState, refresh_models
from muxserve.cluster.host import HostSpec, InstanceHost
from muxserve.cluster.ray_cluster import Reservation, describe
from muxserve.cluster.spec import ClusterSpec

logger = logging.getLogger("muxserve.cluster")

POLL_S = 0.5
STATUS_TIMEOUT_S = 10.0


class StartFailed(RuntimeError):
    """An instance did not come up; the message names the mesh, its node and its log."""


def start_hosts(spec: ClusterSpec, reservation: Reservation, specs: dict[str, HostSpec]) -> dict:
    """One InstanceHost actor per mesh, in that mesh's bundle. Ray restarts an actor whose process
    dies up to max_restarts times (its constructor starts the instance again)."""
    import ray

    remote = ray.remote(InstanceHost)
    actors = {}
    for mesh in spec.meshes:
        actors[mesh.name] = remote.options(
            name=mesh.name, num_cpus=0, num_gpus=mesh.num_gpus, scheduling_strategy=reservation.strategy(mesh),
            max_restarts=specs[mesh.name].max_restarts, max_task_retries=0, max_concurrency=4,
        ).remote(specs[mesh.name])
        logger.info("%s (%s; %d GPU%s): starting", mesh.name, ", ".join(mesh.llms), mesh.num_gpus,
                    "" if mesh.num_gpus == 1 else "s")
    return actors


def wait_ready(actors: dict, timeout_s: float) -> dict[str, dict]:
    """Block until every instance is ready; StartFailed names the first that failed."""
    import ray

    deadline = time.monotonic() + timeout_s
    seen: dict[str, str] = {}
    while True:
        statuses = dict(zip(actors, ray.get([a.status.remote() for a in actors.values()], timeout=60)))
        for name, st in statuses.items():
            if st["state"] == "failed":
                raise StartFailed(f"{name} on {describe(st)} failed to start: {st['error']}")
            if seen.get(name) != st["state"]:
                seen[name] = st["state"]
                if st["state"] == "ready":
                    logger.info("%s ready at %s on %s in %.1f s", name, st["url"], describe(st), st["start_s"])
                else:
                    logger.info("%s %s on %s", name, st["state"], describe(st))
        if all(st["state"] == "ready" for st in statuses.values()):
            return statuses
        if time.monotonic() > deadline:
            late = [n for n, st in statuses.items() if st["state"] != "ready"]
            raise StartFailed(f"instances not ready after {timeout_s:.0f} s: {late}")
        time.sleep(POLL_S)


def stop_hosts(actors: dict, graceful: bool, timeout_s: float) -> None:
    """Stop every instance (in parallel), then the actors themselves."""
    import ray

    if not actors:
        return
    refs = {name: a.stop.remote(graceful) for name, a in actors.items()}
    try:
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
        for name, ref in refs.items():
            if ref not in ready:
                logger.warning("%s did not stop within %.0f s; killing its actor", name, timeout_s)
    except Exception:
        logger.debug("stopping the instances", exc_info=True)
    for actor in actors.values():
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            logger.debug("killing an actor", exc_info=True)


async def _status(actor) -> dict:
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    try:
        return await asyncio.wait_for(asyncio.wrap_future(actor.status.remote().future()), STATUS_TIMEOUT_S)
    except ActorDiedError as e:
        return {"state": "failed", "url": None, "error": f"its Ray actor died: {e}"}
    except (ActorUnavailableError, RayActorError, asyncio.TimeoutError) as e:
        # the actor's process is being restarted by Ray (or its node does not answer)
        return {"state": "restarting", "url": None, "error": f"its Ray actor is unavailable: {type(e).__name__}"}


async def read_model_lists(state: FrontDoorState) -> None:
    """Each ready instance's own /v1/models entries (max_model_len and all), when not read yet."""
    async def one(view) -> None:
        try:
            await refresh_models(state, view)
        except Exception as e:
            view.models = []  # not asked again until its next start
            logger.warning("%s: its model list was not read (%s); /v1/models shows the placement's names",
                           view.name, e)

    views = [v for v in state.routes.instances.values() if v.state == "ready" and v.url and v.models is None]
    await asyncio.gather(*(one(v) for v in views))


async def watch(actors: dict, state: FrontDoorState, on_fatal: Callable[[str], None]) -> None:
    """Poll every actor; route around instances that are not ready; end the cluster on a failure."""
    routes = state.routes
    names = list(actors)
    while True:
        statuses = await asyncio.gather(*(_status(actors[n]) for n in names))
        changes = [(name, *routes.update(name, st)) for name, st in zip(names, statuses)]
        await read_model_lists(state)
        for name, old, new in changes:
            view = routes.instances[name]
            if old == new:
                continue
            if new == "ready":
                logger.info("%s ready again at %s (restart %d, %.1f s)", name, view.url, view.restarts, view.start_s)
            elif new == "failed":
                on_fatal(f"{name} ({', '.join(view.llms)}) failed: {view.error}")
                return
            else:
                reason = f" ({view.error.splitlines()[0]})" if view.error else ""
                logger.warning("%s is %s%s; its LLMs answer 503 meanwhile", name, new, reason)
        await asyncio.sleep(POLL_S)
