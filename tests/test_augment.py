"""Paired perturbations: image and mask move together, masks stay binary, runs repeat exactly;
one definition, and the tf.data executor resamples exactly as the NumPy one."""

import itertools

import numpy as np
import pytest

import pipeline_cil
from io_cil import InputError
from options_cil import AUG_NEUTRAL, FILL_MODES, NO_PERTURBATION, aug_overrides, resolve_aug
from pipeline_cil import (DRAWS, draws, perturb_pair, perturbation_transform, resample,
                          training_dataset)
from tests.conftest import needs_tensorflow

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
    out_image, out_mask = perturb_pair(image, mask[..., None], draws(7, position),
                                       resolve_aug(aug), out_size)
    return out_image, out_mask[..., 0]


@pytest.mark.parametrize("position", range(12))
def test_grid_transforms_and_crops_move_image_and_mask_identically(position):
    noise = np.random.default_rng(position).integers(0, 256, (40, 40)).astype(np.uint8)
    image, mask = perturbed(np.dstack([noise] * 3), noise, ON_THE_GRID, position)
    assert np.array_equal(image[..., 0], mask.astype(np.float32))


def reference_mask(mask, position, aug, out_size=(32, 32)):
    """The perturbed mask computed independently: each output pixel looks up the input pixel
    its transform names (nearest, borders reflected as numpy's 'symmetric')."""
    a0, a1, a2, b0, b1, b2, _, _ = perturbation_transform(draws(7, position), resolve_aug(aug),
                                                          mask.shape, out_size)
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
    out, _ = perturb_pair(image, image[..., :1], draws(0, 0), NO_PERTURBATION, (40, 40))
    assert np.array_equal(out, image)


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


EXECUTORS = ["numpy", pytest.param("tf.data", marks=needs_tensorflow)]


def stream(executor, images, masks, **options):
    """Batches of training_dataset's stream as NumPy arrays, from the executor named."""
    options = dict(dict(aug=NO_PERTURBATION, seed=0), **options)
    if executor == "numpy":
        out_size = pipeline_cil.train_sample_size(images, options.pop("crop", None),
                                                  options["aug"])
        data = pipeline_cil._numpy_stream(images, masks, options.pop("batch_size"),
                                          options["aug"], options["seed"],
                                          pipeline_cil.pass_template(
                                              len(images), options.get("count", 1),
                                              options.get("extra", 0),
                                              options.get("extra_count", 0)),
                                          out_size, options.get("start_step", 0))
        return (data[index] for index in itertools.count())
    options["crop"] = options.get("crop")
    return ((x.numpy(), y.numpy()) for x, y in training_dataset(images, masks, **options))


@pytest.mark.parametrize("executor", EXECUTORS)
def test_training_stream_has_static_shapes_binary_masks_and_resumes_exactly(executor):
    images = [np.dstack([blobs(seed=s) * 255] * 3) for s in range(3)]
    masks = [blobs(seed=s) for s in range(3)]
    options = dict(batch_size=2, aug=resolve_aug(EVERYTHING), seed=5, count=2, crop=32)
    batches = list(itertools.islice(stream(executor, images, masks, **options), 4))
    x, y = batches[0]
    assert x.shape == (2, 32, 32, 3) and y.shape == (2, 32, 32, 1)
    assert x.dtype == np.float32 and set(np.unique(y)) <= {0.0, 1.0}
    resumed = next(stream(executor, images, masks, start_step=3, **options))
    assert np.array_equal(resumed[0], batches[3][0]) and np.array_equal(resumed[1], batches[3][1])


