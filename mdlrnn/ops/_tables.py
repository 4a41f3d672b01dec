"""A cache for constant index tables, kept out of CUDA graphs' memory pools and out of inference mode.

While torch.compile(mode="reduce-overhead") warms a graph up or records it, every allocation of the calling thread
(in older torch: of the warm-up stream) goes to the graph's private memory pool, whose blocks are handed out again
as soon as the warm-up ends: a table built there and kept in a cache would be overwritten by later activations
(torch stops first, with "tensor(s) in the cudagraph pool not tracked as outputs"). So a table for a CUDA device
is built on a worker thread and stream of its own, from the ordinary pool. A table first built under
torch.inference_mode() would be an inference tensor, which autograd refuses to save when the same size is
trained later: tables are always built outside it.

Nothing is ever evicted: a captured CUDA graph reads the tables by address, so freeing one could hand its memory
to another table under a graph that still replays. The tables are small (indices per grid size) and a program
meets few grid sizes.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache, wraps

import torch

BUILDER = "mdlrnn-tables"
_builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix=BUILDER)


def _device(args, kwargs) -> torch.device | None:
    """The device of the tables: the first torch.device argument, or the `device` of an argument (a plan)."""
    for arg in (*args, *kwargs.values()):
        device = arg if isinstance(arg, torch.device) else getattr(arg, "device", None)
        if isinstance(device, torch.device):
            return device
    return None


def _build_on_cuda(fn, args, kwargs, device: torch.device):
    """Runs on the builder thread: not in inference mode, not allocating to any graph's pool."""
    stream = torch.cuda.Stream(device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        result = fn(*args, **kwargs)
    stream.synchronize()  # complete before any stream of the caller's, which know nothing of this one, reads it
    return result


def device_tables(fn):
    """functools.cache for a function that builds constant tensors (index tables) from hashable arguments, one of
    them a torch.device or an object with a `device` (a plan): built outside inference mode and, on CUDA, outside
    any CUDA graph's memory pool. A CUDA table missing inside a CUDA graph capture is an error (a capture cannot
    copy from the host): the first call at each size must come before the capture."""

    @cache
    @wraps(fn)
    def cached(*args, **kwargs):
        if torch.compiler.is_compiling() or threading.current_thread().name.startswith(BUILDER):
            return fn(*args, **kwargs)
        device = _device(args, kwargs)
        if device is None or device.type != "cuda":
            with torch.inference_mode(False):
                return fn(*args, **kwargs)
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"mdlrnn: {fn.__name__} builds index tables for a new grid size on its first call, "
                               "which a CUDA graph capture cannot do: run the step once before capturing it")
        try:
            build = _builder.submit(_build_on_cuda, fn, args, kwargs, device)
        except RuntimeError:  # no new work at interpreter shutdown: build here, as no graph replays any more
            with torch.inference_mode(False):
                return fn(*args, **kwargs)
        return build.result()

    return cached
