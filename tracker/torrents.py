"""The torrents the origin registered: metainfo by digest, and the announce whitelist.

Only info-hashes registered here are tracked; anything else gets a `failure reason`.
With a `data_dir` the metainfo survives restarts (files written atomically).
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from shoal import metainfo
from shoal.metainfo import Metainfo
from shoal.oci import SHA256_HEX_RE, Digest

log = logging.getLogger(__name__)


class TorrentRegistry:
    def __init__(self, data_dir: Path | None) -> None:
        self.dir = data_dir / "metainfo" if data_dir is not None else None
        self._by_digest: dict[Digest, Metainfo] = {}
        self._by_hash: dict[bytes, Metainfo] = {}

    def load(self) -> None:
        """Blocking: read persisted metainfo at start."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in self.dir.iterdir():
            name = path.name.removesuffix(".torrent")
            if not SHA256_HEX_RE.fullmatch(name) or path.is_symlink():
                path.unlink(missing_ok=True)
                continue
            try:
                meta = metainfo.parse(path.read_bytes())
            except (OSError, metainfo.MetainfoError) as exc:
                log.warning("dropping unreadable metainfo %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            if meta.digest.hex == name:
                self._remember(meta)
        log.info("loaded %d registered torrents", len(self._by_digest))

    def _remember(self, meta: Metainfo) -> None:
        old = self._by_digest.get(meta.digest)
        if old is not None:
            self._by_hash.pop(old.tracker_hash, None)
        self._by_digest[meta.digest] = meta
        self._by_hash[meta.tracker_hash] = meta

    def register(self, meta: Metainfo) -> None:
        """Blocking when persistent (small file write)."""
        self._remember(meta)
        if self.dir is not None:
            dest = self.dir / f"{meta.digest.hex}.torrent"
            tmp = self.dir / f".{meta.digest.hex}.{secrets.token_hex(4)}"
            tmp.write_bytes(meta.raw)
            os.replace(tmp, dest)

    def unregister(self, digest: Digest) -> Metainfo | None:
        meta = self._by_digest.pop(digest, None)
        if meta is not None:
            self._by_hash.pop(meta.tracker_hash, None)
            if self.dir is not None:
                (self.dir / f"{digest.hex}.torrent").unlink(missing_ok=True)
        return meta

    def by_digest(self, digest: Digest) -> Metainfo | None:
        return self._by_digest.get(digest)

    def by_hash(self, info_hash: bytes) -> Metainfo | None:
        return self._by_hash.get(info_hash)

    def __len__(self) -> int:
        return len(self._by_digest)
