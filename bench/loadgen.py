"""wrk as the one load generator for every HTTP comparison (agent, nginx, registries, trackers)."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30}


@dataclass(frozen=True)
class WrkResult:
    requests_per_second: float
    bytes_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


def _seconds(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    assert m, text
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(url: str, *, threads: int = 1, connections: int = 8, seconds: int = 8, headers: dict[str, str] | None = None,
        script: Path | None = None, cmd_prefix: list[str] | None = None) -> WrkResult:
    args = [*(cmd_prefix or []), "wrk", "--latency", f"-t{threads}", f"-c{connections}", f"-d{seconds}s",
            "--timeout", "30s"]
    for key, value in (headers or {}).items():
        args += ["-H", f"{key}: {value}"]
    if script is not None:
        args += ["-s", str(script)]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)(B|KB|MB|GB)", out)
    bps = float(transfer.group(1)) * _BYTES[transfer.group(2)] if transfer else 0.0
    p50 = re.search(r"50%\s+([\d.]+(?:us|ms|s|m))", out)
    p99 = re.search(r"99%\s+([\d.]+(?:us|ms|s|m))", out)
    errors = 0
    for pattern in (r"Non-2xx or 3xx responses: (\d+)", r"Socket errors: .*?timeout (\d+)"):
        m = re.search(pattern, out)
        if m:
            errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+)", out)
    if m:
        errors += sum(int(g) for g in m.groups())
    return WrkResult(rps, bps, _seconds(p50.group(1)) * 1000 if p50 else 0.0,
                     _seconds(p99.group(1)) * 1000 if p99 else 0.0, errors)
