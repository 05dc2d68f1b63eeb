"""What people look at: masks and predictions as pictures (grey levels, or class colours), the
overlay of a prediction on its image (road found, invented, missed), the contact sheet of test
predictions, the mask PNGs a run writes, and a validation image's three PNGs. NumPy only: training
draws its TensorBoard panels with it without importing prediction.
"""

from pathlib import Path

import numpy as np

from io_cil import write_png

TRUE_POSITIVE = (0, 200, 0)      # overlay colours: green road found,
FALSE_POSITIVE = (230, 0, 0)     # red road invented,
FALSE_NEGATIVE = (0, 90, 255)    # blue road missed
OVERLAY_OPACITY = 0.5
CLASS_COLOURS = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                 (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60))
SHEET_IMAGES = 6                 # test images on the contact sheet
SHEET_SIDE = 200                 # pixels per picture on the contact sheet


def class_colours(classes, palette=None):
    """RGB per class: the user's palette where given, else a fixed distinct set."""
    colours = [CLASS_COLOURS[i % len(CLASS_COLOURS)] for i in range(max(classes, 2))]
    for rgb, index in (palette or {}).items():
        colours[index] = rgb
    return np.array(colours, np.uint8)


def render_mask(values, classes, palette=None):
    """RGB uint8 picture of a mask or prediction (H, W, 1 or C): grey levels when binary, class
    colours otherwise."""
    if classes == 1:
        return np.repeat(np.clip(values[..., :1] * 255, 0, 255), 3, axis=-1).astype(np.uint8)
    labels = values[..., 0].astype(int) if values.shape[-1] == 1 else np.argmax(values, -1)
    return class_colours(classes, palette)[labels]


def overlay(image, truth, predicted, classes, palette=None):
    """The image with the prediction painted on it: true positives, false positives and false
    negatives in three colours when binary (truth may be None), class colours otherwise."""
    paint = np.zeros_like(image)
    painted = np.zeros(image.shape[:2], bool)
    if classes == 1:
        regions = [(predicted == 1, TRUE_POSITIVE)] if truth is None else [
            ((predicted == 1) & (truth == 1), TRUE_POSITIVE),
            ((predicted == 1) & (truth == 0), FALSE_POSITIVE),
            ((predicted == 0) & (truth == 1), FALSE_NEGATIVE)]
        for region, colour in regions:
            paint[region] = colour
            painted |= region
    else:
        paint = class_colours(classes, palette)[predicted]
        painted = predicted > 0
    blended = image.astype(np.float32)
    blended[painted] = (1 - OVERLAY_OPACITY) * blended[painted] + OVERLAY_OPACITY * paint[painted]
    return blended.astype(np.uint8)


def mask_png(labels, classes):
    """What a mask file holds: 0/255 when binary (the Kaggle tools read it so), class numbers
    otherwise."""
    return labels * 255 if classes == 1 else labels


def contact_sheet(images, labels, classes, palette=None):
    """One picture of up to SHEET_IMAGES images, each beside its prediction painted on it."""
    rows = []
    for image, label in list(zip(images, labels))[:SHEET_IMAGES]:
        picture = np.concatenate([image, overlay(image, None, label, classes, palette)], axis=1)
        step = max(1, image.shape[0] // SHEET_SIDE)
        rows.append(picture[::step, ::step])
    width = max(row.shape[1] for row in rows)
    rows = [np.pad(row, ((0, 0), (0, width - row.shape[1]), (0, 0))) for row in rows]
    return np.concatenate(rows, axis=0)


def write_validation_outputs(folder, name, image, mask, probabilities, labels, classes,
                             palette=None):
    """<name>_prob.png, <name>_mask.png and <name>_overlay.png in `folder`: the probabilities,
    the decided `labels` and the labels painted on the image against the truth `mask`."""
    stem = Path(name).stem
    confidence = probabilities[..., 0] if classes == 1 else probabilities.max(axis=-1)
    write_png(folder / f"{stem}_prob.png", np.round(confidence * 255).astype(np.uint8))
    write_png(folder / f"{stem}_mask.png", mask_png(labels, classes))
    write_png(folder / f"{stem}_overlay.png", overlay(image, mask, labels, classes, palette))
