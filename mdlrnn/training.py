"""What the training scripts (train/classify.py, train/graphs.py) share: one optimiser step and the
warm-up + cosine learning-rate schedule, both stepped per batch."""

from __future__ import annotations

import math

import torch
from torch import nn


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int, min_ratio: float = 0.0):
    """LambdaLR: linear warm-up over `warmup_steps` (>= 1), then cosine decay to lr * `min_ratio` at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_step(loss: torch.Tensor, model: nn.Module, optimizer, scheduler, clip_grad: float) -> None:
    """Backward, gradient-norm clipping (0: off), the optimiser's and the scheduler's step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip_grad:
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    scheduler.step()
