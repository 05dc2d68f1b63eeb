#!/usr/bin/env bash
#SBATCH --job-name=cil-train
#SBATCH --cpus-per-task=2
#SBATCH --mem-per-cpu=4096
#SBATCH --time=4:00:00
#SBATCH --output=slurm-%j.out
# One training run of main_cil.py on SLURM, two ways:
#
#   sbatch cluster/sbatch_train.sh --epochs 100    # the header above; add --gres=gpu:1 etc.
#                                                  # to sbatch for GPUs, and --gpus 1 here
#   GPUS=1 WALLTIME=24:00 bash cluster/sbatch_train.sh --epochs 100   # submits itself
#
# Run with bash (also inside salloc or srun), it submits through grid_cil.py with CORES (2),
# MEM_PER_CORE in MB (4096), WALLTIME as H:MM or minutes (4:00), GPUS (0; the job trains on
# them, as --gpus N), GPU_CLAUSE (gres: --gres=gpu:N, or gpus: --gpus=N), PARTITION, ACCOUNT
# and QOS; the run folder logs/<run>/ then receives stdout, stderr, the exit code and SLURM's
# own output (scheduler/). The job runs the Python that runs this script (PYTHON, else python3).
set -euo pipefail
if [ "$(basename "$0")" = slurm_script ]; then      # sbatch runs its copy of this script
    cd "${SLURM_SUBMIT_DIR:-.}"
    exec "${PYTHON:-python3}" main_cil.py "$@"
fi
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" grid_cil.py submit slurm -- "$@"
