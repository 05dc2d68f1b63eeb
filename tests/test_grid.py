"""Grid searches: typed values, job ids, submission through recording fake schedulers (LSF has
no free implementation; tests/test_slurm.py runs a real SLURM), job state, and the table."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import grid_cil
import jobs_cil
from grid_cil import expand, job_id, load_grid
from io_cil import InputError
from jobs_cil import job_argv, job_status
from runs_cil import OWNER_FILE, host_name, own_folder
from tests.conftest import REPO, TF_QUIET, one_line_error, resolved

FAKE_SCHEDULER = """#!{python}
# Records its arguments and environment as JSON, answers like the real {name}.
import json, os, sys
with open({record!r}, "a") as file:
    file.write(json.dumps(dict(argv=sys.argv[1:], env=dict(os.environ))) + "\\n")
print({answer!r})
"""


def grid_file(folder, content, name="g"):
    path = folder / f"{name}.json"
    path.write_text(json.dumps(content))
    return path


def fake(tmp_path, monkeypatch, name, answer):
    """A recording `name` first on the PATH; returns a function giving its calls."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / f"{name}.calls"
    script = bin_dir / name
    script.write_text(FAKE_SCHEDULER.format(python=sys.executable, name=name,
                                            record=str(record), answer=answer))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return lambda: [json.loads(line) for line in record.read_text().splitlines()] \
        if record.exists() else []


def grid(*args):
    return CliRunner().invoke(grid_cil.main, [str(a) for a in args], env={TF_QUIET: None})


# ---------------------------------------------------------------------------------------------
# Grid files: typed values, ids


def test_a_grid_expands_to_every_combination_with_stable_ids(tmp_path):
    path = grid_file(tmp_path, {"loss": ["bce", "bce_dice+patch_f1"], "filters": [8, 16, 32],
                                "batchnorm": [True, False], "epochs": 5,
                                "aug": "rotation_range=90"})
    name, varied, fixed, _ = load_grid(path)
    jobs = expand(name, varied, fixed)
    assert len(jobs) == 2 * 3 * 2
    assert [job for job, _, _ in jobs] == [job for job, _, _ in expand(*load_grid(path)[:3])]
    identity, combination, words = jobs[-1]
    assert identity.startswith("loss-bce_dice_patch_f1__filters-32__batchnorm-False-")
    assert words == ["--epochs=5", "--aug=rotation_range=90.0", "--loss=bce_dice+patch_f1",
                     "--filters=32", "--no-batchnorm"]
    assert jobs[0][0] == "loss-bce__filters-8__batchnorm-True"
    assert len({job for job, _, _ in jobs}) == len(jobs)


@pytest.mark.parametrize("aug, expected", [
    (["rotation_range=90"], [["--aug=rotation_range=90.0"]]),           # one job, one override
    (["rotation_range=90", "zoom_range=0.2"], [["--aug=rotation_range=90.0"],
                                               ["--aug=zoom_range=0.2"]]),
    ([["rotation_range=90", "vertical_flip=false"]],
     [["--aug=rotation_range=90.0", "--aug=vertical_flip=False"]]),
    ([{"brightness_range": [0.8, 1.2]}], [["--aug=brightness_range=0.8,1.2"]]),
])
def test_perturbation_overrides_are_whole_values_never_characters(tmp_path, aug, expected):
    name, varied, fixed, _ = load_grid(grid_file(tmp_path, {"aug": aug}))
    assert [words for _, _, words in expand(name, varied, fixed)] == expected


def test_flags_take_true_false_or_1_0(tmp_path):
    name, varied, fixed, _ = load_grid(grid_file(tmp_path, {"no-aug": 1, "submit": [1, 0],
                                                            "batchnorm": 0}))
    assert [words for _, _, words in expand(name, varied, fixed)] == [
        ["--no-aug", "--no-batchnorm", "--submit"], ["--no-aug", "--no-batchnorm"]]


