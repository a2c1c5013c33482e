"""In-process tests run with a guard that fails a test whose code blocks the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shoal import peercerts, signing
from shoal_tracker import app as tracker_app
from shoal_tracker import config as tracker_config
from tests.support.procs import free_port

# A callback or task step holding the loop longer than this is a bug (file I/O, hashing or a
# slow libtorrent call that belongs in a thread). Not less: late in a full run (1,100 tests in one
# process) a step that measures 15 ms alone took 0.27 s of wall time on this 2-core VM with the
# cyclic GC off (below), and a 4 ms one 0.26 s with it on: each failed a clean-clone run.
SLOW_CALLBACK = 0.5


@pytest.fixture(autouse=True)
async def loop_guard(caplog: pytest.LogCaptureFixture) -> AsyncIterator[None]:
    # No cyclic garbage collection while the guard watches: one pass over the whole session's
    # heap (every test so far in this process) took up to 0.21 s, inside whatever callback
    # allocated last, and failed tests that block nothing. A service's own heap is small.
    gc.disable()
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    loop.slow_callback_duration = SLOW_CALLBACK
    try:
        yield
    finally:
        gc.enable()
    records = caplog.get_records("setup") + caplog.get_records("call")
    slow = [r.getMessage() for r in records if r.name == "asyncio" and " took " in r.getMessage()]
    assert not slow, f"the event loop was blocked: {slow}"


class Keys:
    """The origin's signing key (and files for a tracker's config) for in-process tests."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        pem = signing.generate_private_key()
        self.private_path = directory / "origin.pem"
        self.private_path.write_bytes(pem)
        self.public_path = directory / "origin.pub.pem"
        self.public_path.write_bytes(signing.public_pem(pem))
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, Ed25519PrivateKey)
        self.key = key

    def token(self, node: str = "node-test", ttl: float = 600, blob: str = signing.EVERY_BLOB) -> str:
        return signing.issue_token(self.key, node, ttl, blob)

    def sign(self, raw: bytes) -> str:
        return signing.sign_metainfo(self.key, raw)

    @property
    def root_cert(self) -> str:
        return peercerts.ca_certificate(self.key)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path / "keys")


REGISTRATION_TOKEN = "registration-secret-0123456789"
NODE_TOKEN = "node-secret-0123456789abcdef"


@contextlib.asynccontextmanager
async def tracker_server(keys: Keys, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> AsyncIterator[TestServer]:
    """The real tracker app in process, on 127.0.0.1, with the tokens above."""
    monkeypatch.setenv("SHOAL_TEST_TOKEN", REGISTRATION_TOKEN)
    monkeypatch.setenv("SHOAL_TEST_NODE_TOKEN", NODE_TOKEN)
    cfg = tracker_config.load({"registration_token": {"env": "SHOAL_TEST_TOKEN"},
                               "node_token": {"env": "SHOAL_TEST_NODE_TOKEN"},
                               "origin_public_key": str(keys.public_path), **extra})
    server = TestServer(tracker_app.build(cfg), host="127.0.0.1", port=free_port())
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()
