"""Fixtures of the wafer tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread: on a shared, busy CPU idle OpenMP threads spin and slow everything."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
