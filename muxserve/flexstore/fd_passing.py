"""File descriptors from one process to another over a Unix socket, for holders of the instance's secret.

ZeroMQ cannot carry file descriptors; CUDA memory exported as a POSIX file descriptor has to
travel as ``SCM_RIGHTS`` ancillary data of a Unix socket. An :class:`FdServer` (in FlexStore)
listens on a ``SOCK_SEQPACKET`` socket (mode 0600, in the instance's private directory) and
answers one request per connection; :func:`request_fds` (in a runtime) asks.

One connection::

    server -> client   HELLO + 32-byte nonce
    client -> server   HMAC-SHA256(secret, nonce)
    server -> client   OK                  (or it closes the connection: wrong secret)
    client -> server   the request (framed)
    server -> client   the reply and its file descriptors (framed)

A client without the secret gets nothing: the server closes the connection before it reads a
request. The secret itself never crosses the socket. Frames: a header ``(payload bytes, fds)``,
the payload in pieces of at most 64 KiB, then the fds in batches of at most 250 (the kernel
passes at most 253 per message).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

HELLO = b"MUXFD1"
ACK = b"OK"
_HEADER = struct.Struct("!QI")  # payload bytes, number of fds
_PIECE = 64 * 1024
_FD_BATCH = 250
_FD_MARK = b"F"

Handler = Callable[[bytes], tuple[bytes, list[int]]]


class FdAuthError(PermissionError):
    """The server refused the secret (or is not an fd server of this instance)."""


class FdServer:
    """Answers each authenticated request with ``handler(request) -> (reply, fds)``.

    The fds a handler returns are sent and then closed here (they are the handler's to give).
    Serve from a poller (``fileno()`` readable -> :meth:`serve_one`) or from a thread (:meth:`start`).
    """

    def __init__(self, path: str | Path, secret: str, handler: Handler, timeout_s: float = 5.0):
        if not secret:
            raise ValueError("an fd server needs a non-empty secret")
        self.path = str(path)
        self._key = secret.encode()
        self._handler = handler
        self._timeout = timeout_s
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            old_umask = os.umask(0o177)  # the socket file is born 0600
            try:
                self._sock.bind(self.path)
            finally:
                os.umask(old_umask)
            self._sock.listen(16)
        except BaseException:
            self._sock.close()
            raise
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fileno(self) -> int:
        return self._sock.fileno()

    def serve_one(self) -> bool:
        """Accept one waiting connection and answer it; False if the client failed or was refused."""
        conn, _ = self._sock.accept()
        with conn:
            conn.settimeout(self._timeout)
            try:
                nonce = secrets.token_bytes(32)
                conn.sendall(HELLO + nonce)
                proof = conn.recv(64)
                if not hmac.compare_digest(proof, _proof(self._key, nonce)):
                    logger.warning("fd server %s: a client without the secret was refused", self.path)
                    return False
                conn.sendall(ACK)
                request, stray = _recv_frames(conn)
                for fd in stray:  # clients send none; never keep what we did not ask for
                    os.close(fd)
            except (OSError, ValueError) as exc:
                logger.warning("fd server %s: bad client: %s", self.path, exc)
                return False
            try:
                reply, fds = self._handler(request)
            except Exception:
                logger.exception("fd server %s: the handler failed; the client gets no reply", self.path)
                return False
            try:
                _send_frames(conn, reply, fds)
            except OSError as exc:
                logger.warning("fd server %s: client left before the reply: %s", self.path, exc)
                return False
            finally:
                for fd in fds:
                    os.close(fd)
        return True

    def start(self) -> FdServer:
        """Serve in a daemon thread until :meth:`close`."""
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._loop, args=(sel,), name=f"fd-server {self.path}", daemon=True)
        self._thread.start()
        return self

    def _loop(self, sel: selectors.BaseSelector) -> None:
        with sel:
            while not self._stop.is_set():
                if sel.select(timeout=0.1):
                    try:
                        self.serve_one()
                    except Exception:  # keep serving the other clients
                        logger.exception("fd server %s failed on a request", self.path)

    def close(self) -> None:
        """Stop serving and remove the socket file. Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._sock.fileno() != -1:
            self._sock.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> FdServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def request_fds(path: str | Path, secret: str, request: bytes, timeout_s: float = 10.0) -> tuple[bytes, list[int]]:
    """Send ``request`` to the fd server at ``path``; returns its reply and the fds (now the caller's)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        hello = sock.recv(len(HELLO) + 32)
        if len(hello) != len(HELLO) + 32 or not hello.startswith(HELLO):
            raise FdAuthError(f"{path} is not an fd server (greeting {hello[:8]!r})")
        sock.sendall(_proof(secret.encode(), hello[len(HELLO):]))
        try:
            ack = sock.recv(len(ACK))
        except ConnectionResetError:
            ack = b""
        if ack != ACK:
            raise FdAuthError(f"the fd server at {path} refused the secret")
        _send_frames(sock, request, [])
        return _recv_frames(sock)


def _proof(key: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, nonce, hashlib.sha256).digest()


def _send_frames(sock: socket.socket, payload: bytes, fds: list[int]) -> None:
    sock.sendall(_HEADER.pack(len(payload), len(fds)))
    for i in range(0, len(payload), _PIECE):
        sock.sendall(payload[i:i + _PIECE])
    for i in range(0, len(fds), _FD_BATCH):
        socket.send_fds(sock, [_FD_MARK], fds[i:i + _FD_BATCH])


def _recv_frames(sock: socket.socket) -> tuple[bytes, list[int]]:
    header = sock.recv(_HEADER.size)
    if not header:
        raise ConnectionError("connection closed")
    if len(header) != _HEADER.size:
        raise ValueError(f"bad frame header of {len(header)} bytes")
    size, count = _HEADER.unpack(header)
    pieces, got = [], 0
    while got < size:
        piece = sock.recv(_PIECE)
        if not piece:
            raise ConnectionError(f"connection closed after {got} of {size} bytes")
        pieces.append(piece)
        got += len(piece)
    fds: list[int] = []
    try:
        while len(fds) < count:
            mark, batch, flags, _ = socket.recv_fds(sock, len(_FD_MARK), min(_FD_BATCH, count - len(fds)))
            fds += batch
            if mark != _FD_MARK or flags & socket.MSG_CTRUNC or not batch:
                raise ValueError(f"fd batch lost (flags {flags:#x}, {len(batch)} fds, mark {mark!r})")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return b"".join(pieces), fds
