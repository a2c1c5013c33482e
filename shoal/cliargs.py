"""What every shoal command line shares: `--version` (the installed distribution's version, and
the git commit when it runs from a checkout, so a report names exactly what ran) and help that
shows each option's default."""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DISTRIBUTION = "shoal"


def version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def commit() -> str | None:
    """The checkout's commit (with "-dirty" for local changes), or None outside a git checkout
    or without git."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head or None


def version_text(prog: str) -> str:
    found = commit()
    return f"{prog} {version()}" + (f" (commit {found})" if found else "")


class VersionAction(argparse.Action):
    """`--version`: the version is looked up only when asked (git is not run on every start)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str = "print the version and exit") -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(version_text(parser.prog))
        parser.exit()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in help, but only real ones: an option whose absence means "not set"
    (None, False, an empty list) says in its own words what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return action.help
        if action.help and "%(default)" in action.help:
            return action.help
        return super()._get_help_string(action)
