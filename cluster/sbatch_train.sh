#!/usr/bin/env bash
#SBATCH --job-name=cil-train
#SBATCH --cpus-per-task=4
#SBATCH --mem-per-cpu=4096
#SBATCH --time=4:00:00
#SBATCH --gres=gpu:1
#SBATCH --output=logs/slurm-%j.out
# Train with main_cil.py as a SLURM job. `sbatch cluster/sbatch_train.sh ...` uses the header;
# run it with bash and it submits itself with the resources below.
#
#   sbatch cluster/sbatch_train.sh --epochs 100
#   GPUS=2 WALLTIME=24:00:00 bash cluster/sbatch_train.sh --gpus 2
#
# Environment (default):  CORES (4), MEM_PER_CORE in MB (4096), WALLTIME (4:00:00), GPUS (1; 0
# for a CPU job), GPU_CLAUSE: "gres" asks --gres=gpu:N, "gpus" asks --gpus=N; RUN_NAME
# (time-slurm) and LOGS_DIR (logs) place the run folder, which receives stdout, stderr and the
# exit code; JOB_NAME (RUN_NAME) is what squeue shows. ARRAY_JOBS names a file of job folders (grid_cil.py writes it): one array task per
# line, each running with the arguments in its folder's `args` file.
set -euo pipefail
CORES=${CORES:-4}
MEM_PER_CORE=${MEM_PER_CORE:-4096}
WALLTIME=${WALLTIME:-4:00:00}
GPUS=${GPUS:-1}
GPU_CLAUSE=${GPU_CLAUSE:-gres}
LOGS_DIR=${LOGS_DIR:-logs}
RUN_NAME=${RUN_NAME:-$(date +%Y%m%d-%H%M%S)-slurm}
export LOGS_DIR RUN_NAME

if [ -n "${SLURM_JOB_ID:-}" ]; then       # inside the job
    if [ -n "${ARRAY_JOBS:-}" ]; then      # one task of a grid: its folder and arguments
        job_dir=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$ARRAY_JOBS")
        mapfile -t args < "$job_dir/args"
        mkdir -p "$job_dir/run"
        LOGS_DIR="$job_dir" RUN_NAME=run bash cluster/run_job.sh "${args[@]}" \
            > "$job_dir/run/stdout" 2> "$job_dir/run/stderr"
        exit
    fi
    exec bash cluster/run_job.sh "$@"
fi
if ! command -v sbatch >/dev/null; then
    echo "error: sbatch not found; run this on a SLURM login node, or run python main_cil.py here" >&2
    exit 2
fi
resources=(--cpus-per-task="$CORES" --mem-per-cpu="$MEM_PER_CORE" --time="$WALLTIME")
if [ "$GPUS" -gt 0 ]; then
    case "$GPU_CLAUSE" in
        gres) resources+=(--gres="gpu:$GPUS") ;;
        gpus) resources+=(--gpus="$GPUS") ;;
        *) echo "error: GPU_CLAUSE=$GPU_CLAUSE; use gres or gpus" >&2; exit 2 ;;
    esac
fi
if [ -n "${ARRAY_JOBS:-}" ]; then
    tasks=$(grep -c . "$ARRAY_JOBS")
    exec sbatch --job-name="${JOB_NAME:-$RUN_NAME}" "${resources[@]}" --array="0-$((tasks - 1))" \
        --output=/dev/null --export=ALL cluster/sbatch_train.sh
fi
run_dir="$LOGS_DIR/$RUN_NAME"
mkdir -p "$run_dir"
exec sbatch --job-name="${JOB_NAME:-$RUN_NAME}" "${resources[@]}" --output="$run_dir/stdout" \
    --error="$run_dir/stderr" --export=ALL cluster/sbatch_train.sh "$@"
