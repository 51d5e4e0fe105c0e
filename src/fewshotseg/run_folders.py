"""Where a run writes: a folder of its own that no other run can share, or, when it resumes, the
folder of the run it continues.

Hydra names a run folder from the time to the second, so two runs started in the same second (by
hand, by a launcher, on two machines sharing a disk) would share it. `claim_folder` creates the
folder itself with an exclusive `mkdir`, adding `_2`, `_3`, ... when the name is taken, so exactly
one process owns each folder. The configs call it through the `fss.run_dir` resolver, which Hydra
resolves once per launch (its resolver cache is copied to every job of a sweep, as for `${now:}`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def claim_folder(base: str | Path) -> str:
    """`base`, or `base_2`, `base_3`, ... : the first that did not exist, created by this call."""
    base = Path(base)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else base.with_name(f"{base.name}_{n}")
        try:
            os.mkdir(path)  # atomic: fails if another process created it first
            return str(path)
        except FileExistsError:
            continue
    raise RuntimeError(f"{base}: 10000 run folders of this name exist already")


def resumed_folder(ckpt_path: str | None) -> Path | None:
    """The run folder of a checkpoint written by a run (`<run>/checkpoints/<file>.ckpt`), or None."""
    if not ckpt_path:
        return None
    ckpt = Path(str(ckpt_path)).expanduser().absolute()
    run = ckpt.parent.parent
    if ckpt.parent.name == "checkpoints" and ckpt.is_file() and (run / ".hydra").is_dir():
        return run
    return None


def _inside_a_merge() -> bool:
    """Whether OmegaConf is merging config files: it dereferences interpolations then (to see whether
    they name a container), before the command line's overrides are applied."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_map_merge" and "omegaconf" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def run_dir(
    base: str, ckpt_path: str | None = None, resume_in_place: bool = True, out: str | None = None
) -> str:
    """The folder of a run: `out` when the command names its own output folder (predict's out=),
    the resumed run's own folder (resume_in_place and `ckpt_path` inside a run folder), else a new
    folder claimed from `base`."""
    if _inside_a_merge():
        # a folder claimed now would be the wrong one (out=, paths.log_dir=, ... not applied yet);
        # OmegaConf's merge ignores a failed dereference, and a failure is not cached
        raise LookupError("a run folder is claimed once the config is complete")
    if out:
        return str(out)
    resumed = resumed_folder(ckpt_path) if resume_in_place else None
    return str(resumed) if resumed is not None else claim_folder(base)


def hydra_subdir(ckpt_path: str | None = None, resume_in_place: bool = True, stamp: str = "") -> str:
    """Where Hydra writes the config of this launch: `.hydra`, or for a run resumed in its own
    folder `.hydra/resumed_<stamp>`, so the original run's config stays as it was."""
    resumed = resumed_folder(ckpt_path) if resume_in_place else None
    return ".hydra" if resumed is None else f".hydra/resumed_{stamp}"
