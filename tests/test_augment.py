"""Paired perturbations: image and mask move together, masks stay binary, runs repeat exactly."""

import numpy as np
import pytest
import tensorflow as tf

from data_cil import InputError
from pipeline_cil import perturb_pair, perturbation_transform, training_dataset
from settings_cil import AUG_NEUTRAL, NO_PERTURBATION, aug_overrides, resolve_aug

EVERYTHING = dict(rotation_range=40, width_shift_range=0.1, height_shift_range=3,
                  zoom_range=0.2, shear_range=10, horizontal_flip=True, vertical_flip=True,
                  quarter_turns=True, fill_mode="reflect")
# Transforms that map pixel centres onto pixel centres, so bilinear equals nearest.
ON_THE_GRID = dict(horizontal_flip=True, vertical_flip=True, quarter_turns=True,
                   width_shift_range=4, height_shift_range=4, fill_mode="reflect")


def blobs(size=48, seed=0):
    """0/1 mask of large rectangles: most pixels are far from an edge."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((size, size), np.uint8)
    for _ in range(4):
        top, left = rng.integers(0, size - 12, 2)
        mask[top:top + rng.integers(6, 14), left:left + rng.integers(6, 14)] = 1
    return mask


def perturbed(image, mask, aug, position, out_size=(32, 32)):
    out_image, out_mask = perturb_pair(image, mask[..., None], tf.constant([7, position], tf.int64),
                                       resolve_aug(aug), out_size)
    return out_image.numpy(), out_mask.numpy()[..., 0]


@pytest.mark.parametrize("position", range(12))
def test_grid_transforms_and_crops_move_image_and_mask_identically(position):
    noise = np.random.default_rng(position).integers(0, 256, (40, 40)).astype(np.uint8)
    image, mask = perturbed(np.dstack([noise] * 3), noise, ON_THE_GRID, position)
    assert np.array_equal(image[..., 0], mask.astype(np.float32))


def reference_mask(mask, position, aug, out_size=(32, 32)):
    """The perturbed mask computed independently: each output pixel looks up the input pixel
    its transform names (nearest, borders reflected as numpy's 'symmetric')."""
    transform_seed = tf.random.experimental.stateless_split(tf.constant([7, position], tf.int64),
                                                            2)[0]
    a0, a1, a2, b0, b1, b2, _, _ = perturbation_transform(
        transform_seed, resolve_aug(aug), mask.shape, out_size).numpy()
    rows, cols = np.mgrid[0:out_size[0], 0:out_size[1]]
    x = np.floor(a0 * cols + a1 * rows + a2 + 0.5).astype(int)
    y = np.floor(b0 * cols + b1 * rows + b2 + 0.5).astype(int)
    padded = np.pad(mask, 200, mode="symmetric")
    return padded[y + 200, x + 200]


@pytest.mark.parametrize("position", range(12))
def test_all_transforms_keep_image_and_mask_aligned(position):
    """The same 0/255 picture as image and as mask: the bilinear image, thresholded, must agree
    with the nearest-neighbour mask everywhere but at a few corner pixels, where the two
    interpolations legitimately round differently; and the mask is where the transform says."""
    mask = blobs(seed=position)
    image, out_mask = perturbed(np.dstack([mask * 255] * 3), mask, EVERYTHING, position)
    agree = (image[..., 0] >= 127.5) == (out_mask == 1)
    assert agree.mean() > 0.99
    assert (out_mask == reference_mask(mask, position, EVERYTHING)).mean() > 0.995


@pytest.mark.parametrize("key, value", [
    ("rotation_range", 40), ("width_shift_range", 0.2), ("height_shift_range", 0.2),
    ("zoom_range", 0.3), ("shear_range", 20), ("horizontal_flip", True),
    ("vertical_flip", True), ("quarter_turns", True), ("brightness_range", (0.5, 1.5))])
@pytest.mark.parametrize("fill_mode", ["constant", "reflect", "nearest", "wrap"])
def test_masks_stay_exactly_binary_after_every_transform(key, value, fill_mode):
    mask = blobs()
    for position in range(4):
        _, out = perturbed(np.dstack([mask * 255] * 3), mask, {key: value, "fill_mode": fill_mode},
                           position)
        assert set(np.unique(out)) <= {0, 1}


def test_class_numbers_survive_as_they_are():
    mask = blobs() * 3 + (blobs(seed=1) > 0) * 1
    _, out = perturbed(np.dstack([mask] * 3), mask.astype(np.uint8), EVERYTHING, 0)
    assert set(np.unique(out)) <= set(np.unique(mask))


def test_brightness_touches_the_image_only():
    mask = blobs()
    image, out = perturbed(np.full((48, 48, 3), 100, np.uint8), mask,
                           {"brightness_range": (0.5, 0.5)}, 0)
    assert np.allclose(image, 50)
    assert out.sum() > 0


def test_the_same_seed_and_position_repeat_and_others_differ():
    image = np.dstack([blobs() * 255] * 3)
    first = perturbed(image, blobs(), EVERYTHING, 3)
    again = perturbed(image, blobs(), EVERYTHING, 3)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[1], perturbed(image, blobs(), EVERYTHING, 4)[1])


