"""An outsider at the BitTorrent port: a hand-written BEP 3/52 client that dials a node's swarm
port (with TLS and a certificate of the test's choice, or in clear), asks for blocks and counts
the payload bytes it gets. What a bare peer that knows a blob's info-hash can take."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import ssl
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from shoal import peercerts
from shoal.metainfo import Metainfo

PSTR = b"\x13BitTorrent protocol"
RESERVED = b"\x00" * 7 + b"\x10"  # BEP 52: v2 support
BLOCK = 16 << 10
# requests in flight (libtorrent drops those beyond max_allowed_in_request_queue, 2,000)
WINDOW = 256


@dataclass(frozen=True)
class Identity:
    """A certificate and its key (PEM) to present."""

    certificate: str
    key: str


def node_identity(key: peercerts.NodeKey, certificate: str) -> Identity:
    return Identity(certificate, key.private_pem)


def forged(issuer: Ed25519PrivateKey | None, *, not_before: dt.datetime | None = None,
           not_after: dt.datetime | None = None) -> Identity:
    """A `*` certificate for a new key, signed by `issuer` (None: by itself)."""
    key = Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "*")])
    issuer_name = name if issuer is None else x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shoal swarm CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - dt.timedelta(hours=1))
            .not_valid_after(not_after or now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("*")]), critical=False)
            .sign(issuer or key, None))
    return Identity(cert.public_bytes(serialization.Encoding.PEM).decode(),
                    key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode())


def chained(under: Identity) -> Identity:
    """A `*` certificate signed by a node's own key, presented with the node's certificate as
    its intermediate: refused, since a node certificate is no CA (CA:FALSE)."""
    node_key = serialization.load_pem_private_key(under.key.encode(), password=None)
    assert isinstance(node_key, Ed25519PrivateKey)
    issuer = x509.load_pem_x509_certificate(under.certificate.encode())
    key = Ed25519PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "*")]))
            .issuer_name(issuer.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("*")]), critical=False)
            .sign(node_key, None))
    return Identity(cert.public_bytes(serialization.Encoding.PEM).decode() + under.certificate,
                    key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()).decode())


def listening_ports(pid: int) -> set[int]:
    """The TCP ports a process listens on (from /proc: its socket inodes in LISTEN state)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _message(msg_id: int, payload: bytes = b"") -> bytes:
    return struct.pack(">IB", len(payload) + 1, msg_id) + payload


def _frames(buf: bytes) -> tuple[list[bytes], bytes]:
    """The messages (id and payload; keep-alives left out) whole at the head of `buf`, past the
    peer's handshake, and the rest (all of it while the handshake has not all come)."""
    if buf.startswith(PSTR):
        if len(buf) < 68:
            return [], buf
        buf = buf[68:]
    bodies = []
    while len(buf) >= 4:
        (length,) = struct.unpack(">I", buf[:4])
        if len(buf) < 4 + length:
            break
        body, buf = buf[4:4 + length], buf[4 + length:]
        if length:
            bodies.append(body)
    return bodies, buf


def _wrap(sock: socket.socket, meta: Metainfo, identity: Identity | None) -> socket.socket:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # an attacker takes any server
    if identity is not None:
        with tempfile.TemporaryDirectory() as d:
            cert, key = Path(d) / "cert.pem", Path(d) / "key.pem"
            cert.write_text(identity.certificate)
            key.write_text(identity.key)
            ctx.load_cert_chain(cert, key)
    # libtorrent picks the torrent by SNI: the hex of the (truncated) info-hash
    return ctx.wrap_socket(sock, server_hostname=meta.tracker_hash.hex())


def probe(address: tuple[str, int], meta: Metainfo, *, source_ip: str, identity: Identity | None = None,
          tls: bool = True, within: float = 8.0, enough: int = 4 * BLOCK) -> bytes:
    """The payload received for the blob's first `enough` bytes (what arrived, in order of
    offset), once all of it came, the peer hung up, or `within` seconds passed."""
    deadline = time.monotonic() + within
    want = min(enough, meta.size)
    got: dict[int, bytes] = {}
    with contextlib.suppress(OSError, ssl.SSLError, ConnectionError, struct.error):
        raw = socket.create_connection(address, timeout=within, source_address=(source_ip, 0))
        sock = _wrap(raw, meta, identity) if tls else raw
        with sock:
            sock.sendall(PSTR + RESERVED + meta.tracker_hash + b"-PR0001-" + os.urandom(12))
            sock.sendall(_message(2))  # interested
            buf = b""
            asked = False
            requests = (_message(6, struct.pack(">III", *divmod(offset, meta.piece_length),
                                                min(BLOCK, meta.size - offset)))
                        for offset in range(0, want, BLOCK))
            while time.monotonic() < deadline and sum(map(len, got.values())) < want:
                sock.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                bodies, buf = _frames(buf + chunk)
                for body in bodies:
                    if body[0] == 1 and not asked:  # unchoke: ask for blocks up to `want`
                        asked = True
                        sock.sendall(b"".join(next(requests, b"") for _ in range(WINDOW)))
                    elif body[0] == 7:  # piece(index, begin, block): ask for one more
                        index, begin = struct.unpack(">II", body[1:9])
                        got[index * meta.piece_length + begin] = body[9:]
                        sock.sendall(next(requests, b""))
    return b"".join(got[k] for k in sorted(got))


