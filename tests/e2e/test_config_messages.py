"""What an operator sees from the real command for a mistyped key, a key given twice and a
password left in a URL: one line that names the key, suggests the fix, and shows no secret."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from shoal import cluster
from tests.support.procs import ROOT

SECRET = "s3cr3t-hunter2"


@pytest.mark.parametrize(("text", "message"), [
    ("data_dir: /tmp/x\nupstreams: [{name: r, url: 'http://r'}]\ncache: {max_byte: 1GiB}\n",
     "shoal-agent: config error: cache.max_byte: unknown key; did you mean `cache.max_bytes`?"),
    ("data_dir: /tmp/x\nupstreams: [{name: r, url: 'http://r'}]\ndata_dir: /tmp/y\n",
     "shoal-agent: config error: data_dir: given twice in {path} (lines 1 and 3); keep one"),
    (f"data_dir: /tmp/x\nupstreams: [{{name: r, url: 'ftp://alice:{SECRET}@r'}}]\n",
     "shoal-agent: config error: upstreams[0].url: expected an http:// or https:// URL without credentials, "
     "got 'ftp://alice:***@r'"),
])
def test_agent_config_messages(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    result = subprocess.run([*cluster.command("agent", path), "--check-config"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message.format(path=path)]
    assert SECRET not in result.stdout + result.stderr
