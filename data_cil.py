"""Reading, checking and splitting image/mask pairs, the tf.data pipeline with paired
perturbations, and the synthetic road images behind `--demo` and the tests.

An image and its mask travel together as one element from the first read to the batch. Every
random draw is stateless and keyed by (seed, position in the stream), so a run, and a run resumed
after a kill, sees exactly the same crops and perturbations.
"""

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

# Drops TensorFlow's C++ info and warning lines (the CPU-feature banner among them). The lines it
# prints while loading come before absl logging starts and ignore this (tensorflow#102212).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import skimage.io
import skimage.transform
import tensorflow as tf

IMAGES_SUBDIR = Path("training/images")
MASKS_SUBDIR = Path("training/groundtruth")
TEST_LAYOUTS = ("test_set_images/*/*", "test_images/*")   # EPFL: test_N/test_N.png, CIL: test_N.png
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MASK_THRESHOLD = 128         # road pixels are 237 with anti-aliased edges, not 255
MAX_NAMES_SHOWN = 3          # file names listed in one error line before "and N more"

# The ImageDataGenerator vocabulary with its meanings, plus quarter turns. Each value's type is
# the type an override from the command line must have.
AUG_DEFAULTS = dict(
    rotation_range=0.0,          # degrees, drawn uniformly in [-r, r]
    width_shift_range=0.0,       # fraction of the width below 1, pixels from 1 up
    height_shift_range=0.0,      # fraction of the height below 1, pixels from 1 up
    zoom_range=0.0,              # z or [lo, hi]: a factor per axis in [1-z, 1+z]; above 1 zooms out
    shear_range=0.0,             # degrees, counter-clockwise
    horizontal_flip=False,
    vertical_flip=False,
    quarter_turns=False,         # rotate by 0, 90, 180 or 270 degrees
    fill_mode="reflect",         # what fills pixels mapped from outside the image
    brightness_range=(1.0, 1.0), # factor multiplying the image, not the mask
)
FILL_MODES = ("constant", "nearest", "reflect", "wrap")


class InputError(Exception):
    """A problem with the user's files or options, reported as one line without a traceback."""


def write_atomically(path, write):
    """Call write(temporary_path), then rename it over `path`: a reader, or a run killed
    mid-write, sees the old file or the new one, never half of one. The temporary name starts
    with a dot and keeps the suffix, so file finders skip it and writers recognise the format."""
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def write_json(path, data):
    return write_atomically(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))


def write_png(path, array):
    return write_atomically(path, lambda p: skimage.io.imsave(p, array, check_contrast=False))


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path

    @property
    def name(self):
        return self.image.name


def _image_files(folder):
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found; pass --data-dir with "
                         f"{IMAGES_SUBDIR}/ and {MASKS_SUBDIR}/ inside")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder; "
                         "add them or pass another --data-dir")
    return files


def _by_stem(files):
    found = {}
    for path in files:
        if path.stem in found:
            raise InputError(f"{path}: same name as {found[path.stem].name}; "
                             "keep one file per name")
        found[path.stem] = path
    return found


def _listed(names):
    shown = ", ".join(sorted(names)[:MAX_NAMES_SHOWN])
    more = len(names) - MAX_NAMES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def find_pairs(data_dir):
    """Image/mask pairs matched by file name (extension aside), sorted by name."""
    data_dir = Path(data_dir)
    images = _by_stem(_image_files(data_dir / IMAGES_SUBDIR))
    masks = _by_stem(_image_files(data_dir / MASKS_SUBDIR))
    if missing := images.keys() - masks.keys():
        names = _listed([images[stem].name for stem in missing])
        raise InputError(f"{data_dir / IMAGES_SUBDIR}: {names} "
                         f"{'has' if len(missing) == 1 else 'have'} no mask of the same name in "
                         f"{data_dir / MASKS_SUBDIR}; add the masks or remove the images")
    if orphans := masks.keys() - images.keys():
        names = _listed([masks[stem].name for stem in orphans])
        raise InputError(f"{data_dir / MASKS_SUBDIR}: {names} "
                         f"{'has' if len(orphans) == 1 else 'have'} no image of the same name in "
                         f"{data_dir / IMAGES_SUBDIR}; add the images or remove the masks")
    return [Pair(images[stem], masks[stem]) for stem in sorted(images)]


