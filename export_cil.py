"""Models that travel without this code: a TensorFlow SavedModel of the model with what
prediction does around it (any image size, uint8 or float pixels), and where tf2onnx is
installed (requirements-onnx.txt) the same as ONNX for ONNX Runtime. TensorFlow only: under
another Keras backend `--export` says so in one line (main_cil.py).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import tensorflow as tf

from io_cil import temporary_name
from model_cil import required_multiple

ONNX_FILE = "model.onnx"      # in the export folder, when tf2onnx is installed
ONNX_OPSET = 17               # run by ONNX Runtime 1.14 (2023) and later
_FLOAT_IMAGES = tf.TensorSpec([None, None, None, 3], tf.float32, "images")


class _Serving(tf.Module):
    """The models with what prediction does around them: images of any size are reflect-padded
    to what each model accepts, predicted, and cropped back; uint8 or float 0..255 pixels in,
    probabilities out, the mean of the models' where there are several (--weights repeated, a
    cross-validated run's folds), as the tool predicts with them."""

    def __init__(self, models):
        super().__init__()
        self.models = list(models)
        self.multiples = [required_multiple(model) for model in self.models]

    def _predict(self, images):
        height, width = tf.shape(images)[1], tf.shape(images)[2]
        images = tf.cast(images, tf.float32)
        probabilities = []
        for model, multiple in zip(self.models, self.multiples):
            # (m - h % m) % m, not -h % m: ONNX's Mod of a negative number keeps its sign
            padding = [[0, 0], [0, (multiple - height % multiple) % multiple],
                       [0, (multiple - width % multiple) % multiple], [0, 0]]
            padded = tf.pad(images, padding, mode="SYMMETRIC")
            probabilities.append(model(padded, training=False)[:, :height, :width, :])
        return {"probabilities": tf.add_n(probabilities) / len(probabilities)}

    @tf.function(input_signature=[_FLOAT_IMAGES])
    def serve_float(self, images):
        return self._predict(images)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, "images")])
    def serve_uint8(self, images):
        return self._predict(images)


def export_saved_model(models, folder):
    """Write `folder` as a TensorFlow SavedModel of the mean of `models` (one or several) that
    loads with `tf.saved_model.load` alone:
    signatures serving_default (float32 pixels 0..255) and serving_uint8, each taking a batch
    (N, H, W, 3) of any H and W and returning {"probabilities": (N, H, W, classes)}. Where
    tf2onnx is installed, serving_default also goes into ONNX_FILE, for ONNX Runtime without
    TensorFlow. Written beside and renamed into place, so a kill leaves no half export; an
    earlier export of the run (a resumed run exports its new best model) is replaced whole.

    Returns (folder, why ONNX_FILE is missing, or None)."""
    folder = Path(folder)
    partial, replaced = temporary_name(folder), temporary_name(folder, "replaced")
    serving = _Serving(models)
    try:
        tf.saved_model.save(serving, str(partial), signatures={
            "serving_default": serving.serve_float.get_concrete_function(),
            "serving_uint8": serving.serve_uint8.get_concrete_function()})
        no_onnx = write_onnx(partial)
        if folder.exists():
            os.replace(folder, replaced)
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(replaced, ignore_errors=True)
    return folder, no_onnx


def write_onnx(saved_model):
    """Convert the SavedModel's serving_default into ONNX_FILE beside it with tf2onnx's
    command line; None when done, else why not. Converting the saved graph, not the live
    function, makes every constant a model captured (EfficientNet's input normalisation) part
    of the ONNX graph instead of an input it asks for."""
    if importlib.util.find_spec("tf2onnx") is None:
        return "tf2onnx is not installed; pip install -r requirements-onnx.txt for one"
    converted = subprocess.run(
        [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(saved_model),
         "--signature_def", "serving_default", "--opset", str(ONNX_OPSET),
         "--output", str(Path(saved_model) / ONNX_FILE)], capture_output=True, text=True)
    if converted.returncode:
        last = (converted.stderr.strip().splitlines() or ["no message"])[-1]
        return f"tf2onnx failed: {last}"
    return None
