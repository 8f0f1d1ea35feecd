"""Fixtures of the end-to-end launcher tests."""

import pytest

from .helpers import Setup, build_setup


@pytest.fixture(scope="session")
def setup(tmp_path_factory) -> Setup:
    return build_setup(tmp_path_factory.mktemp("launch"))
