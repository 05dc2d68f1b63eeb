"""Nothing outside the folders a run owns is touched: run names, --force, locks, concurrent
writers, job arguments, the Kaggle CSV, and the table of bad inputs that each give one line,
exit code 2, and lose nothing."""

import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import grid_cil
import jobs_cil
import mask_to_submission as m2s
from data_cil import image_number
from io_cil import InputError, write_atomically
from main_cil import main
from predict_cil import write_test_predictions
from runs_cil import OWNER_FILE, close_run, host_name, open_run, own_folder
from tests.conftest import BACKEND, REPO, TINY, cli, make_pair, resolved, rgb, save


def tree(folder):
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------
# 1. Run names and --force


BAD_RUN_NAMES = ["..", ".", "../escape", "/tmp/abs", "a/b", "", "-x", ".hidden", "x" * 101,
                 "a b", "a\nb", "a;b"]


@pytest.mark.parametrize("name", BAD_RUN_NAMES)
def test_a_run_name_is_one_safe_folder_name_checked_before_anything(workdir, road_dir, name):
    (workdir / "logs/kept").mkdir(parents=True)
    (workdir / "logs/kept/config.json").write_text("{}")
    before = tree(workdir)
    result = cli("--data-dir", road_dir, *TINY, "--run-name", name, "--force")
    assert result.exit_code == 2, result.output
    assert "a run name is one folder name of letters, digits" in result.output
    assert tree(workdir) == before


def make_run(logs, name, valid, submit):
    """A finished run's three folders, made as the tool makes them."""
    for folder in (logs / name, valid / name, submit / name):
        own_folder(folder, "test run")
    (logs / name / "config.json").write_text('{"settings": {}}')
    (valid / name / "a_mask.png").write_bytes(b"png")
    (submit / name / "submission.csv").write_text("id,prediction\n")


def test_force_moves_the_earlier_run_and_its_outputs_aside(tmp_path):
    logs, valid, submit = tmp_path / "logs", tmp_path / "valid", tmp_path / "submit"
    make_run(logs, "r", valid, submit)
    with pytest.raises(InputError, match="logs/r: a run of that name exists; pass --force"):
        open_run(logs, "r", valid, submit)
    run, moved = open_run(logs, "r", valid, submit, force=True)
    assert sorted(folder.parent for folder in moved) == sorted(
        [logs / ".trash", valid / ".trash", submit / ".trash"])
    assert (moved[-1] / "config.json").is_file()          # kept, not deleted
    assert sorted(p.name for p in run.folder.iterdir()) == [OWNER_FILE, "lock"]
    assert [p.name for p in run.valid_dir.iterdir()] == [OWNER_FILE]
    assert [p.name for p in run.submit_dir.iterdir()] == [OWNER_FILE]
    close_run(run)
    assert not (run.folder / "lock").exists()


