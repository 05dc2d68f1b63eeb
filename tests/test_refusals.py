"""The refusal tables, class by class: bad input of every kind a user can type or point at,
numbers that are not finite, writes that fail (read-only targets, a full disk), damaged run
files, grid and config files that cannot run, the CSV converter in reverse, options that cannot
apply, and checks whose suggested fixes are themselves accepted. Each case ends in one line and
a non-zero exit naming the file or option, and changes nothing outside a run's own folders."""

import errno
import json
import os
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import bench_cil
import grid_cil
import jobs_cil
import mask_to_submission as m2s
import model_cil
import train_cil
from cli_cil import FiniteFloat, out_of_memory_line
from data_cil import train_sample_size
from grid_cil import load_grid
from io_cil import InputError
from main_cil import main
from model_cil import build_unet
from options_cil import NO_PERTURBATION, OPTIONS
from runs_cil import open_run, own_folder
from tests.conftest import (BACKEND, TF_QUIET, TINY, checkpoint_state, cli, make_pair,
                            one_line_error, refused_leaving, rgb, save, saved_run, tree)
from tests.test_grid import grid_file


def grid(*args, env=None):
    return CliRunner().invoke(grid_cil.main, [str(a) for a in args],
                              env={TF_QUIET: None, **(env or {})})


# ---------------------------------------------------------------------------------------------
# File systems that refuse: a real tmpfs, full or read-only (root mounts it; else skipped)


@pytest.fixture
def mount(tmp_path):
    """mount(name, kib, read_only, fill): a tmpfs folder under tmp_path; with `fill`, a file
    takes all of its space. Unmounted afterwards."""
    mounted = []

    def make(name, kib=256, read_only=False, fill=False, content=None):
        folder = tmp_path / name
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs",
                               str(folder)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"no tmpfs can be mounted here ({done.stderr.strip()}); run as root")
        mounted.append(folder)
        if content:
            content(folder)
        if fill:
            subprocess.run(["dd", "if=/dev/zero", f"of={folder / 'filler'}", "bs=4k"],
                           capture_output=True)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)])


def test_a_read_only_logs_folder_is_one_line(workdir, road_dir, mount):
    read_only = mount("ro", read_only=True)
    result = cli("--data-dir", road_dir, *TINY, "--logs-dir", read_only / "logs")
    assert result.exit_code == 2
    one_line_error(result.output, f"{read_only / 'logs'}: cannot create the logs folder "
                                  "(Read-only file system)")


@pytest.mark.slow
def test_a_full_disk_under_the_outputs_is_one_line_and_keeps_the_checkpoint(workdir, road_dir,
                                                                           mount):
    full = mount("full", fill=True, kib=64)
    result = cli("--data-dir", road_dir, *TINY, "--valid-output-dir", full, "--run-name", "r")
    assert result.exit_code == 2
    one_line_error(result.output, "no space left on the device")


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_says_how_to_resume(workdir, road_dir, monkeypatch):
    """The second epoch's checkpoint meets a full disk: the first stays intact and resumes."""
    writes = []

    def full_after_one(model, path, *, training_state):
        if training_state:
            writes.append(path)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        keep(model, path, training_state=training_state)

    keep = train_cil.save_model
    monkeypatch.setattr(train_cil, "save_model", full_after_one)
    result = cli("--data-dir", road_dir, *TINY, "--epochs", "3", "--patience", "0",
                 "--run-name", "r")
    assert result.exit_code == 2
    one_line_error(result.output, "no space left on the device; free some (df -h) and run "
                                  "again; the last checkpoint in logs/r is intact: once that is "
                                  "mended, continue with python main_cil.py --resume logs/r")
    state = json.loads((workdir / "logs/r/checkpoint/state.json").read_text())
    assert state["epoch"] == 1 and (workdir / "logs/r/checkpoint" / state["file"]).is_file()
    monkeypatch.setattr(train_cil, "save_model", keep)
    assert cli("--resume", "logs/r").exit_code == 0


