"""What every command-line entry point shares: where the Hydra configs live, how bad input ends the
program, and instantiating a config group of objects (loggers, callbacks).

The library modules behind the entry points: `runs` (a run built from a config, a checkpoint or the
authors' weights), `results` (results.json), `loggers` (W&B without an account).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from fewshotseg.errors import UserInputError

# The Hydra configs ship inside the package, so an installed wheel finds them as a source checkout does.
CONFIG_DIR = str(Path(__file__).resolve().parent / "conf")


def _user_error(exc: BaseException) -> UserInputError | None:
    """The UserInputError behind `exc` (Hydra wraps errors raised while instantiating)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserInputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def user_errors():
    """Bad input ends the program with one clear line (exit code 2), not a traceback."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the user's input
        err = _user_error(e)
        if err is None:
            raise
        print(f"fewshotseg: error: {err}", file=sys.stderr)
        sys.exit(2)


def instantiate_group(group: DictConfig | None) -> list:
    """The objects of a config group such as `logger` or `callbacks` (entries set to null skipped)."""
    return [instantiate(v) for v in (group or {}).values() if v is not None and "_target_" in v]
