"""origin/budget.py: events per key and minute, a new minute starting afresh, a bounded table."""

from __future__ import annotations

import pytest

from shoal_origin import budget
from shoal_origin.budget import MinuteBudget


def test_a_key_gets_its_limit_a_minute_and_a_new_minute_starts_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("shoal_origin.budget.time.monotonic", lambda: now[0])
    b = MinuteBudget()
    assert [b.take("node-a", 2) for _ in range(3)] == [True, True, False]
    assert b.used("node-a") == 2 and b.take("node-b", 2)  # keys apart
    now[0] += 59.9
    assert not b.take("node-a", 2)  # the same minute, counted from its first event
    now[0] += 0.1
    assert b.used("node-a") == 0 and b.take("node-a", 2)
    b.add("node-c")
    b.add("node-c")
    assert b.used("node-c") == 2 and not b.take("node-c", 2)


def test_the_table_holds_at_most_max_keys_and_forgets_the_stalest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget, "MAX_KEYS", 3)
    b = MinuteBudget()
    for key in ("a", "b", "c"):
        b.add(key)
    b.add("a")  # used again: no longer the stalest
    b.add("d")
    assert [b.used(k) for k in ("a", "b", "c", "d")] == [2, 0, 1, 1]
