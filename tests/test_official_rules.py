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


PAPER_PRESETS = [
    (method, data)
    for method in ("asgnet", "dpnet", "pfenet", "pspnet_base", "qgnet", "symnet")
    for data in ("pascal", "coco")
]


@pytest.mark.parametrize("data", ["pascal", "coco"])
def test_symnet_presets_exclude_novel_images(data):
    # BAM (and Sym-Net on it) builds its training lists with filter_intersection=True.
    from helpers import compose_config

    assert compose_config("train", ["method=symnet", f"data={data}"]).data.exclude_novel_in_train is True
    assert compose_config("train", [f"experiment=symnet_{data}_r50"]).data.exclude_novel_in_train is True
    # PFENet's lists keep such images (novel objects are background); so does BAM's base stage.
    for method in ("pfenet", "asgnet", "qgnet", "dpnet", "pspnet_base"):
        assert compose_config("train", [f"method={method}", f"data={data}"]).data.exclude_novel_in_train is False


@pytest.mark.parametrize("method,data", PAPER_PRESETS)
def test_paper_presets_train_in_fp32(method, data):
    from helpers import compose_config

    cfg = compose_config("train", [f"method={method}", f"data={data}", "trainer=gpu"])
    assert cfg.trainer.precision == 32
    cfg = compose_config("train", [f"method={method}", f"data={data}", "trainer=gpu", "trainer.precision=bf16-mixed"])
    assert cfg.trainer.precision == "bf16-mixed"  # the user's choice wins


def test_panet_experiment_trains_in_fp32():
    from helpers import compose_config

    assert compose_config("train", ["experiment=panet_pascal", "trainer=gpu"]).trainer.precision == 32
    assert compose_config("train", ["method=panet", "trainer=gpu"]).trainer.precision == "bf16-mixed"
