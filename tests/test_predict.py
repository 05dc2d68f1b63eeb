"""Full-size prediction: test-time augmentation, tiles, threshold tuning and the pictures."""

from pathlib import Path

import keras
import numpy as np
import pytest

from data_cil import Pair
from model_cil import build_model, build_unet
from predict_cil import (DIHEDRAL, dihedral, ensemble_probabilities, pad_to_multiple, predict_image,
                         predict_probabilities, predict_tiled, tile_window, undo_dihedral)
from render_cil import overlay
from report_cil import read_oof, write_oof
from thresholds_cil import tune_thresholds


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
    tuned = tune_thresholds([mask], [prob])
    assert 0.2 < tuned["threshold"] <= 0.35
    assert tuned["patch_f1"] == 1.0 and tuned["patch_f1_at_defaults"] == 0.0


def test_the_patch_share_is_tuned_too():
    """Road patches hold a fifth of their pixels as confident road: only a patch share below
    0.2 calls them road, the grader's truth (mean above 0.25 of a 0/1 mask) does not move."""
    mask = np.zeros((32, 32), np.uint8)
    mask[:16, :16] = 1                                 # one road patch of four
    prob = np.zeros((32, 32, 1), np.float32)
    prob[:16, :3] = 0.9                                # 48 of its 256 pixels: share 0.1875
    tuned = tune_thresholds([mask], [prob])
    assert tuned["patch_threshold"] < 0.1875 and tuned["patch_f1"] == 1.0
    assert tuned["patch_f1_at_defaults"] == 0.0


def test_thresholds_are_scored_on_folds_they_were_not_tuned_on():
    """Two folds that want different thresholds: fold 0 road at 0.3 over background at 0.2,
    fold 1 road at 0.8 over background at 0.6. Scored with the other fold's thresholds, each
    fails, which tuning on all images (best 0.8: no one threshold fits both) does not show."""
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :] = 1
    low, high = (np.full((16, 16, 1), value, np.float32) for value in (0.3, 0.8))
    empty = np.zeros((16, 16), np.uint8)
    masks, probabilities = [mask, empty, mask, empty], [low, np.full_like(low, 0.2), high,
                                                        np.full_like(low, 0.6)]
    tuned = tune_thresholds(masks, probabilities, groups=[0, 0, 1, 1])
    # fold 0 scored at 0.65 misses its road, fold 1 scored at 0.3 invents one: tp 1, fp 1, fn 1
    assert tuned["patch_f1"] == 0.8 and tuned["patch_f1_unseen"] == 0.5
    assert tuned["applied"] is False                   # no better than 0.5 at the defaults


def test_thresholds_are_applied_when_they_beat_the_defaults_on_unseen_folds():
    road, background = np.ones((16, 16), np.uint8), np.zeros((16, 16), np.uint8)
    low, faint = np.full((16, 16, 1), 0.3, np.float32), np.full((16, 16, 1), 0.1, np.float32)
    tuned = tune_thresholds([road, background] * 2, [low, faint] * 2, groups=[0, 0, 1, 1])
    assert (tuned["patch_f1_at_defaults"], tuned["patch_f1_unseen"]) == (0.0, 1.0)
    assert tuned["applied"] is True and tuned["threshold"] <= 0.3
    assert tune_thresholds([road], [low])["applied"] is False   # no unseen images to judge by


def test_an_ensemble_is_the_mean_of_its_models():
    first, second = pixelwise_model(), pixelwise_model()
    image = np.random.default_rng(2).integers(0, 256, (16, 16, 3)).astype(np.uint8)
    mean = (predict_probabilities(first, image) + predict_probabilities(second, image)) / 2
    assert np.allclose(ensemble_probabilities([first, second], image), mean, atol=1e-6)


def test_out_of_fold_predictions_round_trip_to_1_255(tmp_path):
    pairs = [Pair(Path("a.png"), Path("a.png")), Pair(Path("b.png"), Path("b.png"))]
    masks = [np.eye(4, dtype=np.uint8), np.zeros((4, 6), np.uint8)]
    probabilities = [np.full((4, 4, 1), 0.3, np.float32), np.full((4, 6, 1), 0.91, np.float32)]
    write_oof(tmp_path / "oof.npz", pairs, masks, probabilities)
    names, back_masks, back = read_oof(tmp_path / "oof.npz")
    assert names == ["a.png", "b.png"]
    assert all(np.array_equal(a, b) for a, b in zip(masks, back_masks))
    assert all(np.allclose(a, b, atol=0.5 / 255) for a, b in zip(probabilities, back))


def test_overlay_paints_hits_misses_and_inventions():
    image = np.full((1, 3, 3), 100, np.uint8)
    out = overlay(image, np.array([[1, 1, 0]]), np.array([[1, 0, 1]]), classes=1)
    assert out[0, 0].tolist() == [50, 150, 50]          # found: green
    assert out[0, 1].tolist() == [50, 95, 177]          # missed: blue
    assert out[0, 2].tolist() == [165, 50, 50]          # invented: red


# ---------------------------------------------------------------------------------------------
# Tiles


def sides_seen(model, predict):
    """(what `predict`(model) returns, the sides of every batch the model was given)."""
    seen = []
    original = model.predict_on_batch
    model.predict_on_batch = lambda batch: seen.append(batch.shape[1:3]) or original(batch)
    try:
        return predict(model), seen
    finally:
        model.predict_on_batch = original


def test_the_tile_window_blends_to_a_smooth_partition():
    window = tile_window(32, 8)[..., 0]
    assert window.max() == 1.0 and window[16, 16] == 1.0 and 0 < window[0, 0] < 0.01
    assert np.allclose(window, window.T) and np.allclose(window, window[::-1, ::-1])


def test_tiled_and_whole_predictions_agree_and_tiles_stay_tile_sized():
    """A model that sees about as far as the overlap: tiles blend into the whole prediction."""
    keras.utils.set_random_seed(0)
    model = build_model("unet", filters=4, depth=1)
    image = np.random.default_rng(0).integers(0, 256, (100, 70, 3)).astype(np.uint8)
    tiled, seen = sides_seen(model, lambda m: predict_tiled(m, image, tile=48, overlap=16))
    whole = predict_probabilities(model, image)
    assert tiled.shape == whole.shape == (100, 70, 1)
    assert set(seen) == {(48, 48)} and len(seen) == 3 * 2      # starts 0, 32, 52 and 0, 22
    # a random model: how far it sees past a tile's edge depends on its draw (backends draw
    # differently), so the bound on the worst pixel is loose, the mean tight
    assert np.abs(tiled - whole).mean() < 0.005 and np.abs(tiled - whole).max() < 0.1


def test_a_tile_that_covers_the_image_predicts_it_whole():
    """--tile 100000 on a 40x30 image: one whole-image pass, not a 100000x100000 padded tile."""
    model = build_model("unet", filters=2, depth=2)
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3)).astype(np.uint8)
    covered, seen = sides_seen(model, lambda m: predict_image(m, image, tile=100000, overlap=64))
    assert seen == [(40, 32)]
    assert np.array_equal(covered, predict_probabilities(model, image))
