"""One running MuxServe instance (one GPU mesh): FlexStore, two runtimes per LLM, the scheduler.

The Instance is the only door to its scheduler. ``start()`` brings every process up and waits
until each is ready; ``submit()`` queues a request (with optional token and error callbacks);
``poll()`` dispatches jobs and applies results; ``run_until_done()`` polls until every request has
ended; ``load()`` and ``metrics()`` are snapshots for the HTTP server and the launcher; ``stop()``
ends every process it started. The offline launcher and the HTTP server both drive an Instance.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from muxserve.config import MuxServeConfig
from muxserve.engine.model_config import ModelSpec, end_token_ids
from muxserve.engine.sampling_params import SamplingParams
from muxserve.engine.sequence import FinishReason, RequestLimits, check_request
from muxserve.flexstore import FlexStoreConfig, FlexStoreDied, FlexStoreProcess
from muxserve.flexstore.auth import new_secret
from muxserve.flexstore.config import ModelEntry
from muxserve.instance import calibrate
from muxserve.instance.budget import check_memory_budget
from muxserve.instance.mps import mps_env
from muxserve.instance.options import InstanceOptions
from muxserve.instance.processes import ChildDied, ProcessGroup
from muxserve.instance.residency import IdleTimeout, ResidencyControl, ResidencyEvent, kv_pages
from muxserve.instance.runtimes import Runtimes, max_num_seqs
from muxserve.instance.supervisor import Event, Failed, Lost, Restored, RuntimeState, Supervisor
from muxserve.ipc import runtime as M
from muxserve.ipc.process import describe_exit
from muxserve.ipc.rundir import create_run_dir
from muxserve.ipc.runtime import Phase
from muxserve.scheduler.policy import QuotaMode
from muxserve.scheduler.quota import QuotaManager, QuotaModel, units_for
from muxserve.scheduler.recovery import LLMUnavailable
from muxserve.scheduler.scheduler import ErrorCallback, LLMInfo, MuxScheduler, TokenCallback
from muxserve.scheduler.state import Request
from muxserve.scheduler.stats import BaseLatency

logger = logging.getLogger(__name__)

POLL_S = 0.05  # run_until_done's longest wait for results


class FlexStoreExited(ChildDied):
    """FlexStore died: it holds every LLM's weights and KV pool, so the instance cannot go on."""

    def __init__(self, pid: int, code: int, log: Path | None):
        super().__init__("flexstore", code, log)
        where = f"; its log: {log}" if log else ""
        self.args = (f"FlexStore (pid {pid}), which holds the weights and the KV pool of every LLM, "
                     f"{describe_exit(code)}; the instance cannot go on without it{where}",)


@dataclass(frozen=True)
class LLMLoad:
    running: int  # prefilled, or inside a job
    waiting: int
    used_pages: int  # of the shared pool
    preemptions: int  # since start
    state: str = "resident"  # elastic residency: resident or offloaded (FlexStore's word)


@dataclass(frozen=True)
class InstanceLoad:
    """What the server's load gauges show: per LLM, and the shared pool."""

    llms: dict[str, LLMLoad]
    free_pages: int
    total_pages: int


@dataclass(frozen=True)
class InstanceMetrics:
    """What the launcher reports after a run."""

    preemptions: int  # requests the scheduler preempted (wakes' preemptions included)
    decode_waits: dict[str, dict[str, float]]  # per LLM: decode_jobs, decode_wait_ms_mean
    # per elastic LLM: offloads, wakes and their durations; every offload and wake
    residency: dict[str, dict[str, float]] = field(default_factory=dict)
    residency_events: tuple[ResidencyEvent, ...] = ()


@dataclass(frozen=True)
class _Listener:
    on_token: TokenCallback | None
    on_error: ErrorCallback | None


