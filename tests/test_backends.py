"""The tool end to end under a Keras backend other than TensorFlow (.ci/run runs these with
KERAS_BACKEND=jax in a virtual environment without TensorFlow): the demo with its TensorBoard
files, a 2-fold cross-validation and its ensemble CSV, and a run stopped mid-epoch that resumes
exactly. Under TensorFlow, test_cli, test_cv and test_train cover the same paths."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BACKEND, TINY, cli

pytestmark = [pytest.mark.slow, pytest.mark.backends,
              pytest.mark.skipif(BACKEND == "tensorflow",
                                 reason="the TensorFlow suite covers these paths")]


def board_tags(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return EventAccumulator(str(folder), size_guidance={"images": 0}).Reload().Tags()


def test_the_demo_learns_and_writes_tensorboard_files(workdir):
    result = cli("--demo", "--run-name", "demo")
    assert result.exit_code == 0, result.output
    assert f"({BACKEND})" in result.output
    valid = json.loads(Path("logs/demo/metrics.json").read_text())["valid"]
    assert valid["f1"] > 0.8 and valid["patch_f1"] > 0.8
    assert "epoch_f1" in board_tags("logs/demo/validation")["scalars"]
    assert board_tags("logs/demo/images")["images"]
    config = json.loads(Path("logs/demo/config.json").read_text())
    assert config["backend"] == BACKEND and "tensorflow" not in config["versions"]


def test_two_folds_and_their_ensemble_csv(workdir, road_dir):
    result = cli("--data-dir", road_dir, *TINY, "--folds", "2", "--tta", "1", "--run-name", "cv")
    assert result.exit_code == 0, result.output
    assert "out-of-fold report" in result.output
    ensemble = cli("--submit", "--from-run", "logs/cv", "--run-name", "ens")
    assert ensemble.exit_code == 0, ensemble.output
    lines = (road_dir / "submit_output/ens/submission.csv").read_text().splitlines()
    assert lines[0] == "id,prediction" and len(lines) == 1 + 2 * 16


def final_weights(run):
    import keras
    state = json.loads((run / "checkpoint/state.json").read_text())
    return keras.models.load_model(run / "checkpoint" / state["file"]).get_weights()


def test_a_run_stopped_mid_epoch_resumes_exactly(workdir, road_dir, monkeypatch):
    from train_cil import RunCheckpoint
    args = ["--data-dir", road_dir, *TINY, "--epochs", "3", "--count", "5", "--patience", "0",
            "--tta", "1"]
    assert cli(*args, "--run-name", "whole").exit_code == 0
    keep = RunCheckpoint.on_train_batch_end
    batches = []

    def stopped_in_epoch_two(self, batch, logs=None):
        batches.append(batch)
        if len(batches) == 10:                # 8 steps per epoch: step 2 of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)
        keep(self, batch, logs)

    with monkeypatch.context() as patch:
        patch.setattr(RunCheckpoint, "on_train_batch_end", stopped_in_epoch_two)
        stopped = cli(*args, "--run-name", "stopped")
    assert stopped.exit_code == 128 + signal.SIGTERM, stopped.output
    state = json.loads(Path("logs/stopped/checkpoint/state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = cli("--resume", "logs/stopped")
    assert resumed.exit_code == 0, resumed.output
    for a, b in zip(final_weights(Path("logs/whole")), final_weights(Path("logs/stopped"))):
        assert np.allclose(a, b, atol=1e-4)


def test_a_local_grid_runs_its_jobs_under_this_backend(tmp_path, road_dir):
    from click.testing import CliRunner

    import grid_cil
    import jobs_cil
    (tmp_path / "g.json").write_text(json.dumps({
        "data-dir": str(road_dir), "filters": [2], "depth": 2, "crop": 32, "epochs": 1,
        "count": 1, "batch-size": 4, "valid-fraction": 0.25, "tta": 1}))
    result = CliRunner().invoke(grid_cil.main, [str(tmp_path / "g.json"), "--jobs-dir",
                                                str(tmp_path / "jobs")])
    assert result.exit_code == 0, result.output
    job = tmp_path / "jobs/g/filters-2"
    assert jobs_cil.job_status(job) == "finished", (job / "stderr").read_text()
    assert f"({BACKEND})" in (job / "stdout").read_text()
