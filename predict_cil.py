"""Prediction and what follows it: full-size prediction with test-time augmentation, the
decision threshold (decided in one place), evaluation tables, the validation report, the test
masks with the Kaggle CSV, and the PNG outputs of a run. Models are read by model_cil, exported
by export_cil, and TensorBoard's files written by board_cil.
"""

import time
from pathlib import Path

import click
import numpy as np

from data_cil import read_image, write_atomically, write_png
from losses_cil import evaluation_metrics
from mask_to_submission import FOREGROUND_THRESHOLD, patch_means, write_submission
from model_cil import required_multiple
from runs_cil import SUBMISSION_FILE, fold_folder, path, read_metrics
from settings_cil import PIXEL_THRESHOLD
# (quarter turns, mirror left-right) in the order TTA adds them: 2 = + mirror, 4 = + upside
# down and half turn, 8 = all eight symmetries of the square.
DIHEDRAL = ((0, False), (0, True), (2, True), (2, False), (1, False), (1, True), (3, False),
            (3, True))
# Searched by tune_thresholds: pixel probabilities, and patch foreground fractions for the CSV.
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.05))
PATCH_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.51, 0.05))
SUMMARY_METRICS = {1: ("f1", "patch_f1", "precision", "recall", "iou", "patch_accuracy"),
                   "multi": ("f1", "mean_iou", "precision", "recall", "micro_f1")}
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
    """One model's probabilities for one image: whole, or in tiles when `tile`."""
    if tile:
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


def evaluate(masks, probabilities, classes, threshold=PIXEL_THRESHOLD,
             patch_threshold=FOREGROUND_THRESHOLD):
    """{metric name: value} over all images, streamed image by image like validation."""
    metrics = evaluation_metrics(classes, threshold, patch_threshold)
    for mask, prob in zip(masks, probabilities):
        for metric in metrics:
            metric.update_state(mask[None, ..., None], prob[None])
    return {metric.name: round(float(metric.result()), 4) for metric in metrics}


def decided_thresholds(settings):
    """(pixel, patch) thresholds that validation, submission and the tables use: --threshold
    and --patch-threshold, else what --from-run (or --weights of a run) brought when tuning
    beat the defaults on folds it did not see, else PIXEL_THRESHOLD and the grader's
    FOREGROUND_THRESHOLD. All arrive as settings, with their source recorded."""
    return (settings.threshold or PIXEL_THRESHOLD,
            FOREGROUND_THRESHOLD if settings.patch_threshold is None else settings.patch_threshold)


def _patch_table(masks, probabilities):
    """(truth patch labels, {pixel threshold: patch foreground shares}) over all images."""
    truth = np.concatenate([(patch_means(mask) > FOREGROUND_THRESHOLD).ravel() for mask in masks])
    shares = {t: np.concatenate([patch_means(prob[..., 0] >= t).ravel()
                                 for prob in probabilities]) for t in THRESHOLDS}
    return truth, shares


def _patch_f1(truth, predicted):
    tp = np.sum(truth & predicted)
    wrong = np.sum(truth != predicted)
    return 2 * tp / (2 * tp + wrong) if tp + wrong else 0.0


def _best(scores):
    """The (pixel, patch) pair with the best score; ties go to the one nearest the defaults."""
    return max(scores, key=lambda pair: (round(scores[pair], 10),
                                         -abs(pair[0] - PIXEL_THRESHOLD)
                                         - abs(pair[1] - FOREGROUND_THRESHOLD)))


