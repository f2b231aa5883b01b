"""Run several training jobs one after another inside one `torchrun` launch (process start-up and
rendezvous are most of a tiny run's time). Usage: torchrun ... tests/distributed/dist_driver.py JOBS.json

JOBS.json: [{"config": "path.yaml", "overrides": ["train.strategy=fsdp2", ...]}, ...]
"""

import json
import sys

import torch
import torch.distributed as dist

from vlm.config import load_config
from vlm.train import train


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for job in json.loads(open(sys.argv[1]).read()):
        train(load_config(job["config"], job["overrides"]))
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
