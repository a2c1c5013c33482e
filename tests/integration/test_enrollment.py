"""The origin's node registry (shoal_origin.collector): a name is bound to the key it first
enrolled with, the origin's own name is reserved, and forget_node releases a name."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoal import errors, peercerts
from shoal_origin.collector import AUDIT_DB, Collector, forget_node


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
