"""The command line end to end on tiny synthetic sets: outputs written, metrics printed, bad
input reported in one line with exit code 2."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import devices_cil
from data_cil import read_image
from model_cil import load_saved_model
from predict_cil import predict_probabilities
from runs_cil import OWNER_FILE
from tests.conftest import TINY, cli, make_pair, predicted_alone

pytestmark = pytest.mark.slow      # each test trains a model end to end


def board_events(folder):
    """What TensorBoard reads from the event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0}).Reload()


def panel_steps(folder):
    """The epochs of the TensorBoard image panels written to `folder`, as TensorBoard reads them."""
    events = board_events(folder)
    return sorted({event.step for tag in events.Tags()["images"] for event in events.Images(tag)})


def test_training_writes_the_run_folder_validation_outputs_and_table(workdir, road_dir):
    result = cli("--data-dir", road_dir, *TINY, "--run-name", "t1")
    assert result.exit_code == 0, result.output
    run = Path("logs/t1")
    for name in ("best.keras", "config.json", "history.csv", "split.json", "metrics.json",
                 "checkpoint/state.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("train/events.out.tfevents*"))
    assert panel_steps(run / "images") == [2]         # a 2-epoch run: its last epoch's panel
    split = json.loads((run / "split.json").read_text())
    assert len(split["train"]) == 6 and len(split["valid"]) == 2
    assert not set(split["train"]) & set(split["valid"])
    outputs = sorted(p.name for p in Path("data/valid/output/t1").iterdir()
                     if not p.name.startswith("."))
    assert len(outputs) == 6 and all(p.endswith(("_prob.png", "_mask.png", "_overlay.png"))
                                     for p in outputs)
    assert "patch F1 (Kaggle)" in result.output and "never used to choose a model" in result.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and 0 <= metrics["valid"]["patch_f1"] <= 1
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["filters"] == 4 and config["settings"]["aug"]["rotation_range"] == 45
    assert config["sources"]["filters"] == "command line" and config["sources"]["lr"] == "default"
    assert "versions" in config and config["settings"]["run_name"] == "t1"
    assert not (run / "lock").exists()                  # released when the run ended
    events = board_events(run)
    assert "_hparams_/session_start_info" in events.summary_metadata     # the HParams table
    assert events.Scalars("final/patch_f1")[0].value == pytest.approx(
        metrics["valid"]["patch_f1"], abs=1e-6)
    assert [e.step for e in board_events(run / "validation").Scalars("epoch_f1")] == [0, 1]


def test_an_existing_run_is_refused_and_force_replaces_it(workdir, road_dir):
    assert cli("--data-dir", road_dir, *TINY, "--epochs", "1", "--run-name", "same").exit_code == 0
    before = Path("logs/same/config.json").read_text()
    result = cli("--data-dir", road_dir, *TINY, "--epochs", "1", "--run-name", "same")
    assert result.exit_code == 2
    assert "logs/same: a run of that name exists; pass --force" in result.output
    assert Path("logs/same/config.json").read_text() == before
    result = cli("--data-dir", road_dir, *TINY, "--epochs", "1", "--run-name", "same", "--force")
    assert result.exit_code == 0
    moved = list(Path("logs/.trash").iterdir())       # the earlier run is kept, not deleted
    assert len(moved) == 1 and (moved[0] / "config.json").read_text() == before
    assert len(list(Path("data/valid/output/.trash").iterdir())) == 1


def test_submit_writes_masks_and_csv_and_weights_reproduce_them(workdir, road_dir):
    result = cli("--data-dir", road_dir, *TINY, "--submit", "--run-name", "sub")
    assert result.exit_code == 0, result.output
    folder = road_dir / "submit_output/sub"                    # beside the data it predicts
    assert sorted(p.name for p in folder.iterdir() if p.name != OWNER_FILE) == [
        "submission.csv", "test_1.png", "test_2.png"]
    lines = (folder / "submission.csv").read_text().splitlines()
    assert lines[0] == "id,prediction" and len(lines) == 1 + 2 * 16       # 64x64: 4x4 patches
    assert lines[1].startswith("001_0_0,") and lines[-1].startswith("002_48_48,")
    assert "2 test images" in result.output and "32 patches" in result.output
    assert Path("logs/sub/contact_sheet.png").is_file()
    again = cli("--data-dir", road_dir, "--submit", "--weights", "logs/sub/best.keras",
                "--run-name", "again")
    assert again.exit_code == 0, again.output
    assert "no training" in again.output
    assert (road_dir / "submit_output/again/submission.csv").read_text().splitlines() == lines
    assert not Path("data/roadseg").exists()


def test_weights_without_submit_evaluate_the_validation_split(workdir, road_dir):
    assert cli("--data-dir", road_dir, *TINY, "--run-name", "w").exit_code == 0
    result = cli("--data-dir", road_dir, "--weights", "logs/w/best.keras", "--tta", "8",
                 "--run-name", "w8")
    assert result.exit_code == 0, result.output
    assert "TTA 8" in result.output and "patch F1" in result.output
    assert json.loads(Path("logs/w8/metrics.json").read_text())["tta"] == 8


def test_submit_from_run_takes_its_settings_and_best_epoch_not_thresholds_tuned_in_sample(
        workdir, road_dir):
    valid = cli("--data-dir", road_dir, *TINY, "--epochs", "3", "--run-name", "v")
    assert "so not applied (--folds tunes them)" in valid.output
    earlier = json.loads(Path("logs/v/metrics.json").read_text())
    assert earlier["tuned"]["applied"] is False
    result = cli("--submit", "--from-run", "logs/v", "--run-name", "s")
    assert result.exit_code == 0, result.output
    config = json.loads(Path("logs/s/config.json").read_text())["settings"]
    assert config["epochs"] == earlier["best_epoch"]
    assert (config["threshold"], config["patch_threshold"]) == (None, None)
    assert (config["filters"], config["crop"], config["data_dir"]) == (4, 32, str(road_dir))
    assert "pixel threshold 0.5, patch share 0.25" in result.output


def test_three_classes_train_end_to_end_with_a_per_class_table(workdir, tmp_path):
    rng = np.random.default_rng(0)
    for index in range(6):
        mask = np.zeros((32, 32), np.uint8)
        mask[:, 8 + index:16 + index] = 1                  # class 1: a band
        mask[20:28, 20:28] = 2                             # class 2: a square
        image = (np.array([[90, 90, 90], [200, 200, 200], [30, 160, 30]], np.uint8)[mask]
                 + rng.integers(0, 20, (32, 32, 3)).astype(np.uint8))
        make_pair(tmp_path / "three", f"p{index}.png", image, mask)
    result = cli("--data-dir", tmp_path / "three", *TINY, "--classes", "3", "--crop", "0",
                 "--valid-fraction", "0.34", "--run-name", "c3")
    assert result.exit_code == 0, result.output
    assert "class" in result.output and "macro" in result.output and "micro" in result.output
    valid = json.loads(Path("logs/c3/metrics.json").read_text())["valid"]
    assert {"iou_0", "iou_1", "iou_2", "mean_iou"} <= set(valid)
    assert json.loads(Path("logs/c3/metrics.json").read_text())["monitor"] == "val_mean_iou"


@pytest.fixture
def float32_after():
    """The global precision policy back to float32 after a test that trains with --amp."""
    yield
    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("bfloat16", [True, False], ids=["bf16 CPU", "older CPU"])
def test_amp_on_the_cpu_trains_in_bfloat16_where_the_cpu_has_it(workdir, road_dir, monkeypatch,
                                                                float32_after, bfloat16):
    monkeypatch.setattr(devices_cil, "cpu_has_bfloat16", lambda: bfloat16)
    result = cli("--data-dir", road_dir, *TINY, "--epochs", "1", "--amp", "--run-name", "amp")
    assert result.exit_code == 0, result.output
    if bfloat16:
        assert "precision: mixed_bfloat16 (--amp)" in result.output
    else:
        assert "note: --amp ignored: this CPU has no bfloat16 instructions" in result.output
    assert keras.mixed_precision.global_policy().name == ("mixed_bfloat16" if bfloat16
                                                          else "float32")
    model = keras.models.load_model("logs/amp/best.keras")
    assert all(w.dtype == "float32" for w in model.weights)     # variables stay float32
    assert model.get_layer("probabilities").dtype_policy.compute_dtype == "float32"
    again = cli("--data-dir", road_dir, *TINY, "--epochs", "1", "--run-name", "plain")
    assert again.exit_code == 0 and keras.mixed_precision.global_policy().name == "float32"


def test_the_demo_generates_data_learns_and_exports_a_model_that_runs_alone(workdir,
                                                                            tmp_path):
    result = cli("--demo", "--export")
    assert result.exit_code == 0, result.output
    assert Path("data/demo/training/images").is_dir() and Path("data/demo/test_images").is_dir()
    run = next(Path("logs").iterdir())
    valid = json.loads((run / "metrics.json").read_text())["valid"]
    assert valid["f1"] > 0.8 and valid["patch_f1"] > 0.8
    image = read_image(next(Path("data/demo/test_images").iterdir()))
    float_out, uint8_out = predicted_alone(run / "export", image, tmp_path)
    expected = predict_probabilities(load_saved_model(run / "best.keras"), image)
    assert np.allclose(float_out, expected, atol=1e-5) and np.allclose(uint8_out, expected,
                                                                       atol=1e-5)
