"""Fixtures of the engine tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def program(tiny_bundle):
    """The tiny Mixtral's colocated program on the CPU (one per test module: engines may fuse it at load)."""
    return tiny_bundle.load_program(tiny_bundle.manifest["colocated"]["program"], "cpu")
