"""The outsider's probe (tests/support/peerprobe.py) reads a plain torrent in full: so its 0 bytes
against shoal's swarms (tests/e2e/test_peer_admission.py) mean the door is shut, not that the
probe is broken. (This plain torrent is made with libtorrent directly: shoal makes none.)"""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path

import libtorrent as lt

from shoal.metainfo import Metainfo, piece_size_for
from shoal.oci import Digest
from tests.support.peerprobe import probe
from tests.support.procs import free_port


async def test_the_probe_reads_a_plain_torrent_whole(tmp_path: Path) -> None:
    data = random.Random(3).randbytes((1 << 20) + 777)
    digest = Digest(hashlib.sha256(data).hexdigest())
    (tmp_path / digest.hex).write_bytes(data)
    ct = lt.create_torrent([lt.create_file_entry(digest.hex, len(data))], piece_size=piece_size_for(len(data)),
                           flags=lt.create_torrent.v2_only)
    ct.set_priv(True)
    lt.set_piece_hashes(ct, str(tmp_path))
    raw = lt.bencode(ct.generate())
    info = lt.torrent_info(raw)
    meta = Metainfo(raw, digest, len(data), piece_size_for(len(data)), info.info_hashes().v2.to_bytes(),
                    "http://127.0.0.1:9/announce", "")
    port = free_port("127.0.0.30")
    session = lt.session({"listen_interfaces": f"127.0.0.30:{port}", "enable_dht": False, "enable_lsd": False,
                          "enable_upnp": False, "enable_natpmp": False, "enable_incoming_utp": False,
                          "enable_outgoing_utp": False})
    atp = lt.add_torrent_params()
    atp.ti = info
    atp.save_path = str(tmp_path)
    atp.flags = 0
    atp.have_pieces = [True] * meta.num_pieces
    atp.verified_pieces = [True] * meta.num_pieces
    session.add_torrent(atp)
    try:
        got = await asyncio.to_thread(probe, ("127.0.0.30", port), meta, source_ip="127.0.0.31", tls=False,
                                      enough=len(data), within=30)
        assert hashlib.sha256(got).hexdigest() == digest.hex
    finally:
        session.pause()
        del session
