"""DPNet (reconstructed) throughput: train and eval episodes/s at the paper protocol's 473 px
(deep-base ResNet-50, frozen, BN in train mode as the PFENet code) and at the synthetic benchmark's
113 px (ResNet-18), with the share of the time spent in the cycle comparison module (CCM: forward
similarity, the all-pairs backward check, the fallbacks).

    python benchmarks/bench.py --only dpnet [--device cuda] [--quick]
"""

from __future__ import annotations

import functools
import os

import torch
from bench import peak_rss_mib, section, sync
from bench_asgnet import Stopwatch, episode_batch, eval_step, measure

import fewshotseg.methods.dpnet as dpnet_module
from fewshotseg.backbones import Backbone
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.dpnet import DPNet


def train_step(model, optimizer, batch, device) -> None:
    model.train()
    logits, aux = model(batch)
    loss = segmentation_loss(logits, batch["query_mask"]) + sum(aux.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sync(device)


@section("dpnet")
def dpnet(args) -> list[dict]:
    device = args.device
    cuda = device.type == "cuda"
    rows = [{"name": "load average (1 min) at start", "value": os.getloadavg()[0], "unit": ""}]
    settings = [("resnet50_psp", 473, 1, 4 if cuda else 2), ("resnet18", 113, 1, 8), ("resnet18", 113, 5, 8)]
    if cuda:
        settings[1:1] = [("resnet50_psp", 473, 5, 4), ("resnet50_psp", 641, 1, 8)]
    steps = (2 if args.quick else 5) if cuda else (1 if args.quick else 2)
    repeat = 1 if args.quick else 3
    for name, size, shot, batch_size in settings:
        torch.manual_seed(0)
        psp = name.endswith("_psp")
        backbone = functools.partial(Backbone, name=name, frozen=psp, bn_mode="train" if psp else "eval")
        bins = [60, 30, 15, 8] if size == 473 else [1.0, 0.5, 0.25, 0.125]
        model = DPNet(backbone, bins=bins).to(device)
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.025, momentum=0.9
        )
        batch = episode_batch(batch_size, shot, size, device)
        watch = Stopwatch("cycle_comparison", device, dpnet_module)
        dpnet_module.cycle_comparison = watch
        tag = f"{shot}-shot, {size}px, batch {batch_size}, {name}"
        steps_of = {
            "train": functools.partial(train_step, model, optimizer, batch, device),
            "eval": functools.partial(eval_step, model, batch, device),
        }
        try:
            for phase, run in steps_of.items():
                speed, shares = measure(run, steps, batch_size, [watch], repeat)
                rows.append({"name": f"DPNet {phase} ({tag})", "value": speed, "unit": "episodes/s"})
                rows.append(
                    {"name": f"  CCM share of {phase} time", "value": 100 * shares[watch.name], "unit": "%"}
                )
        finally:
            dpnet_module.cycle_comparison = watch.real
    rows.append({"name": "peak RSS so far", "value": peak_rss_mib(), "unit": "MiB"})
    if cuda:
        rows.append(
            {
                "name": "peak GPU memory (DPNet)",
                "value": torch.cuda.max_memory_allocated() / 2**20,
                "unit": "MiB",
            }
        )
    return rows