@pytest.mark.parametrize("target", ["/dev/null", "/dev/full"])
def test_the_converter_never_replaces_a_device_even_with_force(tmp_path, target):
    masks = tmp_path / "masks"
    save(masks / "test_1.png", np.full((32, 32), 255, np.uint8))
    result = CliRunner().invoke(m2s.main, [str(masks), "-o", target, "--force"])
    assert result.exit_code == 2
    one_line_error(result.output, f"{target}: exists and is not a regular file")
    assert not os.path.isfile(target)


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_the_converter_says_in_one_line_when_it_cannot_write(tmp_path, mount, kind):
    masks = tmp_path / "masks"
    save(masks / "test_1.png", np.full((32, 32), 255, np.uint8))
    target = mount("out", fill=kind == "full", read_only=kind == "read-only", kib=64)
    result = CliRunner().invoke(m2s.main, [str(masks), "-o", str(target / "s.csv")])
    assert result.exit_code == 2
    one_line_error(result.output, "is not writable" if kind == "read-only" else
                   "no space left on the device")
    (tmp_path / "s.csv").write_text("id,prediction\n001_0_0,1\n")
    result = CliRunner().invoke(m2s.main, ["--to-masks", str(tmp_path / "s.csv"), "-o",
                                           str(target / "masks")])
    assert result.exit_code == 2
    one_line_error(result.output, "read-only file system" if kind == "read-only" else
                   "no space left on the device")


def test_the_grid_says_in_one_line_when_it_cannot_write(tmp_path, mount):
    (tmp_path / "g.json").write_text(json.dumps({"lr": [0.1]}))
    read_only = mount("ro", read_only=True, content=lambda folder: (
        (folder / "g").mkdir(), (folder / "g/.cil-owner").write_text("{}"),
        (folder / "g/grid.json").write_text(json.dumps({"lr": [0.1]}))))
    result = grid(tmp_path / "g.json", "--jobs-dir", read_only, "--dry-run")
    assert result.exit_code == 0                     # a dry run writes nothing: it works
    for args in ([tmp_path / "g.json", "--jobs-dir", read_only / "new"],
                 ["summary", read_only / "g"]):
        result = grid(*args)
        assert result.exit_code == 2
        one_line_error(result.output, "ead-only file system")


@pytest.mark.slow
def test_the_benchmark_shows_its_results_before_a_write_that_fails(workdir, mount):
    full = mount("full", fill=True, kib=64)
    result = CliRunner().invoke(bench_cil.main, ["--quick", "--part", "startup", "-o",
                                                 str(full / "bench.json")])
    assert result.exit_code == 2
    assert "| main_cil.py |" in result.output                  # the table came first
    one_line_error(result.output, "no space left on the device")
    read_only = mount("ro", read_only=True)
    result = CliRunner().invoke(bench_cil.main, ["--quick", "-o", str(read_only / "b.json")])
    assert result.exit_code == 2 and "matmul" not in result.output    # refused before measuring
    one_line_error(result.output, "is not writable")


# ---------------------------------------------------------------------------------------------
# Numbers: NaN and infinity are refused for every float option, from every source


FLOAT_OPTIONS = [option.opts[0] for option in OPTIONS if isinstance(option.type, FiniteFloat)]


