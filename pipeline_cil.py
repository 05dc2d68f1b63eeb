"""The input pipeline: training batches with paired perturbations, validation batches.

One definition of a perturbation, two executors. `perturbation_transform` turns DRAWS uniform
numbers into the 8 projective coefficients of one element (written once, over NumPy or
TensorFlow arithmetic); `resample` applies them as TensorFlow's ImageProjectiveTransformV3 does
(bilinear image, nearest mask, the same four fill modes), in NumPy. Under TensorFlow the stream
is a tf.data chain, the fastest on CPUs (parallel C++ maps, that very op); under JAX or PyTorch
a NumPy stream feeds Keras. Both take the order and the draws from NumPy's generator (`draws`,
`pass_order`), so a seed gives the same batches under every backend (tests check it).

An image and its mask travel together as one element from the first read to the batch. Every
random draw is keyed by (seed, position in the stream), so a run, and a run resumed after a
kill, sees exactly the same crops and perturbations. The perturbations speak ImageDataGenerator's
vocabulary (options_cil.AUG_NEUTRAL says what each key means).
"""

import math
import os
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np

from data_cil import train_sample_size
from io_cil import InputError

# The uniform draws in [0, 1) of one element, by position in its vector of draws.
DRAWS = ("angle", "shear", "zoom_x", "zoom_y", "flip_x", "flip_y", "turn", "left", "top",
         "shift_x", "shift_y", "brightness")
DRAW = {name: index for index, name in enumerate(DRAWS)}
# The NumPy stream prepares this many batches ahead, each in a thread of its own (NumPy's large
# array loops run outside the GIL). Its own threads, not Keras' PyDataset workers, whose
# enqueuer starts its order again at every epoch and would break the stream's (seed, position)
# keys: with them a resumed run differed from an uninterrupted one (tests/test_backends.py).
STREAM_THREADS = min(8, os.cpu_count() or 1)


def _between(draw, low, high):
    return low + (high - low) * draw


def _shift_pixels(draw, shift_range, side, xp):
    if not shift_range:
        return 0.0
    limit = shift_range * side if shift_range < 1 else shift_range
    # Whole pixels: a sub-pixel shift would only blur the image and change nothing else.
    return xp.round(_between(draw, -limit, limit))


def perturbation_transform(u, aug, in_size, out_size, xp=np):
    """The 8 projective coefficients mapping output pixels to input pixels for one element,
    from its draws `u` (DRAWS uniform numbers), in the arithmetic of `xp`: numpy, or inside
    tf.data TensorFlow's functions of the same names.

    Output pixel q (column, row) reads input pixel c_in + shift + crop + A D (q - c_out): D is the
    flips and quarter turn, A the rotation/shear/zoom (ImageDataGenerator's order), crop the
    window's offset from the centre, all in one matrix so image and mask are resampled once.
    """
    in_h, in_w = in_size
    out_h, out_w = out_size
    degrees = math.pi / 180
    angle = _between(u[DRAW["angle"]], -aug["rotation_range"], aug["rotation_range"]) * degrees
    shear = _between(u[DRAW["shear"]], -aug["shear_range"], aug["shear_range"]) * degrees
    zx, zy = (_between(u[DRAW[key]], *aug["zoom_range"]) for key in ("zoom_x", "zoom_y"))
    fx = xp.where(u[DRAW["flip_x"]] < 0.5, -1.0, 1.0) if aug["horizontal_flip"] else 1.0
    fy = xp.where(u[DRAW["flip_y"]] < 0.5, -1.0, 1.0) if aug["vertical_flip"] else 1.0
    turn = xp.floor(u[DRAW["turn"]] * 4) * (math.pi / 2) if aug["quarter_turns"] else 0.0
    # rounded: exact 0 and +-1, so flips and turns copy pixels
    cos_t, sin_t = xp.round(xp.cos(turn)), xp.round(xp.sin(turn))
    cos_a, sin_a, sin_s, cos_s = xp.cos(angle), xp.sin(angle), xp.sin(shear), xp.cos(shear)
    # A = rotation @ shear @ zoom, D = [[cos_t fx, -sin_t fy], [sin_t fx, cos_t fy]], L = A @ D
    a11, a12 = cos_a * zx, (-cos_a * sin_s - sin_a * cos_s) * zy
    a21, a22 = sin_a * zx, (-sin_a * sin_s + cos_a * cos_s) * zy
    a = a11 * cos_t * fx + a12 * sin_t * fx
    b = -a11 * sin_t * fy + a12 * cos_t * fy
    c = a21 * cos_t * fx + a22 * sin_t * fx
    d = -a21 * sin_t * fy + a22 * cos_t * fy
    # An integer window corner keeps flips, turns and crops on the pixel grid (exact copies).
    left = xp.floor(u[DRAW["left"]] * (in_w - out_w + 1))
    top = xp.floor(u[DRAW["top"]] * (in_h - out_h + 1))
    centre_x = left + (out_w - 1) / 2 + _shift_pixels(u[DRAW["shift_x"]],
                                                      aug["width_shift_range"], in_w, xp)
    centre_y = top + (out_h - 1) / 2 + _shift_pixels(u[DRAW["shift_y"]],
                                                     aug["height_shift_range"], in_h, xp)
    out_cx, out_cy = (out_w - 1) / 2, (out_h - 1) / 2
    coefficients = [a, b, centre_x - a * out_cx - b * out_cy,
                    c, d, centre_y - c * out_cx - d * out_cy, 0.0, 0.0]
    return xp.stack([xp.asarray(value, dtype="float32") for value in coefficients])


