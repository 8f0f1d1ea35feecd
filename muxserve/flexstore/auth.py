"""The secret every FlexStore client presents (ZeroMQ PLAIN, checked by pyzmq's ZAP authenticator).

FlexStore's socket is a PLAIN server: a connection whose handshake lacks the instance's secret
is refused by the authenticator thread before any of its messages reaches the request loop.
The secret travels to child processes in the environment (``SECRET_ENV``) or in a file of mode
0600, never on a command line (anyone on the host can read those in /proc).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

SECRET_ENV = "MUXSERVE_FLEXSTORE_SECRET"
USER = "muxserve"
# pyzmq's authenticator logs passwords at DEBUG: its logger never goes below INFO.
_auth_log = logging.getLogger("muxserve.flexstore.zap")
_auth_log.setLevel(logging.INFO)


def new_secret() -> str:
    """256 random bits, as hex."""
    return secrets.token_hex(32)


def write_secret(path: Path, secret: str | None = None) -> str:
    """Write ``secret`` (default: a new random one) to ``path``, readable by its owner only."""
    secret = secret or new_secret()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def secret_from_env() -> str | None:
    return os.environ.get(SECRET_ENV) or None


def load_secret_file(path: str | Path) -> str:
    """The secret in ``path``; a new one is generated and written there (mode 0600) if it does not exist."""
    path = Path(path).expanduser()
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        return write_secret(path)
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    if path.stat().st_mode & 0o077:
        raise ValueError(f"secret file {path} is readable by other users (mode {path.stat().st_mode & 0o777:o}); "
                         f"chmod 600 it")
    return secret


def serve_with_secret(context: zmq.Context, socket: zmq.Socket, secret: str) -> ThreadAuthenticator:
    """Make ``socket`` (not yet bound) accept only clients that present ``secret``; stop the returned thread at exit."""
    if not secret:
        raise ValueError("FlexStore needs a non-empty secret")
    auth = ThreadAuthenticator(context, log=_auth_log)
    auth.start()
    auth.configure_plain(domain="*", passwords={USER: secret})
    socket.plain_server = True
    return auth


def present_secret(socket: zmq.Socket, secret: str) -> None:
    """Make a client ``socket`` (not yet connected) log in with ``secret``."""
    socket.plain_username = USER.encode()
    socket.plain_password = secret.encode()


__all__ = ["SECRET_ENV", "load_secret_file", "new_secret", "present_secret", "secret_from_env", "serve_with_secret"]