def test_a_job_that_cannot_run_is_an_error_before_anything_is_submitted(tmp_path):
    path = grid_file(tmp_path, {"filters": [2, 4], "crop": [32, 30], "depth": 2})
    with pytest.raises(InputError, match="job filters-2__crop-30: --crop must be a multiple of 4"):
        expand(*load_grid(path)[:3])


def test_colliding_and_long_values_get_distinct_bounded_ids(tmp_path):
    with pytest.raises(InputError, match="two jobs would be lr-0.001"):
        expand(*load_grid(grid_file(tmp_path, {"lr": [0.001, "0.001"]}))[:3])
    assert job_id({"loss": "bce+dice"}) != job_id({"loss": "bce_dice"})
    long = job_id({"data_dir": Path("x" * 300)})
    assert len(long) <= grid_cil.JOB_ID_LENGTH and long != job_id({"data_dir": Path("x" * 299)})


@pytest.mark.parametrize("name", ["..", "a;b", "-x"])
def test_a_grid_file_name_is_one_safe_folder_name(tmp_path, name):
    path = tmp_path / f"{name}.json"
    path.write_text('{"lr": [0.1]}')
    with pytest.raises(InputError, match="a grid's name"):
        load_grid(path)


# ---------------------------------------------------------------------------------------------
# LSF: the exact bsub command lines


def lsf_grid(tmp_path, monkeypatch, content, jobs_dir=None):
    calls = fake(tmp_path, monkeypatch, "bsub", "Job <4711> is submitted to queue <normal.4h>.")
    jobs_dir = jobs_dir or tmp_path / "jobs"
    result = grid(grid_file(tmp_path, content), "--scheduler", "lsf", "--jobs-dir", jobs_dir)
    return result, calls(), jobs_dir


@pytest.mark.parametrize("resources, gpus, expected", [
    ({}, 0, ["-n", "2", "-W", "4:00", "-wa", "USR2", "-wt", "5", "-R", "span[hosts=1]", "-R",
             "rusage[mem=4096]"]),
    ({"cores": 8, "mem_per_core": 2048, "walltime": "24:00", "stop_warning": 15}, 2,
     ["-n", "8", "-W", "24:00", "-wa", "USR2", "-wt", "15", "-R", "span[hosts=1]", "-R",
      "rusage[mem=2048, ngpus_excl_p=2]"]),
    ({"gpu_clause": "gpu", "walltime": 90, "partition": "gpu.24h", "account": "es_cil"}, 1,
     ["-n", "2", "-W", "1:30", "-wa", "USR2", "-wt", "5", "-R", "span[hosts=1]", "-R",
      "rusage[mem=4096]", "-gpu", "num=1", "-q", "gpu.24h", "-P", "es_cil"]),
])
def test_lsf_jobs_follow_the_documented_syntax(tmp_path, monkeypatch, resources, gpus, expected):
    """bsub -W [hour:]minute, -wa USR2 -wt minutes (the checkpoint warning), -R "rusage[mem=MB,
    ngpus_excl_p=N]" or -gpu "num=N"."""
    result, calls, jobs_dir = lsf_grid(tmp_path, monkeypatch, {
        "lr": [0.001], "gpus": gpus, "resources": resources})
    assert result.exit_code == 0, result.output
    folder = jobs_dir / "g/lr-0.001"
    argv = calls[0]["argv"]
    assert argv[:2] == ["-J", "g/lr-0.001"] and argv[2:-3] == expected
    assert argv[-3:-1] == ["-o", f"{folder.resolve()}/scheduler/lsf-%J.out"]
    assert shlex.split(argv[-1]) == ["exec", *job_argv(folder)]   # one word, quoted once
    assert shlex.split(argv[-1])[1] == sys.executable          # the submitting interpreter
    job = json.loads((folder / "job.json").read_text())
    assert job["args"][:2] == [f"--gpus={gpus}", "--lr=0.001"]
    assert json.loads((folder / "submitted.json").read_text())["job_id"] == "4711"
    assert "lr-0.001 (start): Job <4711>" in result.output


