"""podman as the e2e tests drive it: the image bin/image builds, and the host limits podman must
be told about on this kind of machine."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

from tests.support.procs import ROOT

BUILD_TIMEOUT = 900
TEST_TAG = "localhost/shoal-e2e:test"


def podman(*args: str, check: bool = True, timeout: float = 120,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = ["podman", *os.environ.get("SHOAL_PODMAN_FLAGS", "").split(), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
    return result


def limits() -> tuple[int, int]:
    """podman (as root) raises a container's open-files and processes limits to the kernel's
    maximum, which a host without CAP_SYS_RESOURCE (this CI runs in a container) refuses: "error
    setting rlimit ... operation not permitted". Ask for what the test itself has instead
    (processes at most kernel.pid_max, the highest value such a host accepted)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], int(Path("/proc/sys/kernel/pid_max").read_text()))
    return nofile, nproc


def ulimits() -> list[str]:
    nofile, nproc = limits()
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def containers_conf(path: Path) -> Path:
    """The same limits for `podman kube play`, which has no --ulimit (CONTAINERS_CONF=path)."""
    nofile, nproc = limits()
    path.write_text(f'[containers]\ndefault_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n')
    return path


def build_image(tag: str = TEST_TAG) -> bool:
    """bin/image TAG (a no-op when TAG holds an image of this clean commit); True if the image
    was there before."""
    existed = podman("image", "exists", tag, check=False).returncode == 0
    # PYTHON: this interpreter has pip (Debian's python3 may not)
    result = subprocess.run([str(ROOT / "bin" / "image"), tag], capture_output=True, text=True,
                            timeout=BUILD_TIMEOUT, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, f"bin/image failed: {result.stderr.strip()[-3000:]}"
    return existed
