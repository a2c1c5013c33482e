"""Import contracts (DESIGN.md's layout): the components (agent/, origin/, tracker/) build on the
shared core and never on each other; the core builds on none of them. Checked on the source, so
an import hidden in a function body counts as much as one at the top. The components install
under unique import names (shoal_agent, …): every package folder is mapped, and the bare folder
names are never imported."""

from __future__ import annotations

import ast
import os
import re
import tomllib
from pathlib import Path

import pytest

from shoal import cluster

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
FOLDERS: dict[str, str] = SETUPTOOLS["package-dir"]  # import name -> folder
CORE = "shoal"
COMPONENTS = tuple(name for name in FOLDERS if name != CORE)
BARE = {FOLDERS[name] for name in COMPONENTS}  # what they would be called without the mapping


def imported_packages(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """Top-level packages each module of `package` imports (relative imports resolve to itself)."""
    out: dict[str, set[str]] = {}
    for path in sorted((root / FOLDERS.get(package, package)).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                names.add(package if node.level else (node.module or "").split(".")[0])
        out[str(path.relative_to(root))] = names
    return out


def test_the_components_are_mapped_to_unique_names() -> None:
    assert sorted(COMPONENTS) == ["shoal_agent", "shoal_origin", "shoal_tracker"]
    assert sorted(BARE) == ["agent", "origin", "tracker"]
    # `shoal up`, the tests and the bench start components by these names
    assert {cluster.MODULES[FOLDERS[name]] for name in COMPONENTS} == set(COMPONENTS)


def test_mypy_finds_every_component_by_its_import_name() -> None:
    """mypy cannot follow the editable install's import hook: .mypy-path (pyproject's mypy_path)
    has a symlink per import name, and it must follow package-dir."""
    links = ROOT / ".mypy-path"
    assert {p.name: os.readlink(p) for p in links.iterdir()} == {
        name: f"../{FOLDERS[name]}" for name in COMPONENTS}
    mypy = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    assert mypy["mypy_path"] == ".mypy-path" and set(BARE) <= set(mypy["files"])


def test_every_package_folder_is_installed() -> None:
    """A subpackage missing from pyproject's list would be missing from the wheel, not from a dev run."""
    found = set()
    for name, folder in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(ROOT / folder).parts]))
    assert found == set(SETUPTOOLS["packages"])


@pytest.mark.parametrize("component", COMPONENTS)
def test_a_component_imports_the_core_and_no_other_component(component: str) -> None:
    modules = imported_packages(component)
    assert modules, f"no modules found in {FOLDERS[component]}/"
    for module, names in modules.items():
        others = names & (set(COMPONENTS) - {component})
        assert not others, f"{module} imports {sorted(others)}: components talk through the protocol only"


def test_the_core_imports_no_component() -> None:
    for module, names in imported_packages(CORE).items():
        assert not names & set(COMPONENTS), f"{module} imports {sorted(names & set(COMPONENTS))}"


def test_nothing_imports_a_bare_folder_name() -> None:
    """`import agent` works in a checkout (the folder is on the path) and fails once installed."""
    for package in (CORE, *COMPONENTS, "tests", "bench"):
        for module, names in imported_packages(package).items():
            assert not names & BARE, f"{module} imports {sorted(names & BARE)}: use the shoal_* name"


def test_the_contract_check_sees_imports(tmp_path: Path) -> None:
    """The checker itself: imports inside a function body and relative ones are found."""
    (tmp_path / "agent").mkdir()
    (tmp_path / "agent" / "x.py").write_text(
        "def f():\n    from shoal_origin.seeder import Seeder\n    import tracker.peers, json\n    from . import y\n")
    assert imported_packages("shoal_agent", tmp_path) == {
        "agent/x.py": {"shoal_origin", "tracker", "json", "shoal_agent"}}


# A path of shoal's own API inside a string: it belongs in shoal/protocol.py, nowhere else.
API_PATH = re.compile(r"(?<![\w.])/(v1/|announce\b|scrape\b|healthz\b|readyz\b|metrics\b)")


def api_path_literals(path: Path) -> list[str]:
    return api_path_literals_at(path, ROOT)


def api_path_literals_at(path: Path, root: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    # a string standing alone as a statement is documentation (docstrings, attribute docs)
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    return [f"{path.relative_to(root)}:{node.lineno}: {node.value[:60]!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and API_PATH.search(node.value)]


def test_api_paths_are_written_only_in_the_protocol_module() -> None:
    found = [hit for package in (CORE, *BARE, "tests", "bench") for path in sorted((ROOT / package).rglob("*.py"))
             if path != ROOT / "shoal" / "protocol.py" for hit in api_path_literals(path)]
    assert not found, "API paths outside shoal/protocol.py:\n" + "\n".join(found)


def test_the_path_check_sees_paths_in_f_strings(tmp_path: Path) -> None:
    status = "/v" + "1/status"  # (written in two pieces so that this file passes its own check)
    (tmp_path / "m.py").write_text(f'"""GET {status} is documented here."""\nurl = f"{{base}}{status}"\n')
    hits = [h.split(": ", 1)[1] for h in api_path_literals_at(tmp_path / "m.py", tmp_path)]
    assert hits == [repr(status)]
