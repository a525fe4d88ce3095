"""Shared pytest fixtures."""

import pytest
import torch


@pytest.fixture
def one_torch_thread():
    """Small tensors: extra torch threads only cost synchronisation on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
