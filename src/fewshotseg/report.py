"""The paper table of a sweep: read the runs' results.json and write Markdown, CSV and PNG charts.

    python -m fewshotseg.train -m method=panet,asgnet fold=0,1,2,3 shot=1,5
    python -m fewshotseg.report logs/train/multiruns/<date> [more run or sweep folders] [--out report/]
    python -m fewshotseg.report ... --seed-stat best     # each run's best test seed instead of the mean

Every `results.json` under the given folders (written by `train` and `evaluate`) is one run. Runs
are grouped into tables by dataset and by everything their record says changes a number (protocol,
test split, test input, scoring resolution, episodes, query order, fold split, test seeds, checkpoint
selection, novel-image rule, precision: `results.HOW_FIELDS`), so runs obtained differently never
share a table; a record that lacks one of these fields is flagged. Rows are method x backbone x shot
(labelled with the class-name table a method reads and with how its backbone started and trained),
columns fold 0..3 and their mean, for mIoU, FB-IoU and any other metric the runs hold (e.g. Sym-Net's
meta_miou).

A cell is the run's mean over its test seeds (`--seed-stat best`: its best seed; the table says
which). With several runs of one cell (training seeds) it is mean +- sample std (n - 1) over them;
two runs of the same cell with the same training seed are both kept, with a warning. The mean column
is the mean over the folds present (the paper number), marked when fewer than the dataset's folds;
its std is over the training seeds when every fold has the same ones. Charts: mIoU per fold per row,
and per-class IoU per row (each class from the fold where it is novel).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fewshotseg.cli import user_errors
from fewshotseg.errors import ConfigError
from fewshotseg.results import HOW_FIELDS

log = logging.getLogger(__name__)

METRIC_NAMES = {"miou": "mIoU", "fbiou": "FB-IoU"}
SEED_STATS = {"mean": "the mean over the run's test seeds", "best": "the run's best test seed (optimistic)"}
# HOW_FIELDS that name a row, not a table: a method's own input, and how its backbone started and
# trained (the papers' regime beside from scratch in one table, each row labelled)
ROW_FIELDS = ("class_name_table", "backbone_training")
TABLE_FIELDS = tuple(f for f in HOW_FIELDS if f not in ROW_FIELDS)


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
    metrics: dict[str, float]  # the mean (or best) over the run's test seeds
    iou_per_class: dict[str, float]
    how: dict = field(default_factory=dict)  # the record's HOW_FIELDS
    num_folds: int = 4  # the dataset's

    @property
    def missing(self) -> list[str]:
        return [f for f in HOW_FIELDS if f not in self.how]

    def setting(self, name: str) -> str:
        value = self.how.get(name, "unrecorded")
        return "default" if name == "protocol" and value is None else str(value)


@dataclass
class Row:
    """One table row: a method x backbone x shot (x ROW_FIELDS) in one section."""

    key: tuple  # section key..., method, backbone, shot, class-name table, backbone training
    runs: list[Run] = field(default_factory=list)

    def _part(self, i: int) -> str:  # 0 method, 1 backbone, 2 shot, 3.. ROW_FIELDS
        return str(self.key[len(self.key) - 3 - len(ROW_FIELDS) + i])

    def _labelled(self, i: int, note: int) -> str:  # a part, with a recorded ROW_FIELD in brackets
        value = self._part(note)
        return self._part(i) if value in ("None", "unrecorded") else f"{self._part(i)} ({value})"

    @property
    def method(self) -> str:
        return self._labelled(0, 3)  # with the class-name table

    @property
    def backbone(self) -> str:
        return self._labelled(1, 4)  # with how the backbone started and trained

    @property
    def shot(self) -> str:
        return self._part(2)

    @property
    def label(self) -> str:
        return f"{self.method} / {self.backbone} / {self.shot}-shot"


def read_run(path: Path, seed_stat: str = "mean") -> Run:
    try:
        record = json.loads(path.read_text())
        info, summary = record["run"], record["summary"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path}: not a fewshotseg results.json with 'run' and 'summary' ({type(e).__name__}: {e})"
        ) from e
    how = dict(record.get("how") or {})
    if "protocol" not in how and "protocol" in info:  # older records: the run's protocol only
        how["protocol"] = info["protocol"]

    def stat(v: dict) -> float:
        return float(v.get(seed_stat, v["mean"]) if seed_stat == "best" else v["mean"])

    metrics = {k: stat(v) for k, v in summary.items() if k != "iou_per_class" and isinstance(v, dict)}
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
        how=how,
        num_folds=int(info.get("num_folds") or 4),
    )


def find_runs(paths: Iterable[str | Path], seed_stat: str = "mean") -> list[Run]:
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
    return [read_run(f, seed_stat) for f in dict.fromkeys(files)]


def section_key(run: Run) -> tuple:
    return (run.data, *(run.setting(f) for f in TABLE_FIELDS))


def group_rows(runs: list[Run]) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for run in runs:
        key = (*section_key(run), run.method, run.backbone, run.shot, *(run.setting(f) for f in ROW_FIELDS))
        rows.setdefault(key, Row(key)).runs.append(run)
    return [rows[k] for k in sorted(rows, key=lambda k: tuple(map(str, k)))]


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean, and the sample std (n - 1, as `evaluate`) when there are several values."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def duplicates(row: Row) -> list[str]:
    """One line per cell that holds two runs with the same training seed (both are kept)."""
    seen: dict[tuple, list[Path]] = defaultdict(list)
    for run in row.runs:
        seen[(run.fold, run.seed)].append(run.path)
    return [
        f"{row.label}, fold {fold}, training seed {seed}: {len(paths)} runs, all kept ({', '.join(map(str, paths))})"
        for (fold, seed), paths in seen.items()
        if len(paths) > 1
    ]


def row_cells(row: Row, metric: str, folds: list[int]) -> dict[str, tuple[float, float | None] | None]:
    """{'fold0': (mean, std), ..., 'mean': (mean, std)} of one metric; None where no run exists."""
    by_fold: dict[int, list[tuple]] = defaultdict(list)  # fold -> [(training seed, value)]
    for run in row.runs:
        if metric in run.metrics:
            by_fold[run.fold].append((run.seed, run.metrics[metric]))
    cells: dict[str, tuple[float, float | None] | None] = {
        f"fold{f}": _mean_std([v for _, v in by_fold[f]]) if by_fold.get(f) else None for f in folds
    }
    present = [f for f in folds if by_fold.get(f)]
    if not present:
        cells["mean"] = None
        return cells
    seeds = {f: [s for s, _ in by_fold[f]] for f in present}
    first = seeds[present[0]]
    same_seeds = all(sorted(map(str, s)) == sorted(map(str, first)) for s in seeds.values())
    if same_seeds and len(first) > 1 and len(set(map(str, first))) == len(first) and None not in first:
        per_seed = [statistics.fmean(dict(by_fold[f])[s] for f in present) for s in first]
        cells["mean"] = _mean_std(per_seed)
    else:
        cells["mean"] = (statistics.fmean(cells[f"fold{f}"][0] for f in present), None)
    return cells


def folds_in_mean(row: Row, metric: str) -> int:
    return len({run.fold for run in row.runs if metric in run.metrics})


def _fmt(cell: tuple[float, float | None] | None) -> str:
    if cell is None:
        return "–"
    mean, std = cell
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def metrics_of(rows: list[Row]) -> list[str]:
    """mIoU, FB-IoU, then any other metric found (sorted)."""
    found = {m for row in rows for run in row.runs for m in run.metrics}
    return [m for m in METRIC_NAMES if m in found] + sorted(found - set(METRIC_NAMES))


def sections(rows: list[Row]) -> dict[tuple, list[Row]]:
    """Rows per (dataset, how it was obtained): runs of different protocols, resolutions, episode
    counts, seeds, selections or precisions never share a table."""
    out: dict[tuple, list[Row]] = defaultdict(list)
    for row in rows:
        out[row.key[: 1 + len(TABLE_FIELDS)]].append(row)
    return dict(out)


def folds_of(rows: list[Row]) -> list[int]:
    """Folds 0..3 (the benchmarks' four), or every fold seen if more."""
    seen = {run.fold for row in rows for run in row.runs}
    return list(range(max(4, max(seen) + 1))) if seen else [0, 1, 2, 3]


def warnings_of(rows: list[Row]) -> list[str]:
    """Duplicate runs of a cell, and records that lack a field of how they were obtained."""
    notes = [line for row in rows for line in duplicates(row)]
    for row in rows:
        for run in row.runs:
            if run.missing:
                notes.append(
                    f"{run.path}: the record lacks {', '.join(run.missing)} (written by an older version?)"
                )
    return notes


def markdown(rows: list[Row], seed_stat: str = "mean") -> str:
    out = []
    for key, section in sections(rows).items():
        data, protocol = key[0], key[1]
        folds = folds_of(section)
        n_runs = sum(len(r.runs) for r in section)
        out.append(f"## {data} (protocol: {protocol}), {n_runs} runs\n")
        out += [
            f"- {name.replace('_', ' ')}: {value}"
            for name, value in zip(TABLE_FIELDS[1:], key[2:], strict=True)
        ]
        out.append(f"- each cell: {SEED_STATS[seed_stat]}; several runs of a cell (training seeds): "
                   "mean ± sample std over them\n")  # fmt: skip
        for metric in metrics_of(section):
            head = ["method", "backbone", "shot", *(f"fold {f}" for f in folds), "mean"]
            out.append(f"**{METRIC_NAMES.get(metric, metric)}** (%)\n")
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "---|" * len(head))
            for row in section:
                cells = row_cells(row, metric, folds)
                if cells["mean"] is None:  # a metric other methods report (e.g. meta_miou)
                    continue
                n, total = folds_in_mean(row, metric), row.runs[0].num_folds
                partial = f" ({n} of {total} folds)" if n < total else ""
                values = [_fmt(cells[f"fold{f}"]) for f in folds] + [f"**{_fmt(cells['mean'])}**{partial}"]
                out.append("| " + " | ".join([row.method, row.backbone, row.shot, *values]) + " |")
            out.append("")
    notes = warnings_of(rows)
    if notes:
        out.append("## Warnings\n")
        out += [f"- {n}" for n in notes]
        out.append("")
    return "\n".join(out)


