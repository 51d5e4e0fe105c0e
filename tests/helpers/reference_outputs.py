"""Reference outputs of PANet and ASGNet on the paper backbones (and PANet on ResNet-18), written
once by `python tests/reference_outputs.py` (now `python -m helpers.reference_outputs` run in tests/) with the code *before* the backbone-level refactor
(issue 7; the code of commit c8da91d, with layer names instead of levels) into `tests/data/reference_outputs.pt`;
`test_backbone_levels.py` checks that the current code gives the same numbers. Do not regenerate
it to make a test pass: it is the proof that the refactor changed nothing. Weights are filled per parameter name from a name-seeded
generator, so they do not depend on module construction order."""

from __future__ import annotations

import zlib
from functools import partial
from pathlib import Path

import torch

from fewshotseg.backbones import Backbone
from helpers.episodes import episode as shared_episode

REFERENCE_FILE = Path(__file__).parents[1] / "data" / "reference_outputs.pt"


def fill_by_name(model: torch.nn.Module) -> None:
    """Deterministic weights from each tensor's name (BN stats positive, scaled for stability)."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64))
            else:
                fan_in = max(1, t[0].numel()) if t.dim() > 1 else 1
                scale = (1.0 / fan_in) ** 0.5 if t.dim() > 1 else 0.1
                base = 1.0 if name.endswith("weight") and t.dim() == 1 else 0.0
                t.copy_(base + scale * torch.randn(t.shape, generator=g, dtype=torch.float64))


def episode(size: int, shots: int, batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """The reference episode: float64 images, fixed support and query regions scaled with `size`."""
    return shared_episode(
        batch, shots, size, seed, random_boxes=False, dtype=torch.float64,
        support=[((slice(size // 4, 3 * size // 4), slice(size // 5, 4 * size // 5)), 1),
                 ((slice(None, 3), slice(None)), 255)],
        query=(slice(size // 3, None), slice(size // 3, None)),
    )  # fmt: skip


def cases():
    """name -> (model factory, backbone, episode size, shots[, bn_mode])."""
    from fewshotseg.methods.asgnet import ASGNet
    from fewshotseg.methods.panet import PANet

    return {
        "panet_resnet18": (lambda bb: PANet(bb, **PANET_RESNET18), "resnet18", 65, 2),
        "panet_vgg16": (lambda bb: PANet(bb, **PANET_VGG), "vgg16_panet", 65, 1),
        "asgnet_psp_eval": (lambda bb: ASGNet(bb, **ASGNET_KW), "resnet50_psp", 97, 2),
        "asgnet_psp_train_bn": (lambda bb: ASGNet(bb, **ASGNET_KW), "resnet50_psp", 97, 2, "train"),
    }


# Before the refactor: feature_layer="layer3" / "block5" and feature_layers=["layer3", "layer2"].
PANET_RESNET18 = {"level": 3}
PANET_VGG = {"level": 4}
ASGNET_KW = {"levels": [3, 2], "bins": [1.0, 0.5, 0.25, 0.125]}


def run(model_factory, backbone_name, size, shots, bn_mode="eval", **backbone_kwargs):
    """Eval logits and the training-mode auxiliary loss (dropout seeded) of one case, float64."""
    bb = partial(Backbone, name=backbone_name, output_stride=8, bn_mode=bn_mode, **backbone_kwargs)
    model = model_factory(bb).double()
    fill_by_name(model)
    model.eval()
    batch = episode(size, shots)
    with torch.no_grad():
        logits = model({k: v for k, v in batch.items() if k != "query_mask"})[0]
    model.train()
    torch.manual_seed(1)
    _, aux = model(batch)
    return {"logits": logits, **{f"aux/{k}": v.detach() for k, v in aux.items()}}


if __name__ == "__main__":
    out = {name: run(*case) for name, case in cases().items()}
    REFERENCE_FILE.parent.mkdir(exist_ok=True)
    torch.save(out, REFERENCE_FILE)
    for name, res in out.items():
        print(name, {k: tuple(v.shape) for k, v in res.items()})
