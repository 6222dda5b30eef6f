#!/bin/bash
# The tiny tool-calling GRPO recipe on a CPU-only Slurm cluster (one node, 2 cores).
#   sbatch slurm/tiny_cpu.sh                       # from the repository root, after `make demo`
#   RECIPE=configs/tiny/sft_cpu.yaml sbatch slurm/tiny_cpu.sh
#SBATCH --job-name=megarl-tiny
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# ---- cluster specifics (export before sbatch to override) ------------------------------------------
# partition / account: `export SBATCH_PARTITION=... SBATCH_ACCOUNT=...` (sbatch reads them)
MEGARL_ROOT=${MEGARL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}    # the repository checkout
VENV=${VENV:-$MEGARL_ROOT/.venv}                        # `make setup` made it
RECIPE=${RECIPE:-configs/tiny/grpo_cpu.yaml}
MEGARL_ARGS=${MEGARL_ARGS:-}                            # extra launcher args, e.g. "--set trainer.steps=20"
export MEGARL_SRUN_ARGS=${MEGARL_SRUN_ARGS:-}           # extra srun flags for the Ray steps
# ------------------------------------------------------------------------------------------------------
export WANDB_MODE=${WANDB_MODE:-offline} TOKENIZERS_PARALLELISM=false CUDA_VISIBLE_DEVICES=
cd "$MEGARL_ROOT"
# exec: the launcher becomes the batch step, so Slurm's USR1 (preemption warning) reaches it
# shellcheck disable=SC2086
exec "$VENV/bin/python" -m megarl.cli launch "$RECIPE" $MEGARL_ARGS
