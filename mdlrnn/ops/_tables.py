"""A cache for constant index tables, kept out of CUDA graphs' memory pools and out of inference mode.

While torch.compile(mode="reduce-overhead") warms a graph up or records it, every allocation of the calling thread
goes to the graph's private memory pool, whose blocks are handed out again as soon as the warm-up ends: a table
built there and kept in a cache would be overwritten by later activations (torch stops first, with "tensor(s) in
the cudagraph pool not tracked as outputs"). So on CUDA a cache miss builds its tables on a worker thread and
stream of its own, from the ordinary pool. And a table first built under torch.inference_mode() would be an
inference tensor, which autograd refuses to save when the same size is trained later: tables are always built
outside it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, wraps

import torch

_builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mdlrnn-tables")
_on_builder = threading.local()
_streams: dict[int, torch.cuda.Stream] = {}


def _build(fn, args, kwargs, caller: torch.cuda.Stream):
    torch.cuda.set_device(caller.device)
    if caller.device.index not in _streams:
        _streams[caller.device.index] = torch.cuda.Stream(caller.device)
    stream = _streams[caller.device.index]
    stream.wait_stream(caller)  # memory an evicted table freed is rewritten only after the work queued to read it
    _on_builder.active = True
    try:
        with torch.cuda.stream(stream):  # a fresh thread: not in inference mode
            result = fn(*args, **kwargs)
        stream.synchronize()  # complete before the caller's stream, which knows nothing of this one, reads it
        return result
    finally:
        _on_builder.active = False


def device_tables(maxsize: int):
    """functools.lru_cache for a function that builds constant tensors (index tables) from hashable arguments,
    with its misses on CUDA built outside any CUDA graph's memory pool. A miss inside a CUDA graph capture is an
    error (a capture cannot copy from the host): the first call at each size must come before the capture."""

    def decorate(fn):
        @lru_cache(maxsize)
        @wraps(fn)
        def cached(*args, **kwargs):
            if torch.compiler.is_compiling() or getattr(_on_builder, "active", False):
                return fn(*args, **kwargs)
            if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
                with torch.inference_mode(False):
                    return fn(*args, **kwargs)
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"mdlrnn: {fn.__name__} builds index tables for a new grid size on its first call, "
                                   "which a CUDA graph capture cannot do: run the step once before capturing it")
            return _builder.submit(_build, fn, args, kwargs, torch.cuda.current_stream()).result()

        return cached

    return decorate
