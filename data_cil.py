"""Pairs in, arrays out: finding, reading, checking and splitting image/mask pairs, and the
synthetic road images behind `--demo` and the tests. No TensorFlow here: the Kaggle converter and
the command line's checks read images without loading it (the tf.data pipeline is
pipeline_cil.py).
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import skimage.io
import skimage.transform

from io_cil import InputError, write_png

IMAGES_SUBDIR = Path("training/images")
MASKS_SUBDIR = Path("training/groundtruth")
TEST_LAYOUTS = ("test_set_images/*/*", "test_images/*")   # EPFL: test_N/test_N.png, CIL: test_N.png
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# A number in a file name or a CSV id: ASCII digits only, in both directions of the converter
# (\d, int() and str.isdigit also take "١", an Arabic-Indic one).
NUMBER = "[0-9]+"
# A numbered image is named <letters>_<number>: test_12.png, satImage_001.png, mask_007.png.
NUMBERED_NAME = re.compile(rf"[A-Za-z]+_({NUMBER})")
MASK_THRESHOLD = 128         # road pixels are 237 with anti-aliased edges, not 255
MAX_NAMES_SHOWN = 3          # file names listed in one error line before "and N more"
MAX_IMAGE_SIDE = 16384       # pixels; larger images are refused (a 16384^2 RGB image is 768 MiB)


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path

    @property
    def name(self):
        return self.image.name


def _image_files(folder, option):
    if not folder.is_dir():
        raise InputError(f"{folder}: folder not found; pass {option} with "
                         f"{IMAGES_SUBDIR}/ and {MASKS_SUBDIR}/ inside")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise InputError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) in the folder; "
                         f"add them or pass another {option}")
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


def find_pairs(data_dir, option="--data-dir"):
    """Image/mask pairs matched by file name (extension aside), sorted by name; errors name the
    `option` that gave the folder."""
    data_dir = Path(data_dir)
    images = _by_stem(_image_files(data_dir / IMAGES_SUBDIR, option))
    masks = _by_stem(_image_files(data_dir / MASKS_SUBDIR, option))
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
    """The number of a numbered image: test_12.png -> 12 (NUMBERED_NAME, nothing else)."""
    match = NUMBERED_NAME.fullmatch(Path(path).stem)
    if not match:
        raise InputError(f"{path}: not a numbered image name; name it like test_12.png "
                         "(letters, an underscore, the image number)")
    return int(match.group(1))


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
        # The first line only: imageio appends several lines of plugin advice.
        reason = (str(error).strip().splitlines() or [""])[0][:120]
        raise InputError(f"{path}: cannot read the image ({type(error).__name__}: {reason}); "
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
    if max(array.shape[:2]) > MAX_IMAGE_SIDE:
        raise InputError(f"{path}: {array.shape[1]}x{array.shape[0]} pixels, larger than "
                         f"{MAX_IMAGE_SIDE} on a side; cut it into tiles")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{path}: shape {array.shape} is not an image with 1 to 4 channels; "
                         "save it as grey, RGB or RGBA")
    channels = array.shape[-1]
    # An opaque alpha channel (the CIL 2022 images') says nothing: such images are RGB.
    transparent = channels in (2, 4) and bool((array[..., -1] < 255).any())
    if channels in (2, 4):
        array = array[..., :-1]                      # drop alpha
    if channels in (1, 2):
        array = np.repeat(array, 3, axis=-1)
    if notes is not None and (channels in (1, 2) or transparent):
        kind = {1: "grey", 2: "grey with alpha", 4: "RGBA"}[channels]
        dropped = ", transparency dropped" if transparent else ""
        notes.setdefault(f"{kind} images converted to RGB{dropped}", []).append(Path(path).name)
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
                         f"--classes {max(2, int(array.max()) + 1)} if the values are class "
                         "numbers")
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


def fold_assignment(foreground, folds, seed):
    """The fold (0..folds-1) of each image, stratified by its foreground share: images sorted by
    it are dealt out in blocks of `folds`, each block shuffled by the seed, so every fold gets
    its share of sparse and dense masks and the fold sizes differ by at most one."""
    if len(foreground) < folds:
        raise InputError(f"found {len(foreground)} image(s) for --folds {folds}; every fold "
                         "needs at least one, so lower --folds or add images")
    rng = np.random.default_rng(seed)
    order = np.argsort(foreground, kind="stable")
    assignment = np.empty(len(foreground), int)
    for start in range(0, len(order), folds):
        block = order[start:start + folds]
        assignment[block] = rng.permutation(folds)[:len(block)]
    return assignment.tolist()


def train_sample_size(images, crop, aug, multiple=1):
    """(height, width) of the training samples: the crop, or the images' one shared size, which
    the model must accept (sides multiples of `multiple`)."""
    sizes = sorted({image.shape[:2] for image in images})
    if crop:
        small = [s for s in sizes if min(s) < crop]
        if small:
            fit = min(min(s) for s in sizes) // multiple * multiple
            hint = (f"pass --crop {fit} or smaller (a multiple of {multiple})" if fit else
                    f"use images of at least {multiple} pixels or a smaller --depth")
            raise InputError(f"--crop {crop} is larger than images of {small[0][1]}x{small[0][0]}; "
                             f"{hint}")
        return crop, crop
    if len(sizes) > 1:
        raise InputError(f"training images differ in size ({sizes[0][1]}x{sizes[0][0]} and "
                         f"{sizes[1][1]}x{sizes[1][0]}); pass --crop to train on crops of one size")
    if aug["quarter_turns"] and sizes[0][0] != sizes[0][1]:
        raise InputError(f"quarter turns need square samples but the images are "
                         f"{sizes[0][1]}x{sizes[0][0]}; pass --crop or --aug quarter_turns=false")
    height, width = sizes[0]
    if height % multiple or width % multiple:
        fit = f"{height // multiple * multiple}" if min(height, width) >= multiple else None
        hint = f"pass --crop {fit}" if fit else "use larger images"
        raise InputError(f"training images are {width}x{height} but the model needs sides that are "
                         f"multiples of {multiple}; {hint} or a smaller --depth")
    return height, width


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
