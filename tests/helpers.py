"""Small helpers for writing test images."""

import numpy as np
import skimage.io


def save(path, array):
    """Write an image file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    skimage.io.imsave(path, np.asarray(array), check_contrast=False)
    return path


def make_pair(root, name, image, mask):
    """An image and its mask under root/training/."""
    save(root / "training/images" / name, image)
    save(root / "training/groundtruth" / name, mask)


def rgb(size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8)


def road_mask(size=32):
    """A vertical road, 237 like the real masks, with anti-aliased 118 edges."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 4 + 1:size // 2] = 237
    mask[:, size // 4] = mask[:, size // 2] = 118
    return mask
