"""`python -m shoal_origin --config FILE` (console script `shoal-origin`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shoal.entry import run_component
from shoal_origin import app, config

FLAGS = {
    "--listen": ("listen", "address of the seed and pre-seed API"),
    "--data-dir": ("data_dir", "blob store directory"),
    "--tracker": ("tracker", "tracker base URL"),
    "--torrent-listen": ("torrent.listen", "BitTorrent listen address (ip:port)"),
    "--registration-token-file": ("registration_token.file", "file holding the tracker's secret"),
    "--log-level": ("log.level", "debug, info, warning or error"),
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_component("origin", argv, flags=FLAGS, load=config.load, build=app.build)


if __name__ == "__main__":
    sys.exit(main())
