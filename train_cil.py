"""Training: optimizers and learning-rate schedules, the callbacks of a run, resumable fitting.

A run folder holds best.keras (the best model on the monitored metric), checkpoint/ (the latest
resumable state: model with optimizer, epoch, step, best value, patience used), history.csv and
the TensorBoard events. Every file is written atomically, so a kill at any moment leaves a run
that `--resume` continues exactly.
"""

import contextlib
import json
import math
import signal
import threading
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from data_cil import write_atomically, write_json
from predict_cil import render_mask

OPTIMIZERS = ("adam", "rmsprop", "sgd")
LR_SCHEDULES = ("constant", "step", "cosine", "plateau")
PLATEAU_FACTOR = 0.5         # `plateau` halves the learning rate ...
PLATEAU_PATIENCE = 5         # ... after this many epochs without improvement
PANEL_IMAGES = 3             # validation images in the TensorBoard panel
PANEL_EVERY = 5              # epochs between two panels
CHECKPOINT_DIR = "checkpoint"
HISTORY_FILE = "history.csv"
STATE_FILE = "state.json"

_stop_requested = threading.Event()   # set by SIGINT/SIGTERM, read between batches
_stop_signal_number = None


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived; a resumable checkpoint has been written."""

    def __init__(self, signal_number, epoch):
        super().__init__(f"stopped by {signal.Signals(signal_number).name} during epoch {epoch}")
        self.signal_number = signal_number


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; the last checkpoint is the last good state."""


def learning_rate(schedule, lr, *, decay=0.8, decay_steps=500, total_steps=None):
    """A float (constant, plateau) or a Keras schedule of the optimizer step."""
    if schedule in ("constant", "plateau"):
        return lr
    if schedule == "step":
        # Exponential staircase decay, NVIDIA's recipe: lr * decay ** floor(step / decay_steps).
        return keras.optimizers.schedules.ExponentialDecay(lr, decay_steps, decay, staircase=True)
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(lr, total_steps)
    raise ValueError(f"unknown --lr-schedule {schedule}; choose {', '.join(LR_SCHEDULES)}")


def make_optimizer(name, rate, *, rho=0.9, momentum=0.0, centered=False):
    if name == "adam":
        return keras.optimizers.Adam(rate)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(rate, rho=rho, momentum=momentum, centered=centered)
    if name == "sgd":
        return keras.optimizers.SGD(rate, momentum=momentum)
    raise ValueError(f"unknown --optimizer {name}; choose {', '.join(OPTIMIZERS)}")