def test_no_value_or_file_name_reaches_lsfs_shell(tmp_path, monkeypatch):
    """LSF runs the command through a shell: the command holds only the job folder, quoted,
    and the shell gives back exactly its words; values travel in job.json."""
    hostile = tmp_path / "odd; touch INJECTED #$(touch INJECTED2) 'x"
    hostile.mkdir()
    value = "data; touch INJECTED3 #\nthird line"
    result, calls, jobs_dir = lsf_grid(tmp_path, monkeypatch, {"data-dir": [value]},
                                       jobs_dir=hostile / "jobs")
    assert result.exit_code == 0, result.output
    word = calls[0]["argv"][-1]
    parsed = subprocess.run(["sh", "-c", f"set -- {word}; printf '%s\\0' \"$@\""], cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout.split("\0")[:-1]
    folder = next(path for path in (hostile / "jobs/g").iterdir()
                  if path.name != "scheduler" and not path.name.startswith("."))
    assert parsed == ["exec", *job_argv(folder)]
    assert not list(tmp_path.glob("INJECTED*")) and not list(Path.cwd().glob("INJECTED*"))
    assert json.loads((folder / "job.json").read_text())["args"][0] == f"--data-dir={value}"


def test_a_missing_scheduler_is_one_line_and_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    result = grid(grid_file(tmp_path, {"lr": [0.1]}), "--scheduler", "lsf", "--jobs-dir",
                  tmp_path / "jobs")
    assert result.exit_code == 2
    one_line_error(result.output, "bsub", "--scheduler local")
    assert not (tmp_path / "jobs").exists()


def test_dry_run_prints_the_commands_and_writes_nothing(tmp_path, monkeypatch):
    calls = fake(tmp_path, monkeypatch, "sbatch", "77")
    result = grid(grid_file(tmp_path, {"lr": [0.1, 0.01]}), "--scheduler", "slurm", "--dry-run",
                  "--jobs-dir", tmp_path / "jobs")
    assert result.exit_code == 0, result.output
    assert result.output.count("sbatch --parsable") == 1 and "--array=0-1" in result.output
    assert not calls() and not (tmp_path / "jobs/g/lr-0.1").exists()


# ---------------------------------------------------------------------------------------------
# SLURM through a recording sbatch (the real one: tests/test_slurm.py)


def test_cpu_jobs_ask_no_gpu_and_gpu_counts_get_their_own_arrays(tmp_path, monkeypatch):
    calls = fake(tmp_path, monkeypatch, "sbatch", "77")
    path = grid_file(tmp_path, {"loss": ["bce", "dice"], "gpus": [0, 2],
                                "resources": {"walltime": "2:00", "qos": "normal"}})
    result = grid(path, "--scheduler", "slurm", "--jobs-dir", tmp_path / "jobs")
    assert result.exit_code == 0, result.output
    cpu, gpu = (call["argv"] for call in calls())
    assert not any("gres" in word or "gpus" in word for word in cpu)
    assert "--gres=gpu:2" in gpu and "--time=2:00:00" in cpu and "--qos=normal" in cpu
    assert "--array=0-1" in cpu and "--cpus-per-task=2" in cpu
    wrap = next(word for word in cpu if word.startswith("--wrap="))
    listing = Path(shlex.split(wrap.removeprefix("--wrap="))[-1])
    assert shlex.split(wrap.removeprefix("--wrap="))[:2] == ["exec", sys.executable]
    assert json.loads(listing.read_text()) == [str((tmp_path / f"jobs/g/{job}").resolve())
                                               for job in ("loss-bce__gpus-0", "loss-dice__gpus-0")]
    submitted = json.loads((tmp_path / "jobs/g/loss-dice__gpus-2/submitted.json").read_text())
    assert submitted["job_id"] == "77_1"
    assert "array 77 of 2 job(s) with 2 GPU(s)" in result.output


@pytest.mark.parametrize("clause, gpus, expected", [
    ("gres", 2, ["--gres=gpu:2"]), ("gpus", 2, ["--gpus=2"]), ("gpus", 0, [])])
def test_one_gpu_request_per_job_and_none_for_cpu_jobs(clause, gpus, expected):
    resources = jobs_cil.check_resources({"gpu_clause": clause, "walltime": 90}, "grid")
    words = jobs_cil.slurm_resources(resources, gpus)
    assert [word for word in words if "gpu" in word] == expected
    assert "--time=1:30:00" in words


def test_a_rerun_never_changes_what_a_queued_task_runs(tmp_path, monkeypatch):
    calls = fake(tmp_path, monkeypatch, "sbatch", "77")
    fake(tmp_path, monkeypatch, "squeue", "PENDING")
    path = grid_file(tmp_path, {"lr": [0.1, 0.01]})
    assert grid(path, "--scheduler", "slurm", "--jobs-dir", tmp_path / "jobs").exit_code == 0
    listings = sorted((tmp_path / "jobs/g/arrays").iterdir())
    before = [listing.read_text() for listing in listings]
    job = (tmp_path / "jobs/g/lr-0.1/job.json").read_text()
    path.write_text(json.dumps({"lr": [0.1, 0.01, 0.5]}))
    result = grid(path, "--scheduler", "slurm", "--jobs-dir", tmp_path / "jobs")
    assert "lr-0.1: pending, skipped" in result.output
    assert "lr-0.01: pending, skipped" in result.output
    assert [listing.read_text() for listing in listings] == before
    assert (tmp_path / "jobs/g/lr-0.1/job.json").read_text() == job
    new_listing = sorted((tmp_path / "jobs/g/arrays").iterdir())[-1]
    assert json.loads(new_listing.read_text()) == [str((tmp_path / "jobs/g/lr-0.5").resolve())]
    assert len(calls()) == 2


@pytest.mark.parametrize("scheduler, command, answer, status", [
    ("slurm", "squeue", "PENDING", "pending"), ("slurm", "squeue", "RUNNING", "running"),
    ("slurm", "squeue", "", "lost"), ("lsf", "bjobs", "PEND", "pending"),
    ("lsf", "bjobs", "RUN", "running"), ("lsf", "bjobs", "EXIT", "lost")])
def test_job_state_comes_from_the_queue_first_then_from_the_exit_code(
        tmp_path, monkeypatch, scheduler, command, answer, status):
    fake(tmp_path, monkeypatch, command, answer)
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "submitted.json").write_text(json.dumps({"scheduler": scheduler, "job_id": "5"}))
    assert job_status(folder) == status
    (folder / "exit_code").write_text("143\n")       # an earlier attempt's, when requeued
    assert job_status(folder) == (status if status in ("pending", "running")
                                  else "failed (exit 143)")


