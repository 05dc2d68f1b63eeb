#!/usr/bin/env bash
#SBATCH --job-name=cil-train
#SBATCH --cpus-per-task=2
#SBATCH --mem-per-cpu=4096
#SBATCH --time=4:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --output=slurm-%j.out
# One training run of main_cil.py on SLURM. From the repository root, with the venv active:
#
#   bash cluster/sbatch_train.sh --epochs 100          # submits itself
#   GPUS=1 WALLTIME=24:00 bash cluster/sbatch_train.sh --epochs 100
#   bash cluster/sbatch_train.sh --resume logs/<run>   # the same run again, from its checkpoint
#
# Run with bash (also inside salloc or srun), it submits through grid_cil.py with CORES (2),
# MEM_PER_CORE in MB (4096), WALLTIME as H:MM or minutes (4:00), STOP_WARNING in minutes (5:
# the job is asked to checkpoint and stop that long before the limit), GPUS (0; the job trains
# on them, as --gpus N), GPU_CLAUSE (gres: --gres=gpu:N, or gpus: --gpus=N), PARTITION, ACCOUNT
# and QOS; the run folder logs/<run>/ then receives stdout, stderr, the exit code and SLURM's
# own output (scheduler/). The job runs the Python that runs this script (PYTHON, else python3).
#
# A bare `sbatch cluster/sbatch_train.sh --epochs 100` (from the repository root) also works:
# the header above asks for the resources, the job runs the run as grid_cil.py jobs do (its
# stdout, stderr and exit code in the run folder) and SLURM writes only its own lines to
# ./slurm-<job>.out. That job finds Python as PYTHON or python3 on the PATH it was submitted
# with: activate the venv first, or `PYTHON=$PWD/.venv/bin/python sbatch ...`.
set -euo pipefail
if [ "$(basename "$0")" = slurm_script ]; then      # sbatch runs its copy of this script
    cd "${SLURM_SUBMIT_DIR:-.}"
    exec "${PYTHON:-python3}" grid_cil.py here -- "$@"
fi
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" grid_cil.py submit slurm -- "$@"