def image_number(path):
    """The last number in a file name: test_12.png -> 12."""
    numbers = re.findall(r"\d+", Path(path).stem)
    if not numbers:
        raise InputError(f"{path}: no number in the file name; name test images like test_12.png")
    return int(numbers[-1])


def find_test_images(data_dir):
    """{image number: path} for the test images under data_dir, in either layout users meet."""
    data_dir = Path(data_dir)
    found = {}
    for pattern in TEST_LAYOUTS:
        for path in sorted(data_dir.glob(pattern)):
            if path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith("."):
                number = image_number(path)
                if number in found:
                    raise InputError(f"{path}: test image number {number} also in {found[number]}; "
                                     "keep one file per number")
                found[number] = path
    if not found:
        raise InputError(f"{data_dir}: no test images in test_set_images/test_N/test_N.png "
                         "or test_images/test_N.png; pass the --data-dir that holds them")
    return dict(sorted(found.items()))


def read_array(path):
    """The pixels of an image file as stored, or InputError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: file is empty (0 bytes); replace it or remove it")
    try:
        return np.asarray(skimage.io.imread(path))
    except Exception as error:  # every decoder fails differently; all mean the same to the user
        raise InputError(f"{path}: cannot read the image ({type(error).__name__}: {error}); "
                         "re-save it as PNG or remove it") from error


def _to_uint8(array, path):
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return (array >> 8).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating) and array.min() >= 0 and array.max() <= 1:
        return np.round(array * 255).astype(np.uint8)
    raise InputError(f"{path}: pixel values {array.min()}..{array.max()} ({array.dtype}) are "
                     "neither 8/16-bit nor floats in 0..1; re-save it as an 8-bit PNG")


def read_image(path, notes=None):
    """An RGB uint8 (H, W, 3) array; grey and alpha are converted and counted in `notes`."""
    array = _to_uint8(read_array(path), path)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{path}: shape {array.shape} is not an image with 1 to 4 channels; "
                         "save it as grey, RGB or RGBA")
    channels = array.shape[-1]
    if channels in (2, 4):
        array = array[..., :-1]                      # drop alpha
    if channels in (1, 2):
        array = np.repeat(array, 3, axis=-1)
    if notes is not None and channels != 3:
        kind = {1: "grey", 2: "grey with alpha", 4: "RGBA"}[channels]
        notes.setdefault(f"{kind} images converted to RGB", []).append(Path(path).name)
    return array


def _single_channel(array, path, hint):
    if array.ndim == 3 and array.shape[-1] in (2, 4):
        array = array[..., :-1]                      # drop alpha
    if array.ndim == 3:
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, array.shape[-1])):
            raise InputError(f"{path}: mask is in colour; {hint}")
        array = array[..., 0]
    if array.ndim != 2:
        raise InputError(f"{path}: shape {array.shape} is not a mask; save it as a grey PNG")
    return array


def binary_mask(array, path):
    """0/1 uint8 (H, W) from grey pixels thresholded at half their range (128 for 8 bits)."""
    if array.dtype == bool:
        return _single_channel(array, path, "").astype(np.uint8)
    array = _single_channel(array, path, "save binary masks as grey (foreground light)")
    if not np.issubdtype(array.dtype, np.integer):
        array = _to_uint8(array, path)
    threshold = MASK_THRESHOLD if array.dtype == np.uint8 else (np.iinfo(array.dtype).max + 1) // 2
    if 0 < array.max() < threshold:
        raise InputError(f"{path}: mask values are 0..{array.max()}, all below the threshold "
                         f"{threshold}, so it would train as empty; save masks as 0/255, or pass "
                         "--classes 2 if the values are class numbers")
    return (array >= threshold).astype(np.uint8)


def parse_palette(path):
    """{(r, g, b): class} from a JSON object whose keys are "#rrggbb" or "r,g,b"."""
    try:
        entries = json.loads(Path(path).read_text())
        palette = {}
        for colour, index in entries.items():
            if colour.startswith("#"):
                rgb = tuple(int(colour[i:i + 2], 16) for i in (1, 3, 5))
            else:
                rgb = tuple(int(part) for part in colour.split(","))
            if len(rgb) != 3 or not isinstance(index, int):
                raise ValueError(f"entry {colour!r}: {index!r}")
            palette[rgb] = index
    except (OSError, ValueError, AttributeError) as error:
        raise InputError(f"{path}: not a palette ({error}); write a JSON object like "
                         '{"#000000": 0, "#ff0000": 1}') from error
    return palette


def class_mask(array, path, classes, palette=None):
    """Class numbers 0..classes-1 as uint8 (H, W), from an index PNG or a colour PNG + palette."""
    if palette:
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        rgb = array[..., :3].astype(np.int64)
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        lookup = {(r << 16) | (g << 8) | b: index for (r, g, b), index in palette.items()}
        result = np.full(codes.shape, 255, np.uint8)
        for code, index in lookup.items():
            result[codes == code] = index
        if (result == 255).any():
            r, g, b = rgb[result == 255][0]
            raise InputError(f"{path}: colour #{r:02x}{g:02x}{b:02x} is in no class of the "
                             "palette; add it to the palette file")
        array = result
    else:
        array = _single_channel(array, path, "pass --palette to map its colours to classes")
    if array.max() >= classes:
        raise InputError(f"{path}: mask value {array.max()} is no class of --classes {classes} "
                         f"(allowed 0..{classes - 1}); fix the mask or raise --classes")
    return array.astype(np.uint8)


def read_mask(path, classes=1, palette=None):
    """The mask at `path` as uint8 (H, W): 0/1 when binary, class numbers otherwise."""
    array = read_array(path)
    if classes == 1:
        return binary_mask(array, path)
    return class_mask(array, path, classes, palette)


def load_pairs(pairs, classes=1, palette=None, notes=None):
    """(images, masks): lists of uint8 arrays, each mask the size of its image."""
    images, masks = [], []
    for pair in pairs:
        image = read_image(pair.image, notes)
        mask = read_mask(pair.mask, classes, palette)
        if image.shape[:2] != mask.shape:
            raise InputError(f"{pair.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                             f"is {image.shape[1]}x{image.shape[0]}; masks must match their images")
        images.append(image)
        masks.append(mask)
    return images, masks


def split_pairs(pairs, valid_fraction, seed):
    """(train, valid): a deterministic, disjoint split, valid_fraction of the pairs (at least 1)."""
    if len(pairs) < 2:
        raise InputError(f"found {len(pairs)} image(s); a train/valid split needs at least 2, "
                         "add images or train on all of them with --submit")
    n_valid = min(max(1, round(len(pairs) * valid_fraction)), len(pairs) - 1)
    order = np.random.default_rng(seed).permutation(len(pairs))
    valid = sorted(order[:n_valid])
    train = sorted(order[n_valid:])
    return [pairs[i] for i in train], [pairs[i] for i in valid]


def parse_aug_value(key, text):
    """An override from `--aug key=value`, typed like the key's default."""
    default = AUG_DEFAULTS[key]
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(default, tuple):
            low, high = (float(part) for part in text.split(","))
            return (low, high)
        if isinstance(default, str):
            if text not in FILL_MODES:
                raise ValueError
            return text
        return float(text)
    except ValueError:
        allowed = {bool: "true or false", tuple: "two numbers like 0.9,1.1",
                   str: " or ".join(FILL_MODES), float: "a number"}[type(default)]
        raise InputError(f"--aug {key}={text}: expected {allowed}") from None