def brightness_factor(u, aug):
    """The factor multiplying the image (never the mask), from the element's draws."""
    return _between(u[DRAW["brightness"]], *aug["brightness_range"])


# ---------------------------------------------------------------------------------------------
# Resampling in NumPy, as TensorFlow's ImageProjectiveTransformV3 computes it


def _mapped(coordinate, length, fill_mode):
    """Input coordinates outside 0..length-1 mapped inside by the fill mode, step by step as
    TensorFlow's image_ops.h MapCoordinate does (its seams included); constant leaves them
    outside, where they read 0."""
    if fill_mode == "constant":
        return coordinate
    if length <= 1:
        return np.zeros_like(coordinate)
    c, last = coordinate, length - 1
    if fill_mode == "reflect":                   # d c b a | a b c d | d c b a
        period = 2 * length
        low = period * np.trunc(-c / period) + c
        low = np.where(low < -length, low + period, -low - 1)
        high = c - period * np.trunc(c / period)
        high = np.where(high >= length, period - high - 1, high)
        c = np.where(c < 0, low, np.where(c > last, high, c))
    elif fill_mode == "wrap":                    # a b c d | a b c d | a b c d
        c = np.where(c < 0, c + length * (np.trunc(-c / last) + 1),
                     np.where(c > last, c - length * np.trunc(c / last), c))
    return np.clip(c, 0, last).astype(np.float32)


def _read(pixels, rows, cols):
    """pixels[rows, cols] where inside the image, 0 outside (the constant fill)."""
    height, width = pixels.shape[:2]
    inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
    values = pixels[np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)]
    return np.where(inside[..., None], values, 0)


def _rounded(coordinate):
    """The nearest whole pixel, halves away from zero: C's round, as TensorFlow's kernel does."""
    return (np.sign(coordinate) * np.floor(np.abs(coordinate) + 0.5)).astype(np.int64)


def resample(pixels, transform, out_size, interpolation, fill_mode):
    """(h, w, C) float32: `pixels` (H, W, C) read through the projective `transform` (output
    pixel to input pixel), bilinear or nearest; what ImageProjectiveTransformV3 returns."""
    a0, a1, a2, b0, b1, b2, c0, c1 = np.asarray(transform, np.float32)
    rows, cols = np.mgrid[0:out_size[0], 0:out_size[1]].astype(np.float32)
    projection = c0 * cols + c1 * rows + np.float32(1)
    x = _mapped((a0 * cols + a1 * rows + a2) / projection, pixels.shape[1], fill_mode)
    y = _mapped((b0 * cols + b1 * rows + b2) / projection, pixels.shape[0], fill_mode)
    pixels = pixels.astype(np.float32)
    if interpolation == "nearest":
        return _read(pixels, _rounded(y), _rounded(x))
    x0, y0 = np.floor(x), np.floor(y)
    wx, wy = (x - x0)[..., None], (y - y0)[..., None]
    x0, y0 = x0.astype(np.int64), y0.astype(np.int64)
    top = (1 - wx) * _read(pixels, y0, x0) + wx * _read(pixels, y0, x0 + 1)
    bottom = (1 - wx) * _read(pixels, y0 + 1, x0) + wx * _read(pixels, y0 + 1, x0 + 1)
    return ((1 - wy) * top + wy * bottom).astype(np.float32)


