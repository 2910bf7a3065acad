"""Driver for tests/test_sharding.py and tests/test_sharding_deepspeed.py: several training runs
inside ONE torchrun launch, so the 2-process tests pay for starting torch and the process group once.

    python -m torch.distributed.run --nproc_per_node 2 tests/sharded_runs.py PLAN.json

PLAN.json: a list of {"name", "overrides": [dotted.key=value ...], "copy_checkpoint": [src, dst]?}.
"copy_checkpoint" copies a checkpoint folder of an earlier run into a fresh output_dir first (rank 0),
so that a run can resume from it.
"""

import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from preftune.run_config import load_run_config
from preftune.train.loop import train


def main(plan_path: str) -> None:
    for job in json.loads(Path(plan_path).read_text()):
        if "copy_checkpoint" in job:
            src, dst = (Path(p) for p in job["copy_checkpoint"])
            if dist.get_rank() == 0:
                shutil.copytree(src, dst)
            dist.barrier()
        train(load_run_config(None, job["overrides"]))
        dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
