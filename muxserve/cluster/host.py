"""Node side of the cluster: a Ray actor that runs one mesh's ``muxserve serve`` on the GPUs Ray
gave it, watches it and restarts it when it dies; and a Ray task that runs one mesh's
``muxserve.launch`` replay and returns its statistics.

Both are plain Python here (the driver wraps them with ``ray.remote``); the instance is a child
process talked to through its command line and HTTP only. Its processes start from one long-lived
supervisor thread, so that the kernel kills them if the actor's process dies (see ``guard``).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from muxserve.cluster.mps import start_mps, stop_mps
from muxserve.cluster.process import free_port, kill_group, log_tail, start_guarded, stop_group

logger = logging.getLogger("muxserve.cluster")

# Flags the cluster sets on every instance itself (the others pass through from the command line).
# FlexStore and the tensor-parallel groups of an instance are private to it (ipc:// sockets and
# file rendezvous in its own folder), so instances of one machine need no ports but their HTTP one;
# explicit --flexstore-port / --server-port are refused as they would only add collisions.
PASSED_ENV = ("OMP_NUM_THREADS",)
HEALTH_PERIOD_S, HEALTH_FAILURES = 10.0, 6  # a ready instance that stops answering for a minute is restarted
RESERVED_FLAGS = ("--host", "--port", "--flexstore-port", "--server-port", "--log-dir", "--mps-dir",
                  "--drain-timeout", "--stats-file", "--workload-file")


@dataclass
class HostSpec:
    """What a node needs to run one mesh (pickled by Ray to the node)."""

    mesh: str
    config_text: str  # the mesh's model_config (see spec.portable_config)
    flags: list[str]  # more flags of muxserve serve / muxserve.launch
    log_dir: str  # on the node: <log_dir>/<mesh>/
    cwd: str  # where the command ran; used on the node when it exists there
    api_key: str | None = None  # the instance's key (MUXSERVE_API_KEY); the front door presents it
    mps: bool = False  # an MPS daemon of its own for this mesh
    max_restarts: int = 3  # restarts allowed within restart_window_s before the mesh counts as failed
    restart_window_s: float = 600.0
    ready_timeout_s: float = 1200.0
    drain_timeout_s: float = 30.0
    env: dict[str, str] = field(default_factory=dict)


def _node() -> tuple[str, str, list[str]]:
    """(IP, Ray node id, GPU ids) of the node this actor or task runs on."""
    import ray

    gpus = [str(g) for g in ray.get_gpu_ids()]
    return ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(), gpus


def _log_folder(spec: HostSpec, run_dir: Path) -> Path:
    folder = Path(spec.log_dir) / spec.mesh
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:  # that path does not exist on this node: keep the logs with the run
        folder = run_dir / "logs"
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def driver_env() -> dict[str, str]:
    """What of the driver's environment the instances get (the rest is the node's)."""
    return {k: os.environ[k] for k in PASSED_ENV if k in os.environ}


def _env(spec: HostSpec) -> dict[str, str]:
    env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
    if "OMP_NUM_THREADS" not in spec.env:  # Ray sets 1 in its workers; an instance picks its own, as run by hand
        env.pop("OMP_NUM_THREADS", None)
    if spec.api_key:
        env["MUXSERVE_API_KEY"] = spec.api_key
    return env


def _last_line(log: Path) -> str:
    """The instance's last words (its ``error: ...`` line when it failed), and where the rest is."""
    tail = log_tail(log, 1).strip()
    return f"{tail} (log: {log})" if tail else f"see {log}"


