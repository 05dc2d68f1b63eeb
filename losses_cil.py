"""Segmentation losses and streaming metrics, written with keras.ops so they stay backend-neutral.

Masks arrive as (B, H, W, 1) floats: 0/1 for binary tasks, class numbers for multi-class ones.
Predictions are probabilities (B, H, W, C): one sigmoid channel, or a softmax over C classes.
Both classes are registered, so `keras.models.load_model` reloads a saved run without arguments.
"""

import keras
from keras import ops

from mask_to_submission import FOREGROUND_THRESHOLD, patch_means
from options_cil import METRIC_KINDS, PATCH_METRIC_KINDS, metric_name, parse_loss
from thresholds_cil import PIXEL_THRESHOLD

EPSILON = 1e-7               # keeps log() and divisions finite at predictions of exactly 0 or 1
DICE_SMOOTH = 1.0            # NVIDIA's dice_coe smoothing: an empty mask predicted empty scores 1
ADAPTIVE_SWITCH = 0.3        # NVIDIA's adaptive loss uses Dice once the Dice loss is below this
FOCAL_ALPHA = 0.25           # Lin et al. 2017, the weight of the foreground term
FOCAL_GAMMA = 2.0            # Lin et al. 2017, how much easy pixels are down-weighted
PATCH_F1_SHARPNESS = 0.05    # width of the sigmoid that stands in for "patch mean > 0.25"


def _one_hot(y_true, classes):
    """(B, H, W, C) targets: the mask itself when binary, one-hot class numbers otherwise."""
    if classes == 1:
        return ops.cast(y_true, "float32")
    return ops.one_hot(ops.cast(y_true[..., 0], "int32"), classes)


# Every loss term takes (target, probabilities, the SegmentationLoss for its settings).


def _cross_entropy(target, prob, loss):
    """Mean pixel cross-entropy; class_weights scale each class's pixels (None: all 1)."""
    prob = ops.clip(prob, EPSILON, 1 - EPSILON)
    if loss.classes == 1:
        w0, w1 = loss.class_weights or (1.0, 1.0)
        per_pixel = -(w1 * target * ops.log(prob) + w0 * (1 - target) * ops.log(1 - prob))
        return ops.mean(per_pixel)
    weights = ops.convert_to_tensor(loss.class_weights or [1.0] * loss.classes, "float32")
    return ops.mean(ops.sum(-target * ops.log(prob) * weights, axis=-1))


def _overlap(target, prob):
    """(intersection, sum of target, sum of prediction) per class over the whole batch."""
    axes = (0, 1, 2)
    return (ops.sum(target * prob, axis=axes), ops.sum(target, axis=axes),
            ops.sum(prob, axis=axes))


def _dice_loss(target, prob, loss=None):
    """1 - soft Sørensen-Dice over the batch, averaged over classes."""
    both, true_sum, pred_sum = _overlap(target, prob)
    return 1 - ops.mean((2 * both + DICE_SMOOTH) / (true_sum + pred_sum + DICE_SMOOTH))


def _bce_dice_loss(target, prob, loss):
    return _cross_entropy(target, prob, loss) + _dice_loss(target, prob)


def _jaccard_loss(target, prob, loss):
    """1 - soft IoU over the batch, averaged over classes."""
    both, true_sum, pred_sum = _overlap(target, prob)
    return 1 - ops.mean((both + DICE_SMOOTH) / (true_sum + pred_sum - both + DICE_SMOOTH))


def _focal_loss(target, prob, loss):
    prob = ops.clip(prob, EPSILON, 1 - EPSILON)
    alpha, gamma = loss.focal_alpha, loss.focal_gamma
    if loss.classes == 1:
        positive = -alpha * target * (1 - prob) ** gamma * ops.log(prob)
        negative = -(1 - alpha) * (1 - target) * prob ** gamma * ops.log(1 - prob)
        return ops.mean(positive + negative)
    return ops.mean(ops.sum(-target * (1 - prob) ** gamma * ops.log(prob), axis=-1))


def _adaptive_loss(target, prob, loss):
    """NVIDIA's rule: cross-entropy while the Dice loss is at least ADAPTIVE_SWITCH, then Dice."""
    dice = _dice_loss(target, prob)
    return ops.where(dice < ADAPTIVE_SWITCH, dice, _cross_entropy(target, prob, loss))


def patch_map(x):
    """The patch means of one-channel maps: (B, H, W, 1) -> (B, rows, cols, 1), cut patches at
    the edges by mask_to_submission.patch_means' rule."""
    return patch_means(x[..., 0], xp=ops)[..., None]


