"""The tf.data pipeline: training batches with paired perturbations, validation arrays.

An image and its mask travel together as one element from the first read to the batch. Every
random draw is stateless and keyed by (seed, position in the stream), so a run, and a run resumed
after a kill, sees exactly the same crops and perturbations. The perturbations speak
ImageDataGenerator's vocabulary (settings_cil.AUG_NEUTRAL says what each key means).
"""

import math

import numpy as np
import tensorflow as tf

from data_cil import InputError, train_sample_size


def _uniform(seed, low, high):
    return tf.random.stateless_uniform([], seed=seed, minval=low, maxval=high)


def _shift_pixels(seed, shift_range, side):
    if not shift_range:
        return tf.constant(0.0)
    limit = shift_range * tf.cast(side, tf.float32) if shift_range < 1 else shift_range
    # Whole pixels: a sub-pixel shift would only blur the image and change nothing else.
    return tf.round(_uniform(seed, -limit, limit))


def _dihedral(seed, aug):
    """2x2 matrix of the random flips and quarter turn, exact in 0 and +-1."""
    flip_seed, turn_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    coins = tf.random.stateless_uniform([2], seed=flip_seed) < 0.5
    fx = tf.where(tf.logical_and(coins[0], aug["horizontal_flip"]), -1.0, 1.0)
    fy = tf.where(tf.logical_and(coins[1], aug["vertical_flip"]), -1.0, 1.0)
    turns = tf.random.stateless_uniform([], seed=turn_seed, maxval=4, dtype=tf.int32)
    turns = turns if aug["quarter_turns"] else tf.constant(0)
    cos = tf.gather([1.0, 0.0, -1.0, 0.0], turns)
    sin = tf.gather([0.0, 1.0, 0.0, -1.0], turns)
    return tf.reshape(tf.stack([cos * fx, -sin * fy, sin * fx, cos * fy]), [2, 2])


def _affine(seed, aug):
    """2x2 matrix of rotation, shear and zoom (ImageDataGenerator's order), output to input."""
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    angle = _uniform(seeds[0], -aug["rotation_range"], aug["rotation_range"]) * math.pi / 180
    shear = _uniform(seeds[1], -aug["shear_range"], aug["shear_range"]) * math.pi / 180
    zx = _uniform(seeds[2], *aug["zoom_range"])
    zy = _uniform(seeds[3], *aug["zoom_range"])
    rotation = tf.reshape(tf.stack([tf.cos(angle), -tf.sin(angle), tf.sin(angle), tf.cos(angle)]),
                          [2, 2])
    shearing = tf.reshape(tf.stack([1.0, -tf.sin(shear), 0.0, tf.cos(shear)]), [2, 2])
    zoom = tf.linalg.diag(tf.stack([zx, zy]))
    return rotation @ shearing @ zoom


def perturbation_transform(seed, aug, in_size, out_size):
    """The 8 projective coefficients mapping output pixels to input pixels for one element.

    Output pixel q (column, row) reads input pixel c_in + shift + crop + A D (q - c_out): D is the
    flips and quarter turn, A the rotation/shear/zoom, crop the window's offset from the centre,
    all in one matrix so image and mask are resampled once.
    """
    in_h, in_w = in_size
    out_h, out_w = out_size
    seeds = tf.unstack(tf.random.experimental.stateless_split(seed, 5))
    linear = _affine(seeds[0], aug) @ _dihedral(seeds[1], aug)
    # An integer window corner keeps flips, turns and crops on the pixel grid (exact copies).
    left = tf.cast(tf.random.stateless_uniform([], seeds[2], maxval=in_w - out_w + 1,
                                               dtype=tf.int32), tf.float32)
    top = tf.cast(tf.random.stateless_uniform([], seeds[3], maxval=in_h - out_h + 1,
                                              dtype=tf.int32), tf.float32)
    shift_seeds = tf.unstack(tf.random.experimental.stateless_split(seeds[4], 2))
    shift_x = _shift_pixels(shift_seeds[0], aug["width_shift_range"], in_w)
    shift_y = _shift_pixels(shift_seeds[1], aug["height_shift_range"], in_h)
    centre_x = left + (out_w - 1) / 2 + shift_x
    centre_y = top + (out_h - 1) / 2 + shift_y
    out_cx, out_cy = (out_w - 1) / 2, (out_h - 1) / 2
    a, b, c, d = tf.unstack(tf.reshape(linear, [4]))
    return tf.stack([a, b, centre_x - a * out_cx - b * out_cy,
                     c, d, centre_y - c * out_cx - d * out_cy, 0.0, 0.0])


