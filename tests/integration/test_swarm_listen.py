"""libtorrent listens on the configured BitTorrent port or the swarm does not start: it once took
the next free port silently, while the log and the peers' view named the configured one."""

from __future__ import annotations

import socket

import pytest

from shoal import errors
from shoal.swarm import AGENT_FINGERPRINT, Swarm, SwarmSettings
from tests.support.procs import free_port


async def test_a_taken_port_fails_the_start_naming_the_key() -> None:
    ip = "127.0.0.1"
    port = free_port(ip)
    with socket.socket() as taken:
        taken.bind((ip, port))
        taken.listen(1)
        swarm = Swarm(SwarmSettings(listen_ip=ip, listen_port=port, fingerprint=AGENT_FINGERPRINT))
        with pytest.raises(errors.ConfigError) as failed:
            await swarm.start()
    message = str(failed.value)
    assert message.startswith(f"torrent.listen: cannot listen on {ip}:{port} (")
    assert "in use" in message and "\n" not in message


async def test_a_free_port_is_the_one_listened_on() -> None:
    ip = "127.0.0.1"
    port = free_port(ip)
    swarm = Swarm(SwarmSettings(listen_ip=ip, listen_port=port, fingerprint=AGENT_FINGERPRINT))
    await swarm.start()
    try:
        assert swarm.listen_port == port
        with socket.create_connection((ip, port), timeout=5):
            pass  # someone listens there: libtorrent
    finally:
        await swarm.stop()
