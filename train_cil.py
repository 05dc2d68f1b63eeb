"""Training: optimizers and learning-rate schedules, the callbacks of a run, resumable fitting.

A run folder holds best.keras (the best model on the monitored metric), checkpoint/ (the latest
resumable state: model with optimizer, epoch, step, best value, patience used), history.csv and
the TensorBoard events. Every file is written atomically, so a kill at any moment leaves a run
that `--resume` continues exactly.
"""

import contextlib
import math
import signal
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np

from board_cil import EventWriter, epoch_scalars, png_image
from io_cil import write_atomically, write_text
from model_cil import encoder_layer, save_model
from options_cil import LR_DECAY, LR_DECAY_STEPS, MOMENTUM, OPTIMIZERS, RHO
from render_cil import render_mask
from runs_cil import (STOP_SIGNALS, TrainingDiverged, TrainingInterrupted, path, read_state,
                      write_state)

PLATEAU_FACTOR = 0.5         # `plateau` halves the learning rate ...
PLATEAU_PATIENCE = 5         # ... after this many epochs without improvement
PANEL_IMAGES = 3             # validation images in the TensorBoard panel
PANEL_EVERY = 5              # epochs between two panels
_stop_requested = threading.Event()   # set by a stop signal, read between batches
_stop_signal_number = None


def _constant(lr, **_):
    return lr


def _step(lr, *, decay, decay_steps, **_):
    # Exponential staircase decay, NVIDIA's recipe: lr * decay ** floor(step / decay_steps).
    return keras.optimizers.schedules.ExponentialDecay(lr, decay_steps, decay, staircase=True)


def _cosine(lr, *, total_steps, **_):
    return keras.optimizers.schedules.CosineDecay(lr, total_steps)


SCHEDULES = {"constant": _constant, "step": _step, "cosine": _cosine,   # options_cil.LR_SCHEDULES
             "plateau": _constant}           # ReduceLROnPlateau lowers it during training
class _SlowerEncoder:
    """An optimizer whose steps for the pretrained encoder's variables use the learning rate
    divided by `encoder_lr_scale`. Which variables those are is set by training (set_encoder),
    before the train step is traced; the scale is saved with the optimizer."""

    def __init__(self, *args, encoder_lr_scale=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder_lr_scale = encoder_lr_scale
        self._encoder_keys = set()

    def set_encoder(self, encoder):
        self._encoder_keys = {self._var_key(variable) for variable in encoder.trainable_weights}

    def update_step(self, gradient, variable, learning_rate):
        if self._var_key(variable) in self._encoder_keys:
            learning_rate = learning_rate / self.encoder_lr_scale
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "encoder_lr_scale": self.encoder_lr_scale}


@keras.saving.register_keras_serializable(package="cil")
class EncoderAdam(_SlowerEncoder, keras.optimizers.Adam):
    """Adam with a slower pretrained encoder."""


@keras.saving.register_keras_serializable(package="cil")
class EncoderRMSprop(_SlowerEncoder, keras.optimizers.RMSprop):
    """RMSprop with a slower pretrained encoder."""


@keras.saving.register_keras_serializable(package="cil")
class EncoderSGD(_SlowerEncoder, keras.optimizers.SGD):
    """SGD with a slower pretrained encoder."""


# options_cil.OPTIMIZERS -> (plain class, class with a slower encoder)
OPTIMIZER_CLASSES = {"adam": (keras.optimizers.Adam, EncoderAdam),
                     "rmsprop": (keras.optimizers.RMSprop, EncoderRMSprop),
                     "sgd": (keras.optimizers.SGD, EncoderSGD)}
OPTIMIZER_OPTIONS = {"adam": (), "rmsprop": ("rho", "momentum", "centered"), "sgd": ("momentum",)}


