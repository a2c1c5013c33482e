"""A fresh editable install of shoal (what bin/shoal does on first use) prints no setuptools
deprecation warnings: a newcomer's first screen used to be ~20 lines of them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.procs import ROOT


def test_a_fresh_install_prints_no_deprecation_warning(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    # the pip scripts/ensure-venv installs (a recent one shows the build backend's warnings; the
    # venv module's bundled pip may not), installing into the fresh venv. --no-deps: the build
    # of shoal is under test (its isolated build environment still gets the setuptools
    # pyproject.toml asks for), not the download of its dependencies.
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                             "--no-deps", "--disable-pip-version-check", "-e", str(ROOT)],
                            capture_output=True, text=True, timeout=170)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "SetuptoolsDeprecationWarning" not in output and "is deprecated" not in output, output[-3000:]
    assert "project.license" not in output and "License classifiers" not in output, output[-3000:]