def tune_thresholds(masks, probabilities, groups=None):
    """The pixel threshold and patch foreground fraction with the best patch F1 over the images,
    with that F1 and the F1 at the defaults. With `groups` (a fold per image), also the F1 that
    tuning reaches on images it did not see: each group scored with the thresholds tuned on the
    others, their patch labels pooled."""
    truth, shares = _patch_table(masks, probabilities)
    scores = {(t, f): _patch_f1(truth, shares[t] > f) for t in THRESHOLDS for f in PATCH_THRESHOLDS}
    best = _best(scores)
    tuned = dict(threshold=best[0], patch_threshold=best[1], patch_f1=round(scores[best], 4),
                 patch_f1_at_defaults=round(scores[(PIXEL_THRESHOLD, FOREGROUND_THRESHOLD)], 4))
    if groups is not None:
        patches = np.concatenate([np.full(patch_means(mask).size, group)
                                  for mask, group in zip(masks, groups)])
        predicted = np.zeros_like(truth)
        for group in sorted(set(groups)):
            seen = patches != group
            pair = _best({(t, f): _patch_f1(truth[seen], shares[t][seen] > f)
                          for t in THRESHOLDS for f in PATCH_THRESHOLDS})
            predicted[~seen] = shares[pair[0]][~seen] > pair[1]
        tuned["patch_f1_unseen"] = round(_patch_f1(truth, predicted), 4)
    # Only a score on images the thresholds were not tuned on can justify leaving the defaults
    tuned["applied"] = bool(tuned.get("patch_f1_unseen", 0.0) > tuned["patch_f1_at_defaults"])
    return tuned


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


# ---------------------------------------------------------------------------------------------
# Reports


