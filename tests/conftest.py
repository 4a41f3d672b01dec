import os
import random

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def generator(request):
    """A fresh seed per test run (printed on failure through the test id's seed parameter or the log)."""
    seed = int(os.environ.get("MDLRNN_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    """Where the fast path runs; the reference always runs on the CPU in float64."""
    return torch.device(request.param)


@pytest.fixture
def kernel_device():
    """Where the Triton kernels run: CUDA where there is one, else the CPU through Triton's interpreter (CI)."""
    from mdlrnn import kernels

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not kernels.usable(device):
        pytest.skip("Triton kernels on the CPU run in CI's interpreter (TRITON_INTERPRET=1)")
    return device
