"""The folders a run owns and nothing else: run names, --force moving earlier runs aside, folders
the tool did not make, locks and concurrent writers, and a run making only the output folders it
writes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from io_cil import InputError, write_atomically
from runs_cil import OWNER_FILE, close_run, is_owned, open_run, own_folder
from tests.conftest import REPO, TINY, cli, refused_leaving, rgb, save, tree

# ---------------------------------------------------------------------------------------------
# Run names and --force


BAD_RUN_NAMES = ["..", ".", "../escape", "/tmp/abs", "a/b", "", "-x", ".hidden", "x" * 101,
                 "a b", "a\nb", "a;b"]


@pytest.mark.parametrize("name", BAD_RUN_NAMES)
def test_a_run_name_is_one_safe_folder_name_checked_before_anything(workdir, road_dir, name):
    (workdir / "logs/kept").mkdir(parents=True)
    (workdir / "logs/kept/config.json").write_text("{}")
    refused_leaving(workdir, "--data-dir", road_dir, *TINY, "--run-name", name, "--force",
                    named="a run name is one folder name of letters, digits")


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
    refused_leaving(tmp_path, "--data-dir", road_dir, *TINY, *args,
                    named="exists and was not made by this tool (no .cil-owner)")


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
# Locks and concurrent writers


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
# A run makes only the folders it writes, and makes them again when resumed


def test_a_resumed_run_makes_its_missing_output_folders_again(tmp_path):
    """A run copied from a cluster without its outputs: resuming it must not fail at the end."""
    run, _ = open_run(tmp_path / "logs", "r", tmp_path / "valid", tmp_path / "submit")
    close_run(run)
    run.valid_dir.joinpath(".cil-owner").unlink()
    run.valid_dir.rmdir()
    resumed, _ = open_run(tmp_path / "logs", "r", tmp_path / "valid", tmp_path / "submit",
                          resume=True)
    close_run(resumed)
    assert resumed.valid_dir.is_dir() and is_owned(resumed.valid_dir)


@pytest.mark.slow
def test_a_run_makes_only_the_output_folders_it_writes(workdir, road_dir):
    """Validation leaves no empty submission folder beside the data; a submission no
    validation folder."""
    assert cli("--data-dir", road_dir, *TINY, "--epochs", "1", "--tta", "1",
               "--run-name", "v").exit_code == 0
    assert (workdir / "data/valid/output/v").is_dir()
    assert not (road_dir / "submit_output").exists()
    model = workdir / "logs/v/best.keras"
    assert cli("--data-dir", road_dir, "--weights", model, "--submit", "--tta", "1",
               "--run-name", "s").exit_code == 0
    assert (road_dir / "submit_output/s/submission.csv").is_file()
    assert not (workdir / "data/valid/output/s").exists()


# ---------------------------------------------------------------------------------------------
# Results only under logs/ and data/


@pytest.mark.slow
def test_results_are_written_only_under_logs_and_data(workdir, road_dir):
    """A whole run, validation and submission, as a fresh checkout sees it."""
    assert cli("--data-dir", road_dir, *TINY, "--epochs", "1", "--run-name", "v").exit_code == 0
    assert cli("--data-dir", road_dir, "--weights", "logs/v/best.keras", "--submit",
               "--run-name", "s").exit_code == 0
    assert {path.split("/")[0] for path in tree(workdir)} <= {"logs", "data", "roads"}


def make_run(logs, name, valid, submit):
    """A finished run's three folders, made as the tool makes them."""
    for folder in (logs / name, valid / name, submit / name):
        own_folder(folder, "test run")
    (logs / name / "config.json").write_text('{"settings": {}}')
    (valid / name / "a_mask.png").write_bytes(b"png")
    (submit / name / "submission.csv").write_text("id,prediction\n")


def checkout(root):
    """A project checkout as a user has one: code, .git and a dataset in data/."""
    (root / ".git").mkdir(parents=True)
    (root / ".git/HEAD").write_text("ref: refs/heads/main\n")
    (root / "main_cil.py").write_text("# the tool\n")
    save(root / "data/roadseg/training/images/satImage_001.png", rgb(16))
    return root


HOLDER = """
import sys, time
from runs_cil import open_run
open_run(sys.argv[1], "r", sys.argv[2], sys.argv[3])
print("held", flush=True)
time.sleep(120)
"""
