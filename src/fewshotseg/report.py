"""The paper table of a sweep: read the runs' results.json and write Markdown, CSV and PNG charts.

    python -m fewshotseg.train -m method=panet,asgnet fold=0,1,2,3 shot=1,5
    python -m fewshotseg.report logs/train/multiruns/<date> [more run or sweep folders] [--out report/]

Every `results.json` under the given folders (written by `train` and `evaluate`) is one run. Rows
are method x backbone x shot (one table per dataset and protocol), columns fold 0..3 and their
mean, for mIoU, FB-IoU and any other metric the runs hold (e.g. Sym-Net's meta_miou). A cell is the
run's value (its mean over test seeds); with several runs of one cell (training seeds) it is
mean +- std over them. The mean column is the mean over the folds present (the paper number); its
std is over the training seeds when every fold has the same seeds. Charts: mIoU per fold per row,
and per-class IoU per row (each class from the fold where it is novel).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fewshotseg.cli import user_errors
from fewshotseg.errors import ConfigError

METRIC_NAMES = {"miou": "mIoU", "fbiou": "FB-IoU"}


@dataclass
class Run:
    path: Path
    method: str
    backbone: str
    data: str
    protocol: str
    fold: int
    shot: int
    seed: int | None
    metrics: dict[str, float]  # the mean over the run's test seeds
    iou_per_class: dict[str, float]


@dataclass
class Row:
    """One table row: a method x backbone x shot on one dataset and protocol."""

    key: tuple[str, str, str, str, int]  # data, protocol, method, backbone, shot
    runs: list[Run] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.key[2]} / {self.key[3]} / {self.key[4]}-shot"


def read_run(path: Path) -> Run:
    try:
        record = json.loads(path.read_text())
        info, summary = record["run"], record["summary"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path}: not a fewshotseg results.json with 'run' and 'summary' ({type(e).__name__}: {e})"
        ) from e
    metrics = {
        k: float(v["mean"]) for k, v in summary.items() if k != "iou_per_class" and isinstance(v, dict)
    }
    return Run(
        path=path,
        method=str(info.get("method")),
        backbone=str(info.get("backbone")),
        data=str(info.get("data")),
        protocol=str(info.get("protocol") or "default"),
        fold=int(info.get("fold") or 0),
        shot=int(info.get("shot") or 1),
        seed=info.get("seed"),
        metrics=metrics,
        iou_per_class={c: float(v["mean"]) for c, v in summary.get("iou_per_class", {}).items()},
    )


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every results.json in the given run/sweep folders (or the files themselves), sorted."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = sorted(p.rglob("results.json"))
            if not found:
                raise ConfigError(
                    f"{p}: no results.json in this folder (train with test=true, or run evaluate)"
                )
            files += found
        else:
            raise ConfigError(f"{p}: no such run or sweep folder")
    return [read_run(f) for f in dict.fromkeys(files)]


def group_rows(runs: list[Run]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for run in runs:
        key = (run.data, run.protocol, run.method, run.backbone, run.shot)
        rows.setdefault(key, Row(key)).runs.append(run)
    return [rows[k] for k in sorted(rows)]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean, and the std when there are several values (population std, as `evaluate`)."""
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else None)


def row_cells(row: Row, metric: str, folds: list[int]) -> dict[str, tuple[float, float | None] | None]:
    """{'fold0': (mean, std), ..., 'mean': (mean, std)} of one metric; None where no run exists."""
    by_fold: dict[int, dict] = defaultdict(dict)  # fold -> {seed or index: value}
    for i, run in enumerate(row.runs):
        if metric in run.metrics:
            seed = run.seed if run.seed is not None else f"#{i}"
            by_fold[run.fold][seed] = run.metrics[metric]
    cells: dict[str, tuple[float, float | None] | None] = {
        f"fold{f}": _mean_std(list(by_fold[f].values())) if by_fold.get(f) else None for f in folds
    }
    present = [f for f in folds if by_fold.get(f)]
    if not present:
        cells["mean"] = None
        return cells
    seed_sets = {frozenset(by_fold[f]) for f in present}
    if len(seed_sets) == 1 and len(next(iter(seed_sets))) > 1:  # the same seeds in every fold
        seeds = sorted(next(iter(seed_sets)), key=str)
        cells["mean"] = _mean_std([statistics.fmean(by_fold[f][s] for f in present) for s in seeds])
    else:
        cells["mean"] = (statistics.fmean(cells[f"fold{f}"][0] for f in present), None)
    return cells


def _fmt(cell: tuple[float, float | None] | None) -> str:
    if cell is None:
        return "–"
    mean, std = cell
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def metrics_of(rows: list[Row]) -> list[str]:
    """mIoU, FB-IoU, then any other metric found (sorted)."""
    found = {m for row in rows for run in row.runs for m in run.metrics}
    return [m for m in METRIC_NAMES if m in found] + sorted(found - set(METRIC_NAMES))


