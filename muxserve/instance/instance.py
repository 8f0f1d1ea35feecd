"""One running MuxServe instance (one GPU mesh): FlexStore, two runtimes per LLM, the scheduler.

``Instance.start()`` brings every process up and waits until each is ready; ``submit()`` queues
a request; ``poll()`` dispatches jobs and applies results; ``stop()`` ends every process it
started. The offline launcher and the HTTP server both drive an Instance.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from pathlib import Path

import zmq

from muxserve.config import MuxServeConfig
from muxserve.engine.model_config import ModelSpec, end_token_ids
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.sequence import FinishReason, RequestLimits, check_request
from muxserve.flexstore import FlexStoreConfig, FlexStoreDied, FlexStoreProcess
from muxserve.flexstore.auth import SECRET_ENV, new_secret
from muxserve.flexstore.config import ModelEntry as StoreModel
from muxserve.instance.mps import mps_env
from muxserve.instance.options import InstanceOptions
from muxserve.instance.processes import Child, ChildDied, ProcessGroup
from muxserve.instance.supervisor import (
    Event,
    Failed,
    Lost,
    Restored,
    RuntimeGroup,
    RuntimeState,
    Supervisor,
)
from muxserve.ipc import runtime as M
from muxserve.ipc.process import describe_exit
from muxserve.ipc.rundir import create_run_dir
from muxserve.ipc.runtime import Phase
from muxserve.scheduler.policy import QuotaMode
from muxserve.scheduler.quota import QuotaManager, QuotaModel
from muxserve.scheduler.request import Request
from muxserve.scheduler.scheduler import LLMInfo, LLMUnavailable, MuxScheduler
from muxserve.scheduler.sm_units import units_for
from muxserve.scheduler.stats import BaseLatency

logger = logging.getLogger(__name__)

CALIBRATION_PROMPT_LENS = (16, 64, 256)
CALIBRATION_DECODE_STEPS = 8


class FlexStoreExited(ChildDied):
    """FlexStore died: it holds every LLM's weights and KV pool, so the instance cannot go on."""

    def __init__(self, pid: int, code: int, log: Path | None):
        super().__init__("flexstore", code, log)
        where = f"; its log: {log}" if log else ""
        self.args = (f"FlexStore (pid {pid}), which holds the weights and the KV pool of every LLM, "
                     f"{describe_exit(code)}; the instance cannot go on without it{where}",)


class _Link:
    """The PUSH sockets that carry one (LLM, phase) runtime's jobs: one per tensor-parallel rank,
    each rank getting every job. A send never blocks: a rank that is gone leaves ``undelivered`` set."""

    def __init__(self, sockets: list[zmq.Socket]):
        self.sockets = sockets
        self.undelivered = False

    def send(self, job: M.Job) -> None:
        self.send_nowait(job)

    def send_nowait(self, message) -> None:
        data = M.encode(message)
        for socket in self.sockets:
            try:
                socket.send(data, zmq.NOBLOCK)
            except zmq.Again:  # no connected peer: the process died (or never connected)
                self.undelivered = True


def _runtime_name(llm: str, phase: Phase, rank: int, tp: int) -> str:
    """A runtime process's name (logs, readiness): ``llm/phase``, plus ``/rankN`` under tensor parallelism."""
    return f"{llm}/{phase.value}" + (f"/rank{rank}" if tp > 1 else "")


