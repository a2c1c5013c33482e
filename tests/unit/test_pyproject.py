"""pyproject.toml uses PEP 639's SPDX `license` string, with a setuptools that reads it: the
deprecated `license = {text = ...}` table made every install print ~20 lines of warnings."""

from __future__ import annotations

import re
import tomllib

from tests.support.procs import ROOT


def test_license_is_an_spdx_string_and_the_build_backend_reads_it() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert doc["project"]["license"] == "Apache-2.0"
    setuptools = [r for r in doc["build-system"]["requires"] if r.startswith("setuptools")]
    assert len(setuptools) == 1
    floor = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", setuptools[0])
    assert floor is not None and int(floor.group(1)) >= 77, setuptools  # PEP 639 support
    assert not any(c.startswith("License ::") for c in doc["project"].get("classifiers", []))  # 639 forbids both


def test_rich_is_a_runtime_dependency() -> None:
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.split(">")[0].split("=")[0].strip() == "rich" for d in doc["project"]["dependencies"])
