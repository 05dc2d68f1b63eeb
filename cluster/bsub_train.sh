#!/usr/bin/env bash
#BSUB -J cil-train
#BSUB -n 4
#BSUB -W 4:00
#BSUB -R "rusage[mem=4096, ngpus_excl_p=1]"
#BSUB -o logs/lsf.%J.out
# Train with main_cil.py as an LSF job (ETH Euler, Leonhard). Run it with bash and it submits
# itself with the resources below; `bsub < cluster/bsub_train.sh` uses the header instead.
#
#   bash cluster/bsub_train.sh --epochs 100 --loss bce_dice
#   GPUS=2 WALLTIME=24:00 bash cluster/bsub_train.sh --gpus 2
#
# Environment (default):  CORES (4), MEM_PER_CORE in MB (4096), WALLTIME (4:00), GPUS (1; 0 for
# a CPU job), GPU_CLAUSE: "rusage" asks -R "rusage[..., ngpus_excl_p=N]" (Leonhard), "gpu" asks
# -gpu "num=N" (newer LSF); RUN_NAME (time-lsf) and LOGS_DIR (logs) place the run folder, which
# also receives LSF's stdout and stderr (bpeek shows them live) and the exit code; JOB_NAME
# (RUN_NAME) is what bjobs shows.
set -euo pipefail
CORES=${CORES:-4}
MEM_PER_CORE=${MEM_PER_CORE:-4096}
WALLTIME=${WALLTIME:-4:00}
GPUS=${GPUS:-1}
GPU_CLAUSE=${GPU_CLAUSE:-rusage}
LOGS_DIR=${LOGS_DIR:-logs}
RUN_NAME=${RUN_NAME:-$(date +%Y%m%d-%H%M%S)-lsf}
export LOGS_DIR RUN_NAME

if [ -n "${LSB_JOBID:-}" ]; then          # inside the job
    exec bash cluster/run_job.sh "$@"
fi
if ! command -v bsub >/dev/null; then
    echo "error: bsub not found; run this on an LSF login node, or run python main_cil.py here" >&2
    exit 2
fi
rusage="mem=$MEM_PER_CORE"
gpu_args=()
if [ "$GPUS" -gt 0 ]; then
    case "$GPU_CLAUSE" in
        rusage) rusage="$rusage, ngpus_excl_p=$GPUS" ;;
        gpu) gpu_args=(-gpu "num=$GPUS") ;;
        *) echo "error: GPU_CLAUSE=$GPU_CLAUSE; use rusage or gpu" >&2; exit 2 ;;
    esac
fi
run_dir="$LOGS_DIR/$RUN_NAME"
mkdir -p "$run_dir"
exec bsub -J "${JOB_NAME:-$RUN_NAME}" -n "$CORES" -W "$WALLTIME" -R "rusage[$rusage]" "${gpu_args[@]}" \
    -o "$run_dir/stdout" -e "$run_dir/stderr" bash cluster/bsub_train.sh "$@"