class Instance:
    """FlexStore, the runtimes and the scheduler of one mesh, private to this process.

    Its sockets live in a private directory (mode 0700, ``run_dir``) and FlexStore accepts only
    clients that present ``secret``. A runtime that dies is restarted and its requests recomputed
    (``InstanceOptions.restart``); if it keeps dying only its LLM fails (``LLMUnavailable``). If
    FlexStore dies, ``poll`` raises ``FlexStoreExited`` at once.
    """

    def __init__(self, config: MuxServeConfig, options: InstanceOptions, processes: ProcessGroup | None = None):
        """``processes``: where child processes start (default: a ProcessGroup logging to ``options.log_dir``)."""
        self.config = config
        self.options = options
        self.run_dir = create_run_dir()
        self.secret = new_secret()  # reaches children through their environment, never their command line
        self.flexstore_address = options.flexstore_address or f"ipc://{self.run_dir}/flexstore"
        self.processes = processes or ProcessGroup(options.log_dir)
        self.runtimes = Runtimes(config, options, self.run_dir, self.flexstore_address, self.secret, self.processes)
        self.supervisor = Supervisor(self.processes, self.runtimes.spawn, options.restart)
        self.flexstore: FlexStoreProcess | None = None
        self._scheduler: MuxScheduler | None = None
        self.residency: ResidencyControl | None = None  # with an elastic LLM
        self._allocator = None
        self._listeners: dict[str, _Listener] = {}
        self._ids = 0

    # -- start ------------------------------------------------------------------------------
    def start(self) -> None:
        try:
            logger.info("instance directory %s", self.run_dir)
            self._start_flexstore()
            self.runtimes.bind()
            self._start_runtimes()
            self._wait_ready()
            self._scheduler = self._build_scheduler()
        except BaseException:
            self.stop()
            raise

    def _start_flexstore(self) -> None:
        o = self.options
        check_memory_budget(self.config, o.page_bytes, o.granule_bytes)
        device = "cuda:0" if o.device == "cuda" else "cpu"
        models = tuple(ModelEntry(m.name, m.model, m.torch_dtype_name, m.load_format,
                                  tensor_parallel_size=m.tensor_parallel_size, devices=tuple(m.devices),
                                  residency=m.residency)
                       for m in self.config.models)
        store_config = FlexStoreConfig(models=models, address=self.flexstore_address, device=device,
                                       kv_cache_bytes=self.config.kv_cache_bytes,
                                       gpu_memory_utilization=self.config.gpu_memory_utilization,
                                       page_bytes=o.page_bytes, shm_prefix=f"muxserve{os.getpid()}",
                                       num_devices=self.config.num_gpus, granule_bytes=o.granule_bytes,
                                       reserve_granules=o.reserve_granules,
                                       memory_budget_bytes=self.config.memory_budget_bytes)
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

    def _start_runtimes(self) -> None:
        for m in self.config.models:
            for phase in Phase:
                self.supervisor.add(m.name, phase, m.tensor_parallel_size)

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
            if self.runtimes.results.wait(200):
                msg = self.runtimes.results.receive()
                if isinstance(msg, M.Failure):
                    raise RuntimeError(f"runtime {msg.runtime} failed at start: {msg.message}")
                if isinstance(msg, M.Ready):
                    self.supervisor.on_ready(msg)
        logger.info("all %d runtime processes ready", total)

    def _build_scheduler(self) -> MuxScheduler:
        o = self.options
        infos, quota_models = [], []
        layouts = {m.name: m for m in self.store_info.models}
        for m in self.config.models:
            folder = layouts[m.name].folder
            spec = ModelSpec.from_folder(folder)
            infos.append(LLMInfo(
                name=m.name, prefill_units=units_for(m.prefill_percentage), decode_units=units_for(m.decode_percentage),
                max_num_seqs=max_num_seqs(self.config, o, m), eos_ids=end_token_ids(folder, spec),
                max_model_len=spec.max_position_embeddings, vocab_size=spec.vocab_size,
                architecture=spec.architecture,
            ))
            lay = layouts[m.name].layout
            quota_models.append(QuotaModel(m.name, o.rates.get(m.name, 1.0), lay.pages_per_block, lay.page_tokens))
        quota = None
        if o.policy.quota is not QuotaMode.NONE:
            with self.flexstore.client() as client:
                pages = kv_pages(client.stats(), self.store_info.page_bytes)
            quota = QuotaManager(quota_models, pages, o.avg_seq_len,
                                 by_rate=o.policy.quota is QuotaMode.ADAPTIVE)
            logger.info("initial quotas (sequences): %s", quota.all_max_num_seqs())
        self._allocator = self.flexstore.client()  # a FlexStore death ends its waits at once
        scheduler = MuxScheduler(infos, self._allocator, self.runtimes.links, o.policy, o.max_num_batched_tokens,
                                 self.config.overload_threshold, quota, on_token=self._token, on_error=self._error)
        elastic = [m.name for m in self.config.models if m.residency == "elastic"]
        if elastic:
            policy = None if o.offload_idle_s is None else IdleTimeout(o.offload_idle_s, o.min_resident_s)
            # Elastic LLMs that did not fit the memory budget at start begin offloaded; a wake short of
            # room offloads idle ones, least recently used first (ResidencyControl.make_room).
            offloaded = [m.name for m in self.store_info.models if m.residency == "elastic" and m.state == "offloaded"]
            for llm in offloaded:
                scheduler.set_offloaded(llm)
            granule = o.granule_bytes
            weight_granules = {m.name: -(-m.weight_bytes // granule) for m in self.store_info.models}
            # A wake leaves room for one token block of the widest LLM: the resident LLMs can go on.
            headroom = max(-(-m.layout.pages_per_block * m.layout.page_bytes // granule)
                           for m in self.store_info.models)
            self.residency = ResidencyControl(elastic, scheduler, self._allocator, self.runtimes.links, policy,
                                              offloaded=offloaded, weight_granules=weight_granules,
                                              min_resident_s=o.min_resident_s, kv_headroom=headroom)
            if offloaded:
                logger.info("elastic LLMs offloaded at start (beyond the memory budget): %s", offloaded)
        return scheduler

    # -- requests ---------------------------------------------------------------------------
    def max_tokens(self, llm: str) -> int:
        """Tokens one request of ``llm`` can hold with the whole KV pool."""
        return next(m.max_tokens for m in self.store_info.models if m.name == llm)

    def llm_info(self, llm: str) -> LLMInfo:
        """What the scheduler knows of ``llm`` (its EOS ids, context, architecture, ...)."""
        return self._scheduler.info(llm)

    def limits(self, llm: str) -> RequestLimits:
        """What a request of ``llm`` must fit: its context, its vocabulary, the KV pool."""
        info = self._scheduler.info(llm)
        return RequestLimits(info.max_model_len, info.vocab_size, self.max_tokens(llm))

    @property
    def failed_llms(self) -> dict[str, str]:
        """LLMs that failed (a runtime that could not be restarted) and why."""
        return dict(self._scheduler.failed) if self._scheduler is not None else {}

    def submit(self, llm: str, prompt_token_ids: list[int], params: SamplingParams, arrival: float,
               idx: int | None = None, on_token: TokenCallback | None = None,
               on_error: ErrorCallback | None = None) -> Request:
        """Queue a request (``arrival`` on the time.monotonic clock).

        ``on_token(request, token)`` is called for every token after the request took it
        (``finish_reason`` and ``end`` are set on the last); ``on_error(request)`` if its LLM fails
        first. An aborted request gets no more calls. Raises ValueError for a request the LLM can
        never run (``check_request``) and LLMUnavailable for an LLM that failed.
        """
        if llm in self._scheduler.failed:
            raise LLMUnavailable(self._scheduler.failed[llm])
        check_request(prompt_token_ids, params, self.limits(llm), llm)
        self._ids += 1
        req = Request(str(self._ids), list(prompt_token_ids), params, idx=self._ids if idx is None else idx,
                      llm=llm, arrival=arrival)
        self._scheduler.add(req)
        if on_token is not None or on_error is not None:
            self._listeners[req.req_id] = _Listener(on_token, on_error)
        return req

    def abort(self, req_id: str) -> bool:
        """Drop an unfinished request (see ``MuxScheduler.abort``); False if there is none with that id."""
        self._listeners.pop(req_id, None)
        return self._scheduler.abort(req_id)

    def has_work(self) -> bool:
        """Whether a request is waiting, between steps or inside a job."""
        return self._scheduler.has_work()

    def _token(self, req: Request, token: int) -> None:
        listener = self._listeners.get(req.req_id)
        if listener is None:
            return
        if req.finish_reason is not None:
            del self._listeners[req.req_id]
        if listener.on_token is not None:
            listener.on_token(req, token)

    def _error(self, req: Request) -> None:
        listener = self._listeners.pop(req.req_id, None)
        if listener is not None and listener.on_error is not None:
            listener.on_error(req)

    def offload(self, llm: str) -> ResidencyEvent:
        """Offload an idle elastic LLM now (its weights to the host copy, its device memory to KV)."""
        return self._residency().offload(llm)

    def wake(self, llm: str) -> ResidencyEvent:
        """Wake an offloaded elastic LLM now, offloading idle ones least recently used first when the
        budget is short (``residency.WakeDeferred`` when the room is held by requests). A request of an
        offloaded LLM wakes it anyway."""
        return self._residency().wake_making_room(llm)

    def _residency(self) -> ResidencyControl:
        if self.residency is None:
            raise ValueError("no LLM of this instance is elastic (residency: elastic in the config)")
        return self.residency

    # -- running ----------------------------------------------------------------------------
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

    def run_until_done(self, due: Callable[[], float | None] | None = None,
                       on_finished: Callable[[list[Request]], None] | None = None) -> None:
        """Poll until every request has ended and ``due`` has nothing more to do.

        ``due()`` (optional) runs before each poll: it may submit or abort requests and returns the
        seconds until it has more to do, or None once it never will. ``on_finished`` gets what
        each poll finished.
        """
        while True:
            wait = due() if due is not None else None
            if wait is None and not self.has_work():
                return
            finished = self.poll(POLL_S if wait is None else max(0.0, min(POLL_S, wait)))
            if on_finished is not None:
                on_finished(finished)

    @staticmethod
    def raise_if_failed(requests: list[Request]) -> None:
        """LLMUnavailable for the first of ``requests`` whose LLM failed."""
        for req in requests:
            if req.finish_reason is FinishReason.ERROR:
                raise LLMUnavailable(req.error)

    def calibrate(self) -> dict[str, BaseLatency]:
        """Each LLM's speed alone (``calibrate.measure_alone``)."""
        return calibrate.measure_alone(self)

    def _poll(self, timeout_s: float, wake_fd: int | None) -> list[Request]:
        self._check_flexstore()
        self._supervise()
        finished = []
        restart_in = self.supervisor.next_restart_in()
        wait_s = timeout_s if restart_in is None else min(timeout_s, restart_in)
        results = self.runtimes.results
        if results.wait(max(0, int(wait_s * 1000)), wake_fd):
            while True:
                finished.extend(self._on_message(results.receive()))
                if not results.wait(0):
                    break
            self._supervise()
        return finished

    def _supervise(self) -> None:
        """Handle dead runtimes and unreachable ones, then dispatch what may run."""
        self._apply(self.supervisor.check())
        if self.residency is not None:
            self.residency.tick()
        self._scheduler.schedule()
        for key, link in self.runtimes.links.items():
            if link.undelivered:  # sent to a runtime with no connected process
                link.undelivered = False
                group = self.supervisor.groups[key]
                if group.state is RuntimeState.READY:
                    self._apply([self.supervisor.lose(group, f"{group.name} did not take its job (not connected)")])
                    self._scheduler.schedule()

    def _apply(self, events: list[Event]) -> None:
        for event in events:
            llm, phase = event.group.key
            if isinstance(event, Lost):
                requeued = self._scheduler.runtime_lost(llm, phase)
                logger.warning("%d requests of %s will be recomputed once %s is back", len(requeued), llm,
                               event.group.name)
            elif isinstance(event, Restored):
                self._scheduler.runtime_ready(llm, phase)
            elif isinstance(event, Failed):
                self.supervisor.retire(llm)
                failed = self._scheduler.fail_llm(llm, event.message)
                logger.error("%s; %d of its requests failed, the other LLMs go on", event.message, len(failed))

    def _on_message(self, msg: M.JobResult | M.Ready | M.Failure) -> list[Request]:
        if isinstance(msg, M.JobResult):
            return self._scheduler.on_result(msg)
        if isinstance(msg, M.Ready):
            event = self.supervisor.on_ready(msg)
            if event is not None:
                self._apply([event])
        elif isinstance(msg, M.Synced):
            if self.residency is not None:
                self.residency.on_synced(msg)
        else:
            self.supervisor.on_failure(msg)
        return []

    def _check_flexstore(self) -> None:
        proc = self.flexstore.proc if self.flexstore is not None else None
        if proc is not None and proc.poll() is not None:
            raise FlexStoreExited(proc.pid, proc.returncode, self.flexstore.log_file)

    # -- snapshots --------------------------------------------------------------------------
    def load(self) -> InstanceLoad:
        """Requests and pages of every LLM now (asks FlexStore for its page counts)."""
        stats = self._allocator.stats()
        pages = {m.name: m for m in stats.models}
        llms = {}
        for name, (running, waiting) in self._scheduler.queue_lengths().items():
            m = pages.get(name)
            llms[name] = LLMLoad(running, waiting, m.pages if m else 0, m.preemptions if m else 0,
                                 m.state if m else "resident")
        return InstanceLoad(llms, stats.num_free, stats.num_pages)

    def metrics(self) -> InstanceMetrics:
        """The scheduler's figures of the run so far: preemptions and each LLM's decode wait."""
        r = self.residency
        return InstanceMetrics(self._scheduler.num_preemptions, self._scheduler.decode_waits(),
                               r.summary() if r else {}, tuple(r.events) if r else ())

    # -- stop -------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every process this instance started and release its sockets and files."""
        self.runtimes.shutdown()
        self.processes.stop_all()
        if self._allocator is not None:
            self._allocator.close()
            self._allocator = None
        if self.flexstore is not None:
            try:
                self.flexstore.stop()
            except Exception:
                logger.exception("stopping FlexStore failed")
            self.flexstore = None
        self.runtimes.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