def _patch_f1_loss(target, prob, loss):
    """1 - soft F1 of the Kaggle patch labels: the rule "patch mean > 0.25" is applied to the
    truth and replaced by a steep sigmoid for the prediction, so it has a gradient."""
    truth = ops.cast(patch_map(target) > FOREGROUND_THRESHOLD, "float32")
    soft = ops.sigmoid((patch_map(prob) - FOREGROUND_THRESHOLD) / PATCH_F1_SHARPNESS)
    both = ops.sum(truth * soft)
    return 1 - (2 * both + DICE_SMOOTH) / (ops.sum(truth) + ops.sum(soft) + DICE_SMOOTH)


LOSS_FUNCTIONS = {                           # one per name of options_cil.LOSS_TERMS
    "bce": _cross_entropy,
    "weighted_bce": _cross_entropy,          # with the weights resolved by the caller
    "dice": _dice_loss,
    "bce_dice": _bce_dice_loss,
    "jaccard": _jaccard_loss,
    "focal": _focal_loss,
    "adaptive": _adaptive_loss,
    "patch_f1": _patch_f1_loss,
}


@keras.saving.register_keras_serializable(package="cil")
class SegmentationLoss(keras.losses.Loss):
    """The sum of the terms of a loss spec ("bce_dice", "focal+patch_f1", ...).

    Cross-entropy terms use `class_weights` ([background, foreground] when binary); `weighted_bce`
    is bce with weights that the caller resolved (e.g. from the training masks).
    `adaptive` is NVIDIA's rule as their code has it (utils/losses.py): binary cross-entropy while
    the Dice loss is at least 0.3, Dice once it falls below. Their README states the reverse.
    """

    def __init__(self, spec="bce_dice", classes=1, class_weights=None, focal_alpha=FOCAL_ALPHA,
                 focal_gamma=FOCAL_GAMMA, name=None, **kwargs):
        self.terms = parse_loss(spec)
        if classes > 1 and "patch_f1" in self.terms:
            raise ValueError("--loss patch_f1 scores the Kaggle road patches and needs binary "
                             "masks (--classes 1)")
        # TensorFlow name scopes refuse "+"
        super().__init__(name=name or spec.replace("+", "_plus_"), **kwargs)
        self.spec = spec
        self.classes = classes
        self.class_weights = list(class_weights) if class_weights else None
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def call(self, y_true, y_pred):
        target = _one_hot(y_true, self.classes)
        prob = ops.cast(y_pred, "float32")
        total = sum(LOSS_FUNCTIONS[term](target, prob, self) for term in self.terms)
        # One value per image, not a scalar: Keras divides per-image losses by the number of
        # replicas before summing gradients across them, but passes scalars through unscaled.
        return total * ops.ones_like(prob[:, 0, 0, 0])

    def get_config(self):
        return {**super().get_config(), "spec": self.spec, "classes": self.classes,
                "class_weights": self.class_weights, "focal_alpha": self.focal_alpha,
                "focal_gamma": self.focal_gamma}


def auto_class_weights(masks, classes):
    """Inverse-frequency weights from the training masks, normalised so background weighs 1."""
    counts = [0] * max(classes, 2)
    for mask in masks:
        for index, count in enumerate(mask_counts(mask, max(classes, 2))):
            counts[index] += count
    missing = [index for index, count in enumerate(counts) if count == 0]
    if missing:
        raise ValueError(f"class {missing[0]} never occurs in the training masks, so it has no "
                         "weight; pass --class-weights explicitly")
    return [round(counts[0] / count, 4) for count in counts]


def mask_counts(mask, classes):
    """Pixels of each class in one mask (numpy, uint8 class numbers)."""
    return [int((mask == index).sum()) for index in range(classes)]


# options_cil.METRIC_KINDS -> scores per class from the confusion counts (tp, fp, fn, tn)
METRIC_FORMULAS = {
    "precision": lambda tp, fp, fn, tn: ops.divide_no_nan(tp, tp + fp),
    "recall": lambda tp, fp, fn, tn: ops.divide_no_nan(tp, tp + fn),
    "f1": lambda tp, fp, fn, tn: ops.divide_no_nan(2 * tp, 2 * tp + fp + fn),
    "iou": lambda tp, fp, fn, tn: ops.divide_no_nan(tp, tp + fp + fn),
    "accuracy": lambda tp, fp, fn, tn: ops.divide_no_nan(tp + tn, tp + fp + fn + tn),
}


