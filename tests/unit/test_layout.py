"""Import contracts (DESIGN.md's layout): the components (agent, origin, tracker) build on the
shared core and never on each other; the core builds on none of them. Checked on the source, so
an import hidden in a function body counts as much as one at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("agent", "origin", "tracker")
CORE = "shoal"


def imported_packages(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Top-level packages each module of `package` imports (relative imports resolve to itself)."""
    out: dict[str, set[str]] = {}
    for path in sorted((root / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(package if node.level else (node.module or "").split(".")[0])
        out[str(path.relative_to(root))] = names
    return out


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_component_imports_the_core_and_no_other_component(component: str) -> None:
    modules = imported_packages(component)
    assert modules, f"no modules found in {component}/"
    for module, names in modules.items():
        others = names & (set(COMPONENTS) - {component})
        assert not others, f"{module} imports {sorted(others)}: components talk through the protocol only"


def test_the_core_imports_no_component() -> None:
    for module, names in imported_packages(CORE).items():
        assert not names & set(COMPONENTS), f"{module} imports {sorted(names & set(COMPONENTS))}"


def test_the_contract_check_sees_imports(tmp_path: Path) -> None:
    """The checker itself: imports inside a function body and relative ones are found."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "x.py").write_text(
        "def f():\n    from origin.seeder import Seeder\n    import tracker.peers, json\n    from . import y\n")
    assert imported_packages("agent", tmp_path) == {"agent/x.py": {"origin", "tracker", "json", "agent"}}
