"""Before/after channels_last (issue 7): PANet (VGG-16, 417 px) and ASGNet (deep-base ResNet-50,
473 px, frozen, BN in train mode as the official code) train and eval episodes/s with contiguous
NCHW everywhere, with the default channels_last policy, and with the heads in channels_last too, measured
interleaved in one run so the ratio is robust to a shared machine's load; plus the largest
difference of the eval logits (same weights).

    python benchmarks/bench.py --only memory_format [--device cuda] [--quick]
"""

from __future__ import annotations

import functools
import time

import torch
from bench import section
from bench_asgnet import episode_batch, eval_step, train_step

from fewshotseg.backbones import Backbone
from fewshotseg.lit import segmentation_loss
from fewshotseg.methods.asgnet import ASGNet
from fewshotseg.methods.panet import PANet

# NCHW everywhere; the default (backbone.channels_last: channels_last in passes without gradient,
# NCHW maps to backpropagating heads); and the method's heads converted to channels_last as well.
FORMATS = {
    "NCHW": (False, False),
    "default channels_last": (True, False),
    "heads channels_last too": (True, True),
}


def build(method: str, channels_last: bool, heads: bool, device):
    torch.manual_seed(0)
    if method == "PANet":
        model = PANet(functools.partial(Backbone, name="vgg16_panet", channels_last=channels_last), level=4)
        setting = (1, 1, 417, "1-shot, 417px, batch 1, vgg16_panet")
    else:
        backbone = functools.partial(
            Backbone, name="resnet50_psp", frozen=True, bn_mode="train", channels_last=channels_last
        )
        model = ASGNet(backbone, bins=[60, 30, 15, 8])
        setting = (2, 1, 473, "1-shot, 473px, batch 2, resnet50_psp")
    if heads:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device), setting


def panet_train_step(model, optimizer, batch, device) -> None:
    model.train()
    logits, aux = model(batch)
    loss = segmentation_loss(logits, batch["query_mask"]) + aux["align"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@section("memory_format")
def memory_format(args) -> list[dict]:
    device, rows = args.device, []
    repeat = 1 if args.quick else 3
    for method in ("PANet", "ASGNet"):
        runs, logits = {}, {}
        for fmt, (cl, heads) in FORMATS.items():
            model, (batch_size, shot, size, tag) = build(method, cl, heads, device)
            batch = episode_batch(batch_size, shot, size, device)
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            step = panet_train_step if method == "PANet" else train_step
            model.eval()
            with torch.no_grad():
                logits[fmt] = model({k: v for k, v in batch.items() if k != "query_mask"})[0].float().cpu()
            runs[fmt] = {
                "train": functools.partial(step, model, optimizer, batch, device),
                "eval": functools.partial(eval_step, model, batch, device),
            }
        best = {(fmt, phase): float("inf") for fmt in runs for phase in ("train", "eval")}
        for fmt in runs:  # warm-up
            runs[fmt]["eval"]()
        for _ in range(repeat):  # interleaved: every format sees the same load
            for fmt in runs:
                for phase, fn in runs[fmt].items():
                    start = time.perf_counter()
                    fn()
                    best[fmt, phase] = min(best[fmt, phase], time.perf_counter() - start)
        for (fmt, phase), seconds in best.items():
            rows.append({"name": f"{method} {phase} ({tag}), {fmt}", "value": batch_size / seconds,
                         "unit": "episodes/s"})  # fmt: skip
        for phase in ("train", "eval"):
            for fmt in list(FORMATS)[1:]:
                rows.append({"name": f"  {method} {phase} speed-up, {fmt} / NCHW",
                             "value": best["NCHW", phase] / best[fmt, phase], "unit": "x"})  # fmt: skip
        for fmt in list(FORMATS)[1:]:
            rows.append({"name": f"  {method} eval logits max |diff|, {fmt} vs NCHW",
                         "value": (logits[fmt] - logits["NCHW"]).abs().max().item(), "unit": ""})  # fmt: skip
    return rows