def test_no_aug_is_a_plain_crop():
    image = np.arange(40 * 40 * 3).reshape(40, 40, 3).astype(np.uint8)
    seed = tf.constant([0, 0], tf.int64)
    out, _ = perturb_pair(image, image[..., :1], seed, NO_PERTURBATION, (40, 40))
    assert np.array_equal(out.numpy(), image)


def test_overrides_are_typed_and_checked():
    overrides = aug_overrides(["rotation_range=90", "horizontal_flip=true",
                               "brightness_range=0.8,1.2", "fill_mode=wrap"])
    aug = resolve_aug({"zoom_range": 0.1, **overrides})
    assert aug["rotation_range"] == 90.0 and aug["horizontal_flip"] is True
    assert aug["zoom_range"] == (0.9, 1.1) and aug["brightness_range"] == (0.8, 1.2)
    assert aug_overrides({"rotation_range": 90, "zoom_range": [0.8, 1.0]}) == {
        "rotation_range": 90.0, "zoom_range": (0.8, 1.0)}
    with pytest.raises(InputError, match="key one of rotation_range, width_shift_range"):
        aug_overrides(["rotation=3"])
    with pytest.raises(InputError, match="horizontal_flip=maybe: expected true or false"):
        aug_overrides(["horizontal_flip=maybe"])
    assert set(resolve_aug({})) == set(AUG_NEUTRAL)


def test_training_stream_has_static_shapes_binary_masks_and_resumes_exactly():
    images = [np.dstack([blobs(seed=s) * 255] * 3) for s in range(3)]
    masks = [blobs(seed=s) for s in range(3)]
    stream = training_dataset(images, masks, batch_size=2, aug=resolve_aug(EVERYTHING),
                              seed=5, count=2, crop=32)
    batches = [b for b in stream.take(4)]
    x, y = batches[0]
    assert x.shape == (2, 32, 32, 3) and y.shape == (2, 32, 32, 1)
    assert x.dtype == tf.float32 and set(np.unique(y)) <= {0.0, 1.0}
    resumed = next(iter(training_dataset(images, masks, batch_size=2,
                                         aug=resolve_aug(EVERYTHING), seed=5, count=2,
                                         crop=32, start_step=3)))
    assert np.array_equal(resumed[0], batches[3][0]) and np.array_equal(resumed[1], batches[3][1])


def test_each_pass_shows_every_image_count_times():
    images = [np.full((16, 16, 3), value, np.uint8) for value in (10, 20, 30)]
    masks = [np.zeros((16, 16), np.uint8)] * 3
    stream = training_dataset(images, masks, batch_size=3, aug=NO_PERTURBATION, seed=0, count=2)
    first_pass = np.concatenate([x[:, 0, 0, 0].numpy() for x, _ in stream.take(2)])
    assert sorted(first_pass) == [10, 10, 20, 20, 30, 30]


def test_a_crop_larger_than_the_images_is_refused():
    with pytest.raises(InputError, match="--crop 64 is larger than images of 16x16"):
        training_dataset([np.zeros((16, 16, 3), np.uint8)], [np.zeros((16, 16), np.uint8)],
                         batch_size=1, aug=NO_PERTURBATION, seed=0, crop=64)


def test_images_of_several_sizes_need_a_crop():
    images = [np.zeros((16, 16, 3), np.uint8), np.zeros((24, 24, 3), np.uint8)]
    masks = [np.zeros(i.shape[:2], np.uint8) for i in images]
    with pytest.raises(InputError, match="differ in size.*pass --crop"):
        training_dataset(images, masks, batch_size=1, aug=NO_PERTURBATION, seed=0)
    dataset = training_dataset(images, masks, batch_size=2, aug=NO_PERTURBATION, seed=0, crop=16)
    x, _ = next(iter(dataset))
    assert x.shape == (2, 16, 16, 3)