@keras.saving.register_keras_serializable(package="cil")
class SegmentationMetric(keras.metrics.Metric):
    """Precision, recall, F1, IoU or accuracy, streamed over batches from confusion counts.

    Counts accumulate per class, summed over replicas, so the result over a dataset is the
    result on one batch holding all of it. With `patch=True` the counts are over the Kaggle
    16x16 patch labels instead of pixels (binary tasks): the truth's by the grader's rule, the
    prediction's by `patch_threshold`, the submitter's choice. For several classes, `class_id` picks
    one class; otherwise `average` is "macro" (mean over classes) or "micro" (pooled counts).
    A binary task scores its foreground class.
    """

    def __init__(self, kind="f1", classes=1, class_id=None, average="macro", patch=False,
                 threshold=PIXEL_THRESHOLD, patch_threshold=FOREGROUND_THRESHOLD, name=None,
                 **kwargs):
        if kind not in METRIC_FORMULAS:
            raise ValueError(f"metric kind {kind!r}; choose from {', '.join(METRIC_KINDS)}")
        super().__init__(name=name or metric_name(kind, classes, class_id, average, patch),
                         **kwargs)
        self.kind, self.classes, self.class_id = kind, classes, class_id
        self.average, self.patch, self.threshold = average, patch, threshold
        self.patch_threshold = patch_threshold
        width = max(classes, 2)
        self.counts = {part: self.add_variable(shape=(width,), initializer="zeros", name=part,
                                               aggregation="sum")
                       for part in ("tp", "fp", "fn", "tn")}

    def _labels(self, y_true, y_pred):
        """One-hot (N, C) truth and prediction, background included as class 0 when binary."""
        if self.classes == 1:
            truth = ops.cast(y_true >= 0.5, "float32")
            pred = ops.cast(y_pred >= self.threshold, "float32")
            if self.patch:
                truth = ops.cast(patch_map(truth) > FOREGROUND_THRESHOLD, "float32")
                pred = ops.cast(patch_map(pred) > self.patch_threshold, "float32")
            truth = ops.concatenate([1 - truth, truth], axis=-1)
            pred = ops.concatenate([1 - pred, pred], axis=-1)
        else:
            truth = ops.one_hot(ops.cast(y_true[..., 0], "int32"), self.classes)
            pred = ops.one_hot(ops.argmax(y_pred, axis=-1), self.classes)
        width = truth.shape[-1]
        return ops.reshape(truth, (-1, width)), ops.reshape(pred, (-1, width))

    def update_state(self, y_true, y_pred, sample_weight=None):
        truth, pred = self._labels(ops.cast(y_true, "float32"), ops.cast(y_pred, "float32"))
        tp = ops.sum(truth * pred, axis=0)
        fp = ops.sum((1 - truth) * pred, axis=0)
        fn = ops.sum(truth * (1 - pred), axis=0)
        tn = ops.cast(ops.shape(truth)[0], "float32") - tp - fp - fn
        for part, value in zip(("tp", "fp", "fn", "tn"), (tp, fp, fn, tn)):
            self.counts[part].assign_add(value)

    def _selected(self):
        tp, fp, fn, tn = (self.counts[part] for part in ("tp", "fp", "fn", "tn"))
        if self.classes == 1:
            return tp[1:], fp[1:], fn[1:], tn[1:]
        if self.class_id is not None:
            index = slice(self.class_id, self.class_id + 1)
            return tp[index], fp[index], fn[index], tn[index]
        if self.average == "micro":
            return (ops.sum(tp, keepdims=True), ops.sum(fp, keepdims=True),
                    ops.sum(fn, keepdims=True), ops.sum(tn, keepdims=True))
        return tp, fp, fn, tn

    def result(self):
        if self.kind == "accuracy" and self.classes > 1 and self.class_id is None:
            # Multi-class accuracy: the share of pixels whose class is right.
            return ops.divide_no_nan(ops.sum(self.counts["tp"]),
                                     ops.sum(self.counts["tp"] + self.counts["fn"]))
        return ops.mean(METRIC_FORMULAS[self.kind](*self._selected()))

    def reset_state(self):
        for variable in self.counts.values():
            variable.assign(ops.zeros(variable.shape, variable.dtype))   # zeros_like: not under JAX

    def get_config(self):
        return {**super().get_config(), "kind": self.kind, "classes": self.classes,
                "class_id": self.class_id, "average": self.average, "patch": self.patch,
                "threshold": self.threshold, "patch_threshold": self.patch_threshold}


def training_metrics(classes, threshold=PIXEL_THRESHOLD, patch_threshold=FOREGROUND_THRESHOLD):
    """What fit() tracks: the monitor candidates without per-class detail."""
    if classes == 1:
        return ([SegmentationMetric(kind, threshold=threshold) for kind in METRIC_KINDS]
                + [SegmentationMetric(kind, patch=True, threshold=threshold,
                                      patch_threshold=patch_threshold)
                   for kind in PATCH_METRIC_KINDS])
    return [SegmentationMetric(kind, classes) for kind in METRIC_KINDS]


def evaluation_metrics(classes, threshold=PIXEL_THRESHOLD, patch_threshold=FOREGROUND_THRESHOLD):
    """The full table after training: training_metrics plus micro means and per-class rows."""
    if classes == 1:
        return training_metrics(classes, threshold, patch_threshold)
    per_class = [SegmentationMetric(kind, classes, class_id=index)
                 for index in range(classes) for kind in ("precision", "recall", "f1", "iou")]
    micro = [SegmentationMetric(kind, classes, average="micro")
             for kind in ("precision", "recall", "f1", "iou")]
    return training_metrics(classes) + micro + per_class
