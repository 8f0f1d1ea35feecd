"""How the launcher's flags reach the runtime processes it starts (no process is started here)."""

from __future__ import annotations

import socket
import stat

import msgspec
import pytest

from muxserve.config import MuxServeConfig
from muxserve.errors import ConfigError
from muxserve.flexstore.auth import SECRET_ENV
from muxserve.instance.cli import check_instance_args
from muxserve.instance.instance import Instance
from muxserve.launch import build_parser, check_args, launch_options


@pytest.fixture
def config(tiny_model) -> MuxServeConfig:
    a, b = tiny_model("qwen2"), tiny_model("llama-gqa-hd64")  # 2 kv heads each
    return msgspec.convert({"num_gpus": 2, "kv_cache_bytes": 1 << 20, "models": [
        {"name": "a", "model": str(a), "tensor_parallel_size": 2, "placement": [[0, 1]], "mps_percentage": [100, 40]},
        {"name": "b", "model": str(b), "placement": [[1]], "mps_percentage": [80, 30]},
    ]}, MuxServeConfig)


class _Recorder:
    def __init__(self):
        self.started: dict[str, list[str]] = {}
        self.env: dict[str, dict[str, str]] = {}

    def start(self, name, args, env=None):
        self.started[name] = args
        self.env[name] = env

    def stop_all(self):  # nothing was started
        pass


def _instance(config: MuxServeConfig, *flags: str) -> Instance:
    """An Instance whose runtimes were recorded, not started (and which has stopped)."""
    args = build_parser().parse_args(["cfg.yaml", *flags])
    check_args(args, config, "cpu")
    instance = Instance(config, launch_options(args, config, "cpu"), processes=_Recorder())
    try:
        instance._start_runtimes()
        assert stat.S_IMODE(instance.run_dir.stat().st_mode) == 0o700
    finally:
        instance.stop()
    assert not instance.run_dir.exists()
    return instance


def _started(config: MuxServeConfig, *flags: str) -> dict[str, list[str]]:
    return _instance(config, *flags).processes.started


def _flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_each_rank_is_a_process_and_each_tp_group_its_own_port(config):
    started = _started(config, "--server-port", "41000", "--master-addr", "10.0.0.5")
    assert sorted(started) == ["a/decode/rank0", "a/decode/rank1", "a/prefill/rank0", "a/prefill/rank1",
                               "b/decode", "b/prefill"]
    # a's prefill group rendezvous at --server-port, its decode group at the next port; b is not TP
    assert [_flag(started[f"a/prefill/rank{r}"], "--dist-init-method") for r in (0, 1)] == ["tcp://10.0.0.5:41000"] * 2
    assert [_flag(started[f"a/decode/rank{r}"], "--dist-init-method") for r in (0, 1)] == ["tcp://10.0.0.5:41001"] * 2
    assert [_flag(started[f"a/decode/rank{r}"], "--tp-rank") for r in (0, 1)] == ["0", "1"]
    assert _flag(started["a/decode/rank1"], "--tp-size") == "2"
    assert "--tp-size" not in started["b/decode"] and "--dist-init-method" not in started["b/decode"]
    # every rank has its own job socket
    assert len({_flag(v, "--jobs") for v in started.values()}) == 6
    assert not any("--enforce-eager" in v for v in started.values())


def test_by_default_every_address_is_in_the_private_directory_and_the_secret_in_the_environment(config):
    instance = _instance(config)
    started, run_dir = instance.processes.started, instance.run_dir
    assert run_dir.name.startswith("muxserve-")
    # tensor-parallel groups meet at files of the private directory, one per group and start
    assert {_flag(started[f"a/prefill/rank{r}"], "--dist-init-method") for r in (0, 1)} == {
        f"file://{run_dir}/rendezvous-0-1"}
    assert {_flag(started[f"a/decode/rank{r}"], "--dist-init-method") for r in (0, 1)} == {
        f"file://{run_dir}/rendezvous-1-1"}
    for name, args in started.items():
        assert _flag(args, "--flexstore") == f"ipc://{run_dir}/flexstore"
        assert _flag(args, "--jobs").startswith(f"ipc://{run_dir}/")
        assert _flag(args, "--results") == f"ipc://{run_dir}/results"
        assert instance.processes.env[name][SECRET_ENV] == instance.secret
        assert instance.secret not in " ".join(args)  # never on a command line
    assert len(instance.secret) == 64


def test_enforce_eager_reaches_every_runtime(config):
    assert all("--enforce-eager" in v for v in _started(config, "--enforce-eager").values())


def test_a_taken_server_port_is_refused_naming_it(config):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = build_parser().parse_args(["cfg.yaml", "--server-port", str(port - 1)])
        with pytest.raises(ConfigError) as err:  # the second of the two groups' ports is taken
            check_instance_args(args, config, "cpu", "cfg.yaml")
    assert str(err.value) == (f"--server-port: port {port} of 127.0.0.1 is already in use (another instance?); "
                              f"choose a free port, or leave --server-port out to use the instance's private "
                              f"directory")


def test_server_port_must_leave_room_for_every_tp_group(config):
    args = build_parser().parse_args(["cfg.yaml", "--server-port", "65535"])
    with pytest.raises(ConfigError) as err:
        check_instance_args(args, config, "cpu", "cfg.yaml")
    assert str(err.value) == "--server-port 65535: the 2 tensor-parallel groups need ports 65535..65536"


@pytest.mark.parametrize("extra, message", [
    (["--tp-size", "2", "--tp-rank", "2", "--dist-init-method", "tcp://127.0.0.1:1"],
     "--tp-rank 2 must be in [0, --tp-size 2)"),
    (["--tp-size", "2", "--tp-rank", "1"], "--tp-size > 1 needs --dist-init-method URL"),
])
def test_runtime_refuses_an_impossible_rank(extra, message, capsys):
    from muxserve.flexserver.__main__ import main

    base = ["--llm", "a", "--phase", "decode", "--flexstore", "ipc:///x", "--jobs", "ipc:///j", "--results", "ipc:///r"]
    with pytest.raises(SystemExit) as exit_info:
        main(base + extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
