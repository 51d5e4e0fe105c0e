"""Learning-rate schedules stepped every iteration. Each takes the optimiser and the total number of
training steps (known only once the trainer has the data), so configs give them as partials."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def poly(optimizer: Optimizer, total_steps: int, power: float = 0.9, warmup_steps: int = 0) -> LambdaLR:
    """The optimizer step k = 0, 1, ... uses lr = base_lr * (1 - (k + 1) / total_steps) ** power, after
    an optional linear warm-up. The PFENet and BAM families count `current_iter = i + 1` before
    setting the lr of update i, so their first update already decays and the last one has lr 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, 1.0 - (step + 1) / max(1, total_steps)) ** power

    return LambdaLR(optimizer, factor)


def multistep(
    optimizer: Optimizer, total_steps: int, milestones: list[int] | list[float], gamma: float = 0.1
) -> LambdaLR:
    """lr = base_lr * gamma ** (number of milestones passed) (PANet: 10k, 20k of 30k steps).

    Milestones <= 1 are fractions of total_steps, so short runs keep the paper's shape."""
    steps = sorted(m * total_steps if m <= 1 else m for m in milestones)
    return LambdaLR(optimizer, lambda step: gamma ** sum(step >= m for m in steps))


def constant(optimizer: Optimizer, total_steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: 1.0)