def checkout(root):
    """A project checkout as a user has one: code, .git and a dataset in data/."""
    (root / ".git").mkdir(parents=True)
    (root / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (root / "main_cil.py").write_text("# the tool\n")
    save(root / "data/roadseg/training/images/satImage_001.png", rgb(16))
    return root


@pytest.mark.parametrize("args", [
    ["--logs-dir", ".", "--run-name", "data"],
    ["--logs-dir", ".", "--run-name", "data", "--force"],
    ["--logs-dir", "..", "--run-name", "project", "--force"],
    ["--logs-dir", "data", "--run-name", "roadseg", "--force"],
    ["--valid-output-dir", ".", "--run-name", "data", "--force"],
    ["--submit-output-dir", "..", "--run-name", "project", "--force"],
], ids=" ".join)
def test_a_folder_the_tool_did_not_make_is_never_written_into_or_moved(tmp_path, monkeypatch,
                                                                       road_dir, args):
    project = checkout(tmp_path / "project")
    monkeypatch.chdir(project)
    before = tree(tmp_path)
    result = cli("--data-dir", road_dir, *TINY, *args)
    assert result.exit_code == 2, result.output
    assert "exists and was not made by this tool (no .cil-owner)" in result.output
    assert tree(tmp_path) == before


def test_force_never_moves_a_run_while_a_run_inside_it_is_held(tmp_path):
    """--force on a cross-validated run while one of its folds trains in another process."""
    logs, valid, submit = tmp_path / "logs", tmp_path / "valid", tmp_path / "submit"
    make_run(logs, "cv", valid, submit)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, logs / "cv", valid / "cv",
                               submit / "cv"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"        # its fold "r" trains
        before = tree(tmp_path)
        with pytest.raises(InputError, match=f"cv/r: in use by process {holder.pid} on .*"
                                             "cv is not moved while it runs"):
            open_run(logs, "cv", valid, submit, force=True)
        assert tree(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_filled_submission_folder_is_refused_before_training(workdir, road_dir):
    own_folder(road_dir / "submit_output/s", "submission folder")
    save(road_dir / "submit_output/s/test_1.png", rgb(16))
    result = cli("--data-dir", road_dir, *TINY, "--submit", "--run-name", "s")
    assert result.exit_code == 2
    assert "submit_output/s: a run of that name exists" in result.output
    assert "Epoch" not in result.output


# ---------------------------------------------------------------------------------------------
# 6. Locks and concurrent writers


HOLDER = """
import sys, time
from runs_cil import open_run
open_run(sys.argv[1], "r", sys.argv[2], sys.argv[3])
print("held", flush=True)
time.sleep(120)
"""


def test_a_run_held_by_a_live_process_is_never_replaced_or_resumed(tmp_path):
    logs, valid, submit = tmp_path / "logs", tmp_path / "valid", tmp_path / "submit"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, logs, valid, submit], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for options in (dict(force=True), dict(resume=True), {}):
            with pytest.raises(InputError, match=f"in use by process {holder.pid} on "):
                open_run(logs, "r", valid, submit, **options)
    finally:
        holder.kill()
        holder.wait()
    run, _ = open_run(logs, "r", valid, submit)          # the holder is gone: its lock is stale
    assert json.loads((run.folder / "lock").read_text())["pid"] == os.getpid()
    close_run(run)


def test_two_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    names = []
    for _ in range(2):
        write_atomically(tmp_path / "best.keras", lambda p: (names.append(p.name),
                                                              p.write_text("x")))
    assert names[0] != names[1]
    assert all(name.startswith(".best.") and name.endswith(".partial.keras") for name in names)
    assert [p.name for p in tmp_path.iterdir()] == ["best.keras"]


@pytest.mark.slow
def test_a_second_run_of_the_same_name_is_refused_while_the_first_trains(workdir, road_dir):
    command = [sys.executable, str(REPO / "main_cil.py"), "--data-dir", str(road_dir), *TINY,
               "--epochs", "200", "--patience", "0", "--run-name", "same"]
    first = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (workdir / "logs/same/checkpoint").exists() and time.time() < deadline:
            time.sleep(0.2)
        config = (workdir / "logs/same/config.json").read_text()
        result = cli("--data-dir", road_dir, *TINY, "--run-name", "same", "--force")
        assert result.exit_code == 2
        assert f"logs/same: in use by process {first.pid}" in result.output
        assert (workdir / "logs/same/config.json").read_text() == config
        assert not (workdir / "logs/.trash").exists()
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)


# ---------------------------------------------------------------------------------------------
# 3, 4. Job arguments stay whole; a running local job is left alone


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


# ---------------------------------------------------------------------------------------------
# 7. The Kaggle CSV


def road_at(value, dtype, x=16, y=32, size=64):
    mask = np.zeros((size, size), dtype)
    mask[y:y + 16, x:x + 16] = value
    return mask


@pytest.mark.parametrize("mask", [road_at(1, np.uint8), road_at(255, np.uint8),
                                  road_at(237, np.uint8), road_at(65535, np.uint16),
                                  road_at(True, bool), road_at(1.0, np.float32)])
