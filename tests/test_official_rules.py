"""The authors' rules, each checked against the official formula or library call computed here
independently: the poly schedule, the augmentation ops, PANet's episode sampling, BAM's
novel-image rule in the presets."""

from __future__ import annotations

import pytest
import torch

from fewshotseg.schedules import poly


def _lrs_used(scheduler_factory, total: int, base_lr: float = 0.05) -> list[float]:
    """The lr each optimizer update uses, stepping the scheduler after every update as Lightning does."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=base_lr)
    sched = scheduler_factory(opt, total)
    used = []
    for _ in range(total):
        used.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return used


@pytest.mark.parametrize("total", [1, 7, 50])
def test_poly_equals_the_official_loop(total):
    # PFENet/BAM train.py: current_iter = epoch * len(loader) + i + 1, then
    # lr = base_lr * (1 - current_iter / max_iter) ** power, then the update.
    base, power = 0.05, 0.9
    official = [base * (1 - (i + 1) / total) ** power for i in range(total)]
    assert _lrs_used(lambda o, t: poly(o, t, power=power), total, base) == pytest.approx(official, abs=1e-15)
    assert official[-1] == 0.0
