"""Grid searches: expansion, submission through fake schedulers, a local grid and its table."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import grid_cil
from grid_cil import GridError, expand, load_grid

REPO = Path(__file__).resolve().parents[1]
FAKE_SCHEDULER = """#!/usr/bin/env bash
# Records how it was called, as a real {name} would be.
printf '%s\\n' "$@" > "{record}"
env | grep -E '^(CORES|MEM_PER_CORE|WALLTIME|GPUS|GPU_CLAUSE|ARRAY_JOBS|LOGS_DIR|RUN_NAME)=' \\
    | sort > "{record}.env"
echo "{answer}"
"""


@pytest.fixture
def at_repo(monkeypatch):
    """Grids run from the repository root, where the cluster scripts are."""
    monkeypatch.chdir(REPO)


def grid_file(tmp_path, content, name="g"):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(content))
    return path


def fake(tmp_path, monkeypatch, name, answer):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    record = tmp_path / f"{name}.args"
    (bin_dir / name).write_text(FAKE_SCHEDULER.format(name=name, record=record, answer=answer))
    (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    return record


def grid(*args):
    return CliRunner().invoke(grid_cil.main, [str(a) for a in args])


def test_a_grid_expands_to_every_combination_with_stable_ids(tmp_path):
    path = grid_file(tmp_path, {"loss": ["bce", "bce_dice+patch_f1"], "filters": [8, 16, 32],
                                "batchnorm": [True, False], "epochs": 5,
                                "aug": [["rotation_range=90"]]})
    varied, fixed, _ = load_grid(path)
    jobs = expand(varied, fixed)
    assert len(jobs) == 2 * 3 * 2
    assert [name for name, _, _ in jobs] == [name for name, _, _ in expand(*load_grid(path)[:2])]
    name, combination, args = jobs[-1]
    assert name == "loss-bce_dice_patch_f1__filters-32__batchnorm-False__aug-__rotation_range_90__"
    assert args == ["--epochs", "5", "--loss", "bce_dice+patch_f1", "--filters", "32",
                    "--no-batchnorm", "--aug", "rotation_range=90"]
    assert len({name for name, _, _ in jobs}) == len(jobs)


def test_a_grid_may_only_set_options_of_main_cil(tmp_path):
    with pytest.raises(GridError, match="'filtres' is not an option a grid may set"):
        load_grid(grid_file(tmp_path, {"filtres": [8]}))
    with pytest.raises(GridError, match="'run-name' is not an option a grid may set"):
        load_grid(grid_file(tmp_path, {"run-name": ["x"]}))


@pytest.mark.parametrize("clause, expected", [
    ("rusage", ["-R", "rusage[mem=2048, ngpus_excl_p=2]"]),
    ("gpu", ["-R", "rusage[mem=2048]", "-gpu", "num=2"]),
])
def test_lsf_jobs_are_submitted_with_the_resources_asked(tmp_path, monkeypatch, at_repo, clause,
                                                          expected):
    record = fake(tmp_path, monkeypatch, "bsub", "Job <4711> is submitted to queue <gpu>.")
    path = grid_file(tmp_path, {"lr": [0.001], "gpus": [2],
                                "resources": {"cores": 8, "mem_per_core": 2048,
                                              "walltime": "24:00", "gpu_clause": clause}})
    result = grid(path, "--scheduler", "lsf", "--jobs-dir", tmp_path / "jobs")
    assert result.exit_code == 0, result.output
    job_dir = tmp_path / "jobs/g/lr-0.001__gpus-2"
    arguments = ["--lr", "0.001", "--gpus", "2", "--valid-output-dir", f"{job_dir}/valid_output",
                 "--submit-output-dir", f"{job_dir}/submit_output"]
    assert record.read_text().splitlines() == [
        "-J", "g/lr-0.001__gpus-2", "-n", "8", "-W", "24:00", *expected,
        "-o", f"{job_dir}/run/stdout", "-e", f"{job_dir}/run/stderr",
        "bash", "cluster/bsub_train.sh", *arguments]
    assert "Job <4711>" in (job_dir / "submitted").read_text()
    assert (job_dir / "args").read_text().splitlines() == arguments
    assert "GPU_CLAUSE=" + clause in (job_dir / "submit.sh").read_text()
    assert "job <4711>" in result.output.lower()
    again = grid(path, "--scheduler", "lsf", "--jobs-dir", tmp_path / "jobs")
    assert "lr-0.001__gpus-2: submitted, skipped" in again.output


def test_slurm_jobs_go_in_one_array(tmp_path, monkeypatch, at_repo):
    record = fake(tmp_path, monkeypatch, "sbatch", "Submitted batch job 77")
    path = grid_file(tmp_path, {"loss": ["bce", "dice"], "resources": {"walltime": "2:00:00"}})
    result = grid(path, "--scheduler", "slurm", "--jobs-dir", tmp_path / "jobs")
    assert result.exit_code == 0, result.output
    words = record.read_text().splitlines()
    assert "--array=0-1" in words and "--gres=gpu:1" in words and "--time=2:00:00" in words
    assert words[-1] == "cluster/sbatch_train.sh"
    listing = (tmp_path / "jobs/g/array-gpus1.txt").read_text().splitlines()
    assert listing == [f"{tmp_path}/jobs/g/loss-bce", f"{tmp_path}/jobs/g/loss-dice"]
    assert f"ARRAY_JOBS={tmp_path}/jobs/g/array-gpus1.txt" in Path(f"{record}.env").read_text()
    assert "array of 2 jobs with 1 GPU(s): Submitted batch job 77" in result.output


def test_a_missing_scheduler_is_one_line_and_exit_2(tmp_path, monkeypatch, at_repo):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    result = grid(grid_file(tmp_path, {"lr": [0.1]}), "--scheduler", "lsf", "--jobs-dir",
                  tmp_path / "jobs")
    assert result.exit_code == 2
    assert result.output.strip() == ("error: bsub not found: --scheduler lsf needs an LSF login "
                                     "node; use --scheduler local here")


def test_dry_run_writes_the_jobs_and_submits_nothing(tmp_path, monkeypatch, at_repo):
    record = fake(tmp_path, monkeypatch, "bsub", "Job <1> is submitted.")
    result = grid(grid_file(tmp_path, {"lr": [0.1, 0.01]}), "--scheduler", "lsf", "--dry-run",
                  "--jobs-dir", tmp_path / "jobs")
    assert result.exit_code == 0
    assert result.output.count("cluster/bsub_train.sh") == 2 and not record.exists()
    assert (tmp_path / "jobs/g/lr-0.01/submit.sh").is_file()


def test_a_local_grid_runs_and_the_summary_ranks_it(tmp_path, road_dir, at_repo):
    path = grid_file(tmp_path, {"data-dir": str(road_dir), "filters": [2, 4], "crop": [32, 30],
                                "depth": 2, "epochs": 2, "count": 1, "batch-size": 4,
                                "valid-fraction": 0.25})
    result = grid(path, "--scheduler", "local", "--jobs-dir", tmp_path / "jobs")
    assert result.exit_code == 0, result.output
    assert "filters-2__crop-32: finished" in result.output
    assert "filters-4__crop-30: failed (exit 2)" in result.output
    stderr = (tmp_path / "jobs/g/filters-4__crop-30/run/stderr").read_text()
    assert "--crop must be a multiple of 4" in stderr
    assert (tmp_path / "jobs/g/filters-2__crop-32/run/best.keras").is_file()
    assert list((tmp_path / "jobs/g/filters-2__crop-32/valid_output/run").glob("*_overlay.png"))
    assert not (REPO / "data/valid/output/run").exists()   # jobs keep their outputs to themselves
    result = grid("summary", tmp_path / "jobs/g")
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "jobs/g/post_output.tsv").read_text().splitlines()
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:]]
    assert header[:5] == ["job", "status", "filters", "crop", "patch_f1"]
    assert [row[1] for row in rows] == ["finished", "finished", "failed (exit 2)",
                                        "failed (exit 2)"]
    scores = [float(row[4]) for row in rows[:2]]
    assert scores == sorted(scores, reverse=True)
    assert (tmp_path / "jobs/g/post_output.md").read_text().startswith("| job | status |")
    again = grid(path, "--scheduler", "local", "--jobs-dir", tmp_path / "jobs")
    assert "filters-2__crop-32: finished, skipped" in again.output
    assert "filters-4__crop-30: failed (exit 2)" in again.output
