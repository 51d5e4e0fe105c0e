"""Data pipeline and PANet throughput on the synthetic benchmark (default settings)."""

from __future__ import annotations

import functools
import itertools

import torch
from bench import peak_rss_mib, section, sync, synthetic_root, timed

from fewshotseg.backbones import Backbone
from fewshotseg.data.datamodule import FewShotDataModule
from fewshotseg.data.sources.synthetic import SyntheticSource
from fewshotseg.data.transforms import resize_transform, train_transform
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.panet import PANet


def datamodule(args, num_workers: int, batch_size: int = 8) -> FewShotDataModule:
    root = synthetic_root(args.workdir)
    dm = FewShotDataModule(root, SyntheticSource, train_transform(113), resize_transform(113),
                           num_workers=num_workers, batch_size=batch_size, test_batch_size=16)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


@section("data")
def data_loading(args) -> list[dict]:
    rows = [
        {
            "name": "synthetic benchmark generation (1500 images)",
            "value": synthetic_root(args.workdir) and synthetic_root.generation_s,
            "unit": "s",
        }
    ]
    batches = 5 if args.quick else 25
    for workers in (0, 2):
        dm = datamodule(args, workers)

        def epoch(loader_fn, n=batches):
            count = 0
            for batch in itertools.islice(loader_fn(), n):
                count += batch["query_img"].shape[0]
            return count

        rows.append(
            {
                "name": f"train episodes/s (1-shot, 113px, workers={workers})",
                "value": timed(lambda dm=dm: epoch(dm.train_dataloader)),
                "unit": "episodes/s",
            }
        )  # noqa: B023
        rows.append(
            {
                "name": f"test episodes/s (1-shot, 113px, workers={workers})",
                "value": timed(lambda dm=dm: epoch(dm.test_dataloader)),
                "unit": "episodes/s",
            }
        )  # noqa: B023
    return rows


@section("panet")
def panet(args) -> list[dict]:
    device = args.device
    torch.manual_seed(0)
    model = PANet(functools.partial(Backbone, name="resnet18", output_stride=8), level=3).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    rows = []
    steps = 3 if args.quick else 10
    for shot, size, batch_size in [(1, 113, 8), (5, 113, 8), (1, 417, 1)]:
        g = torch.Generator().manual_seed(0)
        batch = {
            "query_img": torch.randn(batch_size, 3, size, size, generator=g),
            "support_imgs": torch.randn(batch_size, shot, 3, size, size, generator=g),
            "support_masks": (torch.rand(batch_size, shot, size, size, generator=g) > 0.7).long(),
            "query_mask": (torch.rand(batch_size, size, size, generator=g) > 0.7).long(),
        }
        batch = {k: v.to(device) for k, v in batch.items()}

        def train_steps(batch=batch, batch_size=batch_size):
            model.train()
            for _ in range(steps):
                logits, aux = model(batch)
                loss = segmentation_loss(logits, batch["query_mask"]) + aux["align"]
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            sync(device)
            return steps * batch_size

        @torch.no_grad()
        def eval_steps(batch=batch, batch_size=batch_size):
            model.eval()
            for _ in range(steps):
                model(batch)
            sync(device)
            return steps * batch_size

        tag = f"{shot}-shot, {size}px, batch {batch_size}, resnet18 OS8"
        rows.append({"name": f"PANet train ({tag})", "value": timed(train_steps), "unit": "episodes/s"})
        rows.append({"name": f"PANet eval ({tag})", "value": timed(eval_steps), "unit": "episodes/s"})
    rows.append({"name": "peak RSS so far", "value": peak_rss_mib(), "unit": "MiB"})
    if device.type == "cuda":
        rows.append(
            {
                "name": "peak GPU memory (PANet)",
                "value": torch.cuda.max_memory_allocated() / 2**20,
                "unit": "MiB",
            }
        )
    return rows
