"""The torrents the origin registered: the announce whitelist, by info-hash and by digest.

Only info-hashes registered here are tracked; anything else gets a `failure reason`. The tracker
hands no metainfo out (a node gets a blob's from the origin, with its admission). With a
`data_dir` the metainfo survives restarts (files written atomically; a registry of an earlier
version also kept `<hex>.src` files, which are removed).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
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

    def load(self, verify: Callable[[bytes, str], None]) -> None:
        """Blocking: read persisted metainfo at start (kept only if its signature verifies)."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in self.dir.iterdir():
            if path.suffix == ".src":
                path.unlink(missing_ok=True)
                continue
            if path.suffix == ".sig":
                continue
            name = path.name.removesuffix(".torrent")
            sig_path = path.with_suffix(".sig")
            if not SHA256_HEX_RE.fullmatch(name) or path.is_symlink():
                path.unlink(missing_ok=True)
                continue
            try:
                raw = path.read_bytes()
                signature = sig_path.read_text().strip()
                verify(raw, signature)
                meta = metainfo.parse(raw)
            except (OSError, ValueError) as exc:
                log.warning("dropping unusable metainfo %s: %s", path.name, exc)
                path.unlink(missing_ok=True)
                sig_path.unlink(missing_ok=True)
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

    def register(self, meta: Metainfo, signature: str) -> None:
        """Blocking when persistent (small file writes)."""
        self._remember(meta)
        if self.dir is not None:
            for suffix, data in ((".sig", signature.encode()), (".torrent", meta.raw)):
                dest = self.dir / f"{meta.digest.hex}{suffix}"
                tmp = self.dir / f".{meta.digest.hex}.{secrets.token_hex(4)}"
                tmp.write_bytes(data)
                os.replace(tmp, dest)

    def unregister(self, digest: Digest) -> Metainfo | None:
        meta = self._by_digest.pop(digest, None)
        if meta is not None:
            self._by_hash.pop(meta.tracker_hash, None)
            if self.dir is not None:
                for suffix in (".torrent", ".sig", ".src"):
                    (self.dir / f"{digest.hex}{suffix}").unlink(missing_ok=True)
        return meta

    def by_digest(self, digest: Digest) -> Metainfo | None:
        return self._by_digest.get(digest)

    def by_hash(self, info_hash: bytes) -> Metainfo | None:
        return self._by_hash.get(info_hash)

    def hashes(self) -> list[bytes]:
        return list(self._by_hash)

    def __len__(self) -> int:
        return len(self._by_digest)
