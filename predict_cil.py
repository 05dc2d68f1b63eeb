"""Prediction and its outputs: full-size prediction with test-time augmentation, tiles and
ensembles, the decision threshold (decided in one place), the PNG outputs of a run, and the test
masks with the Kaggle CSV. What predictions are judged by (tables, tuned thresholds, the
cross-validation report) is report_cil's; models are read by model_cil, exported by export_cil,
and TensorBoard's files written by board_cil.
"""

import time
from pathlib import Path

import click
import numpy as np

from data_cil import read_image
from io_cil import write_png
from mask_to_submission import FOREGROUND_THRESHOLD, write_submission
from model_cil import required_multiple
from runs_cil import SUBMISSION_FILE
from options_cil import PIXEL_THRESHOLD
# (quarter turns, mirror left-right) in the order TTA adds them: 2 = + mirror, 4 = + upside
# down and half turn, 8 = all eight symmetries of the square.
DIHEDRAL = ((0, False), (0, True), (2, True), (2, False), (1, False), (1, True), (3, False),
            (3, True))
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


def _tile_starts(size, tile, stride):
    """Where tiles start along one side: every `stride` pixels, the last flush with the end."""
    return [*range(0, size - tile, stride), size - tile]


def tile_window(tile, overlap):
    """(tile, tile, 1) blending weights: 1 inside, falling linearly to near 0 across the
    `overlap` at each edge, so the sum over overlapping tiles changes smoothly."""
    distance = np.minimum(np.arange(tile) + 0.5, tile - np.arange(tile) - 0.5)
    ramp = np.minimum(1.0, distance / overlap) if overlap else np.ones(tile)
    return np.outer(ramp, ramp).astype(np.float32)[..., None]


def predict_tiled(model, image, *, tile, overlap, tta=1):
    """(H, W, C) probabilities for an image of any size from tile x tile pieces that overlap by
    `overlap` pixels, each predicted with TTA and blended with tile_window: the model never holds
    more than one tile's activations, whatever the size of the image."""
    h, w = image.shape[:2]
    padding = ((0, max(0, tile - h)), (0, max(0, tile - w)), (0, 0))
    padded = np.pad(image, padding, mode="symmetric")
    window = tile_window(tile, overlap)
    total = weight = None
    for top in _tile_starts(padded.shape[0], tile, tile - overlap):
        for left in _tile_starts(padded.shape[1], tile, tile - overlap):
            piece = predict_probabilities(model, padded[top:top + tile, left:left + tile],
                                          tta=tta)
            if total is None:
                total = np.zeros((*padded.shape[:2], piece.shape[-1]), np.float32)
                weight = np.zeros((*padded.shape[:2], 1), np.float32)
            total[top:top + tile, left:left + tile] += piece * window
            weight[top:top + tile, left:left + tile] += window
    return (total / weight)[:h, :w]


def predict_image(model, image, *, tta=1, tile=0, overlap=0):
    """One model's probabilities for one image: whole, or in tiles when `tile` is smaller than
    the image (a tile that covers it is the whole image)."""
    if tile and tile < max(image.shape[:2]):
        return predict_tiled(model, image, tile=tile, overlap=overlap, tta=tta)
    return predict_probabilities(model, image, tta=tta)


def ensemble_probabilities(models, image, *, tta=1, tile=0, overlap=0):
    """The mean of several models' probabilities (each with TTA) for one image; time and memory
    grow with the number of models, one model's activations at a time."""
    total = None
    for model in models:
        probabilities = predict_image(model, image, tta=tta, tile=tile, overlap=overlap)
        total = probabilities if total is None else total + probabilities
    return total / len(models)


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


def decided_thresholds(settings):
    """(pixel, patch) thresholds that validation, submission and the tables use: --threshold
    and --patch-threshold, else what --from-run (or --weights of a run) brought when tuning
    beat the defaults on folds it did not see, else PIXEL_THRESHOLD and the grader's
    FOREGROUND_THRESHOLD. All arrive as settings, with their source recorded."""
    return (settings.threshold or PIXEL_THRESHOLD,
            FOREGROUND_THRESHOLD if settings.patch_threshold is None else settings.patch_threshold)


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


def predicted(models, images, settings):
    """Full-size probabilities of each image, averaged over the models, as the settings say
    (TTA, tiles)."""
    return [ensemble_probabilities(models, image, tta=settings.tta, tile=settings.tile,
                                   overlap=settings.overlap) for image in images]


def patch_words(classes, patch_threshold):
    """How a report names the CSV's patch threshold: only binary tasks have one."""
    return f", patch share {patch_threshold}" if classes == 1 else ""


def csv_foreground(labels, classes):
    """The mask the Kaggle CSV scores, or None with several foreground classes: the CSV has one
    foreground, so binary tasks and class 1 of two classes qualify."""
    if classes > 2:
        return None
    return labels.astype(float) if classes == 1 else (labels == 1).astype(float)


def write_test_predictions(models, settings, run, tests, palette=None):
    """Masks for the test images {number: path} in run.submit_dir from the models' mean, the
    CSV (one foreground class) and a contact sheet; returns a summary."""
    started = time.perf_counter()
    classes = settings.classes
    threshold, patch_threshold = decided_thresholds(settings)
    images, labels = [], {}
    for number, file in tests.items():
        image = read_image(file)
        labels[number] = labels_from(ensemble_probabilities(
            models, image, tta=settings.tta, tile=settings.tile, overlap=settings.overlap),
            classes, threshold)
        write_png(run.submit_dir / f"{file.stem}.png", mask_png(labels[number], classes))
        images.append(image)
    summary = dict(test_images=len(tests), models=len(models), threshold=threshold,
                   patch_threshold=patch_threshold, tta=settings.tta, masks=str(run.submit_dir))
    if classes <= 2:
        csv_path = run.submit_dir / SUBMISSION_FILE
        lines = write_submission(csv_path, {n: csv_foreground(m, classes)
                                            for n, m in labels.items()},
                                 threshold=patch_threshold)
        road = sum(line.endswith(",1") for line in lines[1:]) / (len(lines) - 1)
        summary.update(csv=str(csv_path), csv_lines=len(lines) - 1, road_patch_share=round(road, 4))
    sheet = run.file("contact_sheet")
    write_png(sheet, contact_sheet(images, list(labels.values()), classes, palette))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    mean = f" (mean of {len(models)} models)" if len(models) > 1 else ""
    click.echo(f"\npredicted {len(tests)} test images{mean} (pixel threshold {threshold}"
               f"{patch_words(classes, patch_threshold)}, TTA {settings.tta}) into "
               f"{run.submit_dir} in {summary['seconds']} s")
    if "csv" in summary:
        what = "foreground" if classes == 1 else "class 1"
        click.echo(f"wrote {summary['csv']}: {summary['csv_lines']} patches, "
                   f"{summary['road_patch_share']:.1%} of them {what}")
    else:
        click.echo(f"no Kaggle CSV: it scores one foreground class and the model has {classes}; "
                   "the masks hold class numbers")
    click.echo(f"contact sheet: {sheet}")
    return summary
