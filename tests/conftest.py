import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Byte counts do not depend on threads; tiny ops on 2 threads of a busy 2-core machine can
    be 100x slower (the threads wait for each other), so every test uses one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
