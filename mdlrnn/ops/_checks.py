"""Argument checks shared by the scan ops: every message names the op, the argument and what was expected."""

from __future__ import annotations

from collections.abc import Sequence

import torch

BACKENDS = ("auto", "reference", "torch")


def check_tensor(op: str, name: str, x, ndim: int | None = None, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(f"{op}: `{name}` must be a floating-point tensor, got dtype {x.dtype}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: `{name}` must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_shape(op: str, name: str, x: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    check_tensor(op, name, x)
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"{op}: `{name}` must have shape {layout} = {tuple(expected)}, got {tuple(x.shape)}"
        )


def check_same_device(op: str, reference: torch.Tensor, **tensors) -> None:
    for name, x in tensors.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{op}: `{name}` is on {x.device} but `q` is on {reference.device}")


def check_qkv(op: str, q, k, v, layout: str) -> None:
    """q, k and v share every dimension but the last, and a dtype."""
    check_tensor(op, "q", q)
    check_tensor(op, "k", k)
    check_tensor(op, "v", v)
    if k.shape != q.shape:
        raise ValueError(f"{op}: `k` must have the shape of `q` {layout} = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"{op}: `v` must have shape {tuple(q.shape[:-1]) + ('Dv',)} (all but the last dimension of `q`), "
            f"got {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{op}: `q`, `k` and `v` must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check_same_device(op, q, k=k, v=v)


def check_backend(op: str, backend, allowed: Sequence[str] = BACKENDS) -> None:
    if backend not in allowed:
        raise ValueError(f"{op}: `backend` must be one of {', '.join(map(repr, allowed))}; got {backend!r}")


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32 accumulation for half precision inputs; float64 stays float64."""
    dtypes = [x.dtype for x in tensors if x is not None]
    return torch.float64 if torch.float64 in dtypes else torch.float32


def first_order_only(op: str) -> None:
    """Called first in the backward of an op whose gradients are computed outside autograd (the Triton kernels,
    the torch paths' adjoint scans): they carry no graph, so a backward that should record one
    (create_graph=True, as for a gradient penalty) would silently treat them as constants; raise instead."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: this backend gives first derivatives only (a backward with create_graph=True went "
                           "through it); higher derivatives need backend='reference'")
