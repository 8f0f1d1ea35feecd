"""The FlexStore process: a ZeroMQ ROUTER loop around a FlexStoreManager, and its lifecycle.

Requests are served one at a time, in arrival order (as in the original). Any client may talk
to it (REQ or DEALER sockets). SIGINT and SIGTERM, a ``Shutdown`` request, or the death of the
parent process (``exit_with_parent``) end the loop; every exit path releases every segment.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import zmq

from muxserve.flexstore import protocol as P
from muxserve.flexstore.config import FlexStoreConfig
from muxserve.flexstore.manager import FlexStoreManager

logger = logging.getLogger(__name__)
POLL_MS = 100  # how often the loop looks at its stop conditions


class FlexStoreServer:
    """Binds ``address`` and answers every request through ``manager``."""

    def __init__(self, manager: FlexStoreManager, address: str, exit_with_parent: bool = False):
        self.manager = manager
        self.address = address
        self._parent = os.getppid() if exit_with_parent else None
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVTIMEO, POLL_MS)  # wake up now and then to check the stop conditions
        self._socket.bind(address)
        self._running = False

    def serve_forever(self) -> None:
        self._running = True
        while self._running:
            try:
                frames = self._socket.recv_multipart()
            except zmq.Again:  # idle for POLL_MS
                if self._parent is not None and os.getppid() != self._parent:
                    logger.warning("parent process %d is gone; shutting down", self._parent)
                    return
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
        self._socket.close(linger=0)
        self._context.term()
        path = self.address[len("ipc://"):]
        if self.address.startswith("ipc://") and not path.startswith("@"):  # libzmq may leave the file behind
            Path(path).unlink(missing_ok=True)


def _raise_exit(signum, _frame):
    raise SystemExit(128 + signum)


def run(config: FlexStoreConfig, exit_with_parent: bool = False) -> None:
    """Load, serve until told to stop, release everything. The body of ``python -m muxserve.flexstore``."""
    previous = {s: signal.signal(s, _raise_exit) for s in (signal.SIGINT, signal.SIGTERM)}
    manager = server = None
    try:
        manager = FlexStoreManager(config)
        server = FlexStoreServer(manager, config.address, exit_with_parent)
        logger.info("FlexStore %d ready at %s", os.getpid(), config.address)
        server.serve_forever()
    finally:
        for s in previous:  # a second Ctrl-C must not interrupt the cleanup
            signal.signal(s, signal.SIG_IGN)
        if server is not None:
            server.close()
        if manager is not None:
            names = manager.segment_names()
            manager.close()
            logger.info("FlexStore released %d shared segments %s", len(names), names)
        for s, handler in previous.items():
            signal.signal(s, handler)


class FlexStoreProcess:
    """A FlexStore in a child process: what the launcher and the tests start.

    ``start()`` returns once the server answers a ping; ``stop()`` asks it to shut down and
    escalates to SIGTERM, then SIGKILL. The child exits on its own if this process dies.
    """

    def __init__(self, config: FlexStoreConfig, log_file: str | Path | None = None, log_level: str = "INFO",
                 env: dict[str, str] | None = None):
        self.config = config
        self.log_file = Path(log_file) if log_file else None
        self.log_level = log_level
        self.env = env  # the child's whole environment (default: this process's)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> FlexStoreProcess:
        from muxserve.flexstore.client import FlexStoreClient, FlexStoreTimeout

        cmd = [sys.executable, "-m", "muxserve.flexstore", "--config-json",
               msgspec.json.encode(self.config).decode(), "--exit-with-parent", "--log-level", self.log_level]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if self.log_file else None,
                                         env=self.env)
        finally:
            if self.log_file:
                out.close()
        deadline = time.monotonic() + timeout_s
        with FlexStoreClient(self.config.address, timeout_s=0.5) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"FlexStore exited with code {self.proc.returncode} before it was ready"
                                       + (f"; see {self.log_file}" if self.log_file else ""))
                try:
                    client.ping()
                    return self
                except FlexStoreTimeout:
                    if time.monotonic() > deadline:
                        self.kill()
                        raise TimeoutError(f"FlexStore at {self.config.address} not ready after {timeout_s} s") from None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("FlexStore process not started")
        return self.proc.pid

    def stop(self, timeout_s: float = 15.0) -> int:
        """Shut down cleanly (Shutdown request, then SIGTERM, then SIGKILL); returns the exit code."""
        from muxserve.flexstore.client import FlexStoreClient, FlexStoreTimeout

        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            try:
                with FlexStoreClient(self.config.address, timeout_s=min(timeout_s, 5.0)) as client:
                    client.shutdown()
            except FlexStoreTimeout:
                self.proc.terminate()
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