def resolve_aug(base, overrides):
    """`base` with `--aug key=value` strings applied; unknown keys are an InputError."""
    resolved = {**AUG_DEFAULTS, **base}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or key not in AUG_DEFAULTS:
            raise InputError(f"--aug {item}: expected key=value with key one of "
                             f"{', '.join(AUG_DEFAULTS)}")
        resolved[key] = parse_aug_value(key, text)
    zoom = resolved["zoom_range"]
    if not isinstance(zoom, (tuple, list)):
        zoom = (1 - zoom, 1 + zoom)
    if min(zoom) <= 0:
        raise InputError(f"zoom_range {resolved['zoom_range']}: factors must stay above 0")
    resolved["zoom_range"] = tuple(float(z) for z in zoom)
    resolved["brightness_range"] = tuple(float(b) for b in resolved["brightness_range"])
    return resolved


# ---------------------------------------------------------------------------------------------
# Paired perturbations, one resampling per element


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


NO_AUG = resolve_aug({}, [])  # identity perturbation: only the random crop remains


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


def train_sample_size(images, crop, aug):
    """(height, width) of the training samples: the crop, or the images' one shared size."""
    sizes = sorted({image.shape[:2] for image in images})
    if crop:
        small = [s for s in sizes if min(s) < crop]
        if small:
            raise InputError(f"--crop {crop} is larger than images of {small[0][1]}x{small[0][0]}; "
                             f"pass --crop {min(min(s) for s in sizes)} or smaller")
        return crop, crop
    if len(sizes) > 1:
        raise InputError(f"training images differ in size ({sizes[0][1]}x{sizes[0][0]} and "
                         f"{sizes[1][1]}x{sizes[1][0]}); pass --crop to train on crops of one size")
    if aug["quarter_turns"] and sizes[0][0] != sizes[0][1]:
        raise InputError(f"quarter turns need square samples but the images are "
                         f"{sizes[0][1]}x{sizes[0][0]}; pass --crop or --aug quarter_turns=false")
    return sizes[0]


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


