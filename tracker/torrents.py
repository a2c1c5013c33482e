"""The torrents the origin registered: metainfo by digest, and the announce whitelist.

Only info-hashes registered here are tracked; anything else gets a `failure reason`.
With a `data_dir` the metainfo survives restarts (files written atomically), with the
registries the origin vouched hold each blob (`<hex>.src`, protocol.SOURCES_HEADER's form).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from shoal import errors, metainfo, protocol
from shoal.metainfo import Metainfo
from shoal.oci import SHA256_HEX_RE, Digest

log = logging.getLogger(__name__)


class TorrentRegistry:
    def __init__(self, data_dir: Path | None) -> None:
        self.dir = data_dir / "metainfo" if data_dir is not None else None
        self._by_digest: dict[Digest, Metainfo] = {}
        self._by_hash: dict[bytes, Metainfo] = {}
        self._signatures: dict[Digest, str] = {}
        self._sources: dict[Digest, dict[str, str]] = {}

    def load(self, verify: Callable[[bytes, str], None],
             verify_sources: Callable[[Digest, dict[str, str]], None] = lambda _d, _s: None) -> None:
        """Blocking: read persisted metainfo at start (kept only if its signature verifies)."""
        if self.dir is None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in self.dir.iterdir():
            if path.suffix in (".sig", ".src"):
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
                self._remember(meta, signature, self._load_sources(path.with_suffix(".src"), meta.digest,
                                                                   verify_sources))
        log.info("loaded %d registered torrents", len(self._by_digest))

    @staticmethod
    def _load_sources(path: Path, digest: Digest, verify: Callable[[Digest, dict[str, str]], None]) -> dict[str, str]:
        try:
            sources = protocol.parse_sources(path.read_text().strip())
            verify(digest, sources)
            return sources
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, errors.ShoalError) as exc:
            log.warning("dropping the unusable sources of %s: %s", digest, exc)
            return {}

    def _remember(self, meta: Metainfo, signature: str, sources: dict[str, str]) -> None:
        old = self._by_digest.get(meta.digest)
        if old is not None:
            self._by_hash.pop(old.tracker_hash, None)
        self._by_digest[meta.digest] = meta
        self._by_hash[meta.tracker_hash] = meta
        self._signatures[meta.digest] = signature
        self._sources[meta.digest] = sources

    def register(self, meta: Metainfo, signature: str, sources: dict[str, str] | None = None) -> None:
        """Blocking when persistent (small file writes)."""
        self._remember(meta, signature, sources or {})
        if self.dir is not None:
            for suffix, data in ((".src", protocol.encode_sources(sources or {}).encode()),
                                 (".sig", signature.encode()), (".torrent", meta.raw)):
                dest = self.dir / f"{meta.digest.hex}{suffix}"
                tmp = self.dir / f".{meta.digest.hex}.{secrets.token_hex(4)}"
                tmp.write_bytes(data)
                os.replace(tmp, dest)

    def unregister(self, digest: Digest) -> Metainfo | None:
        meta = self._by_digest.pop(digest, None)
        self._signatures.pop(digest, None)
        self._sources.pop(digest, None)
        if meta is not None:
            self._by_hash.pop(meta.tracker_hash, None)
            if self.dir is not None:
                for suffix in (".torrent", ".sig", ".src"):
                    (self.dir / f"{digest.hex}{suffix}").unlink(missing_ok=True)
        return meta

    def by_digest(self, digest: Digest) -> Metainfo | None:
        return self._by_digest.get(digest)

    def signature(self, digest: Digest) -> str | None:
        return self._signatures.get(digest)

    def sources(self, digest: Digest) -> dict[str, str]:
        return self._sources.get(digest, {})

    def by_hash(self, info_hash: bytes) -> Metainfo | None:
        return self._by_hash.get(info_hash)

    def hashes(self) -> list[bytes]:
        return list(self._by_hash)

    def __len__(self) -> int:
        return len(self._by_digest)