def _resample(pixels, transform, out_size, interpolation, fill_mode):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels[None], transforms=transform[None], output_shape=tf.constant(out_size),
        fill_value=0.0, interpolation=interpolation, fill_mode=fill_mode.upper())[0]


def perturb_pair(image, mask, seed, aug, out_size):
    """(image, mask) cropped to out_size and perturbed by one draw: image bilinear float32 in
    0..255, mask nearest so its values stay exactly the input's class numbers."""
    in_size = tf.unstack(tf.shape(image)[:2])
    transform_seed, brightness_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    transform = perturbation_transform(transform_seed, aug, in_size, out_size)
    image = _resample(tf.cast(image, tf.float32), transform, out_size, "BILINEAR", aug["fill_mode"])
    mask = _resample(mask, transform, out_size, "NEAREST", aug["fill_mode"])
    if aug["brightness_range"] != (1.0, 1.0):
        factor = _uniform(brightness_seed, *aug["brightness_range"])
        image = tf.clip_by_value(image * factor, 0, 255)
    return image, mask


# ---------------------------------------------------------------------------------------------
# tf.data pipelines


def _flat_store(arrays):
    """All arrays in one flat uint8 tensor with each one's offset and shape, so images of
    different sizes share one in-memory cache that a tf.data map can index."""
    offsets = np.cumsum([0] + [a.size for a in arrays[:-1]]).astype(np.int64)
    shapes = np.array([a.shape if a.ndim == 3 else (*a.shape, 1) for a in arrays], np.int64)
    flat = np.concatenate([a.ravel() for a in arrays])
    return tf.constant(flat), tf.constant(offsets), tf.constant(shapes)


def _fetch(store, index):
    flat, offsets, shapes = store
    shape = shapes[index]
    return tf.reshape(flat[offsets[index]:offsets[index] + tf.reduce_prod(shape)], shape)


def training_dataset(images, masks, *, batch_size, aug, seed, count=1, crop=None, start_step=0):
    """Endless batches of (image float32 0..255 (B, h, w, 3), mask float32 (B, h, w, 1)).

    Each pass over the training set shows every image `count` times in an order shuffled by
    (seed, pass); element k of the stream is perturbed with seed (seed, k). Starting at
    `start_step` continues a run exactly where it stopped.
    """
    out_size = train_sample_size(images, crop, aug)
    image_store, mask_store = _flat_store(images), _flat_store(masks)
    per_pass = len(images) * count
    first = start_step * batch_size

    def one_pass(pass_index):
        """(image index, stream position) of every element of one pass."""
        order = tf.random.experimental.stateless_shuffle(
            tf.range(per_pass, dtype=tf.int64) % len(images), seed=tf.stack([seed, pass_index]))
        positions = pass_index * per_pass + tf.range(per_pass, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices((order, positions))

    def element(index, position):
        image, mask = perturb_pair(_fetch(image_store, index), _fetch(mask_store, index),
                                   tf.stack([tf.constant(seed, tf.int64), position]), aug, out_size)
        image.set_shape((*out_size, images[0].shape[-1]))
        mask.set_shape((*out_size, 1))
        return image, tf.cast(mask, tf.float32)

    return (tf.data.Dataset.range(first // per_pass, 2**62)
            .flat_map(one_pass)
            .skip(first % per_pass)
            .map(element, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def validation_arrays(images, masks, multiple):
    """(x float32 (N, h, w, 3), y float32 (N, h, w, 1)): the validation pairs centre-cropped to
    one shared size the model accepts, for Keras' per-epoch validation (the full-size evaluation
    after training sees every pixel)."""
    height = min(i.shape[0] for i in images) // multiple * multiple
    width = min(i.shape[1] for i in images) // multiple * multiple
    if not height or not width:
        raise InputError(f"validation images are smaller than {multiple} pixels, the least the "
                         "model accepts; use larger images or a smaller --depth")
    x = np.stack([centre_window(i, height, width) for i in images]).astype(np.float32)
    y = np.stack([centre_window(m, height, width) for m in masks])[..., None].astype(np.float32)
    return x, y


def centre_window(array, height, width):
    """The centred height x width window of an array."""
    h, w = array.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    return array[top:top + height, left:left + width]