# ---------------------------------------------------------------------------------------------
# Synthetic road images


def _smooth_noise(rng, size, scale):
    """Values in 0..1 varying over about `scale` pixels: bilinear upsampling of coarse noise."""
    coarse = rng.random((size // scale + 2, size // scale + 2))
    return skimage.transform.resize(coarse, (size, size), order=1)


def synthetic_road_pair(rng, size):
    """(RGB image uint8, mask 0/255 uint8): 1 to 3 straight grey roads across a textured field,
    with grey rooftops as distractors, so a model must use shape and not colour alone."""
    field = _smooth_noise(rng, size, max(4, size // 8))
    base = rng.uniform([60, 90, 40], [110, 140, 80])
    image = base + 50 * (field[..., None] - 0.5) + rng.normal(0, 6, (size, size, 3))
    rows, cols = np.mgrid[0:size, 0:size]
    mask = np.zeros((size, size), bool)
    for _ in range(rng.integers(1, 4)):
        angle = rng.uniform(0, np.pi)
        offset = rng.uniform(-0.3, 0.3) * size
        width = rng.uniform(0.04, 0.09) * size
        distance = (cols - size / 2) * np.cos(angle) + (rows - size / 2) * np.sin(angle) - offset
        mask |= np.abs(distance) < width / 2
    for _ in range(rng.integers(1, 4)):
        top, left = rng.integers(0, size - size // 8, 2)
        side = rng.integers(size // 12, size // 6)
        roof = (rows >= top) & (rows < top + side) & (cols >= left) & (cols < left + side) & ~mask
        image[roof] = rng.uniform(120, 160)
    grey = rng.uniform(110, 150)
    image[mask] = grey + rng.normal(0, 6, (mask.sum(), 1))
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8) * 255


def write_synthetic_dataset(folder, *, count, size, seed, test_count=0):
    """Write `count` training pairs (and `test_count` test images) in the EPFL/CIL layout:
    training/images, training/groundtruth, test_images/test_N.png."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    for sub in (IMAGES_SUBDIR, MASKS_SUBDIR):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index in range(1, count + 1):
        image, mask = synthetic_road_pair(rng, size)
        write_png(folder / IMAGES_SUBDIR / f"synthetic_{index:03d}.png", image)
        write_png(folder / MASKS_SUBDIR / f"synthetic_{index:03d}.png", mask)
    if test_count:
        (folder / "test_images").mkdir(exist_ok=True)
        for index in range(1, test_count + 1):
            write_png(folder / "test_images" / f"test_{index}.png",
                      synthetic_road_pair(rng, size)[0])
    return folder
