"""QGNet stage-1 pre-training throughput (`python -m fewshotseg.pretrain`), in images/s (one image =
its two views): the data pipeline (superpixels, views) and the training step (query forward and
backward, momentum encoder, both InfoNCE terms) for the synthetic preset's ResNet-18 at 112 px and
the paper's resnet50_dilated at 224 px.

    python benchmarks/bench.py --only pretrain [--device cuda] [--quick]
"""

from __future__ import annotations

import functools
import os
import time

import numpy as np
import torch
from bench import section, sync, synthetic_root, timed

from fewshotseg.backbones import Backbone
from fewshotseg.contrastive import GlobalLocalMoCo
from fewshotseg.data.sources.synthetic import SyntheticSource
from fewshotseg.data.unlabeled import UnlabeledDataModule, ViewTransform, compute_superpixels


def view_batch(batch_size: int, size: int, device: torch.device, cells: int = 8) -> dict:
    """Random views with a grid of `cells` x `cells` square regions, the second view flipped."""
    regions = torch.arange(cells * cells).view(1, cells, cells).repeat(batch_size, 1, 1)
    regions = torch.nn.functional.interpolate(regions[:, None].float(), size=(size, size), mode="nearest")
    regions = regions[:, 0].to(torch.int16)
    return {
        "view1": torch.randn(batch_size, 3, size, size, device=device),
        "view2": torch.randn(batch_size, 3, size, size, device=device),
        "regions1": regions.to(device),
        "regions2": regions.flip(-1).to(device),
    }


@section("pretrain")
def pretrain(args) -> list[dict]:
    device = args.device
    cuda = device.type == "cuda"
    rows = [{"name": "load average (1 min) at start", "value": os.getloadavg()[0], "unit": ""}]

    # Superpixels of one 500x375 image (computed once per image, then cached).
    image = np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)
    for method in ("slic", "felzenszwalb"):
        start = time.perf_counter()
        compute_superpixels(image, method=method)
        rows.append({"name": f"{method} superpixels, one 500x375 image", "value": 1000 * (time.perf_counter() - start),
                     "unit": "ms"})  # fmt: skip

    # Data pipeline: two 112 px views of the synthetic images, superpixels cached after the first pass.
    root = synthetic_root(args.workdir)
    for workers in (0, 2):
        dm = UnlabeledDataModule(str(root), functools.partial(SyntheticSource), batch_size=32, num_workers=workers,
                                 views=ViewTransform(size=112), superpixel={"method": "slic", "n_segments": 16})  # fmt: skip
        dm.setup()
        batches = 2 if args.quick else 6

        def load(dm=dm, batches=batches) -> int:
            for i, batch in enumerate(dm.train_dataloader()):
                if i + 1 == batches:
                    return batches * batch["view1"].shape[0]
            return 0

        rate = timed(load, warmup=1, repeat=1 if args.quick else 2)
        rows.append(
            {
                "name": f"loader images/s, 112 px, batch 32, {workers} workers (SLIC on first use)",
                "value": rate,
                "unit": "img/s",
            }
        )

    # Training steps.
    settings = [("resnet18", 112, 32 if cuda else 8)]
    settings.append(("resnet50_dilated", 224, 64 if cuda else 2))
    steps = 2 if args.quick else (10 if cuda else 3)
    for name, size, batch_size in settings:
        torch.manual_seed(0)
        model = GlobalLocalMoCo(functools.partial(Backbone, name=name, bn_mode="train"), queue_size=4096).to(
            device
        )
        model.train()
        optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=0.01, momentum=0.9)
        batch = view_batch(batch_size, size, device)

        def step(model=model, optimizer=optimizer, batch=batch, batch_size=batch_size) -> int:
            for _ in range(steps):
                loss = model(batch)["loss"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            sync(device)
            return steps * batch_size

        rate = timed(step, warmup=1, repeat=1 if args.quick else 2)
        rows.append({"name": f"train images/s, {name}, {size} px, batch {batch_size}", "value": rate,
                     "unit": "img/s"})  # fmt: skip
        if cuda:
            rows.append({"name": f"peak GPU memory, {name}, {size} px, batch {batch_size}",
                         "value": torch.cuda.max_memory_allocated() / 2**30, "unit": "GiB"})  # fmt: skip
        del model, optimizer
    return rows
