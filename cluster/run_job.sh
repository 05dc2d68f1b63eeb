#!/usr/bin/env bash
# Inside a job (LSF, SLURM or a local grid): run main_cil.py into the run folder
# $LOGS_DIR/$RUN_NAME and record its exit code there, for grid_cil.py to read.
# A scheduler's SIGTERM/SIGINT reaches main_cil.py, which saves a resumable checkpoint; the trap
# keeps this script alive long enough to write the exit code afterwards.
set -uo pipefail
run_dir="$LOGS_DIR/$RUN_NAME"
mkdir -p "$run_dir"
rm -f "$run_dir/exit_code"
trap ':' TERM INT
"${PYTHON:-python}" main_cil.py --logs-dir "$LOGS_DIR" --run-name "$RUN_NAME" "$@"
status=$?
echo "$status" > "$run_dir/exit_code"
exit "$status"
