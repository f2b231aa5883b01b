"""Two training processes over gloo under torchrun, several jobs in one launch (tests/distributed/dist_driver.py),
with a bounded wait so a hang fails in minutes, showing the end of what the processes printed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_jobs(config: Path, jobs: list[list[str]], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run each job (a list of dotted overrides on `config`) in one 2-process launch; returns stdout + stderr.
    A non-zero exit or a launch still running after `timeout` s fails with the output's last lines."""
    spec = config.parent / f"jobs-{free_port()}.json"
    spec.write_text(json.dumps([{"config": str(config), "overrides": job} for job in jobs]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "distributed" / "dist_driver.py"), str(spec)]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        tail = (err.stderr or b"").decode(errors="replace") if isinstance(err.stderr, bytes) else (err.stderr or "")
        raise AssertionError(f"torchrun still running after {timeout:.0f} s (a hang?):\n{out[-1500:]}\n{tail[-3000:]}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"torchrun exited {result.returncode}:\n{output[-4000:]}"
    return output
