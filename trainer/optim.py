"""AdamW with decay / no-decay groups, and the warmup + cosine learning-rate schedule."""

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module, learning_rate: float, weight_decay: float, device: torch.device,
                    betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """Matrices (projections, embeddings) decay; norms and biases do not. Frozen weights are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every tensor in one pass, on CPU as on CUDA: far faster than the foreach loop and equal
    # to it within fp32 rounding (figures in docs/performance.md).
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas,
                             fused=device.type in ("cuda", "cpu"))


def lr_at(step: int, total_steps: int, learning_rate: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then a cosine from learning_rate down to min_lr."""
    if step < warmup_steps:
        return learning_rate * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (learning_rate - min_lr) * (1 + math.cos(math.pi * progress))
