"""`--slow` adds the long checks (the soak) to the run; CI runs with it (.ci/run)."""

from __future__ import annotations

import pytest

# the session's PostgreSQL cluster (fixtures `postgres`, `pg_database`), started only if a test asks
pytest_plugins = ["tests.support.postgres"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the slow checks (soak); CI does")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow check: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