# ---------------------------------------------------------------------------------------------
# One run through the scripts


def script(name, *args, env=None, cwd=REPO):
    return subprocess.run(["bash", f"cluster/{name}", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_bsub_script_reserves_gpus_and_trains_on_them(tmp_path, monkeypatch, workdir):
    calls = fake(tmp_path, monkeypatch, "bsub", "Job <12> is submitted to queue <gpu>.")
    result = script("bsub_train.sh", "--epochs", "3", "--run-name", "one", "--logs-dir",
                    tmp_path / "logs", env={"GPUS": "2", "WALLTIME": "24:00",
                                            "PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    argv = calls()[0]["argv"]
    assert argv[:6] == ["-J", "one", "-n", "2", "-W", "24:00"]
    assert "rusage[mem=4096, ngpus_excl_p=2]" in argv
    job = json.loads((tmp_path / "logs/one/job.json").read_text())
    assert job["args"] == ["--epochs=3", "--gpus=2"]
    assert shlex.split(argv[-1]) == ["exec", *job_argv(tmp_path / "logs/one")]


def test_sbatch_script_submits_from_inside_an_allocation(tmp_path, monkeypatch):
    calls = fake(tmp_path, monkeypatch, "sbatch", "91")
    result = script("sbatch_train.sh", "--epochs", "3", "--run-name", "inside", "--logs-dir",
                    tmp_path / "logs", env={"SLURM_JOB_ID": "90", "SLURM_CPUS_PER_TASK": "2",
                                            "PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    argv = calls()[0]["argv"]
    assert "--time=4:00:00" in argv and not any("gres" in word for word in argv)
    assert f"{tmp_path}/logs/inside: job 91" in result.stdout


def test_gpus_that_disagree_with_the_reservation_are_refused(tmp_path, monkeypatch):
    fake(tmp_path, monkeypatch, "bsub", "Job <1> is submitted.")
    result = script("bsub_train.sh", "--gpus", "1", "--logs-dir", tmp_path / "logs",
                    env={"GPUS": "2", "PATH": os.environ["PATH"]})
    assert result.returncode == 2
    assert "GPUS=2 reserves 2 GPU(s) but --gpus 1" in result.stderr


# ---------------------------------------------------------------------------------------------
# Summary


def finished_job(folder, patch_f1, gpus):
    folder.mkdir(parents=True)
    (folder / "exit_code").write_text("0\n")
    (folder / "metrics.json").write_text(json.dumps(dict(
        valid=dict(patch_f1=patch_f1, f1=patch_f1 - 0.01), best_epoch=3, epochs_run=4,
        seconds_per_epoch=1.5)))
    (folder / "config.json").write_text(json.dumps(dict(settings=dict(gpus=gpus))))


def test_the_summary_ranks_finished_jobs_with_a_list_of_gpu_counts(tmp_path):
    grid_dir = tmp_path / "jobs/g"
    grid_dir.mkdir(parents=True)
    (grid_dir / "grid.json").write_text(json.dumps({"loss": ["bce", "dice"], "gpus": [1]}))
    finished_job(grid_dir / "loss-bce__gpus-1", 0.81, 1)
    finished_job(grid_dir / "loss-dice__gpus-1", 0.86, 1)
    result = grid("summary", grid_dir)
    assert result.exit_code == 0, result.output
    lines = (grid_dir / "post_output.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["job", "status", "loss", "gpus", "patch_f1", "f1",
                                    "best_epoch", "epochs", "s_per_epoch"]
    assert [line.split("\t")[:5] for line in lines[1:]] == [
        ["loss-dice__gpus-1", "finished", "dice", "1", "0.86"],
        ["loss-bce__gpus-1", "finished", "bce", "1", "0.81"]]


def cross_validated_job(folder, means):
    folder.mkdir(parents=True)
    spread = dict(mean=float(np.mean(means)), sd=float(np.std(means, ddof=1)), min=min(means),
                  max=max(means))
    (folder / "metrics.json").write_text(json.dumps(dict(cross_validation=dict(
        spread={"patch_f1": spread}, oof=dict(patch_f1=spread["mean"] + 0.001, f1=0.8),
        median_best_epoch=7))))


def test_the_summary_ranks_cross_validated_jobs_by_their_fold_mean_with_its_spread(tmp_path):
    grid_dir = tmp_path / "jobs/cv"
    grid_dir.mkdir(parents=True)
    (grid_dir / "grid.json").write_text(json.dumps({"filters": [8, 16], "folds": 3,
                                                    "fold": [0, 1, 2]}))
    cross_validated_job(grid_dir / "filters-16", [0.88, 0.90, 0.86])
    (grid_dir / "filters-8/fold-0").mkdir(parents=True)
    (grid_dir / "filters-8/fold-0/exit_code").write_text("0\n")
    columns, rows = grid_cil.summary_rows(grid_dir)
    assert columns[:6] == ["job", "status", "filters", "patch_f1", "sd", "all_images"]
    assert rows[0]["job"] == "filters-16" and rows[0]["patch_f1"] == pytest.approx(0.88)
    assert rows[0]["sd"] == pytest.approx(0.02) and rows[0]["best_epoch"] == 7
    assert rows[1]["status"] == "1/3 folds finished"


@pytest.mark.slow
def test_a_local_grid_runs_skips_what_finished_and_summarises(tmp_path, road_dir):
    path = grid_file(tmp_path, {"data-dir": str(road_dir), "filters": [2, 4], "depth": 2,
                                "crop": 32, "epochs": 2, "count": 1, "batch-size": 4,
                                "valid-fraction": 0.25})
    result = grid(path, "--scheduler", "local", "--jobs-dir", tmp_path / "jobs")
    assert result.exit_code == 0, result.output
    assert "filters-2 (start): finished" in result.output
    job = tmp_path / "jobs/g/filters-4"
    assert (job / "best.keras").is_file() and (job / "exit_code").read_text() == "0\n"
    assert list((tmp_path / "jobs/g/valid_output/filters-4").glob("*_overlay.png"))
    log, errors = (job / "stdout").read_text(), (job / "stderr").read_text()
    assert "Epoch 2/2 - " in log and not any(character in log for character in "\r\b\x1b")
    assert "I0000" not in errors and "absl" not in errors      # no TensorFlow C++ lines
    assert not (REPO / "data/valid/output/filters-4").exists()
    result = grid("summary", tmp_path / "jobs/g")
    rows = [line.split("\t") for line in
            (tmp_path / "jobs/g/post_output.tsv").read_text().splitlines()[1:]]
    assert [row[1] for row in rows] == ["finished", "finished"]
    assert float(rows[0][3]) >= float(rows[1][3])
    again = grid(path, "--scheduler", "local", "--jobs-dir", tmp_path / "jobs")
    assert "filters-2: finished, skipped" in again.output
    assert f"{tmp_path / 'jobs/g'}: nothing to run" in again.output


# ---------------------------------------------------------------------------------------------
# Job arguments stay whole; a running local job is left alone


def test_a_newline_in_a_grid_value_stays_one_argument_and_the_run_stays_in_its_folder(tmp_path):
    value = "bce\n--logs-dir\n/tmp/y"
    folder = tmp_path / "jobs/g/job"
    words = jobs_cil.job_run_words(folder, dict(args=[f"--data-dir={value}"],
                                                logs_dir=str(folder.parent), run_name="job"))
    settings = resolved(*words)
    assert str(settings.data_dir) == value
    assert (settings.logs_dir, settings.run_name) == (folder.parent, "job")
    with pytest.raises(InputError) as error:
        jobs_cil.checked_settings([f"--loss={value}"], "grid")
    assert repr(value) + " is not a loss" in str(error.value)


def test_a_local_job_that_runs_is_skipped_by_a_second_grid_call(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({"lr": [0.1]}))
    folder = tmp_path / "jobs/g/lr-0.1"
    own_folder(folder.parent, "grid folder")
    own_folder(folder, "job folder")
    runner = subprocess.Popen(["sleep", "60"])
    try:
        (folder / "submitted.json").write_text(json.dumps(dict(
            scheduler="local", job_id="local", pid=runner.pid, host=host_name())))
        result = CliRunner().invoke(grid_cil.main, [str(tmp_path / "g.json"), "--jobs-dir",
                                                    str(tmp_path / "jobs")])
        assert "lr-0.1: running, skipped" in result.output
        assert sorted(p.name for p in folder.iterdir()) == [OWNER_FILE, "submitted.json"]
    finally:
        runner.kill()
        runner.wait()
    assert jobs_cil.job_status(folder) == "lost"
