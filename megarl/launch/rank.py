"""One training rank of a non-Ray stage under `srun`: Slurm's task ids become torch.distributed's
RANK / WORLD_SIZE / LOCAL_RANK, the default process group is joined, then `megarl train` runs in
this process as that rank (megarl.trainers.common.run_ranks).

    srun ... python -m megarl.launch.rank RECIPE [--set ...]

Rendezvous: rank 0 hosts the store on MASTER_ADDR (the job's head node, set by the launcher),
bound to port 0, and publishes the port it got in the file named by MEGARL_RENDEZVOUS_FILE (one
per launch, in the job's log directory, which every node sees); the other ranks read it there.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

from megarl.runtime.rendezvous import RENDEZVOUS_FILE_ENV

RENDEZVOUS_TIMEOUT_S = 600.0


def main(argv: list[str]) -> int:
    env = os.environ
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    join_job_group(argv, int(env["RANK"]), int(env["WORLD_SIZE"]))
    from megarl.cli import main as cli
    from megarl.runtime.strict_device import discipline

    with discipline():   # strict device mode (tests): a no-op otherwise
        return cli(["train", *argv])


def join_job_group(argv: list[str], rank: int, world: int) -> None:
    """The default process group over the store rank 0 hosts (see the module docstring), with the
    backend of the recipe's device; megarl.runtime.distributed then finds it initialised."""
    import torch.distributed as dist

    from megarl.config.loader import load_recipe
    from megarl.runtime.device import select_device
    from megarl.runtime.rendezvous import Rendezvous, open_store, publish_address, wait_for_address

    path, host = os.environ[RENDEZVOUS_FILE_ENV], os.environ["MASTER_ADDR"]
    if rank == 0:
        store, port = open_store(host, 0, RENDEZVOUS_TIMEOUT_S)
        publish_address(path, host, port)
    else:
        host, port = wait_for_address(path, RENDEZVOUS_TIMEOUT_S, "rank 0's store address")
        store = Rendezvous(host, port, RENDEZVOUS_TIMEOUT_S).connect()
    os.environ["MASTER_PORT"] = str(port)  # for anything that reads it
    overrides = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--set"]
    backend = select_device(load_recipe(argv[0], overrides=overrides).cluster.device).backend
    dist.init_process_group(backend, store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
