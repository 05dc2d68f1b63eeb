"""Models that travel: a SavedModel export that loads and predicts in a process with only
TensorFlow, none of this project's code on its path."""

import json

import numpy as np
import pytest

from model_cil import build_model, build_unet
from predict_cil import predict_probabilities
from tests.conftest import cli, needs_tensorflow, predicted_alone, run_alone

pytestmark = needs_tensorflow           # a SavedModel is TensorFlow's


def test_an_exported_model_predicts_alone_like_the_keras_model(workdir, tmp_path):
    model = build_unet(filters=4, depth=3, classes=2)
    model.save(workdir / "m.keras")
    result = cli("--weights", "m.keras", "--export", "--run-name", "e")
    assert result.exit_code == 0, result.output
    export = workdir / "logs/e/export"
    assert (export / "saved_model.pb").is_file() and "exported a SavedModel" in result.output
    image = np.random.default_rng(0).integers(0, 256, (37, 45, 3)).astype(np.uint8)  # not /8
    float_out, uint8_out = predicted_alone(export, image, tmp_path)
    expected = predict_probabilities(model, image)
    assert float_out.shape == (37, 45, 2)
    assert np.allclose(float_out, expected, atol=1e-5)
    assert np.allclose(uint8_out, expected, atol=1e-5)
    config = json.loads((workdir / "logs/e/config.json").read_text())
    assert config["settings"]["export"] is True


def test_repeated_weights_export_the_mean_of_the_models(workdir, tmp_path):
    """--weights A --weights B predicts with the mean of A and B; --export writes that mean,
    not A alone, with each model's input multiple respected (4 and 8 here)."""
    first, second = build_unet(filters=4, depth=2), build_unet(filters=3, depth=3)
    first.save(workdir / "a.keras")
    second.save(workdir / "b.keras")
    result = cli("--weights", "a.keras", "--weights", "b.keras", "--export", "--run-name", "e")
    assert result.exit_code == 0, result.output
    assert "exported a SavedModel (the mean of 2 models)" in result.output
    image = np.random.default_rng(1).integers(0, 256, (20, 28, 3)).astype(np.uint8)  # not /8
    float_out, _ = predicted_alone(workdir / "logs/e/export", image, tmp_path)
    a, b = (predict_probabilities(model, image) for model in (first, second))
    assert not np.allclose(a, b, atol=1e-3)
    assert np.allclose(float_out, (a + b) / 2, atol=1e-5)


RUN_ONNX = """
import sys
import numpy as np
import onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1])
image = np.load(sys.argv[2]).astype(np.float32)
np.save(sys.argv[3], session.run(["probabilities"], {"images": image[None]})[0][0])
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
"""


# EfficientNet captures constants (its input normalisation) that a naive conversion turns into
# inputs the ONNX model asks for
@pytest.mark.parametrize("encoder", [None, pytest.param("efficientnetb0",
                                                     marks=pytest.mark.slow)])
def test_an_onnx_export_predicts_in_onnx_runtime_like_the_keras_model(workdir, tmp_path,
                                                                      encoder):
    pytest.importorskip("tf2onnx", reason="the ONNX extra: pip install -r requirements-onnx.txt")
    pytest.importorskip("onnxruntime", reason="the ONNX extra: pip install -r "
                                              "requirements-onnx.txt")
    model = build_model("unet", encoder=encoder, filters=4, depth=3)
    model.save(workdir / "m.keras")
    result = cli("--weights", "m.keras", "--export", "--run-name", "e")
    assert result.exit_code == 0, result.output
    onnx = workdir / "logs/e/export/model.onnx"
    assert "for ONNX Runtime: logs/e/export/model.onnx" in result.output
    image = np.random.default_rng(1).integers(0, 256, (50, 33, 3)).astype(np.uint8)  # not /32
    out = run_alone(RUN_ONNX, onnx, image, tmp_path)
    assert out.shape == (50, 33, 1)
    assert np.allclose(out, predict_probabilities(model, image), atol=1e-4)


def test_a_second_export_of_a_run_replaces_the_first_whole(tmp_path):
    """A resumed run started with --export exports its new best model over the earlier one."""
    import tensorflow as tf

    from export_cil import export_saved_model
    first, second = build_unet(filters=2, depth=1), build_unet(filters=3, depth=1)
    image = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 3)).astype(np.float32)
    for model in (first, second):
        folder, _ = export_saved_model([model], tmp_path / "export")
    loaded = tf.saved_model.load(str(folder)).signatures["serving_default"]
    out = loaded(images=tf.constant(image))["probabilities"].numpy()
    assert np.allclose(out, second.predict_on_batch(image), atol=1e-5)
    assert not np.allclose(out, first.predict_on_batch(image), atol=1e-3)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]      # nothing partial left
