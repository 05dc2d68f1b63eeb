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

from jobs_cil import job_status
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
        assert "device: CPU (tensorflow), 2 threads" in log and "Epoch 2/2 - " in log
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


def test_a_requeued_job_waiting_in_the_queue_is_not_submitted_again(tmp_path, road_dir):
    grid_file = tmp_path / "requeue.json"
    grid_file.write_text(json.dumps({"data-dir": str(road_dir), "filters": [2], "epochs": 1,
                                     **JOB}))
    run_grid(grid_file, tmp_path / "jobs")
    folder = tmp_path / "jobs/requeue/filters-2"
    wait_for(lambda: job_status(folder) == "finished", "the job")
    job = json.loads((folder / "submitted.json").read_text())["job_id"]
    subprocess.run(["scontrol", "requeuehold", job], check=True)     # back in the queue, held
    try:
        wait_for(lambda: job_status(folder) == "pending", "the requeued job to wait")
        assert (folder / "exit_code").read_text() == "0\n"             # the earlier attempt's
        output = run_grid(grid_file, tmp_path / "jobs")
        assert "filters-2: pending, skipped" in output and "nothing to run" in output
        assert len(list((tmp_path / "jobs/requeue/arrays").iterdir())) == 1
    finally:
        subprocess.run(["scancel", job])


def outputs(folder):
    """The output folders of a run a job starts in the repository: under `folder` instead."""
    return ["--valid-output-dir", folder / "valid", "--submit-output-dir", folder / "submit"]


def script(name, *args, env=None):
    environment = {key: value for key, value in os.environ.items() if key != TF_QUIET}
    return subprocess.run(["bash", f"cluster/{name}", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True,
                          env={**environment, "PYTHON": sys.executable, **(env or {})})


def test_a_single_run_resumes_through_the_documented_cluster_command(tmp_path, road_dir):
    logs = tmp_path / "logs"
    words = ["--data-dir", road_dir, "--filters", "4", "--epochs", "8", "--patience", "0",
             *[f"--{key}={value}" for key, value in JOB.items()], "--count", "24",
             "--run-name", "one", "--logs-dir", logs, *outputs(tmp_path)]
    submitted = script("sbatch_train.sh", *words)
    assert submitted.returncode == 0, submitted.stderr
    folder = logs / "one"
    job = json.loads((folder / "submitted.json").read_text())["job_id"]
    wait_for(lambda: (folder / "checkpoint/state.json").is_file(), "the first checkpoint")
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: not in_queue(job), "the cancelled job to leave the queue")
    assert job_status(folder) == "failed (exit 143)", (folder / "stderr").read_text()
    resumed = script("sbatch_train.sh", "--resume", folder)
    assert resumed.returncode == 0, resumed.stderr
    assert "(resumes its checkpoint)" in resumed.stdout
    assert not (folder / "exit_code").exists()                 # the old one is gone at once
    wait_for(lambda: job_status(folder) not in ("pending", "running"), "the resumed job")
    assert job_status(folder) == "finished", (folder / "stderr").read_text()
    history = (folder / "history.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in history] == list(range(8))
    log = (folder / "stdout").read_text()
    assert "resuming from the checkpoint after epoch" in log and "Epoch 8/8 - " in log
    assert len(list((folder / "scheduler").glob("slurm-*.out"))) == 2
    assert not list(REPO.glob("slurm-*.out"))


def test_a_refused_or_dry_submission_leaves_nothing_and_a_refused_grid_job_is_not_lost(
        tmp_path, road_dir):
    logs = tmp_path / "logs"
    words = ["--data-dir", road_dir, "--epochs", "1", "--run-name", "gpu", "--logs-dir", logs,
             *outputs(tmp_path)]
    refused = script("sbatch_train.sh", *words, env={"GPUS": "1"})   # no GPU in this cluster
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sbatch refused gpu")
    assert not (logs / "gpu").exists()
    dry = subprocess.run([sys.executable, "grid_cil.py", "submit", "slurm", "--dry-run", "--",
                          *map(str, words)], cwd=REPO, capture_output=True, text=True)
    assert dry.returncode == 0 and dry.stdout.startswith("sbatch --parsable")
    assert not (logs / "gpu").exists()
    grid_file = tmp_path / "gpu.json"
    grid_file.write_text(json.dumps({"data-dir": str(road_dir), "filters": [2], "gpus": 1}))
    result = subprocess.run([sys.executable, "grid_cil.py", str(grid_file), "--scheduler",
                             "slurm", "--jobs-dir", str(tmp_path / "jobs")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "sbatch refused" in result.stderr
    assert job_status(tmp_path / "jobs/gpu/filters-2") == "not submitted"


def test_a_bare_sbatch_of_the_script_runs_the_run_as_a_job(tmp_path, road_dir):
    logs = tmp_path / "logs"
    environment = {key: value for key, value in os.environ.items() if key != TF_QUIET}
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", "cluster/sbatch_train.sh",
         "--data-dir", str(road_dir), "--filters", "2", "--epochs", "1",
         *[f"--{key}={value}" for key, value in JOB.items()], "--run-name", "bare",
         "--logs-dir", str(logs), *map(str, outputs(tmp_path))], cwd=REPO, capture_output=True,
        text=True,
        env={**environment, "PYTHON": sys.executable})
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    wait_for(lambda: not in_queue(job), "the job")
    folder = logs / "bare"
    assert job_status(folder) == "finished", (tmp_path / f"slurm-{job}.out").read_text()
    assert "Epoch 1/1 - " in (folder / "stdout").read_text()
    assert f"{folder}: the run's output goes to" in (tmp_path / f"slurm-{job}.out").read_text()
