"""Launch `dist_driver.py` under torchrun and say, per job, whether it finished and, if not, why, in a few lines:
the job's own traceback tail, the job before it that failed, or the stall that had the launch killed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("dist_driver.py")
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(args: list[str]) -> list[str]:
    """Two processes on this machine over a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Launch:
    """What one launch did: the jobs it was given, which finished on every rank, which raised (traceback
    tails), and why it ended early, if it did."""

    name: str
    jobs: list[str]
    done: set[str] = field(default_factory=set)
    errors: dict[str, str] = field(default_factory=dict)
    stopped: str = ""
    output: str = ""

    def failure(self, job: str) -> str | None:
        """None if `job` finished; otherwise a short account of why not, for `pytest.fail`."""
        if job in self.done:
            return None
        head = f"'{job}' did not finish in the {self.name} launch (jobs in order: {', '.join(self.jobs)})"
        if job in self.errors:
            return f"{head}: it raised; traceback tail of the first rank that did:\n{tail(self.errors[job], 12)}"
        if self.errors:
            culprit, error = next(iter(self.errors.items()))
            last = error.strip().splitlines()[-1][:200]
            return f"{head}: it never ran, '{culprit}' raised first ({last}); see its tests"
        stopped = self.stopped or "the launch ended early"
        return f"{head}: {stopped}\n--- launch output, last lines ---\n{tail(self.output)}"


def _events(status: Path) -> list[dict]:
    """Every rank's events so far (a line still being written is left for the next look)."""
    events = []
    for path in sorted(status.glob("rank*.jsonl")):
        for line in path.read_text().splitlines(keepends=True):
            if line.endswith("\n"):
                events.append(json.loads(line))
    return events


def _kill(proc: subprocess.Popen, events: list[dict]) -> None:
    """SIGKILL torchrun's process group and every worker (each in a session of its own)."""
    for pid in {event["pid"] for event in events}:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _watch(proc: subprocess.Popen, status: Path, stall_s: float) -> str:
    """Wait for the launch to end; kill it after `stall_s` seconds without a job event, and say so."""
    seen, last = 0, time.monotonic()
    while proc.poll() is None:
        time.sleep(0.5)
        events = _events(status) if status.exists() else []
        if len(events) != seen:
            seen, last = len(events), time.monotonic()
        elif time.monotonic() - last > stall_s:
            _kill(proc, events)
            started = [e["job"] for e in events if e["event"] == "start"]
            return (f"killed: nothing started or finished for {stall_s:.0f} s "
                    f"(last job started: {started[-1] if started else 'none'})")
    return ""


def launch(name: str, jobs: list[dict], folder: Path, stall_s: float) -> Launch:
    """Run `jobs` ({"name", "config", "overrides"}) in one torchrun launch; kill it when no job starts or
    finishes for `stall_s` seconds (a hang: mismatched collectives, a dead rank)."""
    folder.mkdir(parents=True, exist_ok=True)
    spec, status, log = folder / "jobs.json", folder / "status", folder / "output.log"
    spec.write_text(json.dumps(jobs))
    command = torchrun_command([str(DRIVER), str(spec), "--status", str(status)])
    result = Launch(name, [job["name"] for job in jobs])
    with log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **ENV}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            result.stopped = _watch(proc, status, stall_s)
        except BaseException:  # e.g. pytest-timeout or Ctrl-C: leave no training processes behind
            _kill(proc, _events(status) if status.exists() else [])
            raise
    events = _events(status) if status.exists() else []
    result.done = {e["job"] for e in events if e["event"] == "done"}
    for event in events:
        if event["event"] == "error":
            result.errors.setdefault(event["job"], event["error"])
    if not result.stopped and proc.returncode != 0:
        result.stopped = f"the launch exited {proc.returncode}"
    result.output = log.read_text(errors="replace")
    return result


def run_jobs(folder: Path, config: Path, jobs: list[list[str]], stall_s: float = 240) -> str:
    """Jobs given as dotted overrides on `config`, in one launch that every one of them must finish; returns
    the launch's output (stdout and stderr). For tests whose jobs stand or fall together."""
    result = launch(folder.name, [{"name": str(i), "config": str(config), "overrides": job} for i, job in
                                  enumerate(jobs)], folder, stall_s)
    failures = [f for f in map(result.failure, result.jobs) if f]
    assert not failures, failures[0]
    return result.output