@needs_tensorflow
def test_one_seed_gives_the_same_batches_through_both_executors():
    """tf.data (TensorFlow) and the NumPy stream (JAX, PyTorch) take the same order and draws
    from NumPy: the same crops and perturbations, the image to float rounding, the mask exactly,
    across a pass boundary and from a resumed step."""
    images = [np.dstack([blobs(seed=s) * 255] * 3).astype(np.uint8) for s in range(3)]
    masks = [blobs(seed=s) for s in range(3)]
    for start in (0, 2):
        options = dict(batch_size=2, aug=resolve_aug(EVERYTHING), seed=11, count=2, crop=32,
                       start_step=start)
        tf_batches = itertools.islice(stream("tf.data", images, masks, **options), 4)
        numpy_batches = itertools.islice(stream("numpy", images, masks, **options), 4)
        for (x_tf, y_tf), (x_np, y_np) in zip(tf_batches, numpy_batches):
            assert np.allclose(x_tf, x_np, atol=1e-3) and np.array_equal(y_tf, y_np)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_each_pass_shows_every_image_count_times(executor):
    images = [np.full((16, 16, 3), value, np.uint8) for value in (10, 20, 30)]
    masks = [np.zeros((16, 16), np.uint8)] * 3
    batches = stream(executor, images, masks, batch_size=3, count=2)
    first_pass = np.concatenate([x[:, 0, 0, 0] for x, _ in itertools.islice(batches, 2)])
    assert sorted(first_pass) == [10, 10, 20, 20, 30, 30]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_extra_images_are_shown_their_own_count_per_pass(executor):
    images = [np.full((16, 16, 3), value, np.uint8) for value in (10, 20, 30, 40)]
    masks = [np.zeros((16, 16), np.uint8)] * 4
    batches = stream(executor, images, masks, batch_size=4, count=3, extra=2, extra_count=1)
    first_pass = np.concatenate([x[:, 0, 0, 0] for x, _ in itertools.islice(batches, 2)])
    assert sorted(first_pass) == [10, 10, 10, 20, 20, 20, 30, 40]


def test_without_extra_images_a_pass_is_what_it_was():
    # the default's stream must not change when --extra-data is not used
    assert np.array_equal(pipeline_cil.pass_template(5, 3), np.arange(15) % 5)


def test_a_crop_larger_than_the_images_is_refused():
    with pytest.raises(InputError, match="--crop 64 is larger than images of 16x16"):
        training_dataset([np.zeros((16, 16, 3), np.uint8)], [np.zeros((16, 16), np.uint8)],
                         batch_size=1, aug=NO_PERTURBATION, seed=0, crop=64)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_images_of_several_sizes_need_a_crop(executor):
    images = [np.zeros((16, 16, 3), np.uint8), np.zeros((24, 24, 3), np.uint8)]
    masks = [np.zeros(i.shape[:2], np.uint8) for i in images]
    with pytest.raises(InputError, match="differ in size.*pass --crop"):
        training_dataset(images, masks, batch_size=1, aug=NO_PERTURBATION, seed=0)
    x, _ = next(stream(executor, images, masks, batch_size=2, crop=16))
    assert x.shape == (2, 16, 16, 3)


@needs_tensorflow
@pytest.mark.parametrize("fill_mode", FILL_MODES)
def test_tensorflow_resamples_exactly_as_the_numpy_definition(fill_mode):
    """The same draws through both executors: the same transform, the same pixels (the image
    to float rounding, the mask exactly), every fill mode, far outside the image too."""
    from types import SimpleNamespace

    import tensorflow as tf
    tf_math = SimpleNamespace(where=tf.where, floor=tf.math.floor, round=tf.math.round,
                              cos=tf.math.cos, sin=tf.math.sin, stack=tf.stack,
                              asarray=lambda value, dtype: tf.cast(value, dtype))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (40, 37, 3)).astype(np.uint8)
    mask = rng.integers(0, 3, (40, 37, 1)).astype(np.uint8)
    aug = resolve_aug(dict(EVERYTHING, zoom_range=0.6, fill_mode=fill_mode))
    for position in range(20):
        u = draws(3, position)
        transform = perturbation_transform(u, aug, (40, 37), (32, 32))
        in_tf = perturbation_transform(tf.constant(u), aug, (tf.constant(40.0),
                                                             tf.constant(37.0)), (32, 32),
                                       xp=tf_math).numpy()
        assert np.allclose(transform, in_tf, atol=1e-4)
        for pixels, kind in ((image, "bilinear"), (mask, "nearest")):
            ours = resample(pixels, transform, (32, 32), kind, fill_mode)
            theirs = pipeline_cil._tf_resample(tf.cast(pixels, tf.float32), transform,
                                               (32, 32), kind.upper(), fill_mode).numpy()
            assert np.allclose(ours, theirs, atol=1e-3) if kind == "bilinear" else \
                np.array_equal(ours, theirs)


def test_the_draws_of_an_element_are_its_own():
    assert draws(5, 3).shape == (len(DRAWS),) and np.array_equal(draws(5, 3), draws(5, 3))
    assert not np.array_equal(draws(5, 3), draws(5, 4))
    assert not np.array_equal(draws(5, 3), draws(6, 3))
