#!/usr/bin/env bash
# Submit one training run of main_cil.py to LSF (ETH's Leonhard, and Euler before 2023), with
# these arguments; its run folder logs/<run>/ receives the job's stdout, stderr, exit code and
# LSF's own report (scheduler/).
#
#   bash cluster/bsub_train.sh --epochs 100 --loss bce_dice
#   GPUS=2 WALLTIME=24:00 bash cluster/bsub_train.sh --run-name big
#   bash cluster/bsub_train.sh --resume logs/big     # the same run again, from its checkpoint
#
# Environment (default): CORES (2), MEM_PER_CORE in MB (4096), WALLTIME as H:MM or minutes
# (4:00), STOP_WARNING in minutes (5: LSF sends SIGUSR2 that long before the run limit, and the
# run saves a checkpoint and stops), GPUS (0; the job trains on them, as --gpus N), GPU_CLAUSE
# (rusage: -R "rusage[..., ngpus_excl_p=N]"; gpu: -gpu "num=N"), PARTITION (the queue, -q),
# ACCOUNT (-P). The job runs the Python that runs this script (PYTHON, else python3 on the
# PATH), whatever shell LSF uses. No argument passes through LSF's shell: they travel in
# logs/<run>/job.json.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" grid_cil.py submit lsf -- "$@"
