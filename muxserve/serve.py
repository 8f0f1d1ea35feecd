"""``muxserve serve MODEL_CONFIG.yaml`` (or ``python -m muxserve.serve MODEL_CONFIG.yaml``):
the OpenAI-compatible server for every LLM of one instance.

Starts the same FlexStore, two runtimes per LLM and scheduler as ``muxserve.launch``, warms each
LLM up with one short request, then serves HTTP until SIGTERM or Ctrl-C. SIGTERM drains: new
requests get 503 while the running ones finish (at most --drain-timeout seconds), then every
process is stopped and the server exits 0.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import uvicorn

from muxserve.config import MuxServeConfig, load_config
from muxserve.engine.llm import TOKENIZER_FILES
from muxserve.engine.sampling_params import SamplingParams
from muxserve.errors import ConfigError, InputError
from muxserve.instance.cli import (
    add_instance_arguments,
    check_instance_args,
    instance_options,
    resolve_device,
    run_instance_command,
)
from muxserve.instance.instance import Instance
from muxserve.server.guards import DEFAULT_MAX_REQUEST_BYTES

logger = logging.getLogger("muxserve.serve")

WARMUP_PROMPT_LEN = 8


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="muxserve serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_config", help="the instance's model_config YAML (see examples/basic/model_config.yaml)")
    g = p.add_argument_group("HTTP")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    g.add_argument("--drain-timeout", type=float, default=120.0,
                   help="on SIGTERM, seconds to let running requests finish before they are aborted (default: 120)")
    g.add_argument("--split-by-model", help="serve only this LLM of the config (spatial partitioning)")
    g.add_argument("--no-access-log", action="store_true", help="do not log each HTTP request")
    g.add_argument("--api-key", default=os.environ.get("MUXSERVE_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on every /v1 route (401 otherwise); /health, "
                        "/version and /metrics stay open. Default: $MUXSERVE_API_KEY, which unlike the flag "
                        "does not show in the process list; unset: no key")
    g.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help="largest request body accepted; larger ones get 413 before they are read "
                        f"(default: {DEFAULT_MAX_REQUEST_BYTES} = {DEFAULT_MAX_REQUEST_BYTES >> 20} MiB)")
    add_instance_arguments(p)
    return p


def _served_models(config: MuxServeConfig, instance: Instance) -> dict:
    from transformers import AutoTokenizer

    from muxserve.server.driver import ServedModel

    folders = {m.name: Path(m.folder) for m in instance.store_info.models}
    out = {}
    for m in config.models:
        folder = folders[m.name]
        limits = instance.limits(m.name)
        tokenizer = None
        if any((folder / name).is_file() for name in TOKENIZER_FILES):
            tokenizer = AutoTokenizer.from_pretrained(folder)
        else:
            logger.warning("%s: %s has no tokenizer; it takes prompts as token ids and answers with empty text",
                           m.name, folder)
        info = instance.llm_info(m.name)
        out[m.name] = ServedModel(m.name, m.model, folder, limits.max_model_len, limits.vocab_size,
                                  limits.max_tokens, tokenizer, info.architecture, info.eos_ids)
    return out


def _warm_up(instance: Instance, names: list[str]) -> None:
    """One short request per LLM through both runtimes, so the first client does not pay for warm-up."""
    start = time.monotonic()
    reqs = [instance.submit(n, [i % 7 + 1 for i in range(WARMUP_PROMPT_LEN)],
                            SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), time.monotonic())
            for n in names]
    instance.run_until_done()
    instance.raise_if_failed(reqs)
    logger.info("warm-up done in %.1f s", time.monotonic() - start)


def serve(args) -> int:
    from muxserve.server.api import ServerState, create_app
    from muxserve.server.driver import EngineDriver
    from muxserve.server.metrics import ServerMetrics

    config = load_config(args.model_config)
    if args.split_by_model:
        config = msgspec.structs.replace(config, models=[config.model(args.split_by_model)])
    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be a TCP port (1-65535), got {args.port}")
    if args.drain_timeout < 0:
        raise ConfigError(f"--drain-timeout must be >= 0, got {args.drain_timeout}")
    if args.max_request_bytes < 1:
        raise ConfigError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    key = args.api_key
    if key is not None and (not key or not key.isprintable() or key.strip() != key):
        raise ConfigError("--api-key (or MUXSERVE_API_KEY) must be non-empty printable text without spaces "
                          "around it")
    if args.api_key is None and not _is_loopback(args.host):
        logger.warning("listening on %s without --api-key: anyone who reaches this address can use every LLM",
                       args.host)
    device = resolve_device(args.device)
    check_instance_args(args, config, device, args.model_config)
    instance = Instance(config, instance_options(args, config, device))
    instance.start()  # on failure it has stopped whatever it started
    try:
        _warm_up(instance, config.model_names)
        models = _served_models(config, instance)
    except BaseException:
        instance.stop()
        raise
    metrics = ServerMetrics(config.model_names)
    server: _Server | None = None

    def engine_died(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    driver = EngineDriver(instance, metrics, on_fatal=engine_died)
    state = ServerState(models, driver, metrics)

    @asynccontextmanager
    async def lifespan(_app):
        import asyncio

        driver.start(asyncio.get_running_loop())  # from here on the engine thread owns the instance
        logger.info("serving %s at http://%s:%d/v1", ", ".join(models), args.host, args.port)
        yield

    app = create_app(state, lifespan, api_key=args.api_key, max_request_bytes=args.max_request_bytes)
    uv_config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                               access_log=not args.no_access_log, lifespan="on",
                               timeout_graceful_shutdown=30)  # after the drain: idle connections only
    server = _Server(uv_config, state, args.drain_timeout)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
        driver.stop()
    if server.interrupted:
        return 130
    if driver.error is not None:
        print(f"error: the engine failed ({driver.error}); every process of the instance was stopped",
              file=sys.stderr)
        return 1
    logger.info("stopped")
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        return False


class _Server(uvicorn.Server):
    """uvicorn's server with MuxServe's signals: SIGTERM drains, Ctrl-C (SIGINT) stops now."""

    def __init__(self, config: uvicorn.Config, state, drain_timeout: float):
        super().__init__(config)
        self.mux = state
        self.drain_timeout = drain_timeout
        self.drain_deadline = float("inf")
        self.interrupted = False
        self._aborted = False

    def handle_exit(self, sig, frame) -> None:  # unlike uvicorn's, the signal is not re-raised after run()
        if sig == signal.SIGTERM and not self.mux.draining and not self.should_exit:
            logger.info("SIGTERM: draining %d running requests (new ones get 503)", self.mux.active)
            self.mux.draining = True
            self.drain_deadline = time.monotonic() + self.drain_timeout
            return
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True
        self.interrupted = self.interrupted or sig == signal.SIGINT
        self.mux.draining = True
        self.mux.driver.abort_all("the server is shutting down")

    async def on_tick(self, counter: int) -> bool:
        if self.mux.draining and not self.should_exit:
            if self.mux.active == 0:
                logger.info("drained; stopping")
                self.should_exit = True
            elif time.monotonic() > self.drain_deadline and not self._aborted:
                logger.warning("drain timeout: aborting %d requests", self.mux.active)
                self.mux.driver.abort_all("the server is shutting down (drain timeout)")
                self._aborted = True
        return await super().on_tick(counter)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: ``muxserve serve CONFIG`` (``muxserve CONFIG`` works too);
    ``muxserve cluster ...`` runs the cluster commands (``muxserve.cluster``, which needs Ray)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "cluster":
        from muxserve.cluster.cli import main as cluster_main

        return cluster_main(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Until uvicorn installs its own handlers, SIGTERM stops what was started and exits.
    return run_instance_command(lambda: serve(args), (InputError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
