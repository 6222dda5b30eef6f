"""One training rank of a non-Ray stage under `srun`: Slurm's task ids become torch.distributed's
RANK / WORLD_SIZE / LOCAL_RANK (MASTER_ADDR/PORT come from the launcher), then `megarl train`
runs in this process as that rank (megarl.trainers.common.run_ranks).

    srun ... python -m megarl.launch.rank RECIPE [--set ...]
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> int:
    env = os.environ
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    from megarl.cli import main as cli

    return cli(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
