"""Shared fixtures. `one_thread` is opt-in: a module uses it with
`pytestmark = pytest.mark.usefixtures("one_thread")`."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    # Tiny tensors: on a shared 2-core machine, 2 OpenMP threads wait at barriers for a busy core (measured up
    # to 50x slower per op); one intra-op thread is also the fastest setting for these sizes and keeps runs bitwise
    # repeatable.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
