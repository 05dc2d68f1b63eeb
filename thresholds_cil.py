"""Deciding foreground, in one place: the pixel threshold and the patch share (the share of a
16x16 patch's pixels that must be foreground for the CSV to say so), their defaults, how a run
decides them (given, tuned out of fold where that beat the defaults, or the defaults), applying
the pixel threshold to probabilities, and tuning both on predictions. The grader's own patch
rule and its 0.25 are Kaggle facts (mask_to_submission.FOREGROUND_THRESHOLD); the tool's patch
share starts there. NumPy only.
"""

import numpy as np

from mask_to_submission import FOREGROUND_THRESHOLD, patch_means

PIXEL_THRESHOLD = 0.5        # probability from which a pixel counts as foreground
# Searched by tune_thresholds: pixel probabilities, and patch foreground fractions for the CSV.
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.91, 0.05))
PATCH_THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.1, 0.51, 0.05))


def labels_from(probabilities, classes, threshold=PIXEL_THRESHOLD):
    """(H, W) uint8: 0/1 at `threshold` when binary, the most probable class otherwise."""
    if classes == 1:
        return (probabilities[..., 0] >= threshold).astype(np.uint8)
    return np.argmax(probabilities, axis=-1).astype(np.uint8)


def decided_thresholds(settings):
    """(pixel, patch) thresholds that validation, submission and the tables use: --threshold
    and --patch-threshold, else what --from-run (or --weights of a run) brought when tuning
    beat the defaults on folds it did not see, else PIXEL_THRESHOLD and the grader's
    FOREGROUND_THRESHOLD. All arrive as settings, with their source recorded."""
    return (settings.threshold or PIXEL_THRESHOLD,
            FOREGROUND_THRESHOLD if settings.patch_threshold is None else settings.patch_threshold)


def patch_words(classes, patch_threshold):
    """How a report names the CSV's patch threshold: only binary tasks have one."""
    return f", patch share {patch_threshold}" if classes == 1 else ""


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