@contextlib.contextmanager
def stop_on_signals():
    """While inside, SIGINT (Ctrl-C, bkill) and SIGTERM (scancel, walltime) ask training to stop
    after the current batch; a second signal falls back to the default and ends the process at
    once. The previous handlers come back on leaving."""
    global _stop_signal_number
    _stop_requested.clear()
    _stop_signal_number = None

    def request_stop(number, frame):
        global _stop_signal_number
        _stop_signal_number = number
        _stop_requested.set()
        signal.signal(number, signal.SIG_DFL)

    previous = {number: signal.signal(number, request_stop)
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def read_state(run_dir):
    path = Path(run_dir) / CHECKPOINT_DIR / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


class RunCheckpoint(keras.callbacks.Callback):
    """Best model, early stopping and resumable state of a run, in one place because all three
    share the 'best so far' and must survive a kill together.

    Keras' ModelCheckpoint writes in place (a kill mid-write corrupts it) and EarlyStopping
    forgets its patience on restart, hence this callback. It also stops at once on a stop
    signal or a NaN loss; Keras' TerminateOnNaN would still validate and checkpoint the NaN
    weights at the end of the epoch.
    """

    def __init__(self, run_dir, *, monitor, patience, steps_per_epoch, state=None):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.monitor, self.patience, self.steps_per_epoch = monitor, patience, steps_per_epoch
        state = state or {}
        self.best = state.get("best")
        self.best_epoch = state.get("best_epoch")
        self.wait = state.get("wait", 0)
        self.epoch_seconds = state.get("epoch_seconds", [])
        self.stopped_early = False
        self._epoch_start = None

    def _improved(self, value):
        return self.best is None or value > self.best

    def _save_state(self, epoch, step):
        """Model with optimizer first, then the state naming it: a kill in between leaves the
        previous pair intact."""
        folder = self.run_dir / CHECKPOINT_DIR
        folder.mkdir(exist_ok=True)
        name = f"model-{epoch:04d}-{step:06d}.keras"
        write_atomically(folder / name, self.model.save)
        previous = read_state(self.run_dir)
        write_json(folder / STATE_FILE, dict(
            file=name, epoch=epoch, step=step, best=self.best, best_epoch=self.best_epoch,
            wait=self.wait, monitor=self.monitor, epoch_seconds=self.epoch_seconds))
        if previous and previous["file"] != name:
            (folder / previous["file"]).unlink(missing_ok=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        epoch = int(self.model.optimizer.iterations.numpy()) // self.steps_per_epoch
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the loss became {loss} in epoch {epoch + 1}")
        if _stop_requested.is_set():
            step = int(self.model.optimizer.iterations.numpy()) - epoch * self.steps_per_epoch
            self._save_state(epoch, step)
            raise TrainingInterrupted(_stop_signal_number, epoch + 1)

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(round(time.perf_counter() - self._epoch_start, 2))
        value = (logs or {}).get(self.monitor) if self.monitor else None
        if self.monitor and value is None:
            raise KeyError(f"monitor {self.monitor} is not among the logged metrics "
                           f"{', '.join(sorted(logs or {}))}")
        if self.monitor is None or self._improved(float(value)):
            self.best = None if value is None else float(value)
            self.best_epoch = epoch + 1
            self.wait = 0
            write_atomically(self.run_dir / "best.keras", self.model.save)
        else:
            self.wait += 1
            if self.patience and self.wait >= self.patience:
                self.stopped_early = True
                self.model.stop_training = True
        self._save_state(epoch + 1, 0)


class ImagePanel(keras.callbacks.Callback):
    """Every few epochs, a TensorBoard image of validation images: image | truth | prediction."""

    def __init__(self, run_dir, images, masks, classes, every=PANEL_EVERY):
        super().__init__()
        self.writer = tf.summary.create_file_writer(str(Path(run_dir) / "images"))
        self.images, self.masks, self.classes, self.every = images, masks, classes, every

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        probabilities = self.model.predict_on_batch(np.stack(self.images).astype(np.float32))
        rows = [np.concatenate([image / 255, render_mask(mask, self.classes) / 255,
                                render_mask(prob, self.classes) / 255], axis=1)
                for image, mask, prob in zip(self.images, self.masks, probabilities)]
        with self.writer.as_default():
            tf.summary.image("validation: image | truth | prediction", np.stack(rows),
                             step=epoch + 1, max_outputs=len(rows))


def run_callbacks(run_dir, *, checkpoint, panel=None, schedule="constant"):
    """The run's callbacks, RunCheckpoint last: a checkpoint then holds everything the epoch
    changed (history row, learning rate), and a resume trims history rows it redoes."""
    callbacks = [keras.callbacks.CSVLogger(str(Path(run_dir) / HISTORY_FILE), append=True),
                 keras.callbacks.TensorBoard(str(run_dir), write_graph=False)]
    if panel is not None:
        callbacks.append(panel)
    if schedule == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(
            checkpoint.monitor or "loss", mode="max" if checkpoint.monitor else "min",
            factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE))
    return callbacks + [checkpoint]


def trim_history(run_dir, epochs_done):
    """Drop history rows of epochs a resumed run will redo (a kill can fall between writing
    the row and the checkpoint)."""
    path = Path(run_dir) / HISTORY_FILE
    if path.is_file():
        header, *rows = path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if int(row.split(",")[0]) < epochs_done]
        write_atomically(path, lambda p: p.write_text("".join([header, *kept])))


def fit(model, train_data_from, valid_data, *, epochs, steps_per_epoch, callbacks, checkpoint,
        state=None):
    """Train to `epochs`, continuing from `state` (a read_state dict) when resuming.

    `train_data_from(step)` returns the training stream starting at that optimizer step. An
    epoch interrupted mid-way is first completed on its own, so epoch boundaries, and with them
    validation, checkpoints and the data order, fall where an uninterrupted run has them.
    """
    epoch, step = (state["epoch"], state["step"]) if state else (0, 0)
    if state:
        trim_history(checkpoint.run_dir, epoch)
    phases = []
    if step:
        phases.append((epoch, epoch + 1, steps_per_epoch - step))
        epoch += 1
    if epoch < epochs:
        phases.append((epoch, epochs, steps_per_epoch))
    for first, last, steps in phases:
        if checkpoint.stopped_early:
            break
        start = int(model.optimizer.iterations.numpy())
        model.fit(train_data_from(start), validation_data=valid_data, initial_epoch=first,
                  epochs=last, steps_per_epoch=steps, callbacks=callbacks, shuffle=False,
                  verbose=1)
    return checkpoint
