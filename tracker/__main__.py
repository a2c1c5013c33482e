"""`python -m shoal_tracker --config FILE` (console script `shoal-tracker`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shoal.entry import run_component
from shoal_tracker import app, config

FLAGS = {
    "--listen": ("listen", "address to serve announces and metainfo on"),
    "--data-dir": ("data_dir", "directory that keeps registered metainfo"),
    "--registration-token-file": ("registration_token.file", "file holding the origin's secret"),
    "--log-level": ("log.level", "debug, info, warning or error"),
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_component("tracker", argv, flags=FLAGS, load=config.load, build=app.build)


if __name__ == "__main__":
    sys.exit(main())