def health(url: str, api_key: str | None, timeout_s: float = 2.0) -> bool:
    request = urllib.request.Request(url + "/health")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class InstanceHost:
    """One mesh's instance on this node: started at construction, restarted when it dies."""

    def __init__(self, spec: HostSpec):
        self.spec = spec
        self.node_ip, self.node_id, self.gpus = _node()
        self.run_dir = self._fresh_run_dir()
        self.logs = _log_folder(spec, self.run_dir)
        self.config = self.run_dir / f"{spec.mesh}.yaml"
        self.config.write_text(spec.config_text)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._graceful = True
        self._proc = None
        self._deaths: list[float] = []
        self._status = {"mesh": spec.mesh, "state": "starting", "url": None, "host_pid": os.getpid(),
                        "node_ip": self.node_ip, "node_id": self.node_id, "gpus": self.gpus, "pid": None,
                        "restarts": 0, "error": None, "start_s": None, "since": time.time(),
                        "log": str(self.logs / "server.log")}
        self._thread = threading.Thread(target=self._supervise, name=f"{spec.mesh}-supervisor", daemon=True)
        self._thread.start()

    def _fresh_run_dir(self) -> Path:
        """The actor's folder (config, MPS pipes): named after the actor, which keeps its id when
        Ray restarts it, so a restarted actor clears what its killed process left."""
        import ray

        path = Path(tempfile.gettempdir()) / f"muxserve-{self.spec.mesh}-{ray.get_runtime_context().get_actor_id()}"
        if path.exists():
            if self.spec.mps:
                stop_mps(path / "mps")
            shutil.rmtree(path, ignore_errors=True)
        path.mkdir(mode=0o700, parents=True)
        return path

    # -- the actor's methods ----------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def stop(self, graceful: bool = True) -> dict:
        """Stop the instance: SIGTERM drains its running requests (up to the drain timeout), a
        forced stop sends SIGINT; whatever is left of its process group is then ended. The
        supervisor thread does it: the kernel ties the instance's life to that thread."""
        with self._lock:
            self._graceful = graceful
            self._stopping.set()
            self._status.update(state="stopping")
        self._thread.join(self.spec.drain_timeout_s + 60)
        if self._proc is not None and self._proc.poll() is None:  # the thread is stuck: end it from here
            kill_group(self._proc)
        if self.spec.mps:
            stop_mps(self.run_dir / "mps")
        shutil.rmtree(self.run_dir, ignore_errors=True)
        with self._lock:
            self._status.update(state="stopped", url=None, pid=None)
            return dict(self._status)

    # -- supervision ------------------------------------------------------------------------
    def _set(self, **changes) -> None:
        with self._lock:
            if "state" in changes and changes["state"] != self._status["state"]:
                changes["since"] = time.time()
            self._status.update(changes)

    def _supervise(self) -> None:
        try:
            if self.spec.mps:
                start_mps(self.run_dir / "mps")
            first = True
            while not self._stopping.is_set():
                error = self._run_once()
                if self._stopping.is_set():
                    return
                if first and self._status["state"] != "ready":
                    self._set(state="failed", error=error)  # a first start that fails is not retried
                    return
                first = False
                now = time.monotonic()
                self._deaths = [t for t in self._deaths if now - t < self.spec.restart_window_s] + [now]
                if len(self._deaths) > self.spec.max_restarts:
                    self._set(state="failed", url=None, pid=None,
                              error=f"{error}; it died {len(self._deaths)} times within "
                                    f"{self.spec.restart_window_s:.0f} s (--max-restarts {self.spec.max_restarts})")
                    return
                self._set(state="restarting", url=None, pid=None, error=error,
                          restarts=self._status["restarts"] + 1)
        except Exception as e:
            self._set(state="failed", url=None, pid=None, error=f"{type(e).__name__}: {e}")
        finally:
            if self._proc is not None:
                self._end(self._proc, self._graceful)

    def _end(self, proc, graceful: bool) -> None:
        """Stop the instance from this thread (see stop)."""
        if graceful:
            stop_group(proc, signal.SIGTERM, self.spec.drain_timeout_s + 15)
        else:
            stop_group(proc, signal.SIGINT, 15)

    def _run_once(self) -> str:
        """Start the instance, wait until /health answers 200, then watch it until it ends.

        Returns what ended it (for the status); the state says whether it got ready."""
        started = self._launch()
        if started is None:
            return "stopped"
        proc, url, log = started
        error = self._wait_ready(proc, url, log)
        if error is None:
            error = self._watch(proc, url, log)
        if self._stopping.is_set():
            return "stopped"  # _supervise's finally ends it, from this thread
        if error is None:
            kill_group(proc)  # anything of the instance that outlived it
            error = f"exited with code {proc.returncode}: {_last_line(log)}"
        return error

    def _launch(self):
        """(process, URL, log) of a new start, or None when stopping."""
        s = self.spec
        port = free_port(self.node_ip)
        args = [sys.executable, "-m", "muxserve.serve", str(self.config), "--host", self.node_ip,
                "--port", str(port), "--log-dir", str(self.logs / "procs"),
                "--drain-timeout", str(s.drain_timeout_s), *s.flags]
        if s.mps:
            args += ["--mps-dir", str(self.run_dir / "mps")]
        log = self.logs / "server.log"
        with open(log, "a") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {s.mesh} on {self.node_ip} GPUs "
                      f"{','.join(self.gpus) or '-'}: {shlex.join(args)}\n")
        cwd = s.cwd if Path(s.cwd).is_dir() else str(self.run_dir)
        with self._lock:
            if self._stopping.is_set():
                return None
            proc = self._proc = start_guarded(args, log, _env(s), cwd)
            self._status.update(pid=proc.pid)
        return proc, f"http://{self.node_ip}:{port}", log

    def _wait_ready(self, proc, url: str, log: Path) -> str | None:
        """None once /health answers 200 (or the process ended: the caller looks); else the error."""
        start = time.monotonic()
        while proc.poll() is None and not self._stopping.is_set():
            if health(url, self.spec.api_key):
                self._set(state="ready", url=url, error=None, start_s=round(time.monotonic() - start, 2))
                return None
            if time.monotonic() - start > self.spec.ready_timeout_s:
                self._end(proc, graceful=False)
                return f"not ready after {self.spec.ready_timeout_s:.0f} s; last lines of {log}:\n{log_tail(log)}"
            time.sleep(0.25)
        return None

    def _watch(self, proc, url: str, log: Path) -> str | None:
        """Until the process ends (None) or stops answering /health for a minute (the error):
        alive but hung counts as dead."""
        failures, next_check = 0, time.monotonic() + HEALTH_PERIOD_S
        while proc.poll() is None and not self._stopping.is_set():
            if time.monotonic() >= next_check:
                next_check += HEALTH_PERIOD_S
                failures = 0 if health(url, self.spec.api_key, timeout_s=5.0) else failures + 1
                if failures >= HEALTH_FAILURES:
                    self._end(proc, graceful=False)
                    return (f"did not answer /health for {failures} checks {HEALTH_PERIOD_S:.0f} s apart; "
                            f"stopped it (log: {log})")
            time.sleep(0.2)
        return None


