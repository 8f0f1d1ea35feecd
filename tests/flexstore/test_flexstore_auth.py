"""Only clients that present the secret reach FlexStore; its death and a taken port are named at once."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import msgspec
import pytest
import zmq

from muxserve.flexstore import FlexStoreAuthError, FlexStoreClient, FlexStoreDied
from muxserve.flexstore import protocol as P
from muxserve.flexstore.auth import present_secret

from .helpers import CHILD_ENV, REPO, ipc_address, make_config, start_flexstore

REFUSED = "refused this client: it presented no secret or a wrong one"


def _raw_socket(address: str, secret: str | None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if secret is not None:
        present_secret(sock, secret)
    sock.connect(address)
    return sock


@pytest.mark.parametrize("secret", [None, "not-the-secret"])
def test_a_client_without_the_secret_never_reaches_the_request_loop(shared_store, client, secret):
    address = shared_store.config.address
    before = client.stats()
    sock = _raw_socket(address, secret)
    try:
        for request in (P.Allocate("llama-c", [("intruder", 200)]), P.Attach("llama-c"), P.GetInfo(),
                        P.Shutdown()):
            sock.send(P.encode(request))
        assert sock.poll(2000) == 0  # no reply to any of them
    finally:
        sock.close()
    # nothing went through: no pages taken, no handles handed out, still serving
    assert shared_store.alive()
    assert client.stats() == before
    assert not client.owns("llama-c", "intruder")
    # FlexStoreClient says so at once instead of waiting for its timeout
    start = time.monotonic()
    with FlexStoreClient(address, secret, timeout_s=20) as refused, pytest.raises(FlexStoreAuthError) as excinfo:
        refused.allocate("llama-c", [("intruder", 2)])
    assert time.monotonic() - start < 5
    assert str(excinfo.value) == f"FlexStore at {address} {REFUSED}"
    assert client.stats() == before and client.ping() == shared_store.pid


def test_a_client_notices_at_once_that_flexstore_died(tiny_models, tmp_path):
    store = start_flexstore(make_config(tiny_models, ipc_address(tmp_path), names=["llama-c"]),
                            tmp_path / "flexstore.log")
    try:
        with store.client(timeout_s=60) as client:
            assert client.ping() == store.pid
            os.kill(store.pid, signal.SIGSTOP)  # it cannot answer: the request waits ...
            killer = subprocess.Popen([sys.executable, "-c",
                                       f"import os, time; time.sleep(0.5); os.kill({store.pid}, 9)"])
            start = time.monotonic()
            with pytest.raises(FlexStoreDied) as excinfo:
                client.allocate("llama-c", [("r", 2)])
            waited = time.monotonic() - start
            killer.wait()
        assert 0.4 < waited < 2.0  # ... until it is killed, not for the 60 s timeout
        assert str(excinfo.value) == (f"FlexStore at {store.config.address} exited while this client waited "
                                      "for its answer")
    finally:
        store.kill()


def test_a_taken_tcp_port_fails_the_start_with_a_message_naming_it(tiny_models, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(tiny_models, f"tcp://127.0.0.1:{port}", names=["llama-c"])
        with pytest.raises(RuntimeError) as excinfo:
            start_flexstore(config, tmp_path / "flexstore.log")
    assert str(excinfo.value) == ("FlexStore exited with code 1 before it was ready: error: FlexStore cannot listen "
                                  f"on tcp://127.0.0.1:{port}: it is already in use "
                                  f"(log: {tmp_path / 'flexstore.log'})")


def test_standalone_flexstore_takes_its_secret_from_a_file_it_creates(tiny_models, tmp_path):
    address, secret_file = ipc_address(tmp_path), tmp_path / "secret"
    cmd = [sys.executable, "-m", "muxserve.flexstore", "--model", f"m={tiny_models['llama-c']}",
           "--address", address, "--kv-cache-bytes", "64KiB", "--page-bytes", "1024"]
    env = {k: v for k, v in CHILD_ENV.items() if k != "MUXSERVE_FLEXSTORE_SECRET"}
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert refused.returncode == 2
    assert ("give --secret-file PATH (a new secret is written there if it does not exist) or set "
            "MUXSERVE_FLEXSTORE_SECRET: every client must present it") in refused.stderr
    proc = subprocess.Popen([*cmd, "--secret-file", str(secret_file)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not secret_file.is_file():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.1)  # written
        secret = secret_file.read_text().strip()
        assert len(secret) == 64 and stat.S_IMODE(secret_file.stat().st_mode) == 0o600
        with FlexStoreClient(address, secret, timeout_s=60) as client:
            assert client.ping() == proc.pid
            assert client.allocate("m", [("r", 2)]).new_pages == {"r": [0, 1]}
            client.shutdown()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_secret_file_that_others_can_read_is_refused(tmp_path):
    from muxserve.flexstore.auth import load_secret_file

    path = tmp_path / "secret"
    path.write_text("abc\n")
    path.chmod(0o644)
    with pytest.raises(ValueError) as excinfo:
        load_secret_file(path)
    assert str(excinfo.value) == f"secret file {path} is readable by other users (mode 644); chmod 600 it"
    path.chmod(0o600)
    assert load_secret_file(path) == "abc"


def test_the_secret_never_travels_in_the_config_or_on_the_command_line(tiny_models, tmp_path):
    store = start_flexstore(make_config(tiny_models, ipc_address(tmp_path), names=["llama-c"]),
                            tmp_path / "flexstore.log")
    try:
        cmdline = open(f"/proc/{store.pid}/cmdline", "rb").read().decode()
        assert store.secret not in cmdline and store.secret not in msgspec.json.encode(store.config).decode()
        environ = open(f"/proc/{store.pid}/environ", "rb").read().decode()
        assert f"MUXSERVE_FLEXSTORE_SECRET={store.secret}" in environ.split("\0")
    finally:
        assert store.stop() == 0
