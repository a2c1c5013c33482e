"""The origin's node registry (shoal_origin.collector): a name is bound to the key it first
enrolled with, the origin's own name is reserved, and forget_node releases a name."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal import audit, errors, peercerts, protocol
from shoal_origin.collector import AUDIT_DB, Collector, enroll_node, forget_node, unban


async def test_a_name_is_bound_to_its_first_key_until_an_operator_releases_it(tmp_path: Path) -> None:
    first, second = peercerts.NodeKey.generate(), peercerts.NodeKey.generate()
    collector = Collector(tmp_path / AUDIT_DB)
    await collector.open()
    try:
        assert await collector.node_key("node-a") is None
        await collector.enroll("node-a", first.public_pem)
        await collector.enroll("node-a", first.public_pem)  # renewals with the same key
        assert await collector.node_key("node-a") == first.public_key
        with pytest.raises(errors.Denied, match="enrolled with another key"):
            await collector.enroll("node-a", second.public_pem)
        with pytest.raises(errors.Denied, match="reserved"):
            await collector.enroll("origin", second.public_pem)
        # released while the origin runs (the CLI opens the same database)
        assert forget_node(tmp_path / AUDIT_DB, "node-a")
        assert not forget_node(tmp_path / AUDIT_DB, "node-a")
        assert await collector.node_key("node-a") is None
        await collector.enroll("node-a", second.public_pem)
        assert await collector.node_key("node-a") == second.public_key
    finally:
        await collector.close()
    reopened = Collector(tmp_path / AUDIT_DB)  # bindings survive a restart
    await reopened.open()
    try:
        assert await reopened.node_key("node-a") == second.public_key
    finally:
        await reopened.close()


async def test_a_banned_key_is_refused_under_any_name_and_names_are_bounded(tmp_path: Path) -> None:
    thief, honest = peercerts.NodeKey.generate(), peercerts.NodeKey.generate()
    collector = Collector(tmp_path / AUDIT_DB, max_nodes=2)
    await collector.open()
    try:
        await collector.enroll("compromised", thief.public_pem)
        assert forget_node(tmp_path / AUDIT_DB, "compromised", ban=True)
        for name in ("compromised", "another-name"):
            with pytest.raises(errors.Denied, match="banned"):
                await collector.enroll(name, thief.public_pem)
        # the compromised host makes a fresh key: its name stays shut (found by an outsider's review)
        with pytest.raises(errors.Denied, match="enroll-node"):
            await collector.enroll("compromised", peercerts.NodeKey.generate().public_pem)
        assert await collector.node_key("compromised") is None  # and its journal is refused
        # a plain forget-node must not lift the ban by mistake; the banned key, however spelled,
        # is refused under a new name, and enroll-node does not bind it either
        with pytest.raises(ValueError, match="is banned"):
            forget_node(tmp_path / AUDIT_DB, "compromised")
        respelled = thief.public_pem.replace("\n", "\r\n") + "\n"
        with pytest.raises(errors.Denied, match="banned"):
            await collector.enroll("yet-another", peercerts.canonical_public_pem(
                peercerts.parse_public_key(respelled)))
        with pytest.raises(ValueError, match="this key is banned"):
            enroll_node(tmp_path / AUDIT_DB, "compromised", respelled)
        with pytest.raises(ValueError, match="reserved"):
            enroll_node(tmp_path / AUDIT_DB, "origin", honest.public_pem)
        # the operator admits the real node (its key file with CRLF line ends: one key, any spelling)
        enroll_node(tmp_path / AUDIT_DB, "compromised", honest.public_pem.replace("\n", "\r\n"))
        await collector.enroll("compromised", honest.public_pem)
        with pytest.raises(ValueError, match="--replace"):  # a live binding is not overwritten silently
            enroll_node(tmp_path / AUDIT_DB, "compromised", peercerts.NodeKey.generate().public_pem)
        await collector.enroll("second", peercerts.NodeKey.generate().public_pem)
        with pytest.raises(errors.Denied, match="max_nodes"):
            await collector.enroll("third", peercerts.NodeKey.generate().public_pem)
        await collector.enroll("second", (await _key_of(collector, "second")))  # renewals still pass
        assert collector.enrollment_refusals == 5
        assert unban(tmp_path / AUDIT_DB, "compromised") == 1
    finally:
        await collector.close()
    with pytest.raises(FileNotFoundError):  # a wrong data_dir: no empty database made there
        forget_node(tmp_path / "elsewhere" / AUDIT_DB, "second")
    assert not (tmp_path / "elsewhere").exists()


async def _key_of(collector: Collector, node: str) -> str:
    from cryptography.hazmat.primitives import serialization
    key = await collector.node_key(node)
    assert key is not None
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


async def test_one_node_cannot_write_another_nodes_event(tmp_path: Path) -> None:
    """Anyone with the node token can enroll a node of its own; it must not be able to add the
    end (or a start) of an event another node recorded: the real end was then dropped as a
    duplicate and the audit showed the intruder's outcome (found by an outsider's review)."""
    collector = Collector(tmp_path / AUDIT_DB)
    await collector.open()
    try:
        event = "e" * 32
        start = {"event_id": event, "phase": "start", "ts": audit.now(), "status": 200, "repository": "a/b"}
        end = {"event_id": event, "phase": "end", "ts": audit.now(), "bytes": 10, "outcome": "ok"}
        assert (await collector.store("node-a", [start])).accepted == 1
        forged = await collector.store("intruder", [{**end, "bytes": 0, "outcome": "error"},
                                                    {**start, "repository": "x/y"}])
        assert (forged.accepted, forged.rejected) == (0, 2)
        assert (await collector.store("node-a", [end])).accepted == 1  # the real end is kept
        [merged] = await collector.query(protocol.AuditQuery(limit=10))
        assert (merged["node"], merged["bytes"], merged["outcome"], merged["repository"]) == ("node-a", 10, "ok", "a/b")
    finally:
        await collector.close()
