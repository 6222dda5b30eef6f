#!/bin/bash
# GRPO on a Llama-3-70B-shaped model: 8 nodes × 8 GPUs (configs/grpo_70b.yaml).
#   sbatch slurm/grpo_70b.sh
#SBATCH --job-name=megarl-grpo-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@900
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# ---- cluster specifics (export before sbatch to override) ------------------------------------------
# partition / account: `export SBATCH_PARTITION=... SBATCH_ACCOUNT=...` (sbatch reads them)
MEGARL_ROOT=${MEGARL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}    # the repository checkout (shared filesystem)
VENV=${VENV:-$MEGARL_ROOT/.venv}
RECIPE=${RECIPE:-configs/grpo_70b.yaml}
MEGARL_ARGS=${MEGARL_ARGS:-}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}                    # e.g. nvcr.io/nvidia/pytorch:25.01-py3 (pyxis/enroot)
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$MEGARL_ROOT:$MEGARL_ROOT}
export MEGARL_SRUN_ARGS=${MEGARL_SRUN_ARGS:-${CONTAINER_IMAGE:+--container-image=$CONTAINER_IMAGE --container-mounts=$CONTAINER_MOUNTS}}
export HF_HOME=${HF_HOME:-$MEGARL_ROOT/.cache/huggingface}
# ------------------------------------------------------------------------------------------------------
export WANDB_MODE=${WANDB_MODE:-offline} NCCL_DEBUG=${NCCL_DEBUG:-WARN}
cd "$MEGARL_ROOT"
# shellcheck disable=SC2086
exec "$VENV/bin/python" -m megarl.cli launch "$RECIPE" $MEGARL_ARGS
