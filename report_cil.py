"""What predictions are judged by: the evaluation tables, the validation report (with the
thresholds tuned on its images, never applied) and cross-validation's out-of-fold predictions
with their table and tuned thresholds. Predictions come from predict_cil, thresholds are
thresholds_cil's.
"""

import click
import numpy as np

from io_cil import write_atomically
from losses_cil import evaluation_metrics
from mask_to_submission import FOREGROUND_THRESHOLD
from render_cil import write_validation_outputs
from runs_cil import fold_folder, path, read_metrics
from thresholds_cil import (PIXEL_THRESHOLD, decided_thresholds, labels_from, patch_words,
                            tune_thresholds)

SUMMARY_METRICS = {1: ("f1", "patch_f1", "precision", "recall", "iou", "patch_accuracy"),
                   "multi": ("f1", "mean_iou", "precision", "recall", "micro_f1")}


def evaluate(masks, probabilities, classes, threshold=PIXEL_THRESHOLD,
             patch_threshold=FOREGROUND_THRESHOLD):
    """{metric name: value} over all images, streamed image by image like validation."""
    metrics = evaluation_metrics(classes, threshold, patch_threshold)
    for mask, prob in zip(masks, probabilities):
        for metric in metrics:
            metric.update_state(mask[None, ..., None], prob[None])
    return {metric.name: round(float(metric.result()), 4) for metric in metrics}


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


def report_validation(settings, run, pairs, images, masks, probabilities, palette=None):
    """The validation PNG outputs, the metric table (printed) and the metrics.json fields."""
    classes = settings.classes
    threshold, patch_threshold = decided_thresholds(settings)
    for pair, image, mask, prob in zip(pairs, images, masks, probabilities):
        write_validation_outputs(run.valid_dir, pair.name, image, mask, prob,
                                 labels_from(prob, classes, threshold), classes, palette)
    table = evaluate(masks, probabilities, classes, threshold, patch_threshold)
    click.echo(f"\nvalidation, {len(images)} images at full size, pixel threshold {threshold}"
               f"{patch_words(classes, patch_threshold)}, TTA {settings.tta}:")
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
               f"{patch_words(classes, FOREGROUND_THRESHOLD)}, TTA {settings.tta}):")
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