def refused(address: tuple[str, int], meta: Metainfo, *, source_ip: str, identity: Identity,
            within: float = 5.0) -> bool:
    """Whether the peer hangs up on an admitted node's connection from `source_ip` instead of
    answering its BitTorrent handshake (libtorrent checks its IP filter once the TLS handshake is
    done)."""
    try:
        raw = socket.create_connection(address, timeout=within, source_address=(source_ip, 0))
        with _wrap(raw, meta, identity) as sock:
            sock.sendall(PSTR + RESERVED + meta.tracker_hash + b"-RF0001-" + os.urandom(12))
            return not sock.recv(len(PSTR)).startswith(PSTR[:1])
    except TimeoutError:
        return False
    except (OSError, ssl.SSLError):
        return True


class Trickler:
    """A peer that holds an upload slot and hardly reads (attack20 #3). libtorrent's round robin
    keeps a peer unchoked while it took more in the last round than the peers waiting (none, being
    choked), until it has had four pieces and a minute has passed: so once unchoked this asks for
    one block every `every` seconds, which the sender's socket buffers take (and libtorrent counts
    as sent), and reads `rate` bytes a second through a small receive window. Runs in a thread
    until closed (or `within` seconds); `hung_up` is set if the other side hung up first. With
    `junk`, it also sends an unasked block of piece data every `every` seconds: libtorrent's
    choker ranks first the peers that sent it the most in the last round."""

    def __init__(self, address: tuple[str, int], meta: Metainfo, *, source_ip: str, identity: Identity,
                 every: float = 2.5, rate: int = 256, within: float = 60.0, junk: bool = False) -> None:
        self.unchoked = threading.Event()
        self.hung_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        args=(address, meta, source_ip, identity, every, rate, within, junk))
        self._thread.start()

    def _run(self, address: tuple[str, int], meta: Metainfo, source_ip: str, identity: Identity, every: float,
             rate: int, within: float, send_junk: bool) -> None:
        deadline = time.monotonic() + within
        try:
            raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
            raw.bind((source_ip, 0))
            raw.settimeout(10)
            raw.connect(address)
            with _wrap(raw, meta, identity) as sock:
                sock.sendall(PSTR + RESERVED + meta.tracker_hash + b"-TR0001-" + os.urandom(12))
                sock.sendall(_message(2))  # interested
                buf = b""
                junk = _message(7, struct.pack(">II", 0, 0) + bytes(BLOCK)) if send_junk else b""
                sock.sendall(junk)
                sock.settimeout(every)
                while not self.unchoked.is_set() and time.monotonic() < deadline and not self._stop.is_set():
                    try:
                        chunk = sock.recv(1 << 12)
                    except TimeoutError:
                        sock.sendall(junk)
                        continue
                    if not chunk:
                        self.hung_up.set()
                        return
                    bodies, buf = _frames(buf + chunk)
                    if any(body[0] == 1 for body in bodies):
                        self.unchoked.set()
                blocks = -(-meta.size // BLOCK)
                asked, next_ask = 0, 0.0
                while time.monotonic() < deadline and not self._stop.wait(0.25):
                    if time.monotonic() >= next_ask:
                        offset = (asked % blocks) * BLOCK
                        sock.sendall(_message(6, struct.pack(">III", *divmod(offset, meta.piece_length),
                                                             min(BLOCK, meta.size - offset))) + junk)
                        asked, next_ask = asked + 1, time.monotonic() + every
                    sock.settimeout(0.2)
                    with contextlib.suppress(TimeoutError, ssl.SSLWantReadError):
                        if not sock.recv(max(1, rate // 4)):
                            self.hung_up.set()
                            return
        except (OSError, ssl.SSLError, struct.error):
            if not self._stop.is_set():
                self.hung_up.set()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
