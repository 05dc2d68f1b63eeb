"""Schedules and optimizers, several replicas, and runs that survive kills and signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from losses_cil import SegmentationLoss, SegmentationMetric, training_metrics
from main_cil import main
from model_cil import build_unet
from options_cil import NO_PERTURBATION
from pipeline_cil import training_dataset
from tests.conftest import TINY, checkpoint_state, cli, needs_tensorflow, resolved
from train_cil import RunCheckpoint, learning_rate, run_callbacks

REPO = Path(__file__).resolve().parents[1]


def two_cpus():
    import tensorflow as tf
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@needs_tensorflow
@pytest.mark.slow
def test_two_replicas_both_get_data_and_stay_equal():
    strategy = two_cpus()
    images = [np.random.default_rng(s).integers(0, 256, (32, 32, 3)).astype(np.uint8)
              for s in range(4)]
    masks = [(image[..., 0] > 127).astype(np.uint8) for image in images]
    stream = training_dataset(images, masks, batch_size=4, aug=NO_PERTURBATION, seed=0)
    first = next(iter(strategy.experimental_distribute_dataset(stream)))
    assert [x.shape[0] for x in strategy.experimental_local_results(first[0])] == [2, 2]
    with strategy.scope():
        model = build_unet(filters=4, depth=2)
        model.compile(keras.optimizers.Adam(1e-2), SegmentationLoss(),
                      metrics=training_metrics(1))
    start = [w.numpy().copy() for w in model.trainable_weights]
    model.fit(stream, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
    for weight, before in zip(model.trainable_weights, start):
        replicas = [v.numpy() for v in weight.value.values]
        assert np.array_equal(replicas[0], replicas[1])
        assert not np.array_equal(replicas[0], before)


@needs_tensorflow
def test_metrics_sum_their_counts_over_replicas():
    import tensorflow as tf
    strategy = two_cpus()
    rng = np.random.default_rng(0)
    truth = (rng.random((4, 16, 16, 1)) < 0.4).astype(np.float32)
    prob = rng.random((4, 16, 16, 1)).astype(np.float32)
    with strategy.scope():
        shared = SegmentationMetric("f1")
    data = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((truth, prob)).batch(4))
    for batch in data:
        strategy.run(shared.update_state, args=batch)
    alone = SegmentationMetric("f1")
    alone.update_state(truth, prob)
    assert float(shared.result()) == pytest.approx(float(alone.result()), abs=1e-7)


def final_weights(run):
    state = json.loads((run / "checkpoint/state.json").read_text())
    return keras.models.load_model(run / "checkpoint" / state["file"]).get_weights()


RESUMABLE = [*TINY, "--epochs", "3", "--patience", "0", "--count", "3"]   # 5 steps per epoch


@pytest.mark.slow
def test_resume_after_a_kill_ends_with_the_uninterrupted_weights(workdir, road_dir, monkeypatch):
    assert cli("--data-dir", road_dir, *RESUMABLE, "--run-name", "whole").exit_code == 0
    keep_epoch_end = RunCheckpoint.on_epoch_end

    def killed_after_epoch_two(self, epoch, logs=None):
        keep_epoch_end(self, epoch, logs)
        if epoch == 1:
            raise SystemExit(137)              # like SIGKILL: no cleanup, no last words

    with monkeypatch.context() as patch:
        patch.setattr(RunCheckpoint, "on_epoch_end", killed_after_epoch_two)
        assert cli("--data-dir", road_dir, *RESUMABLE, "--run-name", "killed").exit_code == 137
    result = cli("--resume", "logs/killed")
    assert result.exit_code == 0, result.output
    assert "Epoch 3/3" in result.output and "Epoch 2/3" not in result.output
    for a, b in zip(final_weights(Path("logs/whole")), final_weights(Path("logs/killed"))):
        assert np.allclose(a, b, atol=1e-5)
    history = Path("logs/killed/history.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["0", "1", "2"]


# (signal, optimizer step it arrives after, a second signal sent while the checkpoint is being
# written or None, the checkpoint's (epochs done, step into the next))
STOPS = {"SIGTERM mid-epoch": (signal.SIGTERM, 7, None, (1, 2)),   # epoch 2, step 2 of 5
         "SIGTERM at the last batch": (signal.SIGTERM, 10, None, (2, 0)),  # the epoch's end first
         "SIGUSR2, LSF's run limit": (signal.SIGUSR2, 7, None, (1, 2)),
         "bkill: SIGINT, then SIGTERM while saving": (signal.SIGINT, 7, signal.SIGTERM, (1, 2))}


@pytest.mark.slow
@pytest.mark.parametrize("when", STOPS)
def test_a_stop_signal_saves_a_checkpoint_that_resumes_exactly(workdir, road_dir, monkeypatch,
                                                               when):
    assert cli("--data-dir", road_dir, *RESUMABLE, "--run-name", "whole").exit_code == 0
    keep_batch_end, keep_save = RunCheckpoint.on_train_batch_end, RunCheckpoint._save_state
    number, signal_step, second, checkpoint = STOPS[when]
    saved = []

    def signalled_in_epoch_two(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == signal_step:
            os.kill(os.getpid(), number)
        keep_batch_end(self, batch, logs)

    def saving(self, epoch, step):
        if second and epoch == checkpoint[0] and step == checkpoint[1]:
            os.kill(os.getpid(), second)            # arrives while this checkpoint is written
        keep_save(self, epoch, step)
        saved.append((epoch, step))

    with monkeypatch.context() as patch:
        patch.setattr(RunCheckpoint, "on_train_batch_end", signalled_in_epoch_two)
        patch.setattr(RunCheckpoint, "_save_state", saving)
        result = cli("--data-dir", road_dir, *RESUMABLE, "--run-name", "stopped")
    assert result.exit_code == 128 + number, result.output
    assert f"stopped by {signal.Signals(number).name} during epoch 2" in result.output
    assert "Continue with: python main_cil.py --resume logs/stopped" in result.output
    assert saved[-1] == checkpoint                      # the save the second signal met ended
    state = json.loads(Path("logs/stopped/checkpoint/state.json").read_text())
    assert (state["epoch"], state["step"]) == checkpoint
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL     # handlers given back
    result = cli("--resume", "logs/stopped")
    assert result.exit_code == 0, result.output
    assert f"resuming from the checkpoint after epoch {checkpoint[0]}" in result.output
    for a, b in zip(final_weights(Path("logs/whole")), final_weights(Path("logs/stopped"))):
        assert np.allclose(a, b, atol=1e-5)
    epochs = [row.split(",")[0] for row in
              Path("logs/stopped/history.csv").read_text().splitlines()[1:]]
    assert epochs == [row.split(",")[0] for row in
                      Path("logs/whole/history.csv").read_text().splitlines()[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("signals", [(signal.SIGTERM,), (signal.SIGUSR2,),
                                     (signal.SIGINT, signal.SIGTERM)],
                         ids=["scancel", "LSF run limit", "bkill"])
def test_a_real_stop_signal_to_the_process_exits_with_a_resumable_checkpoint(tmp_path, road_dir,
                                                                            signals):
    command = [sys.executable, str(REPO / "main_cil.py"), "--data-dir", str(road_dir), *TINY,
               "--epochs", "100", "--patience", "0", "--run-name", "job"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    state = tmp_path / "logs/job/checkpoint/state.json"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    for number in signals:              # bkill's second signal follows at once here, not 10 s
        process.send_signal(number)
        time.sleep(0.05)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signals[0], output
    assert "checkpoint saved. Continue with: python main_cil.py --resume logs/job" in output
    assert "Traceback" not in output
    saved = json.loads(state.read_text())
    assert (tmp_path / "logs/job/checkpoint" / saved["file"]).is_file()


@pytest.mark.slow
def test_a_nan_loss_stops_and_keeps_the_last_good_checkpoint(workdir, road_dir, monkeypatch):
    keep_batch_end = RunCheckpoint.on_train_batch_end

    def nan_in_epoch_two(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) > 5:
            logs = dict(logs, loss=float("nan"))
        keep_batch_end(self, batch, logs)

    monkeypatch.setattr(RunCheckpoint, "on_train_batch_end", nan_in_epoch_two)
    result = cli("--data-dir", road_dir, *RESUMABLE, "--run-name", "nan")
    assert result.exit_code == 3
    assert "the loss became nan in epoch 2" in result.output and "lower --lr" in result.output
    state = json.loads(Path("logs/nan/checkpoint/state.json").read_text())
    assert (state["epoch"], state["step"]) == (1, 0)


def test_resume_refuses_a_folder_without_checkpoint(workdir, tmp_path):
    (tmp_path / "logs/empty").mkdir(parents=True)
    (tmp_path / "logs/empty/config.json").write_text(json.dumps(
        {"settings": {**resolved(), "data_dir": "x", "palette": None, "run_name": "empty"}},
        default=str))
    result = CliRunner().invoke(main, ["--resume", "logs/empty"])
    assert result.exit_code == 2 and "no checkpoint to resume from" in result.output


def test_cosine_and_plateau_schedules():
    rate = learning_rate("cosine", 1e-3, total_steps=100)
    assert [float(rate(step)) for step in (0, 50, 100)] == pytest.approx([1e-3, 5e-4, 0.0],
                                                                         abs=1e-9)
    assert learning_rate("plateau", 1e-3) == 1e-3
    checkpoint = RunCheckpoint("unused", monitor="val_f1", patience=0, steps_per_epoch=1)
    plateau = [c for c in run_callbacks("unused", checkpoint=checkpoint, epochs=3,
                                        schedule="plateau")
               if isinstance(c, keras.callbacks.ReduceLROnPlateau)]
    assert len(plateau) == 1 and plateau[0].monitor == "val_f1" and plateau[0].mode == "max"


def test_resume_keeps_the_runs_own_folder_for_every_later_hint(workdir, tmp_path):
    run_dir = tmp_path / "elsewhere/r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(
        {"settings": {**resolved(), "data_dir": "x", "palette": None, "run_name": "r"}},
        default=str))
    checkpoint_state(run_dir)
    settings = resolved("--resume", run_dir)
    assert Path(settings["logs_dir"]) / settings["run_name"] == run_dir
