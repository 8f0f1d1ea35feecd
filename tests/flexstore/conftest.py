"""Fixtures of the FlexStore tests: tiny checkpoints and one shared FlexStore process."""

from __future__ import annotations

import pytest
import torch

from .helpers import TINY, ipc_address, make_config, start_flexstore, write_tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Several processes share the cores in these tests; one intra-op thread each avoids thrashing."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flexstore-models")
    return {name: write_tiny_model(root / name, name, seed=i) for i, name in enumerate(TINY)}


@pytest.fixture(scope="module")
def shared_store(tiny_models, tmp_path_factory):
    """One FlexStore process: the three tiny models, 256 pages of 1 KiB."""
    tmp = tmp_path_factory.mktemp("store")
    process = start_flexstore(make_config(tiny_models, ipc_address(tmp)), tmp / "flexstore.log")
    yield process
    assert process.stop() == 0


@pytest.fixture
def client(shared_store):
    with shared_store.client(timeout_s=20) as c:
        yield c
