"""TensorBoard files without TensorFlow: per-epoch scalars, image panels and the HParams entry,
written with the tensorboard package's own event writer, so every Keras backend leaves the same
files and `tensorboard --logdir logs` shows them (keras.callbacks.TensorBoard and tf.summary
need TensorFlow).

    <run>/train/       epoch_loss, epoch_f1, ... of the training batches
    <run>/validation/  the same names, of the validation images
    <run>/images/      validation: image | truth | prediction, every few epochs and the last
    <run>/             the HParams entry: the learned settings and the final metrics
"""

import time
from pathlib import Path

import imageio.v3
import numpy as np
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams_summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

TRAIN_DIR, VALIDATION_DIR = "train", "validation"   # the folders Keras' own callback used


class EventWriter:
    """One event file in `folder`; summaries are written at a step (an epoch)."""

    def __init__(self, folder):
        self.writer = EventFileWriter(str(folder))

    def write(self, step, values):
        """Write Summary.Value protos at `step`, then flush: a run killed later keeps them."""
        self.write_summary(step, summary_pb2.Summary(value=list(values)))

    def write_summary(self, step, summary):
        """Write a whole Summary proto (HParams' come whole) at `step`, then flush."""
        self.writer.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                              summary=summary))
        self.writer.flush()

    def close(self):
        self.writer.close()


def scalar(tag, value):
    return summary_pb2.Summary.Value(tag=tag, simple_value=float(value))


def png_image(tag, pixels):
    """An image value of (H, W, 3) floats in 0..1, PNG-encoded as TensorBoard shows them."""
    pixels = np.round(np.clip(pixels, 0, 1) * 255).astype(np.uint8)
    encoded = imageio.v3.imwrite("<bytes>", pixels, extension=".png")
    image = summary_pb2.Summary.Image(height=pixels.shape[0], width=pixels.shape[1],
                                      colorspace=pixels.shape[2], encoded_image_string=encoded)
    return summary_pb2.Summary.Value(tag=tag, image=image)


def epoch_scalars(logs):
    """{folder: [scalar values]} of an epoch's Keras logs, named as Keras' TensorBoard callback
    named them: loss -> train/epoch_loss, val_f1 -> validation/epoch_f1."""
    values = {TRAIN_DIR: [], VALIDATION_DIR: []}
    for name, value in (logs or {}).items():
        folder = VALIDATION_DIR if name.startswith("val_") else TRAIN_DIR
        values[folder].append(scalar(f"epoch_{name.removeprefix('val_')}", value))
    return values


def hparam_value(value):
    """A setting as HParams shows it: numbers, text and booleans as they are, others as text."""
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return " ".join(f"{key}={hparam_value(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ",".join(str(item) for item in value)
    return str(value)


def log_hparams(folder, settings, names, metrics):
    """The run's settings `names` and its final metrics in the run folder, so `tensorboard
    --logdir` over several runs (a grid's folder) shows them as one sortable table."""
    hparams = {name: hparam_value(settings[name]) for name in names
               if settings.get(name) is not None}
    writer = EventWriter(Path(folder))
    writer.write_summary(0, hparams_summary.hparams_pb(hparams, trial_id=Path(folder).name))
    writer.write(0, [scalar(f"final/{name}", value) for name, value in metrics.items()])
    writer.close()
