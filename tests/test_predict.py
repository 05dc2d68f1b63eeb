"""Full-size prediction, test-time augmentation and threshold tuning."""

import keras
import numpy as np
import pytest

from model_cil import build_unet
from predict_cil import (DIHEDRAL, dihedral, overlay, pad_to_multiple, predict_probabilities,
                         tune_threshold, undo_dihedral)


def pixelwise_model():
    """A model whose output at a pixel depends on that pixel only: it commutes with every flip
    and turn, so TTA must give back exactly its plain prediction."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 1, activation="relu")(x)
    outputs = keras.layers.Conv2D(1, 1, activation="sigmoid")(keras.layers.MaxPooling2D(1)(x))
    return keras.Model(inputs, outputs)


def test_an_image_of_any_size_comes_back_at_its_size():
    model = build_unet(filters=2, depth=3)
    image = np.random.default_rng(0).integers(0, 256, (37, 50, 3)).astype(np.uint8)
    assert predict_probabilities(model, image).shape == (37, 50, 1)
    assert pad_to_multiple(image, 8).shape == (40, 56, 3)


@pytest.mark.parametrize("tta", [2, 4, 8])
def test_tta_of_an_equivariant_model_equals_its_plain_prediction(tta):
    model = pixelwise_model()
    image = np.random.default_rng(1).integers(0, 256, (24, 24, 3)).astype(np.uint8)
    assert np.allclose(predict_probabilities(model, image, tta=tta),
                       predict_probabilities(model, image), atol=1e-6)


def test_the_eight_symmetries_are_distinct_and_each_is_undone():
    x = np.arange(12).reshape(3, 4)
    variants = {(dihedral(x, *t).shape, dihedral(x, *t).tobytes()) for t in DIHEDRAL}
    assert len(variants) == 8
    for turns, mirror in DIHEDRAL:
        assert np.array_equal(undo_dihedral(dihedral(x, turns, mirror), turns, mirror), x)


def test_threshold_tuning_finds_the_threshold_that_separates_the_classes():
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 1
    prob = np.where(mask == 1, 0.35, 0.2).astype(np.float32)[..., None]
    tuned = tune_threshold([mask], [prob])
    assert 0.2 < tuned["threshold"] <= 0.35
    assert tuned["patch_f1"] == 1.0 and tuned["patch_f1_at_0_5"] == 0.0


def test_overlay_paints_hits_misses_and_inventions():
    image = np.full((1, 3, 3), 100, np.uint8)
    out = overlay(image, np.array([[1, 1, 0]]), np.array([[1, 0, 1]]), classes=1)
    assert out[0, 0].tolist() == [50, 150, 50]          # found: green
    assert out[0, 1].tolist() == [50, 95, 177]          # missed: blue
    assert out[0, 2].tolist() == [165, 50, 50]          # invented: red
