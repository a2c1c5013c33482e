"""`--slow` adds the long checks (the soak, and scenarios that wait out real timeouts) to the run;
CI runs with it (.ci/run). Marked `@pytest.mark.slow`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.redis import RedisServer

# the session's PostgreSQL cluster (fixtures `postgres`, `pg_database`), started only if a test asks
pytest_plugins = ["tests.support.postgres"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--slow", action="store_true", help="also run the slow checks (soak, long faults); CI does")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow check: run with --slow (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server for the session; each test keeps its keys under its own prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