def test_every_common_mask_encoding_gives_the_same_csv(tmp_path, mask):
    fraction = m2s.mask_fraction(mask, "m.png")
    lines = m2s.submission_lines({7: fraction})
    assert [line for line in lines if line.endswith(",1")] == ["007_16_32,1"]


@pytest.mark.parametrize("mask", [road_at(200, np.uint16), road_at(3.0, np.float32),
                                  road_at(-1, np.int16)])
def test_a_mask_of_unknown_scale_is_refused(mask):
    with pytest.raises(InputError, match="m.png: mask values .* save the masks as 8-bit PNGs"):
        m2s.mask_fraction(mask, "m.png")


@pytest.mark.parametrize("name, number", [("test_5.png", 5), ("test_012.png", 12),
                                          ("satImage_001.png", 1), ("mask_044.png", 44)])
def test_image_numbers_come_from_the_documented_pattern(name, number):
    assert image_number(name) == number


@pytest.mark.parametrize("name", ["test_5_v2.png", "test5.png", "5.png", "test_.png"])
def test_other_names_are_refused_not_guessed(name):
    with pytest.raises(InputError, match="not a numbered image name; name it like test_12.png"):
        image_number(name)


def red_is_class_1(classes):
    """A model that predicts class 1 where the red channel is bright, class 0 elsewhere."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    layer = keras.layers.Conv2D(classes, 1, activation="softmax")
    outputs = layer(x)
    kernel = np.zeros((1, 1, 3, classes), np.float32)
    kernel[0, 0, 0, 1] = 40
    bias = np.zeros(classes, np.float32)
    bias[1] = -20
    layer.set_weights([kernel, bias])
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("classes", [2, 3])
def test_a_two_class_submission_writes_the_csv_of_class_1(tmp_path, classes, capsys):
    image = np.zeros((64, 64, 3), np.uint8)
    image[32:48, 16:32, 0] = 255
    tests = {3: save(tmp_path / "test_images/test_3.png", image)}
    run, _ = open_run(tmp_path / "logs", "r", tmp_path / "valid", tmp_path / "submit")
    settings = resolved("--classes", classes, "--tta", "1")
    summary = write_test_predictions([red_is_class_1(classes)], settings, run, tests)
    close_run(run)
    output = capsys.readouterr().out
    if classes == 2:
        lines = (run.submit_dir / "submission.csv").read_text().splitlines()
        assert [line for line in lines if line.endswith(",1")] == ["003_16_32,1"]
        assert "of them class 1" in output and summary["csv_lines"] == 16
    else:
        assert not (run.submit_dir / "submission.csv").exists()
        assert "no Kaggle CSV: it scores one foreground class and the model has 3" in output


def test_the_converter_refuses_a_folder_as_its_csv(tmp_path):
    save(tmp_path / "masks/test_1.png", road_at(255, np.uint8))
    (tmp_path / "out").mkdir()
    result = CliRunner().invoke(m2s.main, [str(tmp_path / "masks"), "-o", str(tmp_path / "out"),
                                           "--force"])
    assert result.exit_code == 2
    assert result.output == f"error: {tmp_path / 'out'}: is a folder; name the file to " \
                            f"write, e.g. {tmp_path / 'out/submission.csv'}\n"


# ---------------------------------------------------------------------------------------------
# 9, 10. The table of bad inputs: one line, exit code 2, no run folder, nothing outside logs/


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


@pytest.mark.slow
def test_results_are_written_only_under_logs_and_data(workdir, road_dir):
    """A whole run, validation and submission, as a fresh checkout sees it."""
    assert cli("--data-dir", road_dir, *TINY, "--epochs", "1", "--run-name", "v").exit_code == 0
    assert cli("--data-dir", road_dir, "--weights", "logs/v/best.keras", "--submit",
               "--run-name", "s").exit_code == 0
    assert {path.split("/")[0] for path in tree(workdir)} <= {"logs", "data", "roads"}

