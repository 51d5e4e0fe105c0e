"""ASGNet throughput: train and eval episodes/s at the paper's 473 px (deep-base ResNet-50, frozen,
BN in train mode as the official code) and at the synthetic benchmark's 113 px (ResNet-18), with the
share of the time spent in superpixel-guided clustering (SGC) and in seed placement; and batched SGC
against a Python loop over the support images.

    python benchmarks/bench.py --only asgnet [--device cuda] [--quick]
"""

from __future__ import annotations

import functools
import os
import time

import torch
from bench import peak_rss_mib, section, sync

import fewshotseg.methods.asgnet as asgnet_module
from fewshotseg.backbones import Backbone
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.asgnet import ASGNet
from fewshotseg.ops.superpixel import batched_superpixel_clustering, superpixel_clustering


class Stopwatch:
    """Wraps a function of a method module and adds up its wall time (device synchronised)."""

    def __init__(self, name: str, device: torch.device, module=asgnet_module):
        self.name, self.device, self.seconds = name, device, 0.0
        self.real = getattr(module, name)

    def __call__(self, *args, **kwargs):
        sync(self.device)
        start = time.perf_counter()
        out = self.real(*args, **kwargs)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        return out


def episode_batch(batch_size: int, shot: int, size: int, device: torch.device) -> dict:
    """Random images; support masks are random rectangles covering 25-80 % of the image, so that
    most supports get several superpixels (5 at 473 px, 2 at 113 px for the larger ones)."""
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(batch_size, shot, size, size, dtype=torch.long)
    for b in range(batch_size):
        for k in range(shot):
            h, w = (torch.rand(2, generator=g) * 0.4 + 0.5).mul(size).long().tolist()
            r, c = (
                torch.randint(0, size - h + 1, (1,), generator=g).item(),
                torch.randint(0, size - w + 1, (1,), generator=g).item(),
            )
            masks[b, k, r : r + h, c : c + w] = 1
    q_mask = torch.zeros(batch_size, size, size, dtype=torch.long)
    q_mask[:, size // 4 : 3 * size // 4, size // 5 : 4 * size // 5] = 1
    batch = {
        "query_img": torch.randn(batch_size, 3, size, size, generator=g),
        "support_imgs": torch.randn(batch_size, shot, 3, size, size, generator=g),
        "support_masks": masks,
        "query_mask": q_mask,
    }
    return {k: v.to(device) for k, v in batch.items()}


def train_step(model, optimizer, batch, device) -> None:
    model.train()
    logits, aux = model(batch)
    loss = segmentation_loss(logits, batch["query_mask"]) + aux["aux"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    sync(device)


@torch.no_grad()
def eval_step(model, batch, device) -> None:
    model.eval()
    model(batch)
    sync(device)


def measure(
    run, steps: int, batch_size: int, watches: list[Stopwatch], repeat: int
) -> tuple[float, dict[str, float]]:
    """Best episodes/s over `repeat` runs of `steps` steps, and each stopwatch's share of that run."""
    run()  # warm-up
    best, shares = 0.0, {}
    for _ in range(repeat):
        for w in watches:
            w.seconds = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            run()
        elapsed = time.perf_counter() - start
        if steps * batch_size / elapsed > best:
            best = steps * batch_size / elapsed
            shares = {w.name: w.seconds / elapsed for w in watches}
    return best, shares


@section("asgnet")
def asgnet(args) -> list[dict]:
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
        model = ASGNet(backbone, bins=bins).to(device)
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad], lr=0.025, momentum=0.9
        )
        batch = episode_batch(batch_size, shot, size, device)
        watches = [Stopwatch("batched_superpixel_clustering", device), Stopwatch("place_seeds_batch", device)]
        for w in watches:
            setattr(asgnet_module, w.name, w)

        tag = f"{shot}-shot, {size}px, batch {batch_size}, {name}"
        steps_of = {
            "train": functools.partial(train_step, model, optimizer, batch, device),
            "eval": functools.partial(eval_step, model, batch, device),
        }
        try:
            for phase, run in steps_of.items():
                speed, shares = measure(run, steps, batch_size, watches, repeat)
                rows.append({"name": f"ASGNet {phase} ({tag})", "value": speed, "unit": "episodes/s"})
                rows.append(
                    {
                        "name": f"  SGC share of {phase} time",
                        "value": 100 * shares["batched_superpixel_clustering"],
                        "unit": "%",
                    }
                )
                rows.append(
                    {
                        "name": f"  seed placement share of {phase} time",
                        "value": 100 * shares["place_seeds_batch"],
                        "unit": "%",
                    }
                )
        finally:
            for w in watches:
                setattr(asgnet_module, w.name, w.real)
    rows += batched_vs_loop(device, args.quick)
    rows.append({"name": "peak RSS so far", "value": peak_rss_mib(), "unit": "MiB"})
    if cuda:
        rows.append(
            {
                "name": "peak GPU memory (ASGNet)",
                "value": torch.cuda.max_memory_allocated() / 2**20,
                "unit": "MiB",
            }
        )
    return rows


def sgc_batched(feat, mask, seeds, counts, device) -> None:
    batched_superpixel_clustering(feat, mask, seeds, counts, 10)
    sync(device)


def sgc_loop(feat, mask, seeds, counts, device) -> None:
    for i in range(feat.shape[0]):
        superpixel_clustering(feat[i], mask[i], seeds[i, : counts[i]], 10)
    sync(device)


def batched_vs_loop(device: torch.device, quick: bool) -> list[dict]:
    """SGC for N support images (60x60x256, 5 seeds, 10 iterations): one batched call against the
    per-image loop the official code runs."""
    rows = []
    g = torch.Generator().manual_seed(0)
    for n in (8, 20):  # batch 8 x 1 shot, batch 4 x 5 shots
        feat = torch.nn.functional.avg_pool2d(torch.randn(n, 256, 60, 60, generator=g), 3, 1, 1).to(device)
        mask = torch.zeros(n, 60, 60)
        mask[:, 10:50, 8:52] = 1
        mask = mask.to(device)
        seeds = (
            torch.tensor([[15, 12], [45, 48], [15, 48], [45, 12], [30, 30]])
            .expand(n, 5, 2)
            .contiguous()
            .to(device)
        )
        counts = torch.full((n,), 5, device=device)

        args = (feat, mask, seeds, counts, device)
        fns = {
            "batched": functools.partial(sgc_batched, *args),
            "per-image loop": functools.partial(sgc_loop, *args),
        }
        best = dict.fromkeys(fns, float("inf"))
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(3 if quick else 8):  # interleaved, best of: robust to a shared machine's load
            for label, fn in fns.items():
                start = time.perf_counter()
                fn()
                best[label] = min(best[label], time.perf_counter() - start)
        for label, seconds in best.items():
            rows.append(
                {
                    "name": f"SGC {label}, {n} supports 60x60x256, 5 seeds, 10 it",
                    "value": 1000 * seconds,
                    "unit": "ms/call",
                }
            )
    return rows
