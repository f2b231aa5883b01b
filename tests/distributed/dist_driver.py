"""Run several training jobs one after another inside one `torchrun` launch (process start-up and
rendezvous are most of a tiny run's time). Usage: torchrun ... tests/distributed/dist_driver.py JOBS.json [--status DIR]

JOBS.json: [{"config": "path.yaml", "overrides": ["train.strategy=fsdp2", ...], "name": "optional"}, ...]

With `--status DIR` each rank appends one JSON line per event to DIR/rank<N>.jsonl, each with its "pid" and "time":
{"job", "event": "start"} before a job, {"job", "event": "done"} once every rank finished it, {"job", "event":
"error", "error": the traceback's tail} when it raises (the launch then ends, as without the flag). A job's
name defaults to its index.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from vlm.config import load_config
from vlm.train import train


def _status_writer(folder: str | None):
    """`write(job, event, **fields)`: one flushed JSON line in this rank's file; a no-op without a folder."""
    if folder is None:
        return lambda *args, **fields: None
    path = Path(folder) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(job: str, event: str, **fields: str) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"job": job, "event": event, "pid": os.getpid(), "time": time.time(), **fields}) + "\n")

    return write


def main(argv: list[str]) -> None:
    jobs_file, status = argv[0], argv[argv.index("--status") + 1] if "--status" in argv else None
    write = _status_writer(status)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for index, job in enumerate(json.loads(open(jobs_file).read())):
        name = str(job.get("name", index))
        write(name, "start")
        try:
            train(load_config(job["config"], job["overrides"]))
        except BaseException:
            write(name, "error", error="".join(traceback.format_exc().splitlines(keepends=True)[-25:]))
            raise
        dist.barrier()
        write(name, "done")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
