"""Models that travel: a SavedModel export that loads and predicts in a process with only
TensorFlow, none of this project's code on its path."""

import json
import subprocess
import sys

import numpy as np
import pytest

from model_cil import build_unet
from predict_cil import predict_probabilities
from tests.conftest import cli

LOAD_AND_PREDICT = """
import json, sys
import numpy as np
import tensorflow as tf
assert not any("cil" in name for name in sys.modules), "project code was imported"
model = tf.saved_model.load(sys.argv[1])
image = np.load(sys.argv[2])
out = {}
out["float"] = model.signatures["serving_default"](images=tf.constant(image[None], tf.float32))
out["uint8"] = model.signatures["serving_uint8"](images=tf.constant(image[None]))
np.save(sys.argv[3], np.stack([out[k]["probabilities"].numpy()[0] for k in ("float", "uint8")]))
"""


def test_an_exported_model_predicts_alone_like_the_keras_model(workdir, tmp_path):
    model = build_unet(filters=4, depth=3, classes=2)
    model.save(workdir / "m.keras")
    result = cli("--weights", "m.keras", "--export", "--run-name", "e")
    assert result.exit_code == 0, result.output
    export = workdir / "logs/e/export"
    assert (export / "saved_model.pb").is_file() and "exported a SavedModel" in result.output
    image = np.random.default_rng(0).integers(0, 256, (37, 45, 3)).astype(np.uint8)  # not /8
    np.save(tmp_path / "image.npy", image)
    alone = tmp_path / "alone"
    alone.mkdir()
    # -I: no user site, no current folder, no PYTHONPATH: only the installed packages
    done = subprocess.run([sys.executable, "-I", "-c", LOAD_AND_PREDICT, str(export),
                           str(tmp_path / "image.npy"), str(tmp_path / "out.npy")], cwd=alone,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    float_out, uint8_out = np.load(tmp_path / "out.npy")
    expected = predict_probabilities(model, image)
    assert float_out.shape == (37, 45, 2)
    assert np.allclose(float_out, expected, atol=1e-5)
    assert np.allclose(uint8_out, expected, atol=1e-5)
    config = json.loads((workdir / "logs/e/config.json").read_text())
    assert config["settings"]["export"] is True


def test_an_export_never_replaces_an_earlier_one(tmp_path):
    from data_cil import InputError
    from predict_cil import export_saved_model
    (tmp_path / "export").mkdir()
    with pytest.raises(InputError, match="export: exists"):
        export_saved_model(build_unet(filters=2, depth=1), tmp_path / "export")
