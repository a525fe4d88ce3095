"""Shared pytest fixtures and the hypothesis profile for CI."""

import os

import pytest
from hypothesis import settings

from prunecert import threads

# CI checks the same hypothesis examples on every run (reproducible verdicts); local runs stay random
# and keep exploring. A failure prints the example (and a blob) to replay it.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def one_torch_thread():
    """Small tensors: extra torch threads only cost synchronisation (see prunecert.threads)."""
    with threads.one_torch_thread():
        yield
