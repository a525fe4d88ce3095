"""Shared pytest fixtures and the hypothesis profile for CI."""

import os

import pytest
import torch
from hypothesis import settings

# CI checks the same hypothesis examples on every run (reproducible verdicts); local runs stay random
# and keep exploring. A failure prints the example (and a blob) to replay it.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture
def one_torch_thread():
    """Small tensors: extra torch threads only cost synchronisation on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