def sections(rows: list[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows per (dataset, protocol): numbers of different benchmarks or protocols never share a table."""
    out: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for row in rows:
        out[row.key[:2]].append(row)
    return dict(out)


def folds_of(rows: list[Row]) -> list[int]:
    """Folds 0..3 (the benchmarks' four), or every fold seen if more."""
    seen = {run.fold for row in rows for run in row.runs}
    return list(range(max(4, max(seen) + 1))) if seen else [0, 1, 2, 3]


def markdown(rows: list[Row]) -> str:
    out = []
    for (data, protocol), section in sections(rows).items():
        folds = folds_of(section)
        n_runs = sum(len(r.runs) for r in section)
        out.append(f"## {data} (protocol: {protocol}), {n_runs} runs\n")
        for metric in metrics_of(section):
            head = ["method", "backbone", "shot", *(f"fold {f}" for f in folds), "mean"]
            out.append(f"**{METRIC_NAMES.get(metric, metric)}** (%)\n")
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for row in section:
                cells = row_cells(row, metric, folds)
                if cells["mean"] is None:  # a metric other methods report (e.g. meta_miou)
                    continue
                values = [_fmt(cells[f"fold{f}"]) for f in folds] + [f"**{_fmt(cells['mean'])}**"]
                out.append("| " + " | ".join([row.key[2], row.key[3], str(row.key[4]), *values]) + " |")
            out.append("")
    return "\n".join(out)


def write_csv(rows: list[Row], path: Path) -> None:
    """One line per row and metric: each fold's mean and std (fractions, not %), and the runs used."""
    all_folds = sorted({f for (_, section) in sections(rows).items() for f in folds_of(section)})
    cols = [c for f in all_folds for c in (f"fold{f}", f"fold{f}_std")]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["data", "protocol", "method", "backbone", "shot", "metric", *cols, "mean", "mean_std", "runs"]
        )
        for row in rows:
            for metric in metrics_of([row]):
                cells = row_cells(row, metric, all_folds)
                values = []
                for name in [*(f"fold{f}" for f in all_folds), "mean"]:
                    cell = cells[name]
                    values += (
                        ["", ""]
                        if cell is None
                        else [f"{cell[0]:.6f}", "" if cell[1] is None else f"{cell[1]:.6f}"]
                    )
                writer.writerow([*row.key, metric, *values, len(row.runs)])


def _slug(*parts) -> str:
    return "_".join(str(p) for p in parts).replace("/", "-").replace(" ", "")


def _mark_missing(ax, positions, means) -> None:
    """'n/a' where a bar has no result, so a missing fold or class never reads as IoU 0."""
    for x, m in zip(positions, means):
        if m != m:  # NaN
            ax.text(x, 1, "n/a", ha="center", va="bottom", rotation=90, fontsize=7, color="dimgray")


def _finish(ax, groups: int, ylabel: str, title: str) -> None:
    """Every group shown (a group with no bar too), a 0-100 axis, and the legend beside the plot
    where it can hide no bar."""
    ax.set_xlim(-0.5, groups - 0.5)
    ax.set_ylim(0, 100)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    ax.grid(axis="y", alpha=0.3)


def charts(rows: list[Row], out: Path) -> list[Path]:
    """Per dataset and protocol: mIoU per fold per row, and per-class IoU per row (grouped bars)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    written = []
    for (data, protocol), section in sections(rows).items():
        folds = folds_of(section)
        width = 0.8 / len(section)
        # mIoU per fold (and the mean), error bars = std over training seeds
        fig, ax = plt.subplots(figsize=(1.6 * (len(folds) + 1) + 4.5, 4))
        x = np.arange(len(folds) + 1)
        for i, row in enumerate(section):
            cells = row_cells(row, "miou", folds)
            names = [*(f"fold{f}" for f in folds), "mean"]
            means = [100 * cells[n][0] if cells[n] else np.nan for n in names]
            stds = [100 * (cells[n][1] or 0) if cells[n] else 0 for n in names]
            positions = x + (i - (len(section) - 1) / 2) * width
            ax.bar(positions, means, width, yerr=stds if any(stds) else None, label=row.label, capsize=2)
            _mark_missing(ax, positions, means)
        ax.set_xticks(x, [*(f"fold {f}" for f in folds), "mean"])
        _finish(ax, len(x), "mIoU (%)", f"mIoU per fold: {data} ({protocol})")
        fig.tight_layout()
        written.append(out / f"miou_per_fold_{_slug(data, protocol)}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

        # per-class IoU: mean over the runs that tested the class
        classes = list(dict.fromkeys(c for row in section for run in row.runs for c in run.iou_per_class))
        if not classes:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(classes) * max(1, len(section) / 2) + 2) + 3, 4.5))
        x = np.arange(len(classes))
        for i, row in enumerate(section):
            values = [[run.iou_per_class[c] for run in row.runs if c in run.iou_per_class] for c in classes]
            means = [100 * statistics.fmean(v) if v else np.nan for v in values]
            positions = x + (i - (len(section) - 1) / 2) * width
            ax.bar(positions, means, width, label=row.label)
            _mark_missing(ax, positions, means)
        ax.set_xticks(x, classes, rotation=60, ha="right", fontsize=8)
        _finish(ax, len(x), "IoU (%)", f"IoU per novel class: {data} ({protocol})")
        fig.tight_layout()
        written.append(out / f"iou_per_class_{_slug(data, protocol)}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def report(paths: Iterable[str | Path], out: str | Path = "report", plots: bool = True) -> dict:
    """Read the runs, write report.md, report.csv and the charts into `out`; returns what it wrote."""
    runs = find_runs(paths)
    rows = group_rows(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows)
    (out / "report.md").write_text(f"# Results ({len(runs)} runs)\n\n{md}")
    write_csv(rows, out / "report.csv")
    pngs = charts(rows, out) if plots else []
    return {
        "runs": runs,
        "rows": rows,
        "markdown": md,
        "files": [out / "report.md", out / "report.csv", *pngs],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fewshotseg.report",
        description="The paper table (Markdown, CSV) and charts (PNG) of runs' results.json.",
    )
    parser.add_argument("paths", nargs="+", help="run or sweep folders (searched for results.json), or files")
    parser.add_argument("--out", default="report", help="folder for report.md, report.csv and the PNGs")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    with user_errors():
        result = report(args.paths, args.out, plots=not args.no_plots)
    print(result["markdown"])
    print("written: " + ", ".join(str(p) for p in result["files"]))


if __name__ == "__main__":
    main()
