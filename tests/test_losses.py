"""Losses and streaming metrics against hand-computed values and a numpy reference."""

import keras
import numpy as np
import pytest

from io_cil import InputError
from losses_cil import (LOSS_FUNCTIONS, METRIC_FORMULAS, SegmentationLoss, SegmentationMetric,
                        auto_class_weights, evaluation_metrics, training_metrics)
from model_cil import build_unet
from options_cil import LOSS_TERMS, METRIC_KINDS, monitored_metrics, parse_loss
from tests.conftest import needs_tensorflow

BINARY_LOSSES = [term for term in LOSS_TERMS] + ["bce+patch_f1", "focal+dice"]
MULTI_LOSSES = [term for term in LOSS_TERMS if term != "patch_f1"]


def binary_truth(seed=0, size=32):
    rng = np.random.default_rng(seed)
    truth = np.zeros((2, size, size, 1), np.float32)
    truth[:, :, 2:14] = 1                 # patch means 0.75 or near 0: far from the 0.25 rule
    truth[1, rng.integers(0, size, 40), rng.integers(0, size, 40)] = 1
    return truth


def loss_value(spec, y_true, y_pred, classes=1):
    return float(SegmentationLoss(spec, classes=classes, class_weights=None)(y_true, y_pred))


@pytest.mark.parametrize("spec", BINARY_LOSSES)
def test_binary_losses_near_zero_when_perfect_and_larger_when_worse(spec):
    truth = binary_truth()
    perfect = loss_value(spec, truth, truth)
    blurred = loss_value(spec, truth, 0.3 + 0.4 * truth)
    wrong = loss_value(spec, truth, 1 - truth)
    assert perfect < 0.02
    assert perfect < blurred < wrong


@pytest.mark.parametrize("spec", MULTI_LOSSES)
def test_multiclass_losses_near_zero_when_perfect_and_larger_when_worse(spec):
    labels = np.random.default_rng(1).integers(0, 3, (2, 16, 16, 1)).astype(np.float32)
    onehot = np.eye(3, dtype=np.float32)[labels[..., 0].astype(int)]
    perfect = loss_value(spec, labels, onehot, classes=3)
    blurred = loss_value(spec, labels, 0.2 + 0.4 * onehot, classes=3)
    wrong = loss_value(spec, labels, np.roll(onehot, 1, axis=-1), classes=3)
    assert perfect < 0.02
    assert perfect < blurred < wrong


@needs_tensorflow
@pytest.mark.parametrize("spec", BINARY_LOSSES)
def test_gradients_are_finite_at_predictions_of_exactly_zero_and_one(spec):
    import tensorflow as tf
    truth = tf.constant(binary_truth())
    for prediction in (truth, 1 - truth):
        prediction = tf.Variable(prediction)
        with tf.GradientTape() as tape:
            loss = SegmentationLoss(spec)(truth, prediction)
        assert np.all(np.isfinite(tape.gradient(loss, prediction).numpy()))


def test_adaptive_follows_nvidias_code_bce_first_then_dice():
    truth = binary_truth()
    poor = 0.4 + 0.2 * truth           # dice loss well above 0.3: cross-entropy
    good = 0.05 + 0.9 * truth          # dice loss below 0.3: dice
    assert loss_value("adaptive", truth, poor) == pytest.approx(loss_value("bce", truth, poor))
    assert loss_value("adaptive", truth, good) == pytest.approx(loss_value("dice", truth, good))


def test_weighted_bce_weighs_foreground_errors():
    truth = binary_truth()
    missed = np.where(truth == 1, 0.2, 0.0).astype(np.float32)
    plain = SegmentationLoss("bce")(truth, missed)
    weighted = SegmentationLoss("weighted_bce", class_weights=[1.0, 4.0])(truth, missed)
    assert float(weighted) == pytest.approx(4 * float(plain), rel=1e-4)


def test_auto_class_weights_are_inverse_frequencies():
    mask = np.zeros((10, 10), np.uint8)
    mask[:, :2] = 1
    assert auto_class_weights([mask], 1) == [1.0, 4.0]
    with pytest.raises(ValueError, match="class 2 never occurs"):
        auto_class_weights([mask], 3)


def test_unknown_loss_names_list_the_choices():
    with pytest.raises(InputError, match="'dcie' is not a loss; choose from bce, dice"):
        parse_loss("bce+dcie")


def test_every_loss_and_metric_name_has_exactly_one_function_and_no_more():
    assert set(LOSS_FUNCTIONS) == set(LOSS_TERMS)
    assert set(METRIC_FORMULAS) == set(METRIC_KINDS)
    with pytest.raises(InputError, match="'hinge' is not a loss"):
        SegmentationLoss("hinge")


@pytest.mark.parametrize("classes", [1, 3])
def test_the_monitor_vocabulary_is_what_training_logs(classes):
    assert [metric.name for metric in training_metrics(classes)] == monitored_metrics(classes)


def numpy_scores(truth, pred):
    tp = np.sum(truth & pred)
    fp = np.sum(~truth & pred)
    fn = np.sum(truth & ~pred)
    tn = np.sum(~truth & ~pred)
    return dict(precision=tp / (tp + fp) if tp + fp else 0.0,
                recall=tp / (tp + fn) if tp + fn else 0.0,
                f1=2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
                iou=tp / (tp + fp + fn) if tp + fp + fn else 0.0,
                accuracy=(tp + tn) / truth.size)


def metric_value(kind, truth, prob, **options):
    metric = SegmentationMetric(kind, **options)
    metric.update_state(truth, prob)
    return float(metric.result())


