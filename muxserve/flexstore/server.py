"""The FlexStore process: a ZeroMQ ROUTER loop around a FlexStoreManager, and its lifecycle.

Requests are served one at a time, in arrival order (as in the original). A client (REQ or
DEALER socket) must present the instance's secret (``auth.py``); others never reach the loop.
SIGINT and SIGTERM, a ``Shutdown`` request, or the death of the parent process
(``exit_with_parent``) end the loop; every exit path releases every segment.

Under a memory budget (an elastic LLM) the same loop also answers the fd socket where runtimes
follow the ranges' mappings (``device_memory.sync_range``), and trims free KV granules when idle.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq

from muxserve.flexstore import protocol as P
from muxserve.flexstore.auth import SECRET_ENV, new_secret, serve_with_secret
from muxserve.flexstore.config import FlexStoreConfig
from muxserve.flexstore.fd_passing import FdServer
from muxserve.flexstore.manager import FlexStoreManager
from muxserve.ipc import process
from muxserve.ipc.rundir import remove_stale_run_dirs

logger = logging.getLogger(__name__)
POLL_MS = 100  # how often the loop looks at its stop conditions


class AddressInUse(RuntimeError):
    """FlexStore's address is taken (another FlexStore, or any other program)."""


class FlexStoreServer:
    """Binds ``address`` and answers every request of a client that presents ``secret`` through ``manager``.

    ``parent``: the pid whose death ends the loop (None: run until told to stop).
    """

    def __init__(self, manager: FlexStoreManager, address: str, secret: str, parent: int | None = None):
        self.manager = manager
        self.address = address
        self._parent = parent
        self._fd_server: FdServer | None = None
        self._fd_dir: str | None = None
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVTIMEO, POLL_MS)  # wake up now and then to check the stop conditions
        self._auth = serve_with_secret(self._context, self._socket, secret)
        self._bound = False
        try:
            self._socket.bind(address)
        except zmq.ZMQError as exc:
            self.close()
            if exc.errno == zmq.EADDRINUSE:
                raise AddressInUse(f"FlexStore cannot listen on {address}: it is already in use") from None
            raise
        self._bound = True
        self._running = False
        handler = manager.range_handler()
        if handler is not None:
            try:
                self._fd_server = FdServer(self._fd_path(address), secret, handler)
            except BaseException:
                self.close()
                raise
            manager.fd_socket = self._fd_server.path

    def _fd_path(self, address: str) -> str:
        """Next to an ipc socket (the instance's private directory), else in a new private directory."""
        path = address[len("ipc://"):]
        if address.startswith("ipc://") and not path.startswith("@") and len(path) < 90:
            return path + ".fd"
        self._fd_dir = tempfile.mkdtemp(prefix="muxserve-fd-")
        return os.path.join(self._fd_dir, "fd.sock")

    @property
    def parent_gone(self) -> bool:
        return self._parent is not None and os.getppid() != self._parent

    def serve_forever(self) -> None:
        self._running = True
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        fd_server = self._fd_server
        if fd_server is not None:
            poller.register(fd_server.fileno(), zmq.POLLIN)
        while self._running:
            events = dict(poller.poll(POLL_MS))
            if not events:  # idle for POLL_MS
                if self.parent_gone:
                    return
                self.manager.idle()
                continue
            if fd_server is not None and fd_server.fileno() in events:
                try:
                    fd_server.serve_one()
                except Exception:  # one bad runtime connection; keep serving
                    logger.exception("fd socket failed on a request")
            if self._socket in events:
                try:
                    frames = self._socket.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    continue
                self.serve_one(frames)

    def serve_one(self, frames: list[bytes]) -> None:
        # REQ clients put an empty delimiter between the routing envelope and the body.
        i = frames.index(b"", 1) + 1 if b"" in frames[1:] else 1
        envelope, body = frames[:i], frames[i:]
        if len(body) != 1:
            reply = P.encode(P.Error(code="malformed", message=f"malformed request: expected 1 frame, got {len(body)}"))
            request = None
        else:
            request, reply = self.manager.handle_bytes(body[0])
        try:
            self._socket.send_multipart([*envelope, reply], flags=zmq.NOBLOCK)
        except zmq.Again:  # the peer is gone or not reading; its loss
            logger.warning("dropped a reply to an unresponsive client")
        if isinstance(request, P.Shutdown):
            logger.info("shutdown requested")
            self._running = False

    def close(self) -> None:
        if self._fd_server is not None:
            self._fd_server.close()
            self._fd_server = None
        if self._fd_dir is not None:
            shutil.rmtree(self._fd_dir, ignore_errors=True)
            self._fd_dir = None
        self._socket.close(linger=0)
        self._auth.stop()
        self._context.term()
        path = self.address[len("ipc://"):]
        if self._bound and self.address.startswith("ipc://") and not path.startswith("@"):
            Path(path).unlink(missing_ok=True)  # libzmq may leave the file behind


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


# The kernel's signal to a child whose parent died: SIGHUP, so that it differs from a plain SIGTERM.
PARENT_DEATH_SIGNAL = signal.SIGHUP


