"""Every method side by side: train and eval episodes/s of each method config (as
`python -m fewshotseg.train method=<m>` builds it) on the synthetic benchmark's setting (ResNet-18
at output stride 8, 113 px, 1-shot, batch 8) and, unless --quick, eval at the paper protocol's
473 px (frozen deep-base ResNet-50, batch 2). Every episodic method config takes part (the method
contract, methods/base.py; a parameter-free one in eval only); a stage another method loads from a
file is built without it, as from a checkpoint (`Stage.restore`). Random weights and inputs.

    python benchmarks/bench.py --only methods [--device cuda] [--quick]
"""

from __future__ import annotations

import functools
import os

import torch
from bench import section
from bench_asgnet import episode_batch, eval_step, measure
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from fewshotseg.cli import CONFIG_DIR
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.base import registered_methods, without_stage_files


def build(method: str, backbone: str, device: torch.device) -> torch.nn.Module:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"method={method}", f"backbone={backbone}"])
    cfg = without_stage_files(cfg)
    torch.manual_seed(0)
    return instantiate(cfg.method.model).to(device)


def train_step(model, optimizer, batch) -> None:
    model.train()
    logits, aux = model(batch)
    loss = segmentation_loss(logits, batch["query_mask"]) + sum(aux.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@section("methods")
def methods(args) -> list[dict]:
    device = args.device
    rows = [{"name": "load average (1 min) at start", "value": os.getloadavg()[0], "unit": ""}]
    settings = [("resnet18", 113, 8, ("train", "eval"))]
    if not args.quick:
        settings.append(("resnet50_psp", 473, 2, ("eval",)))
    steps, repeat = (1, 1) if args.quick else (2, 2)
    for backbone, size, batch_size, phases in settings:
        batch = episode_batch(batch_size, 1, size, device)
        batch["class_id"] = torch.ones(batch_size, dtype=torch.long, device=device)  # for class names
        for method, cls in registered_methods().items():
            if cls.task != "episodes":  # a semantic stage: whole images, not episodes
                continue
            model = build(method, backbone, device)
            params = [p for p in model.parameters() if p.requires_grad]
            runs = {"eval": functools.partial(eval_step, model, batch, device)}
            if params:  # a parameter-free baseline has nothing to train
                optimizer = torch.optim.SGD(params, lr=1e-4)
                runs["train"] = functools.partial(train_step, model, optimizer, batch)
            for phase in (p for p in phases if p in runs):
                speed, _ = measure(runs[phase], steps, batch_size, [], repeat)
                rows.append({"name": f"{method} {phase} (1-shot, {size}px, batch {batch_size}, {backbone})",
                             "value": speed, "unit": "episodes/s"})  # fmt: skip
    return rows