def perturb_pair(image, mask, u, aug, out_size):
    """(image, mask) cropped to out_size and perturbed by one element's draws `u`: image
    bilinear float32 in 0..255, mask (H, W, 1) nearest, so its values stay exactly the input's
    class numbers."""
    transform = perturbation_transform(u, aug, image.shape[:2], out_size)
    out_image = resample(image, transform, out_size, "bilinear", aug["fill_mode"])
    out_mask = resample(mask, transform, out_size, "nearest", aug["fill_mode"])
    if aug["brightness_range"] != (1.0, 1.0):
        out_image = np.clip(out_image * np.float32(brightness_factor(u, aug)), 0, 255)
    return out_image, out_mask


def draws(seed, position):
    """The DRAWS uniform numbers of element `position` of the stream of `seed`: NumPy's
    generator keyed by both, the one source of every perturbation under every backend."""
    return np.random.default_rng([seed, position]).random(len(DRAWS)).astype(np.float32)


def pass_template(images, count, extra=0, extra_count=0):
    """The image of every element of one pass, unshuffled: each of the first `images - extra`
    images `count` times, then each of the last `extra` (--extra-data) `extra_count` times."""
    official = images - extra
    return np.concatenate([np.arange(official * count) % official,
                           official + np.arange(extra * extra_count) % max(extra, 1)])


def pass_order(template, seed, pass_index):
    """The pass template in the order shuffled by (seed, pass)."""
    return np.random.default_rng([seed, pass_index, 1]).permutation(template)


def pass_draws(template, seed, pass_index):
    """(image of each element, its draws) for one whole pass: int64 (n,), float32 (n, DRAWS)."""
    first = int(pass_index) * len(template)
    return (pass_order(template, seed, int(pass_index)).astype(np.int64),
            np.stack([draws(seed, first + k) for k in range(len(template))]))


# ---------------------------------------------------------------------------------------------
# Streams


def training_dataset(images, masks, *, batch_size, aug, seed, count=1, crop=None, start_step=0,
                     extra=0, extra_count=0):
    """Endless batches of (image float32 0..255 (B, h, w, 3), mask float32 (B, h, w, 1)), from
    optimizer step `start_step` on: a tf.data dataset under TensorFlow, a Keras PyDataset
    otherwise.

    Each pass over the training set shows every image `count` times (the last `extra` images,
    --extra-data, `extra_count` times) in an order shuffled by (seed, pass); element k of the
    stream is perturbed with the draws of (seed, k). Starting at `start_step` continues a run
    exactly where it stopped.
    """
    import keras
    out_size = train_sample_size(images, crop, aug)
    template = pass_template(len(images), count, extra, extra_count)
    if keras.backend.backend() == "tensorflow":
        return _tf_dataset(images, masks, batch_size, aug, seed, template, out_size, start_step)
    return _numpy_stream(images, masks, batch_size, aug, seed, template, out_size, start_step)


