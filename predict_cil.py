"""Prediction and the test outputs: full-size prediction with test-time augmentation, tiles and
ensembles, and the test masks with the Kaggle CSV and the contact sheet. Thresholds are decided
by thresholds_cil, pictures drawn by render_cil; what predictions are judged by (tables, the
cross-validation report) is report_cil's; models are read by model_cil, exported by export_cil.
"""

import time

import click
import numpy as np

from data_cil import read_image
from io_cil import write_png
from mask_to_submission import write_submission
from model_cil import required_multiple
from render_cil import contact_sheet, mask_png
from runs_cil import SUBMISSION_FILE
from thresholds_cil import decided_thresholds, labels_from, patch_words

# (quarter turns, mirror left-right) in the order TTA adds them: 2 = + mirror, 4 = + upside
# down and half turn, 8 = all eight symmetries of the square.
DIHEDRAL = ((0, False), (0, True), (2, True), (2, False), (1, False), (1, True), (3, False),
            (3, True))


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


def predicted(models, images, settings):
    """Full-size probabilities of each image, averaged over the models, as the settings say
    (TTA, tiles)."""
    return [ensemble_probabilities(models, image, tta=settings.tta, tile=settings.tile,
                                   overlap=settings.overlap) for image in images]


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
