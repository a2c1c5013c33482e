"""A malicious swarm member: it holds a valid swarm token and certificate (an insider: a node
the origin admitted, then compromised), announces itself as a seeder of a torrent, and answers
every block request with garbage. Agents must detect the bad pieces (v2 merkle hashes), ban it,
and still finish the blob correctly."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import ssl
import struct
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote_from_bytes, urlsplit

from shoal import bencode
from shoal.metainfo import Metainfo
from tests.support.peerprobe import Identity

PSTR = b"\x13BitTorrent protocol"
# reserved bits: BEP 52 (v2) support is bit 4 of the last byte
RESERVED = b"\x00" * 7 + b"\x10"


class EvilPeer:
    def __init__(self, meta: Metainfo, *, ip: str, port: int, identity: Identity) -> None:
        self.meta = meta
        # a TLS server as libtorrent expects for an SSL torrent: this identity, peers checked
        # against the torrent's CA
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "c.pem").write_text(identity.certificate)
            (Path(d) / "k.pem").write_text(identity.key)
            self._tls.load_cert_chain(Path(d) / "c.pem", Path(d) / "k.pem")
        self._tls.verify_mode = ssl.CERT_REQUIRED
        self._tls.load_verify_locations(cadata=meta.root_cert)
        self.ip = ip
        self.port = port
        self.peer_id = b"-EV0001-" + os.urandom(12)
        self.blocks_sent = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._serve, self.ip, self.port, ssl=self._tls)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def announce(self, tracker_announce: str, token: str) -> bytes:
        """Announce from its own address (the tracker records the source address, nothing else)."""
        url = urlsplit(tracker_announce)
        query = (f"info_hash={quote_from_bytes(self.meta.tracker_hash)}&peer_id={quote_from_bytes(self.peer_id)}"
                 f"&port={self.port}&uploaded=0&downloaded=0&left=0&compact=1&event=started&token={token}")
        conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=10,
                                          source_address=(self.ip, 0))
        try:
            conn.request("GET", f"{url.path}?{query}")
            return conn.getresponse().read()
        finally:
            conn.close()

    def close(self) -> None:
        def stop() -> None:
            if self._server is not None:
                self._server.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            handshake = await reader.readexactly(68)
            if handshake[:20] != PSTR or handshake[28:48] != self.meta.tracker_hash:
                return
            writer.write(PSTR + RESERVED + self.meta.tracker_hash + self.peer_id)
            bits = bytearray((self.meta.num_pieces + 7) // 8)
            for i in range(self.meta.num_pieces):
                bits[i // 8] |= 0x80 >> (i % 8)
            writer.write(_message(5, bytes(bits)))  # bitfield: every piece
            writer.write(_message(1))  # unchoke
            await writer.drain()
            while True:
                (length,) = struct.unpack(">I", await reader.readexactly(4))
                if length == 0:
                    continue  # keep-alive
                body = await reader.readexactly(length)
                if body[0] == 6 and len(body) == 13:  # request(index, begin, length)
                    index, begin, size = struct.unpack(">III", body[1:])
                    writer.write(_message(7, struct.pack(">II", index, begin) + os.urandom(size)))
                    self.blocks_sent += 1
                    await writer.drain()
                elif body[0] == 2:  # interested
                    writer.write(_message(1))
                    await writer.drain()
        writer.close()


def _message(msg_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, msg_id) + payload


def decode_peers(body: bytes) -> list[tuple[str, int]]:
    doc = bencode.decode(body)
    assert isinstance(doc, dict)
    peers = doc.get(b"peers", b"")
    assert isinstance(peers, bytes)
    return [(".".join(str(b) for b in peers[i:i + 4]), int.from_bytes(peers[i + 4:i + 6], "big"))
            for i in range(0, len(peers), 6)]