def test_a_4x4_case_by_hand():
    truth = np.array([[1, 1, 0, 0]] * 4, np.float32)[None, ..., None]
    prob = np.array([[0.9, 0.2, 0.7, 0.1]] * 4, np.float32)[None, ..., None]
    # per row: tp 1, fn 1, fp 1, tn 1
    assert metric_value("precision", truth, prob) == pytest.approx(0.5)
    assert metric_value("recall", truth, prob) == pytest.approx(0.5)
    assert metric_value("f1", truth, prob) == pytest.approx(0.5)
    assert metric_value("iou", truth, prob) == pytest.approx(1 / 3)
    assert metric_value("accuracy", truth, prob) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(3))
def test_binary_metrics_match_numpy_and_stream_like_one_batch(seed):
    rng = np.random.default_rng(seed)
    truth = (rng.random((6, 16, 16, 1)) < 0.3).astype(np.float32)
    truth[2] = 0                                          # an image without foreground
    prob = np.clip(truth * 0.6 + rng.random(truth.shape) * 0.5, 0, 1).astype(np.float32)
    expected = numpy_scores(truth > 0.5, prob >= 0.5)
    for kind, value in expected.items():
        streamed = SegmentationMetric(kind)
        for start in range(0, 6, 2):
            streamed.update_state(truth[start:start + 2], prob[start:start + 2])
        assert float(streamed.result()) == pytest.approx(value, abs=1e-6)
        assert metric_value(kind, truth, prob) == pytest.approx(value, abs=1e-6)


def test_patch_metrics_follow_the_kaggle_rule():
    truth = np.zeros((1, 32, 32, 1), np.float32)
    truth[0, :16, :16] = 1                                # patch (0, 0) road
    truth[0, :4, 16:32] = 1                               # patch (0, 1): mean 0.25, not road
    prob = np.zeros_like(truth)
    prob[0, :16, :5] = 0.9                                # patch (0, 0): mean 0.3125, road
    prob[0, 16:, 16:] = 0.8                               # patch (1, 1): road, but wrongly
    # patches: truth road {(0,0)}; predicted road {(0,0), (1,1)}: tp 1, fp 1, tn 2
    assert metric_value("f1", truth, prob, patch=True) == pytest.approx(2 / 3)
    assert metric_value("accuracy", truth, prob, patch=True) == pytest.approx(0.75)


def test_patch_metrics_judge_edge_patches_cut_short_as_the_csv_does():
    """20x40 is no multiple of 16: the bottom-right patch is 4x8 pixels and, as in the CSV,
    averages the pixels it holds; a metric that dropped cut patches would see no road at all."""
    import mask_to_submission as m2s
    truth = np.zeros((20, 40), np.float32)
    truth[16:, 32:] = 1                        # the cut corner patch, all road
    predicted = np.zeros_like(truth)
    predicted[16:18, 32:] = 1                  # half of it: mean 0.5 > 0.25, road
    assert m2s.patch_labels(predicted).tolist() == m2s.patch_labels(truth).tolist() == [
        [0, 0, 0], [0, 0, 1]]
    metric = SegmentationMetric("f1", patch=True)
    metric.update_state(truth[None, ..., None], predicted[None, ..., None])
    assert float(metric.result()) == pytest.approx(1.0)
    miss = SegmentationMetric("recall", patch=True)
    miss.update_state(truth[None, ..., None], np.zeros_like(truth)[None, ..., None])
    assert float(miss.result()) == 0.0


def test_an_all_background_set_scores_zero_not_nan():
    empty = np.zeros((1, 16, 16, 1), np.float32)
    assert metric_value("f1", empty, empty) == 0.0
    assert metric_value("accuracy", empty, empty) == 1.0


def test_multiclass_metrics_per_class_macro_and_micro():
    truth = np.array([[0, 0, 1, 1, 2, 2]], np.float32)[..., None, None].reshape(1, 1, 6, 1)
    labels = np.array([0, 1, 1, 1, 2, 0])
    prob = np.eye(3, dtype=np.float32)[labels][None, None]
    # class 0: tp 1 fp 1 fn 1; class 1: tp 2 fp 1 fn 0; class 2: tp 1 fp 0 fn 1
    assert metric_value("iou", truth, prob, classes=3, class_id=1) == pytest.approx(2 / 3)
    assert metric_value("iou", truth, prob, classes=3) == pytest.approx((1 / 3 + 2 / 3 + 1 / 2) / 3)
    assert metric_value("f1", truth, prob, classes=3, average="micro") == pytest.approx(4 / 6)
    assert metric_value("accuracy", truth, prob, classes=3) == pytest.approx(4 / 6)
    names = {m.name for m in evaluation_metrics(3)}
    assert {"mean_iou", "iou_0", "f1_2", "micro_f1", "precision_1"} <= names


def test_a_saved_model_reloads_with_its_loss_and_metrics(tmp_path):
    model = build_unet(filters=2, depth=1)
    model.compile(optimizer="adam", loss=SegmentationLoss("focal+patch_f1", class_weights=[1, 3]),
                  metrics=training_metrics(1))
    x = np.random.default_rng(0).random((2, 16, 16, 3)).astype(np.float32) * 255
    y = binary_truth(size=16)
    model.train_on_batch(x, y)
    model.save(tmp_path / "m.keras")
    reloaded = keras.models.load_model(tmp_path / "m.keras")
    assert reloaded.loss.spec == "focal+patch_f1" and reloaded.loss.class_weights == [1, 3]
    assert np.allclose(reloaded.predict_on_batch(x), model.predict_on_batch(x), atol=1e-6)
    assert float(reloaded.evaluate(x, y, verbose=0, return_dict=True)["loss"]) == pytest.approx(
        float(model.evaluate(x, y, verbose=0, return_dict=True)["loss"]), rel=1e-5)
