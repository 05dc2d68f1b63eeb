"""The grid on a real SLURM: `bash cluster/slurm_local.sh start` (root, Debian's slurm-wlm and
munge) gives this machine a one-node cluster; `.ci/run` starts it before the suite. Skipped,
with the reason, where there is no SLURM to submit to."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from grid_cil import job_status
from tests.conftest import REPO, TF_QUIET


def slurm_answers():
    if not shutil.which("sbatch"):
        return "sbatch not found (install slurm-wlm: bash cluster/slurm_local.sh install)"
    answer = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if answer.returncode or not answer.stdout.strip():
        return "no SLURM controller answers (start one: bash cluster/slurm_local.sh start)"
    return None


pytestmark = [pytest.mark.slurm, pytest.mark.slow,
              pytest.mark.skipif(slurm_answers() is not None, reason=str(slurm_answers()))]

JOB = {"depth": 2, "crop": 32, "count": 1, "batch-size": 4, "valid-fraction": 0.25}
WAIT_SECONDS = 600


def run_grid(grid_file, jobs_dir):
    environment = {name: value for name, value in os.environ.items() if name != TF_QUIET}
    result = subprocess.run([sys.executable, "grid_cil.py", str(grid_file), "--scheduler",
                             "slurm", "--jobs-dir", str(jobs_dir)], cwd=REPO,
                            capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_for(condition, what):
    deadline = time.time() + WAIT_SECONDS
    while time.time() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"waited {WAIT_SECONDS} s for {what}")


def in_queue(job):
    answer = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True)
    return bool(answer.stdout.strip())


def test_a_cpu_grid_runs_on_slurm_with_default_resources(tmp_path, road_dir):
    grid_file = tmp_path / "cpu.json"
    grid_file.write_text(json.dumps({"data-dir": str(road_dir), "filters": [2, 4], "epochs": 2,
                                     **JOB}))
    started = time.time()
    output = run_grid(grid_file, tmp_path / "jobs")
    assert "array" in output and "with 0 GPU(s): filters-2, filters-4" in output
    folders = [tmp_path / "jobs/cpu/filters-2", tmp_path / "jobs/cpu/filters-4"]
    wait_for(lambda: all(job_status(folder) not in ("pending", "running") for folder in folders),
             "both jobs")
    summary = subprocess.run([sys.executable, "grid_cil.py", "summary", str(tmp_path / "jobs/cpu")],
                             cwd=REPO, capture_output=True, text=True)
    seconds = time.time() - started
    assert summary.returncode == 0, summary.stderr
    print(f"\nsubmit to summary: {seconds:.0f} s\n{summary.stdout}")
    for folder in folders:
        assert job_status(folder) == "finished", (folder / "stderr").read_text()
        assert (folder / "best.keras").is_file() and (folder / "metrics.json").is_file()
        log = (folder / "stdout").read_text()
        assert "device: CPU, 2 threads" in log and "Epoch 2/2 - " in log
        assert not any(character in log for character in "\r\b\x1b")
        assert "I0000" not in (folder / "stderr").read_text()
    assert list((tmp_path / "jobs/cpu/scheduler").glob("slurm-*_1.out"))
    rows = [row for row in summary.stdout.splitlines()[2:] if row]
    assert [row.split(" | ")[1] for row in rows] == ["finished", "finished"]


def test_a_cancelled_job_saves_its_checkpoint_and_a_rerun_resumes_it(tmp_path, road_dir):
    grid_file = tmp_path / "long.json"
    grid_file.write_text(json.dumps({"data-dir": str(road_dir), "filters": [4], "epochs": 8,
                                     "patience": 0, **JOB, "count": 24}))
    run_grid(grid_file, tmp_path / "jobs")
    folder = tmp_path / "jobs/long/filters-4"
    job = json.loads((folder / "submitted.json").read_text())["job_id"]
    state = folder / "checkpoint/state.json"
    wait_for(lambda: state.is_file(), "the first checkpoint")
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: not in_queue(job), "the cancelled job to leave the queue")
    assert job_status(folder) == "failed (exit 143)", (folder / "stderr").read_text()
    stopped = json.loads(state.read_text())
    assert "checkpoint saved. Continue with" in (folder / "stderr").read_text()
    assert stopped["epoch"] < 8
    output = run_grid(grid_file, tmp_path / "jobs")
    assert "filters-4" in output
    wait_for(lambda: job_status(folder) not in ("pending", "running"), "the resumed job")
    assert job_status(folder) == "finished", (folder / "stderr").read_text()
    history = (folder / "history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in history] == list(range(8))
    assert json.loads((folder / "metrics.json").read_text())["epochs_run"] == 8