class Instance:
    """FlexStore, the runtimes and the scheduler of one mesh, private to this process.

    Its sockets live in a private directory (mode 0700, ``run_dir``) and FlexStore accepts only
    clients that present ``secret``. A runtime that dies is restarted and its requests recomputed
    (``InstanceOptions.restart``); if it keeps dying only its LLM fails (``LLMUnavailable``). If
    FlexStore dies, ``poll`` raises ``FlexStoreExited`` at once.
    """

    def __init__(self, config: MuxServeConfig, options: InstanceOptions):
        self.config = config
        self.options = options
        self.run_dir = create_run_dir()
        self.secret = new_secret()  # reaches children through their environment, never their command line
        self.flexstore_address = options.flexstore_address or f"ipc://{self.run_dir}/flexstore"
        self.processes = ProcessGroup(options.log_dir)
        self.supervisor = Supervisor(self.processes, self._spawn, options.restart)
        self.flexstore: FlexStoreProcess | None = None
        self._ctx = zmq.Context()
        self._sockets: list[zmq.Socket] = []
        self.links: dict[tuple[str, Phase], _Link] = {}
        self.scheduler: MuxScheduler | None = None
        self._allocator = None
        self._ids = 0
        self._tp_groups = [(m.name, phase) for m in config.models for phase in Phase if m.tensor_parallel_size > 1]

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            logger.info("instance directory %s", self.run_dir)
            self._start_flexstore()
            self._results, self.links = self._bind_sockets()
            self._start_runtimes()
            self._wait_ready()
            self.scheduler = self._build_scheduler(self.links)
        except BaseException:
            self.stop()
            raise

    def _start_flexstore(self) -> None:
        o = self.options
        device = "cuda:0" if o.device == "cuda" else "cpu"
        models = tuple(StoreModel(m.name, m.model, m.torch_dtype_name, m.load_format,
                                  tensor_parallel_size=m.tensor_parallel_size, devices=tuple(m.devices))
                       for m in self.config.models)
        store_config = FlexStoreConfig(models=models, address=self.flexstore_address, device=device,
                                       kv_cache_bytes=self.config.kv_cache_bytes,
                                       gpu_memory_utilization=self.config.gpu_memory_utilization,
                                       page_bytes=o.page_bytes, shm_prefix=f"muxserve{os.getpid()}",
                                       num_devices=self.config.num_gpus)
        log = o.log_dir / "flexstore.log" if o.log_dir else None
        if o.log_dir:
            o.log_dir.mkdir(parents=True, exist_ok=True)
        logger.info("starting FlexStore at %s (%d LLMs on %s)", self.flexstore_address, len(models), device)
        # Under MPS every process touching the GPU, FlexStore included, is a client of the daemon.
        env = {**os.environ, **mps_env(o.mps_dir, 100)} if o.mps_dir else None
        self.flexstore = FlexStoreProcess(store_config, log_file=log, env=env, secret=self.secret)
        self.flexstore.start(o.ready_timeout_s)
        with self.flexstore.client() as client:
            self.store_info = client.info()
        for m in self.store_info.models:
            logger.info("FlexStore: %s holds at most %d tokens (%d pages of %d B in the pool)",
                        m.name, m.max_tokens, self.store_info.num_pages, self.store_info.page_bytes)

    def _bind_sockets(self):
        results = self._ctx.socket(zmq.PULL)
        results.bind(f"ipc://{self.run_dir}/results")
        self._sockets.append(results)
        links = {}
        for i, m in enumerate(self.config.models):
            for phase in Phase:
                sockets = []
                for rank in range(m.tensor_parallel_size):
                    sock = self._ctx.socket(zmq.PUSH)
                    sock.setsockopt(zmq.LINGER, 0)
                    sock.bind(self._jobs_address(i, phase, rank))
                    self._sockets.append(sock)
                    sockets.append(sock)
                links[(m.name, phase)] = _Link(sockets)
        return results, links

    def _jobs_address(self, index: int, phase: Phase, rank: int) -> str:
        return f"ipc://{self.run_dir}/{index}-{phase.value}" + (f"-{rank}" if rank else "")

    def _start_runtimes(self) -> None:
        for m in self.config.models:
            for phase in Phase:
                self.supervisor.add(m.name, phase, m.tensor_parallel_size)

    def _spawn(self, group: RuntimeGroup) -> list[Child]:
        """Start the processes of one (LLM, phase): one per tensor-parallel rank."""
        o = self.options
        index = self.config.model_names.index(group.llm)
        m = self.config.models[index]
        if group.phase is Phase.PREFILL:
            pct = max(10, m.prefill_percentage - o.policy.prefill_mps_reduction)
        else:
            pct = m.decode_percentage
        tp = m.tensor_parallel_size
        args = ["-m", "muxserve.flexserver", "--llm", m.name, "--phase", group.phase.value,
                "--flexstore", self.flexstore_address, "--results", f"ipc://{self.run_dir}/results",
                "--max-num-seqs", str(m.max_num_seqs or o.max_num_seqs or self.config.max_num_seqs)]
        if tp > 1:
            args += ["--tp-size", str(tp), "--dist-init-method", self._rendezvous(group)]
        if o.enforce_eager:
            args.append("--enforce-eager")
        env = {**mps_env(o.mps_dir, pct), SECRET_ENV: self.secret}
        return [self.processes.start(_runtime_name(m.name, group.phase, rank, tp),
                                     [*args, "--jobs", self._jobs_address(index, group.phase, rank),
                                      *(["--tp-rank", str(rank)] if tp > 1 else [])], env)
                for rank in range(tp)]

    def _rendezvous(self, group: RuntimeGroup) -> str:
        """Where the ranks of a tensor-parallel group meet: a fresh file per start, or an explicit port."""
        k = self._tp_groups.index(group.key)
        if self.options.dist_base_port is not None:
            return f"tcp://{self.options.dist_host}:{self.options.dist_base_port + k}"
        return f"file://{self.run_dir}/rendezvous-{k}-{group.starts}"

    def _wait_ready(self) -> None:
        """Until every runtime is ready; at start any death or failure is fatal (the config cannot run)."""
        total = len(self.processes.children)
        deadline = time.monotonic() + self.options.ready_timeout_s
        groups = self.supervisor.groups.values()
        while any(g.state is not RuntimeState.READY for g in groups):
            self._check_flexstore()
            self.processes.check()
            if time.monotonic() > deadline:
                waiting = sorted(g.name for g in groups if g.state is not RuntimeState.READY)
                raise TimeoutError(f"runtimes not ready after {self.options.ready_timeout_s} s: {waiting}")
            if self._results.poll(200):
                msg = M.decode_from_runtime(self._results.recv())
                if isinstance(msg, M.Failure):
                    raise RuntimeError(f"runtime {msg.runtime} failed at start: {msg.message}")
                if isinstance(msg, M.Ready):
                    self.supervisor.on_ready(msg)
        logger.info("all %d runtime processes ready", total)

    def _build_scheduler(self, links) -> MuxScheduler:
        o = self.options
        infos, quota_models = [], []
        layouts = {m.name: m for m in self.store_info.models}
        for m in self.config.models:
            folder = layouts[m.name].folder
            spec = ModelSpec.from_folder(folder)
            infos.append(LLMInfo(
                name=m.name, prefill_units=units_for(m.prefill_percentage), decode_units=units_for(m.decode_percentage),
                max_num_seqs=m.max_num_seqs or o.max_num_seqs or self.config.max_num_seqs,
                eos_ids=end_token_ids(folder, spec),
                max_model_len=spec.max_position_embeddings, vocab_size=spec.vocab_size,
            ))
            lay = layouts[m.name].layout
            quota_models.append(QuotaModel(m.name, o.rates.get(m.name, 1.0), lay.pages_per_block, lay.page_tokens))
        quota = None
        if o.policy.quota is not QuotaMode.NONE:
            quota = QuotaManager(quota_models, self.store_info.num_pages, o.avg_seq_len,
                                 by_rate=o.policy.quota is QuotaMode.ADAPTIVE)
            logger.info("initial quotas (sequences): %s", quota.all_max_num_seqs())
        self._allocator = self.flexstore.client()  # a FlexStore death ends its waits at once
        return MuxScheduler(infos, self._allocator, links, o.policy, o.max_num_batched_tokens,
                            self.config.overload_threshold, quota)

    # -- run --------------------------------------------------------------------------------
    def max_tokens(self, llm: str) -> int:
        return next(m.max_tokens for m in self.store_info.models if m.name == llm)

    def limits(self, llm: str) -> RequestLimits:
        """What a request of ``llm`` must fit: its context, its vocabulary, the KV pool."""
        info = self.scheduler.llms[llm].info
        return RequestLimits(info.max_model_len, info.vocab_size, self.max_tokens(llm))

    @property
    def failed_llms(self) -> dict[str, str]:
        """LLMs that failed (a runtime that could not be restarted) and why."""
        return dict(self.scheduler.failed) if self.scheduler is not None else {}

    def submit(self, llm: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float,
               idx: int | None = None) -> Request:
        """Queue a request (``arrival`` on the time.monotonic clock).

        Raises ValueError for a request the LLM cannot hold and LLMUnavailable for an LLM that failed.
        """
        if llm in self.scheduler.failed:
            raise LLMUnavailable(self.scheduler.failed[llm])
        check_request(prompt_token_ids, params, self.limits(llm), llm)
        self._ids += 1
        req = Request(str(self._ids), list(prompt_token_ids), params, idx=self._ids if idx is None else idx,
                      llm=llm, arrival=arrival)
        self.scheduler.add(req)
        return req

    def abort(self, req_id: str) -> bool:
        """Drop an unfinished request (see ``MuxScheduler.abort``); False if there is none with that id."""
        return self.scheduler.abort(req_id)

    def poll(self, timeout_s: float, wake_fd: int | None = None) -> list[Request]:
        """Schedule, then wait up to ``timeout_s`` for results; returns requests that finished.

        ``wake_fd`` (optional, readable file descriptor) ends the wait early when it becomes
        readable; the caller drains it. The HTTP server uses it to hand over new requests at once.
        Dead runtimes are restarted here; a dead FlexStore raises FlexStoreExited.
        """
        try:
            return self._poll(timeout_s, wake_fd)
        except FlexStoreDied:  # noticed inside a call to FlexStore: say which process and how
            self._check_flexstore()
            raise

    def _poll(self, timeout_s: float, wake_fd: int | None) -> list[Request]:
        self._check_flexstore()
        self._supervise()
        finished = []
        restart_in = self.supervisor.next_restart_in()
        wait_s = timeout_s if restart_in is None else min(timeout_s, restart_in)
        if self._wait_results(max(0, int(wait_s * 1000)), wake_fd):
            while True:
                finished.extend(self._on_message(M.decode_from_runtime(self._results.recv())))
                if not self._results.poll(0):
                    break
            self._supervise()
        return finished

    def _supervise(self) -> None:
        """Handle dead runtimes and unreachable ones, then dispatch what may run."""
        self._apply(self.supervisor.check())
        self.scheduler.schedule()
        for key, link in self.links.items():
            if link.undelivered:  # sent to a runtime with no connected process
                link.undelivered = False
                group = self.supervisor.groups[key]
                if group.state is RuntimeState.READY:
                    self._apply([self.supervisor.lose(group, f"{group.name} did not take its job (not connected)")])
                    self.scheduler.schedule()

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            llm, phase = event.group.key
            if isinstance(event, Lost):
                requeued = self.scheduler.runtime_lost(llm, phase)
                logger.warning("%d requests of %s will be recomputed once %s is back", len(requeued), llm,
                               event.group.name)
            elif isinstance(event, Restored):
                self.scheduler.runtime_ready(llm, phase)
            elif isinstance(event, Failed):
                self.supervisor.retire(llm)
                failed = self.scheduler.fail_llm(llm, event.message)
                logger.error("%s; %d of its requests failed, the other LLMs go on", event.message, len(failed))

    def _on_message(self, msg: M.JobResult | M.Ready | M.Failure) -> list[Request]:
        if isinstance(msg, M.JobResult):
            return self.scheduler.on_result(msg)
        if isinstance(msg, M.Ready):
            event = self.supervisor.on_ready(msg)
            if event is not None:
                self._apply([event])
        else:
            self.supervisor.on_failure(msg)
        return []

    def _wait_results(self, timeout_ms: int, wake_fd: int | None) -> bool:
        if wake_fd is None:
            return bool(self._results.poll(timeout_ms))
        poller = zmq.Poller()
        poller.register(self._results, zmq.POLLIN)
        poller.register(wake_fd, zmq.POLLIN)
        return self._results in dict(poller.poll(timeout_ms))

    def calibrate(self) -> dict[str, BaseLatency]:
        """Measure each LLM alone at batch 1: prefill at a few prompt lengths, then decode steps.

        A first, unmeasured request per LLM warms its runtimes up (kernel selection, allocator).
        """
        bases = {}
        rng = random.Random(0)
        for m in self.config.models:
            info = self.scheduler.llms[m.name].info
            room = min(info.max_model_len, self.max_tokens(m.name)) - CALIBRATION_DECODE_STEPS
            lengths = [n for n in CALIBRATION_PROMPT_LENS if n < room]
            points, decode = [], []
            for i, n in enumerate([lengths[0], *lengths]):
                req = self.submit(m.name, [rng.randrange(info.vocab_size) for _ in range(n)],
                                  SamplingParams(max_tokens=CALIBRATION_DECODE_STEPS, temperature=0, ignore_eos=True),
                                  time.monotonic())
                self.wait_for(req)
                if i > 0:  # the first one was the warm-up
                    points.append((n, req.prefill_end - req.submit))
                    decode.append((req.end - req.prefill_end) / (CALIBRATION_DECODE_STEPS - 1))
            bases[m.name] = BaseLatency(tuple(points), sum(decode) / len(decode))
            logger.info("%s alone: prefill %s, decode step %.1f ms", m.name,
                        ", ".join(f"{n} tok {s * 1e3:.1f} ms" for n, s in points), bases[m.name].decode_step * 1e3)
        return bases

    def wait_for(self, req: Request) -> None:
        """Poll until ``req`` ends; LLMUnavailable if its LLM failed meanwhile."""
        while req.end is None:
            self.poll(0.05)
        if req.finish_reason is FinishReason.ERROR:
            raise LLMUnavailable(req.error)

    def _check_flexstore(self) -> None:
        proc = self.flexstore.proc if self.flexstore is not None else None
        if proc is not None and proc.poll() is not None:
            raise FlexStoreExited(proc.pid, proc.returncode, self.flexstore.log_file)

    # -- stop -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process this instance started and release its sockets and files."""
        for link in self.links.values():
            link.send_nowait(M.Shutdown())
        self.processes.stop_all()
        if self._allocator is not None:
            self._allocator.close()
            self._allocator = None
        if self.flexstore is not None:
            try:
                self.flexstore.stop()
            except Exception:  # noqa: BLE001 - keep stopping the rest
                logger.exception("stopping FlexStore failed")
            self.flexstore = None
        for sock in self._sockets:
            sock.close(linger=0)
        self._sockets.clear()
        self.links = {}
        if not self._ctx.closed:
            self._ctx.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)