def format_table(table, classes):
    """Two columns of the headline metrics, then per-class rows for several classes."""
    if classes == 1:
        names = [("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("iou", "IoU"),
                 ("patch_accuracy", "patch accuracy"), ("patch_f1", "patch F1 (Kaggle)"),
                 ("accuracy", "pixel accuracy (never used to choose a model)")]
        return "\n".join(f"  {label:<46} {table[key]:.4f}" for key, label in names)
    lines = [f"  {'class':<8}{'precision':>10}{'recall':>10}{'F1':>10}{'IoU':>10}"]
    for index in range(classes):
        lines.append(f"  {index:<8}" + "".join(f"{table[f'{kind}_{index}']:>10.4f}"
                                              for kind in ("precision", "recall", "f1", "iou")))
    lines.append(f"  {'macro':<8}" + "".join(f"{table[key]:>10.4f}"
                                            for key in ("precision", "recall", "f1", "mean_iou")))
    lines.append(f"  {'micro':<8}" + "".join(f"{table[key]:>10.4f}" for key in
                                            ("micro_precision", "micro_recall", "micro_f1",
                                             "micro_iou")))
    lines.append(f"  pixel accuracy {table['accuracy']:.4f} (never used to choose a model)")
    return "\n".join(lines)


def predicted(models, images, settings):
    """Full-size probabilities of each image, averaged over the models, as the settings say
    (TTA, tiles)."""
    return [ensemble_probabilities(models, image, tta=settings.tta, tile=settings.tile,
                                   overlap=settings.overlap) for image in images]


def report_validation(settings, run, pairs, images, masks, probabilities, palette=None):
    """The validation PNG outputs, the metric table (printed) and the metrics.json fields."""
    classes = settings.classes
    threshold, patch_threshold = decided_thresholds(settings)
    for pair, image, mask, prob in zip(pairs, images, masks, probabilities):
        write_validation_outputs(run.valid_dir, pair.name, image, mask, prob, classes,
                                 threshold=threshold, palette=palette)
    table = evaluate(masks, probabilities, classes, threshold, patch_threshold)
    click.echo(f"\nvalidation, {len(images)} images at full size, pixel threshold {threshold}"
               f"{_patch_words(classes, patch_threshold)}, TTA {settings.tta}:")
    click.echo(format_table(table, classes))
    report = dict(valid=table, threshold=threshold, patch_threshold=patch_threshold,
                  tta=settings.tta)
    if classes == 1:
        tuned = tune_thresholds(masks, probabilities)
        note = "" if settings.fold is not None else ("; scored on the images they were tuned "
                                                     "on, so not applied (--folds tunes them)")
        click.echo(f"tuned on these {len(images)} images: pixel threshold {tuned['threshold']}, "
                   f"patch share {tuned['patch_threshold']}: patch F1 {tuned['patch_f1']:.4f} "
                   f"(at {PIXEL_THRESHOLD}/{FOREGROUND_THRESHOLD}: "
                   f"{tuned['patch_f1_at_defaults']:.4f}){note}")
        report["tuned"] = tuned
    click.echo(f"outputs: {run.valid_dir}")
    return report


def _patch_words(classes, patch_threshold):
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
               f"{_patch_words(classes, patch_threshold)}, TTA {settings.tta}) into "
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


# ---------------------------------------------------------------------------------------------
# Cross-validation: out-of-fold predictions and their table


def write_oof(file, pairs, masks, probabilities):
    """A fold's out-of-fold predictions: probabilities as 0..255 (1/255 is finer than any
    threshold searched) and the masks, by image name."""
    arrays = {}
    for pair, mask, prob in zip(pairs, masks, probabilities):
        arrays[f"probabilities/{pair.name}"] = np.round(prob * 255).astype(np.uint8)
        arrays[f"mask/{pair.name}"] = mask
    write_atomically(file, lambda p: np.savez_compressed(p, **arrays))


def read_oof(file):
    """(names, masks, probabilities) of a fold's out-of-fold predictions."""
    with np.load(file) as content:
        names = [key.split("/", 1)[1] for key in content.files if key.startswith("mask/")]
        masks = [content[f"mask/{name}"] for name in names]
        probabilities = [content[f"probabilities/{name}"].astype(np.float32) / 255
                         for name in names]
    return names, masks, probabilities


def cross_validation_report(folder, folds, settings):
    """The out-of-fold table over every image (each predicted by the fold model that did not
    train on it), each metric's mean and spread over the folds, and, for binary tasks, the
    thresholds tuned out of fold with the patch F1 they reach on folds they were not tuned on.
    Printed; returned for metrics.json."""
    classes = settings.classes
    names, masks, probabilities, groups, tables, best_epochs = [], [], [], [], [], []
    for fold in range(folds):
        fold_names, fold_masks, fold_probabilities = read_oof(path(fold_folder(folder, fold),
                                                                   "oof"))
        names += fold_names
        masks += fold_masks
        probabilities += fold_probabilities
        groups += [fold] * len(fold_names)
        tables.append(evaluate(fold_masks, fold_probabilities, classes))
        best_epochs.append(read_metrics(fold_folder(folder, fold)).get("best_epoch"))
    table = evaluate(masks, probabilities, classes)
    keys = SUMMARY_METRICS[1 if classes == 1 else "multi"]
    spread = {key: dict(mean=round(float(np.mean([t[key] for t in tables])), 4),
                        sd=round(float(np.std([t[key] for t in tables], ddof=1)), 4),
                        min=min(t[key] for t in tables), max=max(t[key] for t in tables))
              for key in keys}
    click.echo(f"\nout-of-fold validation: {len(names)} images in {folds} folds, each predicted "
               f"by the model that did not train on it (pixel threshold {PIXEL_THRESHOLD}"
               f"{_patch_words(classes, FOREGROUND_THRESHOLD)}, TTA {settings.tta}):")
    click.echo(f"  {'metric':<16}{'all images':>12}{'fold mean':>12}{'sd':>8}{'min':>9}{'max':>9}")
    for key in keys:
        row = spread[key]
        click.echo(f"  {key:<16}{table[key]:>12.4f}{row['mean']:>12.4f}{row['sd']:>8.4f}"
                   f"{row['min']:>9.4f}{row['max']:>9.4f}")
    epochs = sorted(e for e in best_epochs if e)
    report = dict(images=len(names), folds=folds, oof=table, per_fold=tables, spread=spread,
                  best_epochs=best_epochs,
                  median_best_epoch=int(np.median(epochs)) if epochs else None)
    if classes == 1:
        tuned = tune_thresholds(masks, probabilities, groups)
        click.echo(f"thresholds tuned out of fold: pixel {tuned['threshold']}, patch share "
                   f"{tuned['patch_threshold']}; patch F1 {tuned['patch_f1_unseen']:.4f} on "
                   f"folds they were not tuned on ({tuned['patch_f1_at_defaults']:.4f} at "
                   f"{PIXEL_THRESHOLD}/{FOREGROUND_THRESHOLD}); " + (
                       "--submit --from-run uses them" if tuned["applied"] else
                       f"not better, so --submit --from-run keeps "
                       f"{PIXEL_THRESHOLD}/{FOREGROUND_THRESHOLD}"))
        report["tuned"] = tuned
    return report