def _element_images(position, template, seed):
    per_pass = len(template)
    return int(pass_order(template, seed, position // per_pass)[position % per_pass])


def _numpy_stream(images, masks, batch_size, aug, seed, template, out_size, start_step):
    import keras
    masks = [mask[..., None] if mask.ndim == 2 else mask for mask in masks]

    def batch(step):
        first = step * batch_size
        pairs = []
        for position in range(first, first + batch_size):
            which = _element_images(position, template, seed)
            pairs.append(perturb_pair(images[which], masks[which], draws(seed, position), aug,
                                      out_size))
        return (np.stack([image for image, _ in pairs]), np.stack([mask for _, mask in pairs]))

    class NumpyStream(keras.utils.PyDataset):
        """Batch i is optimizer step start_step + i, endless; the next STREAM_THREADS batches
        are prepared ahead, each keyed by its step, so timing never changes the stream."""

        def __init__(self):
            super().__init__()
            self.threads = ThreadPoolExecutor(STREAM_THREADS)
            self.ahead = {}

        @property
        def num_batches(self):
            return None

        def __getitem__(self, index):
            for stale in [i for i in self.ahead if i < index]:     # Keras asks in order
                self.ahead.pop(stale).cancel()
            for i in range(index, index + STREAM_THREADS):
                if i not in self.ahead:
                    self.ahead[i] = self.threads.submit(batch, start_step + i)
            return self.ahead[index].result()

    return NumpyStream()


def _tf_dataset(images, masks, batch_size, aug, seed, template, out_size, start_step):
    import tensorflow as tf
    tf_math = SimpleNamespace(where=tf.where, floor=tf.math.floor, round=tf.math.round,
                              cos=tf.math.cos, sin=tf.math.sin, stack=tf.stack,
                              asarray=lambda value, dtype: tf.cast(value, dtype))
    image_store, mask_store = _flat_store(images, tf), _flat_store(masks, tf)
    per_pass = len(template)
    first = start_step * batch_size

    def one_pass(pass_index):
        """(image index, draws) of every element of one pass, drawn by NumPy as the NumPy
        stream draws them, so a seed means the same crops under every backend."""
        order, u = tf.numpy_function(lambda index: pass_draws(template, seed, index),
                                     [pass_index], [tf.int64, tf.float32], stateful=False)
        order.set_shape([per_pass])
        u.set_shape([per_pass, len(DRAWS)])
        return tf.data.Dataset.from_tensor_slices((order, u))

    def element(index, u):
        image, mask = _fetch(image_store, index, tf), _fetch(mask_store, index, tf)
        in_size = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
        transform = perturbation_transform(u, aug, in_size, out_size, xp=tf_math)
        image = _tf_resample(tf.cast(image, tf.float32), transform, out_size, "BILINEAR",
                             aug["fill_mode"])
        mask = _tf_resample(mask, transform, out_size, "NEAREST", aug["fill_mode"])
        if aug["brightness_range"] != (1.0, 1.0):
            image = tf.clip_by_value(image * brightness_factor(u, aug), 0, 255)
        image.set_shape((*out_size, images[0].shape[-1]))
        mask.set_shape((*out_size, 1))
        return image, tf.cast(mask, tf.float32)

    return (tf.data.Dataset.range(first // per_pass, 2**62)
            .flat_map(one_pass)
            .skip(first % per_pass)
            .map(element, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE))


def _tf_resample(pixels, transform, out_size, interpolation, fill_mode):
    import tensorflow as tf
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=pixels[None], transforms=tf.cast(transform, tf.float32)[None],
        output_shape=tf.constant(out_size), fill_value=0.0, interpolation=interpolation,
        fill_mode=fill_mode.upper())[0]


def _flat_store(arrays, tf):
    """All arrays in one flat uint8 tensor with each one's offset and shape, so images of
    different sizes share one in-memory cache that a tf.data map can index."""
    offsets = np.cumsum([0] + [a.size for a in arrays[:-1]]).astype(np.int64)
    shapes = np.array([a.shape if a.ndim == 3 else (*a.shape, 1) for a in arrays], np.int64)
    flat = np.concatenate([a.ravel() for a in arrays])
    return tf.constant(flat), tf.constant(offsets), tf.constant(shapes)


def _fetch(store, index, tf):
    flat, offsets, shapes = store
    shape = shapes[index]
    return tf.reshape(flat[offsets[index]:offsets[index] + tf.reduce_prod(shape)], shape)


def validation_batches(x, y, batch_size):
    """The validation arrays in batches, as the backend's fit reads them best: a tf.data
    dataset under TensorFlow (split over replicas like the training stream), else (x, y) and
    the batch size for Keras to batch."""
    import keras
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size), None
    return (x, y), batch_size


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