def learning_rate(schedule, lr, *, decay=LR_DECAY, decay_steps=LR_DECAY_STEPS, total_steps=None):
    """A float (constant, plateau) or a Keras schedule of the optimizer step."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown --lr-schedule {schedule}; choose {', '.join(SCHEDULES)}")
    return SCHEDULES[schedule](lr, decay=decay, decay_steps=decay_steps, total_steps=total_steps)


def make_optimizer(name, rate, *, rho=RHO, momentum=MOMENTUM, centered=False,
                   encoder_lr_scale=None):
    """The optimizer `name`; with `encoder_lr_scale`, one that steps a pretrained encoder's
    variables that many times slower."""
    if name not in OPTIMIZER_CLASSES:
        raise ValueError(f"unknown --optimizer {name}; choose {', '.join(OPTIMIZERS)}")
    given = dict(rho=rho, momentum=momentum, centered=centered)
    options = {key: given[key] for key in OPTIMIZER_OPTIONS[name]}
    plain, slower = OPTIMIZER_CLASSES[name]
    if encoder_lr_scale is None:
        return plain(rate, **options)
    return slower(rate, encoder_lr_scale=encoder_lr_scale, **options)


@contextlib.contextmanager
def trainable_for_saving(model):
    """While inside, a frozen encoder counts as trainable: a saved model then reloads with an
    optimizer that has state for every variable, whatever phase it was saved in."""
    encoder = encoder_layer(model)
    frozen = encoder is not None and not encoder.trainable
    if frozen:
        encoder.trainable = True
    try:
        yield
    finally:
        if frozen:
            encoder.trainable = False


def saved(model, *, training_state):
    """A writer of `model` for write_atomically: a checkpoint (`training_state`) or the network
    alone (best.keras); see trainable_for_saving and model_cil.save_model."""
    def write(path):
        with trainable_for_saving(model):
            save_model(model, path, training_state=training_state)
    return write


@contextlib.contextmanager
def stop_on_signals():
    """While inside, each of STOP_SIGNALS asks training to stop after the current batch and save
    its checkpoint. Later signals change nothing: schedulers send several (bkill: SIGINT, then
    SIGTERM 10 s later; a job's wrapper forwards what the whole job gets), and none may cut short
    the saving the first one started; SIGKILL ends a process at once. The previous handlers come
    back on leaving."""
    global _stop_signal_number
    _stop_requested.clear()
    _stop_signal_number = None

    def request_stop(number, frame):
        global _stop_signal_number
        if not _stop_requested.is_set():
            _stop_signal_number = number
            _stop_requested.set()
            print(f"\n{signal.Signals(number).name}: stopping after this batch, then saving a "
                  "checkpoint", file=sys.stderr, flush=True)

    previous = {number: signal.signal(number, request_stop) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def synced(model):
    """`model` with its variables current: under JAX, fit keeps them outside the model until
    an epoch ends (Keras' JAX trainer), and a checkpoint within an epoch needs them."""
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()
    return model


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
        self._epoch, self._epoch_start = None, None

    def summary(self):
        """What metrics.json says about training: best epoch and value, epochs, time."""
        seconds = self.epoch_seconds
        return dict(best_epoch=self.best_epoch, best_value=self.best, monitor=self.monitor,
                    epochs_run=len(seconds), stopped_early=self.stopped_early,
                    seconds_per_epoch=round(float(np.median(seconds)), 2) if seconds else None,
                    train_seconds=round(sum(seconds), 1))

    def _improved(self, value):
        return self.best is None or value > self.best

    def _save_state(self, epoch, step):
        """Model with optimizer first, then the state naming it: a kill in between leaves the
        previous pair intact."""
        folder = path(self.run_dir, "checkpoint_dir")
        folder.mkdir(exist_ok=True)
        name = f"model-{epoch:04d}-{step:06d}.keras"
        write_atomically(folder / name, saved(self.model, training_state=True))
        previous = read_state(self.run_dir)
        write_state(self.run_dir, dict(
            file=name, epoch=epoch, step=step, best=self.best, best_epoch=self.best_epoch,
            wait=self.wait, monitor=self.monitor, epoch_seconds=self.epoch_seconds))
        if previous and previous["file"] != name:
            (folder / previous["file"]).unlink(missing_ok=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch, self._epoch_start = epoch, time.perf_counter()

    def _interrupted(self):
        """What reports the stop request: its signal and the epoch it arrived in."""
        return TrainingInterrupted(signal.Signals(_stop_signal_number).name, _stop_signal_number,
                                   self._epoch + 1, self.run_dir)

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            raise TrainingDiverged(f"the loss became {loss} in epoch {self._epoch + 1}",
                                   self.run_dir)
        if not _stop_requested.is_set():
            return
        synced(self.model)
        step = int(self.model.optimizer.iterations.numpy()) - self._epoch * self.steps_per_epoch
        # after an epoch's last batch, the stop waits for its end (validation, history row,
        # checkpoint): a checkpoint there would skip what the epoch's end writes
        if step < self.steps_per_epoch:
            self._save_state(self._epoch, step)
            raise self._interrupted()

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
            write_atomically(path(self.run_dir, "best_model"), saved(self.model,
                                                                     training_state=False))
        else:
            self.wait += 1
            if self.patience and self.wait >= self.patience:
                self.stopped_early = True
                self.model.stop_training = True
        self._save_state(epoch + 1, 0)
        if _stop_requested.is_set() and epoch + 1 < self.params["epochs"]:
            raise self._interrupted()


class BoardScalars(keras.callbacks.Callback):
    """Every epoch's metrics as TensorBoard scalars in <run>/train and <run>/validation, as
    Keras' TensorBoard callback named them, under every backend (board_cil)."""

    def __init__(self, run_dir):
        super().__init__()
        self.run_dir = Path(run_dir)
        self.writers = {}

    def on_epoch_end(self, epoch, logs=None):
        for folder, values in epoch_scalars(logs).items():
            if values:
                if folder not in self.writers:
                    self.writers[folder] = EventWriter(self.run_dir / folder)
                self.writers[folder].write(epoch, values)


class ImagePanel(keras.callbacks.Callback):
    """A TensorBoard image of validation images, image | truth | prediction, every few epochs
    and at the run's last epoch (its planned last, or the one early stopping ends on)."""

    def __init__(self, run_dir, images, masks, classes, *, epochs, every=PANEL_EVERY):
        super().__init__()
        self.writer = EventWriter(path(run_dir, "panels"))
        self.images, self.masks, self.classes = images, masks, classes
        self.epochs, self.every = epochs, every
        self._unwritten = None        # the last epoch ended, when it has no panel yet

    def on_epoch_end(self, epoch, logs=None):
        self._unwritten = epoch + 1
        if (epoch + 1) % self.every == 0 or epoch + 1 == self.epochs:
            self.write(epoch + 1)

    def on_train_end(self, logs=None):
        if self._unwritten is not None and self.model.stop_training:     # stopped early
            self.write(self._unwritten)

    def write(self, epoch):
        probabilities = np.asarray(self.model.predict_on_batch(
            np.stack(self.images).astype(np.float32)))
        self.writer.write(epoch, [
            png_image(f"validation: image | truth | prediction/{index}",
                      np.concatenate([image / 255, render_mask(mask, self.classes) / 255,
                                      render_mask(prob, self.classes) / 255], axis=1))
            for index, (image, mask, prob) in enumerate(zip(self.images, self.masks,
                                                            probabilities))])
        self._unwritten = None


class EpochLine(keras.callbacks.Callback):
    """One line per epoch with its time and metrics, flushed at once: what a job's log file gets
    instead of Keras' progress bar, whose carriage returns and backspaces fill it. Epochs count
    to the run's `epochs`, also in a resumed or frozen phase."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        # loss first, then the metrics, then the same for validation
        names = sorted(logs, key=lambda n: (n.startswith("val_"), n.removeprefix("val_") != "loss",
                                            n))
        metrics = " - ".join(f"{name} {float(logs[name]):.4f}" for name in names)
        print(f"Epoch {epoch + 1}/{self.epochs} - "
              f"{time.perf_counter() - self._start:.1f} s - {metrics}", flush=True)


class RunProgressBar(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, its epochs counted to the run's `epochs` (Keras counts to the end of
    each fit call: a resumed or frozen phase would show 'Epoch 10/10')."""

    def __init__(self, epochs):
        super().__init__()
        self.run_epochs = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.run_epochs


def progress_kind(verbose):
    """How training shows its progress for --verbose auto|0|1|2: "bar" (Keras' progress bar),
    "lines" (one per epoch) or None; auto is the bar on a terminal, lines in a log file."""
    if verbose == "auto":
        verbose = "1" if sys.stdout.isatty() else "2"
    return {"1": "bar", "2": "lines"}.get(verbose)


def run_callbacks(run_dir, *, checkpoint, epochs, panel=None, schedule="constant",
                  progress=None):
    """The run's callbacks for `epochs` in all, with the `progress` of progress_kind,
    RunCheckpoint last: a checkpoint then holds everything the epoch changed (history row,
    learning rate), and a resume trims history rows it redoes."""
    callbacks = [keras.callbacks.CSVLogger(str(path(run_dir, "history")), append=True),
                 BoardScalars(run_dir)]
    if progress == "bar":
        callbacks.append(RunProgressBar(epochs))
    elif progress == "lines":
        callbacks.append(EpochLine(epochs))
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
    history = path(run_dir, "history")
    if history.is_file():
        header, *rows = history.read_text().splitlines(keepends=True)
        kept = [row for row in rows if int(row.split(",")[0]) < epochs_done]
        write_text(history, "".join([header, *kept]))


def set_encoder_phase(model, frozen):
    """Freeze or unfreeze the pretrained encoder (batch norm included: a frozen one normalises
    with its moving statistics), tell the optimizer which variables it has, and trace the
    train step again for the variables that now train."""
    encoder = encoder_layer(model)
    if encoder is None:
        return
    encoder.trainable = True
    # mixed float16 wraps the optimizer in a LossScaleOptimizer: the slower one is inside
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if isinstance(optimizer, _SlowerEncoder):
        if not optimizer.built:             # state for every variable, frozen or not
            optimizer.build(model.trainable_variables)
        optimizer.set_encoder(encoder)
    encoder.trainable = not frozen
    model.make_train_function(force=True)


def fit(model, train_data_from, valid_data, *, epochs, steps_per_epoch, callbacks, checkpoint,
        state=None, verbose=1, freeze_epochs=0):
    """Train to `epochs`, continuing from `state` (a read_state dict) when resuming; a
    pretrained encoder stays frozen for the first `freeze_epochs`. `valid_data` is (data,
    batch size for Keras to batch it, or None) as pipeline_cil.validation_batches gives it.

    `train_data_from(step)` returns the training stream starting at that optimizer step. An
    epoch interrupted mid-way is first completed on its own, so epoch boundaries, and with them
    validation, checkpoints and the data order, fall where an uninterrupted run has them; so
    does the end of the frozen epochs.
    """
    epoch, step = (state["epoch"], state["step"]) if state else (0, 0)
    if state:
        trim_history(checkpoint.run_dir, epoch)
    phases = []
    if step:
        phases.append((epoch, epoch + 1, steps_per_epoch - step))
        epoch += 1
    if epoch < freeze_epochs < epochs:
        phases.append((epoch, freeze_epochs, steps_per_epoch))
        epoch = freeze_epochs
    if epoch < epochs:
        phases.append((epoch, epochs, steps_per_epoch))
    for first, last, steps in phases:
        if checkpoint.stopped_early:
            break
        set_encoder_phase(model, frozen=first < freeze_epochs)
        start = int(model.optimizer.iterations.numpy())
        model.fit(train_data_from(start), validation_data=valid_data[0],
                  validation_batch_size=valid_data[1], initial_epoch=first, epochs=last,
                  steps_per_epoch=steps, callbacks=callbacks, shuffle=False, verbose=verbose)
    return checkpoint
