"""Throughput and memory benchmarks: `make bench` (or `python benchmarks/bench.py --only panet`).

Prints a table and writes bench_results/bench.json. Every section is a function returning rows
{section, name, value, unit, ...}; sections live in benchmarks/bench_*.py and register with
@section. Speed is measured here, never asserted in tests; compare ratios within one run.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

SECTIONS: dict[str, Callable[[argparse.Namespace], list[dict]]] = {}


def section(name: str):
    def register(fn):
        SECTIONS[name] = fn
        return fn

    return register


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], int], warmup: int = 1, repeat: int = 3) -> float:
    """Items per second of fn() (which returns how many items it processed): the best of `repeat`."""
    for _ in range(warmup):
        fn()
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        n = fn()
        best = max(best, n / (time.perf_counter() - start))
    return best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@functools.cache
def synthetic_root(workdir: str) -> Path:
    from fewshotseg.data.sources.synthetic_gen import generate_synthetic

    start = time.perf_counter()
    root = generate_synthetic(Path(workdir) / "synthetic")
    synthetic_root.generation_s = time.perf_counter() - start
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default="", help="comma-separated sections (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", default=None, help="where to generate data (default: a temp dir)")
    parser.add_argument("--out", default="bench_results/bench.json")
    parser.add_argument("--quick", action="store_true", help="fewer iterations (smoke test)")
    parser.add_argument(
        "--eval-size", type=int, default=None, help="section eval: test size in px (default 121)"
    )
    parser.add_argument(
        "--eval-episodes", type=int, default=None, help="section eval: episodes per seed (default 45)"
    )
    parser.add_argument(
        "--eval-methods", default="", help="section eval: comma-separated methods (default: all six)"
    )
    parser.add_argument(
        "--no-eval-training", action="store_true", help="section eval: skip the training-with-validation runs"
    )
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    sys.modules.setdefault("bench", sys.modules[__name__])  # sections register here when run as a script
    for path in sorted(here.glob("bench_*.py")):
        importlib.import_module(path.stem)
    chosen = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}: choose from {sorted(SECTIONS)}")

    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = args.workdir or tmp
        rows = []
        for name in chosen:
            if args.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for row in SECTIONS[name](args):
                rows.append({"section": name, **row})
                print(f"{name:<10} {row['name']:<48} {row['value']:>12.2f} {row['unit']}", flush=True)

    meta = {
        "device": str(args.device),
        "gpu": torch.cuda.get_device_name() if args.device.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "peak_rss_mib": peak_rss_mib(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"peak RSS {meta['peak_rss_mib']:.0f} MiB; results written to {out}")


if __name__ == "__main__":
    main()