def run(config: FlexStoreConfig, secret: str, exit_with_parent: bool = False) -> None:
    """Load, serve until told to stop, release everything. The body of ``python -m muxserve.flexstore``.

    With ``exit_with_parent`` the death of the process that started this one ends it (the kernel's
    SIGHUP, or the loop noticing), and the dead parent's run directory is removed on the way out.
    """
    signals = (signal.SIGINT, signal.SIGTERM, PARENT_DEATH_SIGNAL)
    previous = {s: signal.signal(s, _raise_exit) for s in signals}
    parent = process.expected_parent() if exit_with_parent else None
    manager = server = None
    orphaned = False
    try:
        if exit_with_parent:
            process.exit_with_parent(PARENT_DEATH_SIGNAL)
        manager = FlexStoreManager(config)
        server = FlexStoreServer(manager, config.address, secret, parent)
        logger.info("FlexStore %d ready at %s", os.getpid(), config.address)
        server.serve_forever()
        orphaned = server.parent_gone
    except SystemExit as exc:
        orphaned = parent is not None and exc.code == 128 + PARENT_DEATH_SIGNAL
        raise
    finally:
        for s in previous:  # a second Ctrl-C must not interrupt the cleanup
            signal.signal(s, signal.SIG_IGN)
        if orphaned:
            logger.warning("parent process %d is gone; shutting down", parent)
        if server is not None:
            server.close()
        if manager is not None:
            names = manager.segment_names()
            manager.close()
            logger.info("FlexStore released %d shared segments %s", len(names), names)
        if orphaned:
            _remove_run_dir_of(parent)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _remove_run_dir_of(parent: int, timeout_s: float = 5.0) -> None:
    """The parent was killed, so nobody else removes its run directory: do it once it is fully gone.

    The kernel signals us when the thread that started us exits; its other threads may live on a moment.
    """
    deadline = time.monotonic() + timeout_s
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.02)
    remove_stale_run_dirs()


class FlexStoreProcess:
    """A FlexStore in a child process: what the launcher and the tests start.

    ``secret`` (default: a new random one, see ``.secret``) reaches the child in its environment.
    ``start()`` returns once this very child answers a ping; ``stop()`` asks it to shut down and
    escalates to SIGTERM, then SIGKILL. The child exits on its own if this process dies.
    """

    def __init__(self, config: FlexStoreConfig, log_file: str | Path | None = None, log_level: str = "INFO",
                 env: dict[str, str] | None = None, secret: str | None = None):
        self.config = config
        self.log_file = Path(log_file) if log_file else None
        self.log_level = log_level
        self.env = env  # the child's whole environment (default: this process's)
        self.secret = secret or new_secret()
        self.proc: subprocess.Popen | None = None

    def client(self, timeout_s: float = 30.0):
        """A FlexStoreClient of this FlexStore that notices at once when the process has died."""
        from muxserve.flexstore.client import FlexStoreClient

        return FlexStoreClient(self.config.address, secret=self.secret, timeout_s=timeout_s, alive=self.alive)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 120.0) -> FlexStoreProcess:
        from muxserve.flexstore.client import FlexStoreAuthError, FlexStoreDied, FlexStoreTimeout

        cmd = [sys.executable, "-m", "muxserve.flexstore", "--config-json",
               msgspec.json.encode(self.config).decode(), "--exit-with-parent", "--log-level", self.log_level]
        env = {**(self.env if self.env is not None else os.environ), SECRET_ENV: self.secret,
               process.PARENT_PID_ENV: str(os.getpid())}
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if self.log_file else None,
                                         env=env)
        finally:
            if self.log_file:
                out.close()
        deadline = time.monotonic() + timeout_s
        with self.client(timeout_s=0.5) as client:
            while True:
                try:
                    if client.ping() == self.proc.pid:  # this child, not whoever else answers there
                        return self
                except FlexStoreDied:
                    raise RuntimeError(f"FlexStore {process.describe_exit(self.proc.returncode)} before it was "
                                       f"ready{self._last_log_line()}") from None
                except (FlexStoreTimeout, FlexStoreAuthError):  # not up yet, or someone else's address
                    pass
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"FlexStore at {self.config.address} not ready after {timeout_s} s")

    def _last_log_line(self) -> str:
        if self.log_file is None or not self.log_file.is_file():
            return ""
        lines = self.log_file.read_text(errors="replace").strip().splitlines()
        return f": {lines[-1]} (log: {self.log_file})" if lines else f" (log: {self.log_file})"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("FlexStore process not started")
        return self.proc.pid

    def stop(self, timeout_s: float = 15.0) -> int:
        """Shut down cleanly (Shutdown request, then SIGTERM, then SIGKILL); returns the exit code."""
        from muxserve.flexstore.client import FlexStoreDied, FlexStoreTimeout

        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            try:
                with self.client(timeout_s=min(timeout_s, 5.0)) as client:
                    client.shutdown()
            except FlexStoreTimeout:
                self.proc.terminate()
            except FlexStoreDied:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> FlexStoreProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
