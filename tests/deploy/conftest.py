"""The chart's metric test starts a real stack: the end-to-end fixtures (registry, images, stack)."""

from tests.e2e.conftest import e2e_root, images, registry, stack  # noqa: F401 (fixtures)
