"""``muxserve cluster up PLACEMENT``: every mesh of the placement as an instance on a Ray node
that has its GPUs, behind one OpenAI-compatible front door, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn

from muxserve.cluster import controller
from muxserve.cluster.frontdoor import FrontDoorState, create_app
from muxserve.cluster.host import HostSpec, driver_env
from muxserve.cluster.ray_cluster import connect, import_ray, reserve
from muxserve.cluster.routes import RouteTable
from muxserve.cluster.spec import ClusterSpec, load_placement, portable_config
from muxserve.cluster.state import process_alive, read_state, remove_state, write_state
from muxserve.errors import ClusterError

logger = logging.getLogger("muxserve.cluster")


def host_specs(spec: ClusterSpec, args, flags: list[str], instance_key: str) -> dict[str, HostSpec]:
    cwd = Path.cwd()
    log_dir = str(Path(args.log_dir).resolve())
    return {m.name: HostSpec(mesh=m.name, config_text=portable_config(m, cwd), flags=flags, log_dir=log_dir,
                             cwd=str(cwd), api_key=instance_key, mps=args.mps,
                             max_restarts=args.max_restarts, ready_timeout_s=args.ready_timeout,
                             drain_timeout_s=args.drain_timeout, env=driver_env())
            for m in spec.meshes}


def local_gpus(args, spec: ClusterSpec, flags: list[str]) -> int | None:
    """GPUs of a Ray started here: --num-gpus, else for CPU instances one stand-in per GPU of the
    placement (every placement node on this machine), else what Ray detects."""
    if args.num_gpus is not None:
        return args.num_gpus
    if "--device" in flags and flags[flags.index("--device") + 1:][:1] == ["cpu"]:
        return spec.num_gpus
    return None


def check_port(host: str, port: int) -> None:
    if not 1 <= port <= 65535:
        raise ClusterError(f"--port must be a TCP port (1-65535), got {port}")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ClusterError(f"--host {host} --port {port}: cannot listen there ({e})") from None


class _FrontServer(uvicorn.Server):
    """SIGTERM: new requests get 503, running ones finish (up to the drain timeout); Ctrl-C: now.
    Unlike uvicorn's, the signal is not raised again after run()."""

    def __init__(self, config: uvicorn.Config, state: FrontDoorState):
        super().__init__(config)
        self.mux = state
        self.interrupted = False
        self.fatal: str | None = None

    def handle_exit(self, sig, frame) -> None:
        self.mux.draining = True
        if sig == signal.SIGINT or self.should_exit:
            self.force_exit = True
            self.interrupted = self.interrupted or sig == signal.SIGINT
        self.should_exit = True

    def fail(self, message: str) -> None:
        self.fatal = message
        self.mux.draining = True
        self.should_exit = True


def _sigterm(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


@dataclass
class _Parts:
    """What has been started so far (stopped in reverse, whatever happened)."""

    actors: dict = field(default_factory=dict)
    reservation: object = None
    server: _FrontServer | None = None


def run_up(args, flags: list[str]) -> int:
    """Start the cluster, serve until a signal or a failure, stop everything. Exit code: 0 after
    SIGTERM, 130 after Ctrl-C, 1 when a part failed (bad input raises ClusterError)."""
    spec = load_placement(args.placement)
    check_port(args.host, args.port)
    previous = read_state(args.name)
    if previous and process_alive(previous.get("pid", -1)):
        raise ClusterError(f"a cluster named {args.name!r} is already running (pid {previous['pid']}, "
                           f"{previous.get('url')}); stop it with `muxserve cluster down --name {args.name}`")
    ray = import_ray()
    api_key = args.api_key or os.environ.get("MUXSERVE_API_KEY") or None
    logger.info("placement %s: %d meshes, %d LLMs, %d placement nodes", spec.source, len(spec.meshes),
                len(spec.llms), len(spec.nodes()))
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, _sigterm)  # until the front door takes over the signals
    info = {"name": args.name, "pid": os.getpid(), "url": f"http://{args.host}:{args.port}",
            "ray_address": args.address or os.environ.get("RAY_ADDRESS"), "namespace": f"muxserve-{args.name}",
            "placement": str(spec.source), "log_dir": str(Path(args.log_dir).resolve()),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "serving": False}
    write_state(args.name, info)  # `cluster down` can stop it from here on
    parts = _Parts()
    try:
        _start_and_serve(args, flags, spec, api_key, info, parts)
    except controller.StartFailed as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted; stopping the cluster", file=sys.stderr, flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop(args, parts, ray)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if parts.server.fatal:
        print(f"error: {parts.server.fatal}; every instance of the cluster was stopped", file=sys.stderr, flush=True)
        return 1
    return 130 if parts.server.interrupted else 0


def _start_and_serve(args, flags: list[str], spec: ClusterSpec, api_key: str | None, info: dict,
                     parts: _Parts) -> None:
    source = "--address" if args.address else "RAY_ADDRESS"
    where = connect(info["ray_address"], source, info["namespace"], local_gpus(args, spec, flags))
    logger.info("connected to %s", where)
    parts.reservation = reserve(spec, args.ready_timeout)
    instance_key = api_key or secrets.token_urlsafe(24)  # instances listen on the nodes' addresses
    parts.actors = controller.start_hosts(spec, parts.reservation, host_specs(spec, args, flags, instance_key))
    statuses = controller.wait_ready(parts.actors, args.ready_timeout)
    routes = RouteTable(spec)
    for name, st in statuses.items():
        routes.update(name, st)
    state = FrontDoorState(routes, api_key=api_key, instance_key=instance_key)
    parts.server = _serve(args, state, parts.actors, info)


def _stop(args, parts: _Parts, ray) -> None:
    graceful = parts.server is not None and not parts.server.interrupted
    controller.stop_hosts(parts.actors, graceful, args.drain_timeout + 60)
    if parts.reservation is not None:
        parts.reservation.remove()
    if ray.is_initialized():
        ray.shutdown()
    remove_state(args.name, os.getpid())
    logger.info("cluster stopped")


def _serve(args, state: FrontDoorState, actors: dict, info: dict) -> _FrontServer:
    server: _FrontServer | None = None

    @asynccontextmanager
    async def lifespan(_app):
        state.open()
        await controller.read_model_lists(state)  # /v1/models complete from the first request
        watcher = asyncio.ensure_future(controller.watch(actors, state, server.fail))
        path = write_state(args.name, {**info, "serving": True})
        logger.info("serving %d LLMs (%s) at %s/v1; state file %s", len(state.routes.llms),
                    ", ".join(state.routes.llms), info["url"], path)
        try:
            yield
        finally:
            watcher.cancel()
            await state.close()

    config = uvicorn.Config(create_app(state, lifespan), host=args.host, port=args.port, lifespan="on",
                            log_level="warning", access_log=False, timeout_graceful_shutdown=args.drain_timeout)
    server = _FrontServer(config, state)
    server.run()
    return server

