"""Triton kernels behind the scan ops. Imported on demand: triton is needed only when they run."""

from __future__ import annotations

import importlib.util
import os

import torch


def interpreting() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors, for tests without a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def usable(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors on `device`."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def require(op: str, device: torch.device) -> None:
    """The error for backend="triton" where the kernels can't run."""
    if importlib.util.find_spec("triton") is None:
        raise ValueError(f"{op}: backend='triton' needs the triton package (pip install triton)")
    if not usable(device):
        raise ValueError(f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")