def write_csv(rows: list[Row], path: Path) -> None:
    """One line per row and metric: how the runs were obtained, each fold's mean and std (fractions,
    not %), the folds in the mean against the dataset's, and the runs used."""
    all_folds = sorted({f for (_, section) in sections(rows).items() for f in folds_of(section)})
    cols = [c for f in all_folds for c in (f"fold{f}", f"fold{f}_std")]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["data", *TABLE_FIELDS, "method", "backbone", "shot", *ROW_FIELDS, "metric", *cols,
                         "mean", "mean_std", "folds_in_mean", "dataset_folds", "runs"])  # fmt: skip
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
                writer.writerow([*row.key, metric, *values, folds_in_mean(row, metric), row.runs[0].num_folds,
                                 len(row.runs)])  # fmt: skip


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

    written, used = [], defaultdict(int)
    for key, section in sections(rows).items():
        data, protocol = key[0], key[1]
        used[(data, protocol)] += 1  # a second table of the same dataset and protocol: _2, ...
        slug = _slug(data, protocol) + (f"_{used[(data, protocol)]}" if used[(data, protocol)] > 1 else "")
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
        written.append(out / f"miou_per_fold_{slug}.png")
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
        written.append(out / f"iou_per_class_{slug}.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written


def report(paths: Iterable[str | Path], out: str | Path = "report", plots: bool = True,
           seed_stat: str = "mean") -> dict:  # fmt: skip
    """Read the runs, write report.md, report.csv and the charts into `out`; returns what it wrote
    and the warnings (duplicate runs of a cell, records lacking a field), which are also logged."""
    if seed_stat not in SEED_STATS:
        raise ConfigError(f"--seed-stat {seed_stat}: expected one of {list(SEED_STATS)}")
    runs = find_runs(paths, seed_stat)
    rows = group_rows(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(rows, seed_stat)
    notes = warnings_of(rows)
    for note in notes:
        log.warning(note)
    (out / "report.md").write_text(f"# Results ({len(runs)} runs)\n\n{md}")
    write_csv(rows, out / "report.csv")
    pngs = charts(rows, out) if plots else []
    return {
        "runs": runs,
        "rows": rows,
        "markdown": md,
        "warnings": notes,
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
    parser.add_argument("--seed-stat", default="mean", choices=list(SEED_STATS),
                        help="a cell is each run's mean over its test seeds (default) or its best seed")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(format="fewshotseg: warning: %(message)s", level=logging.WARNING)
    with user_errors():
        result = report(args.paths, args.out, plots=not args.no_plots, seed_stat=args.seed_stat)
    print(result["markdown"])
    print("written: " + ", ".join(str(p) for p in result["files"]))


if __name__ == "__main__":
    main()
