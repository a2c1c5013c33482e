"""The tests' free_port: a port once handed out is not handed out again in the session (two calls
in a row once gave a stack's tracker and origin one port: the origin could not listen, and the
tracker answered its readiness check)."""

from __future__ import annotations

from tests.support.procs import free_port


def test_free_port_never_hands_out_a_port_twice() -> None:
    # 2,000 draws from about 28,000 ephemeral ports: without the bookkeeping the kernel's picks
    # repeat dozens of times (the birthday bound)
    ports = [free_port() for _ in range(2000)]
    assert len(set(ports)) == len(ports)
