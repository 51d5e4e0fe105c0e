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

from fewshotseg.errors import ConfigError, UserInputError

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
        print(f"fewshotseg: error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


def one_line(err: UserInputError) -> str:
    """The error's message; for one raised in a DataLoader worker (torch re-raises it with the
    worker's traceback as its message), the original message, as without workers."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def check_group_choices(argv: list[str]) -> None:
    """A config group option on the command line that the package's conf/ lacks (`method=nosuch`)
    is a ConfigError naming the options, before Hydra answers with its multi-line listing. Options
    of Hydra's own groups (hydra/...) and of the user's config folders (hydra.searchpath) are left to Hydra."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in argv if "=" in a and not a.startswith("-")]
    if any(a.lstrip("+~").startswith("hydra.searchpath") for a in args):
        return
    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - bad syntax: Hydra's own message says where
        return
    for override in overrides:
        group = Path(CONFIG_DIR) / override.key_or_group
        if override.key_or_group.startswith("hydra") or not group.is_dir() or override.is_delete():
            continue
        try:
            values = (
                list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
            )
        except Exception:  # noqa: BLE001 - a glob or other sweep form: Hydra resolves it
            continue
        values = [v for v in values if isinstance(v, str)]  # null, or a list of options: left to Hydra
        for value in values:
            if not (group / f"{value}.yaml").is_file():
                options = sorted(str(p.relative_to(group).with_suffix("")) for p in group.rglob("*.yaml"))
                raise ConfigError(
                    f"{override.key_or_group}={value}: no such option; expected one of {', '.join(options)}"
                )


def hydra_main(config_name: str):
    """`@hydra.main` on the package's configs, with the config group options of the command line
    checked first (one line for an unknown option, not Hydra's listing)."""
    import functools

    import hydra

    def decorate(task):
        hydra_task = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(task)

        @functools.wraps(task)
        def main():
            with user_errors():
                check_group_choices(sys.argv[1:])
            return hydra_task()

        return main

    return decorate


def instantiate_group(group: DictConfig | None) -> list:
    """The objects of a config group such as `logger` or `callbacks` (entries set to null skipped)."""
    return [instantiate(v) for v in (group or {}).values() if v is not None and "_target_" in v]
