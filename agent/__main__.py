"""`python -m shoal_agent --config FILE` (console script `shoal-agent`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from shoal.entry import run_component
from shoal_agent import app, config

FLAGS = {
    "--listen": ("listen", "address of the registry mirror API"),
    "--node": ("node", "node name recorded in logs and journals"),
    "--data-dir": ("data_dir", "cache and state directory"),
    "--origin": ("origin", "origin base URL"),
    "--torrent-listen": ("torrent.listen", "BitTorrent listen address (ip:port)"),
    "--zone": ("zone", "the node's zone (trackers hand out same-zone peers first; empty: none)"),
    "--cache-max-bytes": ("cache.max_bytes", "cache size budget, e.g. 50GiB"),
    "--log-level": ("log.level", "debug, info, warning or error"),
}


def main(argv: Sequence[str] | None = None) -> int:
    return run_component("agent", argv, flags=FLAGS, load=config.load, build=app.build)


if __name__ == "__main__":
    sys.exit(main())
