"""Triton kernels behind the scan ops. Imported on demand: triton is needed only when they run."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import lru_cache

import torch

from ..ops._checks import first_order_only  # noqa: F401 (the kernel ops' backward calls it)

# looked up once: torch.compile does not trace importlib, and the answer cannot change while running
HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors, for tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors on `device`."""
    if not HAS_TRITON:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def require(op: str, device: torch.device) -> None:
    """The error for backend="triton" where the kernels can't run."""
    if not HAS_TRITON:
        raise ValueError(f"{op}: backend='triton' needs the triton package (pip install triton)")
    if not usable(device):
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")


def choose(op: str, backend: str, device: torch.device, dtype: torch.dtype, unfit: str | None = None) -> bool:
    """Whether an op runs on its Triton kernels. "auto": where they fit (`unfit` None: the reason they don't),
    in float32 compute, on CUDA. "triton": yes, or the error saying why not (no triton, no CUDA, float64
    inputs, `unfit`). Any other backend: no."""
    if backend == "auto":
        return unfit is None and dtype == torch.float32 and device.type == "cuda" and usable(device)
    if backend != "triton":
        return False
    require(op, device)
    if dtype == torch.float64:
        raise TypeError(f"{op}: backend='triton' computes in float32; got float64 inputs (use backend='torch')")
    if unfit is not None:
        raise ValueError(f"{op}: backend='triton' {unfit} (use backend='torch')")
    return True


def cdiv(a: int, b: int) -> int:
    """Ceiling division for launch grids. Not triton.cdiv: in recent Triton it and triton.next_power_of_2 are
    constexpr functions costing microseconds a call, and a step of the kernels makes dozens of such calls."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for products with inputs of `dtype`. Half inputs run on half tensor cores, their
    products with float32 states on tf32 ones. Float32 inputs take three tf32 products (tf32x3): float32 accuracy
    on tensor cores (the interpreter's products are exact). On the H200 against exact products on CUDA cores
    ("ieee"), f+b: relative error to float64 about 4e-7 either way; grid_scan 2D 5-6x faster (24x24 B=16: 5.9 ->
    0.96 ms; 64x64 B=8: 49.6 -> 9.5), 1D 5x (L=4096 B=4: 8.40 -> 1.68), LightNet causal and box 1.6x (64x64 B=8:
    1.62 -> 1.00, 2.95 -> 1.90), global mode the same (RESULTS.md, tenth session)."""
    return "tf32x3" if dtype == torch.float32 else "tf32"


def unit_last_stride(x: torch.Tensor) -> torch.Tensor:
    """x itself where its last axis is contiguous or one element long (the kernels read any other strides), else a
    contiguous copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one (cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@lru_cache(maxsize=16)
def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use on `device` (Hopper's 227 KiB off CUDA: the interpreter runs
    the configuration the largest GPUs get)."""
    if device.type != "cuda":
        return 227 * 1024
    properties = torch.cuda.get_device_properties(device)
    return getattr(properties, "shared_memory_per_block_optin", 48 * 1024)


POISON = False  # benchmarks/check_kernels.py: kernel outputs start as NaN, so a missed write cannot pass unseen


def empty(*shape, device, dtype=torch.float32) -> torch.Tensor:
    """A buffer for a kernel to fill (NaN-filled while POISON is set)."""
    if POISON:
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(*shape, device=device, dtype=dtype)


def run(op, function: type[torch.autograd.Function], *args):
    """Calls a kernel op: as the torch custom op `op` while torch.compile traces (no graph break there), else
    through `function`, an autograd.Function over the same implementation, context and backward. A custom op's
    dispatch and Python autograd wrapper cost about 0.4 ms of host time per forward+backward on the H200
    machine, a fifth of a small LightNet step."""
    return op(*args) if torch.compiler.is_compiling() else function.apply(*args)


def eager_forward(forward, setup_context):
    """The forward of such an autograd.Function, forward(ctx, *args), calling a custom op's implementation and
    setup_context: in the old style, since Function.apply binds the arguments with inspect.signature on every
    call where a Function defines setup_context (25 us a call on this project's CPU machine)."""
    def function_forward(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    return staticmethod(function_forward)
