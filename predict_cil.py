"""Full-size prediction with test-time augmentation, evaluation tables, threshold tuning and the
PNG outputs of a run (probabilities, masks, overlays, contact sheet).
"""

from pathlib import Path

import numpy as np

from data_cil import write_png
from losses_cil import PIXEL_THRESHOLD, SegmentationMetric, evaluation_metrics
from model_cil import required_multiple

TTA_CHOICES = (1, 2, 4, 8)
# (quarter turns, mirror left-right) in the order TTA adds them: 2 = + mirror, 4 = + upside
# down and half turn, 8 = all eight symmetries of the square.
DIHEDRAL = ((0, False), (0, True), (2, True), (2, False), (1, False), (1, True), (3, False),
            (3, True))
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.05))  # searched by tune_threshold
TRUE_POSITIVE = (0, 200, 0)      # overlay colours: green road found,
FALSE_POSITIVE = (230, 0, 0)     # red road invented,
FALSE_NEGATIVE = (0, 90, 255)    # blue road missed
OVERLAY_OPACITY = 0.5
CLASS_COLOURS = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                 (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60))
SHEET_IMAGES = 6                 # test images on the contact sheet
SHEET_SIDE = 200                 # pixels per picture on the contact sheet


def pad_to_multiple(image, multiple):
    """Reflect-pad the bottom and right so both sides are multiples of `multiple`."""
    h, w = image.shape[:2]
    pad = ((0, -h % multiple), (0, -w % multiple)) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad, mode="symmetric")


def dihedral(x, turns, mirror):
    """x mirrored left-right (if asked), then turned by quarter turns."""
    x = x[:, ::-1] if mirror else x
    return np.rot90(x, turns)


def undo_dihedral(x, turns, mirror):
    x = np.rot90(x, -turns)
    return x[:, ::-1] if mirror else x


def predict_probabilities(model, image, *, tta=1):
    """(H, W, C) probabilities for one image of any size: reflect-padded to what the model
    accepts, predicted in one piece (no tiles, no seams), averaged over `tta` symmetries with
    each one undone, and cropped back."""
    h, w = image.shape[:2]
    padded = pad_to_multiple(image.astype(np.float32), required_multiple(model))
    variants = [dihedral(padded, *DIHEDRAL[i]) for i in range(tta)]
    shapes = {v.shape for v in variants}
    if len(shapes) == 1:
        outputs = model.predict_on_batch(np.stack(variants))
    else:  # quarter turns of a non-square image change its shape
        outputs = [model.predict_on_batch(v[None])[0] for v in variants]
    mean = np.mean([undo_dihedral(out, *DIHEDRAL[i]) for i, out in enumerate(outputs)], axis=0)
    return mean[:h, :w]


def labels_from(probabilities, classes, threshold=PIXEL_THRESHOLD):
    """(H, W) uint8: 0/1 at `threshold` when binary, the most probable class otherwise."""
    if classes == 1:
        return (probabilities[..., 0] >= threshold).astype(np.uint8)
    return np.argmax(probabilities, axis=-1).astype(np.uint8)


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


def evaluate(masks, probabilities, classes, threshold=PIXEL_THRESHOLD):
    """{metric name: value} over all images, streamed image by image like validation."""
    metrics = evaluation_metrics(classes, threshold)
    for mask, prob in zip(masks, probabilities):
        for metric in metrics:
            metric.update_state(mask[None, ..., None], prob[None])
    return {metric.name: round(float(metric.result()), 4) for metric in metrics}


def patch_f1(masks, probabilities, threshold):
    metric = SegmentationMetric("f1", patch=True, threshold=threshold)
    for mask, prob in zip(masks, probabilities):
        metric.update_state(mask[None, ..., None], prob[None])
    return float(metric.result())


def tune_threshold(masks, probabilities):
    """The pixel threshold with the best validation patch F1, and that F1 against 0.5's."""
    scores = {t: patch_f1(masks, probabilities, t) for t in THRESHOLDS}
    best = max(scores, key=lambda t: (scores[t], -abs(t - PIXEL_THRESHOLD)))
    return dict(threshold=best, patch_f1=round(scores[best], 4),
                patch_f1_at_0_5=round(scores[PIXEL_THRESHOLD], 4))


def write_validation_outputs(folder, name, image, mask, probabilities, classes, *, threshold,
                             palette=None):
    """<name>_prob.png, <name>_mask.png and <name>_overlay.png in `folder`."""
    stem = Path(name).stem
    labels = labels_from(probabilities, classes, threshold)
    confidence = probabilities[..., 0] if classes == 1 else probabilities.max(axis=-1)
    write_png(folder / f"{stem}_prob.png", np.round(confidence * 255).astype(np.uint8))
    write_png(folder / f"{stem}_mask.png", mask_png(labels, classes))
    write_png(folder / f"{stem}_overlay.png", overlay(image, mask, labels, classes, palette))


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
