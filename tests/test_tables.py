"""The cache of index tables (mdlrnn.ops._tables.device_tables): one build per argument tuple, outside inference mode,
and for CUDA devices on its worker thread. The worker's CUDA calls (device, stream, synchronize) are stubbed here,
so that the CPU runs the thread's logic; tests/test_cuda_graphs.py runs the real thing on a GPU."""

import contextlib
import threading

import pytest
import torch

from mdlrnn.ops import _tables

CUDA = torch.device("cuda", 0)


@pytest.fixture
def stubbed_cuda(monkeypatch):
    class Stream:
        def __init__(self, device):
            pass

        def synchronize(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def test_cpu_tables_are_built_once_outside_inference_mode():
    calls = []

    @_tables.device_tables
    def table(n, device):
        calls.append(n)
        return torch.arange(n, device=device)

    with torch.inference_mode():
        first = table(3, torch.device("cpu"))
    assert not first.is_inference() and table(3, torch.device("cpu")) is first and calls == [3]


def test_cuda_tables_are_built_on_the_worker_thread(stubbed_cuda):
    threads = []

    @_tables.device_tables
    def inner(n, device):
        threads.append(threading.current_thread().name)
        return torch.arange(n)

    @_tables.device_tables
    def outer(n, device):  # a table built from another: called on the worker itself, no deadlock
        threads.append(threading.current_thread().name)
        return inner(n, device) * 2

    with torch.inference_mode():
        first = outer(4, CUDA)
    assert not first.is_inference() and outer(4, CUDA) is first
    assert len(threads) == 2 and all(name.startswith("mdlrnn-tables") for name in threads)


def test_the_device_of_a_plan_argument(stubbed_cuda):
    class Plan:
        device = CUDA

    @_tables.device_tables
    def table(plan, n):
        return threading.current_thread().name

    assert table(Plan(), 2).startswith("mdlrnn-tables")


def test_a_failed_build_reaches_the_caller_and_is_not_cached(stubbed_cuda):
    @_tables.device_tables
    def table(n, device):
        raise ValueError(f"no table of {n}")

    for _ in range(2):
        with pytest.raises(ValueError, match="no table of 5"):
            table(5, CUDA)


def test_a_miss_inside_a_capture_is_a_clear_error(stubbed_cuda, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)

    @_tables.device_tables
    def slots(n, device):
        return torch.arange(n)

    with pytest.raises(RuntimeError, match="run the step once before capturing it"):
        slots(3, CUDA)
    assert slots(3, torch.device("cpu")).tolist() == [0, 1, 2]  # CPU tables need no warm-up