@pytest.mark.parametrize("option", FLOAT_OPTIONS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_no_float_option_takes_nan_or_infinity(workdir, road_dir, option, value):
    result = cli("--data-dir", road_dir, *TINY, option, value)
    assert result.exit_code == 2
    assert f"'{value}' is not a finite number" in result.output
    assert not (workdir / "logs").exists()


@pytest.mark.parametrize("source", ["config", "environment", "aug", "class weights", "grid"])
def test_nan_is_refused_from_every_source(workdir, road_dir, source):
    (workdir / "c.json").write_text('{"lr": NaN}')            # JSON as Python writes it
    if source == "grid":
        result = grid(workdir / "c.json", "--dry-run")
    else:
        args = {"config": ["--config", "c.json"], "environment": [],
                "aug": ["--aug", "rotation_range=nan"], "class weights": ["--class-weights",
                                                                           "1,nan"]}[source]
        result = cli("--data-dir", road_dir, *TINY, *args,
                     env={"CIL_LR": "nan"} if source == "environment" else None)
    assert result.exit_code == 2, result.output
    assert "finite number" in result.output or "expected auto or numbers" in result.output \
        or "expected a number" in result.output
    assert not (workdir / "logs").exists() and not (workdir / "jobs").exists()


@pytest.mark.parametrize("option", ["--data-dir", "--weights", "--palette", "--logs-dir"])
def test_a_path_too_long_for_the_file_system_is_one_line(workdir, road_dir, option):
    long_path = "/".join(["d" * 200] * 30)                    # 6000 characters
    args = ["--data-dir", road_dir, *TINY, option, long_path]
    if option == "--palette":
        args += ["--classes", "2"]
    result = cli(*args)
    assert result.exit_code == 2, result.output
    one_line_error(result.output, "d" * 60)       # the path, shortened where the tool says it
    assert len(result.output.splitlines()[-1]) < 400 or option == "--palette"   # click's


# ---------------------------------------------------------------------------------------------
# Damaged run files


DAMAGE = {
    "config.json truncated": ("config.json", '{"settings": {"epo', "config.json: damaged"),
    "config.json hand-edited": ("config.json", '{"settings": [1, 2]}', "config.json: damaged"),
    "config.json records no settings": ("config.json", '{"x": 1}',
                                        "config.json: damaged (it records no settings)"),
    "config.json has a number for a folder": (
        "config.json", '{"settings": {"data_dir": 5}, "sources": {}}',
        "config.json: data-dir: 5 is not a valid"),
    "config.json has a list for the perturbations": (
        "config.json", '{"settings": {"aug": [1, 2]}, "sources": {}}',
        "config.json: --aug 1: expected key=value"),
    "config.json of a newer format": ("config.json", '{"format": 99, "settings": {}}',
                                      "config.json: damaged (format 99, newer"),
    "state.json truncated": ("checkpoint/state.json", '{"file": "m', "state.json: damaged"),
    "checkpoint model cut short": ("checkpoint/model-0001-000000.keras", "PK\x03\x04cut",
                                   "model-0001-000000.keras: damaged (not a whole .keras"),
    "state names a missing model": ("checkpoint/state.json", json.dumps(
        {"file": "model-0009-000000.keras", "epoch": 9, "step": 0, "best": None,
         "best_epoch": None, "wait": 0, "epoch_seconds": []}),
        "it names 'model-0009-000000.keras', which is not a file in"),
    "state names a model outside its folder": ("checkpoint/state.json", json.dumps(
        {"file": "../config.json", "epoch": 1, "step": 0}), "it names '../config.json'"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_run_file_is_named_in_one_line_by_resume(workdir, damage):
    file, content, message = DAMAGE[damage]
    folder = saved_run(workdir / "logs/r")
    (folder / file).write_text(content)
    result = cli("--resume", folder)
    assert result.exit_code == 2
    one_line_error(result.output, message)


@pytest.mark.parametrize("content", ["[]", '{"pid": "me"}', '{"pid": 1'])
def test_a_damaged_lock_is_named_in_one_line(tmp_path, content):
    folder = own_folder(tmp_path / "logs/r", "run folder")
    (folder / "lock").write_text(content)
    with pytest.raises(InputError, match="lock: damaged.*; delete it if no process of the tool "
                                         "holds the run"):
        open_run(tmp_path / "logs", "r", tmp_path / "valid", tmp_path / "submit", resume=True)


@pytest.mark.parametrize("content", ['{"best_epoch": 3', '{"best_epoch": "three"}',
                                     '{"best_epoch": 1000000000000000000000000000000}',
                                     '{"cross_validation": 5}', "[]"])
def test_damaged_metrics_are_named_in_one_line_by_from_run(workdir, content):
    folder = saved_run(workdir / "logs/r")
    (folder / "metrics.json").write_text(content)
    result = cli("--from-run", folder, "--submit")
    assert result.exit_code == 2
    one_line_error(result.output, f"{folder / 'metrics.json'}: ")
    assert "--resume" in result.output


@pytest.mark.parametrize("file, content, message", [
    ("metrics.json", '{"valid": {"patch_f1": ', "metrics.json: damaged"),
    ("metrics.json", '{"valid": {"patch_f1": "high"}}', "metrics.json: damaged"),
    ("exit_code", "zero\n", "exit_code: damaged ('zero' is not an exit code)"),
    ("submitted.json", '{"scheduler": ', "submitted.json: damaged"),
])
def test_damaged_job_files_are_named_in_one_line_by_the_grid(tmp_path, file, content, message):
    (tmp_path / "g.json").write_text(json.dumps({"lr": [0.1]}))
    assert grid(tmp_path / "g.json", "--jobs-dir", tmp_path / "jobs", "--dry-run").exit_code == 0
    job = tmp_path / "jobs/g/lr-0.1"
    own_folder(job.parent, "grid folder")
    own_folder(job, "job folder")
    (job.parent / "grid.json").write_text(json.dumps({"lr": [0.1]}))
    (job / file).write_text(content)
    for args in (["summary", job.parent], [tmp_path / "g.json", "--jobs-dir",
                                           tmp_path / "jobs", "--dry-run"]):
        if args[0] != "summary" and file == "metrics.json":
            continue                          # a rerun reads no metrics
        result = grid(*args)
        assert result.exit_code == 2, result.output
        one_line_error(result.output, message)


# ---------------------------------------------------------------------------------------------
# The CSV converter in reverse


@pytest.mark.parametrize("line", ["001_16_0,2", "001_-16_0,1", "-01_16_0,1", "001_8_0,1",
                                  "001_16,1", "+001_16_0,1", "\u0661_16_0,1", "001_16_0,1,1"])
def test_the_reverse_converter_refuses_bad_lines_before_writing(tmp_path, line):
    """Ids that do not parse as whole numbers, labels other than 0 and 1, ids off the 16-pixel
    grid: one line naming the file's line, nothing written."""
    (tmp_path / "s.csv").write_text(f"id,prediction\n001_0_0,1\n{line}\n")
    result = CliRunner().invoke(m2s.main, ["--to-masks", str(tmp_path / "s.csv"), "-o",
                                           str(tmp_path / "masks")])
    assert result.exit_code == 2
    one_line_error(result.output, f"s.csv:3: '{line}'")
    assert not (tmp_path / "masks").exists()


@pytest.mark.parametrize("content", [b"\x00\xff" * 50, b"id,prediction\n001_0_0, 2\n"])
def test_the_reverse_converter_refuses_files_that_are_no_submission(tmp_path, content):
    (tmp_path / "s.csv").write_bytes(content)
    result = CliRunner().invoke(m2s.main, ["--to-masks", str(tmp_path / "s.csv"), "-o",
                                           str(tmp_path / "masks")])
    assert result.exit_code == 2
    one_line_error(result.output, "s.csv")
    assert not (tmp_path / "masks").exists()


def test_the_reverse_converter_reads_what_spreadsheets_write(tmp_path):
    """A byte order mark, CRLF line ends, blanks around fields and a last empty line."""
    (tmp_path / "s.csv").write_bytes(b"\xef\xbb\xbfid,prediction\r\n001_0_0, 1\r\n"
                                     b"001_16_0 ,0\r\n\r\n")
    assert m2s.read_submission(tmp_path / "s.csv") == {1: {(0, 0): 1, (16, 0): 0}}


# ---------------------------------------------------------------------------------------------
# Nothing is ignored silently


@pytest.mark.parametrize("args, env, message", [
    (["--run-name", "other"], {}, "--run-name (command line) cannot apply to --resume"),
    (["--logs-dir", "elsewhere"], {}, "--logs-dir (command line) cannot apply to --resume"),
    ([], {"CIL_RUN_NAME": "other"}, "--run-name (environment CIL_RUN_NAME) cannot apply"),
    (["--force"], {}, "--force (command line) cannot apply to --resume"),
])
def test_options_a_resumed_run_cannot_take_are_refused(workdir, args, env, message):
    folder = saved_run(workdir / "logs/r")
    refused_leaving(workdir, "--resume", folder, *args, named=message, env=env)


def test_resume_from_the_environment_refuses_a_run_name_too(workdir):
    folder = saved_run(workdir / "logs/r")
    result = cli("--run-name", "x", env={"CIL_RESUME": str(folder)})
    assert result.exit_code == 2
    one_line_error(result.output, "--run-name (command line) cannot apply to --resume")


@pytest.mark.parametrize("variable, message", [
    ("CIL_EPOCS", "environment CIL_EPOCS: names no option of main_cil.py; did you mean "
                  "CIL_EPOCHS?"),
    ("CIL_NOTHING_LIKE_IT", "environment CIL_NOTHING_LIKE_IT: names no option"),
])
def test_an_environment_variable_that_names_no_option_is_refused(workdir, road_dir, variable,
                                                                 message):
    result = cli("--data-dir", road_dir, *TINY, env={variable: "5"})
    assert result.exit_code == 2
    one_line_error(result.output, message)


def test_encoder_weights_without_an_encoder_are_refused(workdir, road_dir):
    result = cli("--data-dir", road_dir, *TINY, "--encoder-weights", "imagenet")
    assert result.exit_code == 2
    one_line_error(result.output, "--encoder-weights imagenet are an encoder's starting weights; "
                                  "pass --encoder too")
    result = cli("--data-dir", road_dir, *TINY, "--encoder", "resnet50", "--encoder-weights",
                 "hed")
    one_line_error(result.output, "--encoder-weights hed holds vgg16 weights; pass --encoder "
                                  "vgg16 with it")


def test_the_summary_lists_the_metrics_it_knows(tmp_path):
    grid_dir = tmp_path / "jobs/g"
    grid_dir.mkdir(parents=True)
    (grid_dir / "grid.json").write_text(json.dumps({"lr": [0.1]}))
    result = grid("summary", grid_dir, "--metric", "dice")
    assert result.exit_code == 2
    one_line_error(result.output, "--metric dice: not a metric the runs record; choose one of "
                                  "accuracy, f1, iou")


def test_the_summary_of_a_folder_that_is_no_grid_is_one_line(tmp_path):
    result = grid("summary", tmp_path)
    assert result.exit_code == 2
    one_line_error(result.output, f"{tmp_path}: not a grid folder (no grid.json)")


def test_resources_that_are_no_object_are_one_line(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({"lr": [0.1], "resources": [1]}))
    result = grid(tmp_path / "g.json", "--jobs-dir", tmp_path / "jobs", "--dry-run")
    assert result.exit_code == 2
    one_line_error(result.output, "g.json: resources [1]: expected an object")


# ---------------------------------------------------------------------------------------------
# Checks that match what they check


def test_tile_is_checked_against_the_models_own_multiple(workdir, road_dir):
    build_unet(filters=2, depth=2).save("d2.keras")          # sides: multiples of 4
    result = cli("--data-dir", road_dir, "--weights", "d2.keras", "--tile", "12",
                 "--overlap", "4", "--run-name", "t")
    assert result.exit_code == 0, result.output              # not "a multiple of 16"
    result = cli("--data-dir", road_dir, "--weights", "d2.keras", "--tile", "10",
                 "--overlap", "4", "--run-name", "u")
    assert result.exit_code == 2
    one_line_error(result.output, "d2.keras: --tile must be a multiple of 4 (what the model's "
                                  "input sides must be), got 10; pass --tile 8")


def test_the_crop_an_error_suggests_is_accepted(tmp_path):
    images = [rgb(100)]
    with pytest.raises(InputError) as error:
        train_sample_size(images, 128, NO_PERTURBATION, 16)
    assert "pass --crop 96 or smaller (a multiple of 16)" in str(error.value)
    assert train_sample_size(images, 96, NO_PERTURBATION, 16) == (96, 96)


def test_a_dry_run_of_a_finished_grid_has_nothing_to_run(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({"lr": [0.1, 0.2]}))
    for value in ("0.1", "0.2"):
        job = tmp_path / f"jobs/g/lr-{value}"
        own_folder(job.parent, "grid folder")
        own_folder(job, "job folder")
        (job / "exit_code").write_text("0\n")
    before = tree(tmp_path)
    result = grid(tmp_path / "g.json", "--jobs-dir", tmp_path / "jobs", "--dry-run")
    assert result.exit_code == 0
    assert "lr-0.1: finished, skipped" in result.output and "nothing to run" in result.output
    assert tree(tmp_path) == before


@pytest.mark.slow
def test_a_local_grid_with_a_failed_job_exits_non_zero(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({"data-dir": str(tmp_path / "nowhere"),
                                                 "epochs": [1]}))
    result = grid(tmp_path / "g.json", "--jobs-dir", tmp_path / "jobs")
    assert result.exit_code == 1
    assert "epochs-1 (start): failed (exit 2)" in result.output
    assert "folder not found" in (tmp_path / "jobs/g/epochs-1/stderr").read_text()


@pytest.mark.parametrize("variables, message", [
    ({"GPUS": "abc"}, "GPUS='abc': expected a whole number of GPUs"),
    ({"CORES": "two"}, "CORES='two': expected a whole number from 1"),
    ({"WALLTIME": "0"}, "walltime '0': use H:MM"),
    ({"WALLTIME": "0:00"}, "above 0 (SLURM reads 0 as no limit)"),
    ({"STOP_WARNING": "300", "WALLTIME": "60"}, "stop_warning 300 (minutes) must be shorter"),
])
def test_bad_resources_for_the_cluster_scripts_are_one_line(tmp_path, variables, message):
    result = subprocess.run(["bash", "cluster/sbatch_train.sh", "--epochs", "1", "--logs-dir",
                             str(tmp_path / "logs")], cwd=jobs_cil.REPO, capture_output=True,
                            text=True, env={**os.environ, "PYTHON": sys.executable,
                                            "PATH": f"{tmp_path}:{os.environ['PATH']}",
                                            **variables})
    assert result.returncode == 2
    one_line_error(result.stderr, message)
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("content", [{"cores": True}, {"mem_per_core": 4096.5},
                                     {"walltime": False}])
def test_booleans_and_fractions_are_no_resources(tmp_path, content):
    (tmp_path / "g.json").write_text(json.dumps({"lr": [0.1], "resources": content}))
    result = grid(tmp_path / "g.json", "--dry-run")
    assert result.exit_code == 2
    assert "resources" in result.output or "walltime" in result.output


def test_a_run_without_a_checkpoint_or_mask_file_is_still_refused_in_one_line(workdir):
    make_pair(workdir / "d", "a.png", rgb(32), np.zeros((32, 32), np.uint8))
    folder = saved_run(workdir / "logs/r")
    (folder / "checkpoint/state.json").unlink()
    result = cli("--resume", folder)
    assert result.exit_code == 2
    one_line_error(result.output, "no checkpoint to resume from")
    assert checkpoint_state(folder).is_file()


def test_a_dry_run_of_a_new_grid_creates_nothing(tmp_path):
    (tmp_path / "g.json").write_text(json.dumps({"lr": [0.1, 0.2], "folds": 2, "fold": [0, 1]}))
    result = grid(tmp_path / "g.json", "--jobs-dir", tmp_path / "jobs", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "lr-0.1/fold-0 (start): " in result.output
    assert not (tmp_path / "jobs").exists()


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the tensorflow backend exports")
def test_export_under_another_backend_is_one_line_before_anything(workdir, road_dir):
    result = cli("--data-dir", road_dir, *TINY, "--export")
    assert result.exit_code == 2
    one_line_error(result.output, f"--export writes a TensorFlow SavedModel, which the {BACKEND} "
                                  "backend cannot")
    assert not (workdir / "logs").exists()


# ---------------------------------------------------------------------------------------------
# Memory that runs out: one line with what to lower, exit code 1


OOM_ERRORS = {
    "tensorflow": ("ResourceExhaustedError", "{{function_node __wrapped__X}} OOM when allocating "
                   "tensor with shape[3,3,100000,100000] and type float on /job:localhost",
                   "OOM when allocating tensor with shape[3,3,100000,100000]"),
    "numpy": ("MemoryError", "Unable to allocate 27.9 GiB for an array with shape (100000, "
              "100000, 3) and data type uint8", "Unable to allocate 27.9 GiB for an array with "
              "shape (100000, 100000, 3)"),
    "xla": ("XlaRuntimeError", "RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
            "40000000000 bytes.", "XlaRuntimeError"),
}


@pytest.mark.parametrize("kind", OOM_ERRORS)
def test_running_out_of_memory_is_one_line_naming_what_to_lower(workdir, road_dir, monkeypatch,
                                                                kind):
    name, text, reason = OOM_ERRORS[kind]
    error = type(name, (MemoryError if name == "MemoryError" else RuntimeError,), {})(text)

    def exhausted(*args, **kwargs):
        raise error

    monkeypatch.setattr(model_cil, "build_model", exhausted)
    result = cli("--data-dir", road_dir, *TINY, "--filters", "100000", "--run-name", "big")
    assert result.exit_code == 1
    one_line_error(result.output, f"out of memory ({reason}); lower --batch-size or --crop for "
                                  "training, --filters or --depth for the model")


def test_memory_is_told_by_the_error_class_or_xla_status_and_nothing_else():
    assert out_of_memory_line(RuntimeError("shapes do not match"), "hint") is None
    assert out_of_memory_line(ValueError("RESOURCE_EXHAUSTED: 8 GiB"), "hint") == (
        "out of memory (ValueError); hint")


# ---------------------------------------------------------------------------------------------
# The table of bad inputs: one line, exit code 2, no run folder, nothing outside logs/


def classifier_model(path):
    inputs = keras.Input((32, 32, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    keras.Model(inputs, keras.layers.Dense(10, activation="softmax")(pooled)).save(path)


def one_channel_model(path):
    inputs = keras.Input((None, None, 1))
    keras.Model(inputs, keras.layers.Conv2D(1, 1, activation="sigmoid")(inputs)).save(path)


def bad_models(folder):
    (folder / "junk.keras").write_bytes(b"PK\x03\x04 not really a zip")
    (folder / "fake.keras").write_text("a text file, not a model")
    with zipfile.ZipFile(folder / "empty.zip.keras", "w") as archive:
        archive.writestr("notes.txt", "no model here")
    one_channel_model(folder / "grey.keras")
    classifier_model(folder / "classifier.keras")


BAD_INPUTS = [
    (["--data-dir", "nowhere"], "nowhere/training/images: folder not found; pass --data-dir"),
    (["--crop", "30"], "--crop must be a multiple of 4 (the model halves the image 2 times), "
                       "got 30"),
    (["--crop", "128"], "--crop 128 is larger than images of 64x64; pass --crop 64 or smaller"),
    (["--crop", "0", "--depth", "7"], "training images are 64x64 but the model needs sides that "
                                      "are multiples of 128; use larger images or a smaller "
                                      "--depth"),
    (["--loss", "dcie"], "'dcie' is not a loss; choose from bce"),
    (["--aug", "rotaton=3"], "--aug rotaton=3: expected key=value with key one of"),
    (["--aug", "zoom_range=1.5"], "zoom_range 1.5: factors must stay above 0"),
    (["--monitor", "val_dice"], "--monitor val_dice: choose one of val_precision"),
    (["--gpus", "2"], "GPU(s) visible to " + BACKEND + "; pass --gpus 0 (the CPU)"),
    (["--class-weights", "1,2,3"], "--class-weights needs 2 numbers"),
    (["--class-weights", "heavy"], "--class-weights heavy: expected auto or numbers like 1,4"),
    (["--valid-fraction", "1.5"], "Invalid value for '--valid-fraction'"),
    (["--palette", "p.json"], "--palette maps colours to classes; pass --classes N"),
    (["--submit", "--weights", "nothing.keras"], "nothing.keras: weights file not found"),
    (["--submit", "--weights", "junk.keras"], "junk.keras: not a .keras model file"),
    (["--submit", "--weights", "fake.keras"], "fake.keras: not a .keras model file"),
    (["--submit", "--weights", "empty.zip.keras"], "empty.zip.keras: not a model saved by this "
                                                   "tool"),
    (["--submit", "--weights", "classifier.keras"], "not images to masks; pass a segmentation"),
    (["--submit", "--weights", "grey.keras"], "the model expects 1-channel images"),
    (["--logs-dir", "/sys/cil-logs"], "/sys/cil-logs: cannot create the logs folder"),
    (["--logs-dir", "p.json/logs"], "p.json/logs: cannot create the logs folder"),
    (["--resume", "p.json"], "config.json: not found; . is not a run folder of this tool"),
    (["--weights", "."], ".: a folder, not a model file; pass best.keras, or --from-run ."),
    (["--submit", "--submit-output-dir", "p.json"], "p.json: not a folder; choose another "
                                                    "place for the submission output folder"),
    (["--valid-output-dir", "p.json/out"], "p.json/out: cannot create the validation output "
                                           "folder"),
    (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295"),
    (["--seed", str(2**32)], "is not in the range 0<=x<=4294967295"),
    (["--class-weights", "0,0"], "--class-weights 0,0: all weights 0 leave nothing to learn"),
    (["--aug", "width_shift_range=-0.1"], "width_shift_range -0.1: a range is 0 or more (draws "
                                          "fall in [-r, r]); pass 0.1"),
    (["--aug", "brightness_range=1.1,0.9"], "brightness_range 1.1,0.9: factors run from a low "
                                            "one to a high one"),
    (["--weights", "grey.keras", "--from-run", "."], "--weights names the models and "
                                                     "--from-run takes an earlier run's"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=lambda value: " ".join(value)
                         if isinstance(value, list) else None)
def test_bad_input_gives_one_line_and_exit_code_2(workdir, road_dir, args, message):
    bad_models(workdir)
    (workdir / "p.json").write_text('{"#ff0000": 1}')
    before = set(tree(workdir))
    result = cli(*TINY, "--data-dir", road_dir, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    if not args[0].startswith("--valid"):                 # click's usage errors aside
        lines = result.output.splitlines()
        assert lines[-1].startswith("error: ") and sum("error" in line for line in lines) == 1
    created = set(tree(workdir)) - before
    assert not [path for path in created if not path.startswith(("logs", "data"))]
    assert not (workdir / "logs").exists() or not any((workdir / "logs").iterdir())


def test_bad_files_in_the_data_are_named_in_one_line(workdir, tmp_path):
    make_pair(tmp_path / "d", "a.png", rgb(32), np.zeros((32, 32), np.uint8))
    make_pair(tmp_path / "d", "b.png", rgb(32), np.zeros((32, 32), np.uint8))
    (tmp_path / "d/training/images/b.png").write_bytes(b"")
    result = cli("--data-dir", tmp_path / "d", *TINY)
    assert result.exit_code == 2
    assert "b.png: file is empty (0 bytes); replace it or remove it" in result.output
    (tmp_path / "d/training/images/b.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    result = cli("--data-dir", tmp_path / "d", *TINY)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "b.png: cannot read the image" in result.output and "pip" not in result.output
    save(tmp_path / "d/training/images/b.png", rgb(32))
    save(tmp_path / "d/training/images/c.png", rgb(32))
    result = cli("--data-dir", tmp_path / "d", *TINY)
    assert result.exit_code == 2 and "c.png has no mask of the same name" in result.output


def test_submit_without_test_images_fails_before_training(workdir, tmp_path):
    for name in ("a.png", "b.png"):
        make_pair(tmp_path / "d", name, rgb(32), np.zeros((32, 32), np.uint8))
    result = cli("--data-dir", tmp_path / "d", *TINY, "--submit")
    assert result.exit_code == 2 and "no test images" in result.output
    assert "Epoch" not in result.output


def test_debug_shows_the_traceback(workdir):
    result = CliRunner().invoke(main, ["--data-dir", "nowhere", "--debug"])
    assert result.exit_code != 0 and result.exc_info[0].__name__ == "InputError"


# ---------------------------------------------------------------------------------------------
# Grid files that cannot run


@pytest.mark.parametrize("content, message", [
    ({"filtres": [8]}, "'filtres' is not an option; did you mean filters?"),
    ({"run-name": ["x"]}, "'run-name' is not an option a grid may set"),
    ({"logs_dir": "elsewhere"}, "'logs_dir' is not an option a grid may set"),
    ({}, "sets no option; a grid needs at least one"),
    ({"lr": None}, "lr: null is not a value; leave the key out for the default"),
    ({"lr": ["x"]}, "lr: 'x' is not a valid float"),
    ({"lr": ["0.001; touch /tmp/cil-injected #"]}, "is not a valid float"),
    ({"gpus": ["one"]}, "gpus: 'one' is not a valid integer"),
    ({"epochs": [2.5]}, "epochs: 2.5 is not a valid int"),
    ({"batchnorm": ["yes"]}, 'batchnorm: "yes" is not true or false'),
    ({"loss": []}, "'loss' has an empty list of values"),
    ({"aug": ["rotation=3"]}, "--aug rotation=3: expected key=value with key one of"),
    ({"lr": [0.1], "resources": {"walltime": "4:00:00"}}, "walltime '4:00:00': use H:MM"),
    ({"lr": [0.1], "resources": {"cpus": 4}}, "resources cpus unknown"),
    ({"lr": [0.1], "resources": {"partition": "gpu; rm -rf /"}}, "resources partition"),
])
def test_bad_grid_values_are_one_clear_error(tmp_path, content, message):
    with pytest.raises(InputError) as error:
        load_grid(grid_file(tmp_path, content))
    assert message in str(error.value)


@pytest.mark.parametrize("text", ['{"lr": 0.1, "lr": 0.2}',
                                  '{"lr": [0.1], "resources": {"cores": 1, "cores": 2}}'])
def test_a_key_given_twice_is_refused_not_silently_the_last(tmp_path, text):
    path = tmp_path / "twice.json"
    path.write_text(text)
    with pytest.raises(InputError) as error:
        load_grid(path)
    assert "twice.json" in str(error.value) and "given twice" in str(error.value)


# ---------------------------------------------------------------------------------------------
# Config files


@pytest.mark.parametrize("content, message", [
    ({"epochz": 3}, "'epochz' is not an option; did you mean epochs?"),
    ({"batch_sise": 3}, "did you mean batch-size?"),
    ({"resume": "logs/x"}, "'resume' cannot come from a config file"),
    ({"epochs": "many"}, "epochs: 'many' is not a valid integer"),
    ([1, 2], "expected a JSON object"),
])
def test_config_file_errors_name_the_key_and_the_closest_option(workdir, content, message):
    config = workdir / "c.json"
    config.write_text(json.dumps(content))
    result = cli("--config", config)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and not (workdir / "logs").exists()


def test_a_config_key_given_twice_is_refused(workdir):
    config = workdir / "c.json"
    config.write_text('{"epochs": 3, "epochs": 4}')
    result = cli("--config", config)
    assert result.exit_code == 2 and "c.json" in result.output and "'epochs'" in result.output
    assert not (workdir / "logs").exists()