# -- offline replay -------------------------------------------------------------------------------
@dataclass
class ReplaySpec:
    host: HostSpec
    workload: bytes  # the mesh's requests, in the workload file format


def replay_mesh(spec: ReplaySpec) -> dict:
    """Run ``python -m muxserve.launch`` on this mesh's share of the workload; return its
    statistics file (bytes, or None when it failed), exit code and log tail."""
    s = spec.host
    node_ip, node_id, gpus = _node()
    run_dir = Path(tempfile.mkdtemp(prefix=f"muxserve-{s.mesh}-"))
    logs = _log_folder(s, run_dir)
    proc = None
    try:
        (run_dir / "config.yaml").write_text(s.config_text)
        (run_dir / "workload.json").write_bytes(spec.workload)
        args = [sys.executable, "-m", "muxserve.launch", str(run_dir / "config.yaml"),
                "--workload-file", str(run_dir / "workload.json"), "--stats-file", str(run_dir / "stats.json"),
                "--log-dir", str(logs / "procs"), *s.flags]
        if s.mps:
            start_mps(run_dir / "mps")
            args += ["--mps-dir", str(run_dir / "mps")]
        log = logs / "launch.log"
        with open(log, "a") as out:
            out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {s.mesh} on {node_ip} GPUs "
                      f"{','.join(gpus) or '-'}: {shlex.join(args)}\n")
        start = time.monotonic()
        proc = start_guarded(args, log, _env(s), s.cwd if Path(s.cwd).is_dir() else str(run_dir))
        code = proc.wait()
        stats = run_dir / "stats.json"
        return {"mesh": s.mesh, "returncode": code, "node_ip": node_ip, "node_id": node_id, "gpus": gpus,
                "wall_s": round(time.monotonic() - start, 2), "log": str(log), "tail": log_tail(log, 30),
                "stats": stats.read_bytes() if code == 0 and stats.is_file() else None}
    finally:
        if proc is not None:
            stop_group(proc, signal.SIGINT, 15)
        if s.mps:
            stop_mps(run_dir / "mps")
        shutil.rmtree(run_dir, ignore_errors=True)
