"""Cross-validation end to end: folds, the out-of-fold table with its spread, tuned thresholds,
ensembles and refits, folds run as grid jobs, and a fold interrupted and resumed."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import grid_cil
from tests.conftest import REPO, TINY, cli
from train_cil import RunCheckpoint

pytestmark = pytest.mark.slow
CV = [*TINY, "--folds", "3", "--patience", "0"]


def cross_validation(folder):
    return json.loads((Path(folder) / "metrics.json").read_text())["cross_validation"]


def test_cross_validation_reports_every_image_out_of_fold_and_submits_the_ensemble(
        workdir, road_dir):
    result = cli("--data-dir", road_dir, *CV, "--run-name", "cv")
    assert result.exit_code == 0, result.output
    assert "out-of-fold validation: 8 images in 3 folds" in result.output
    assert "fold mean" in result.output and "thresholds tuned out of fold" in result.output
    split = json.loads(Path("logs/cv/split.json").read_text())
    sizes = [list(split["fold_of"].values()).count(fold) for fold in range(3)]
    assert sorted(sizes) == [2, 3, 3]
    report = cross_validation("logs/cv")
    assert report["images"] == 8 and len(report["per_fold"]) == 3
    spread = report["spread"]["patch_f1"]
    assert spread["min"] <= spread["mean"] <= spread["max"] and spread["sd"] >= 0
    assert 0.1 <= report["tuned"]["threshold"] <= 0.9
    for fold in range(3):
        fold_split = json.loads(Path(f"logs/cv/fold-{fold}/split.json").read_text())
        assert sorted(fold_split["valid"]) == sorted(name for name, f in split["fold_of"].items()
                                                     if f == fold)
        assert list(Path(f"data/valid/output/cv/fold-{fold}").glob("*_overlay.png"))
    ensemble = cli("--submit", "--from-run", "logs/cv", "--run-name", "ens")
    assert ensemble.exit_code == 0, ensemble.output
    assert "mean of 3 models" in ensemble.output
    tuned = report["tuned"]
    applied = (tuned["threshold"], tuned["patch_threshold"]) if tuned["applied"] else (0.5, 0.25)
    assert f"pixel threshold {applied[0]}, patch share {applied[1]}" in ensemble.output
    lines = (road_dir / "submit_output/ens/submission.csv").read_text().splitlines()
    assert lines[0] == "id,prediction" and len(lines) == 1 + 2 * 16
    refit = cli("--submit", "--from-run", "logs/cv", "--refit", "--run-name", "refit")
    assert refit.exit_code == 0, refit.output
    config = json.loads(Path("logs/refit/config.json").read_text())["settings"]
    assert config["epochs"] == report["median_best_epoch"] and config["folds"] is None
    assert (road_dir / "submit_output/refit/submission.csv").is_file()


def test_a_fold_interrupted_and_resumed_gives_the_same_out_of_fold_table(workdir, road_dir,
                                                                         monkeypatch):
    cv = [*TINY, "--folds", "2", "--patience", "0", "--tta", "1"]
    assert cli("--data-dir", road_dir, *cv, "--run-name", "whole").exit_code == 0
    keep_epoch_end = RunCheckpoint.on_epoch_end

    def killed_in_fold_one(self, epoch, logs=None):
        keep_epoch_end(self, epoch, logs)
        if self.run_dir.name == "fold-1" and epoch == 0:
            raise SystemExit(137)              # like SIGKILL after the first checkpoint

    with monkeypatch.context() as patch:
        patch.setattr(RunCheckpoint, "on_epoch_end", killed_in_fold_one)
        assert cli("--data-dir", road_dir, *cv, "--run-name", "cut").exit_code == 137
    assert not Path("logs/cut/metrics.json").exists()
    result = cli("--resume", "logs/cut")
    assert result.exit_code == 0, result.output
    assert "fold 0: finished earlier, kept" in result.output and "(resumed)" in result.output
    whole, cut = cross_validation("logs/whole"), cross_validation("logs/cut")
    for key, value in whole["oof"].items():
        assert cut["oof"][key] == pytest.approx(value, abs=1e-4), key
    assert cut["tuned"] == whole["tuned"]


def test_folds_run_as_grid_jobs_share_one_cross_validated_run(workdir, road_dir):
    grid_file = workdir / "cvgrid.json"
    grid_file.write_text(json.dumps({"data-dir": str(road_dir), "folds": 2, "fold": [0, 1],
                                     "filters": 4, "depth": 2, "crop": 32, "count": 1,
                                     "batch-size": 4, "epochs": 2}))
    result = CliRunner().invoke(grid_cil.main, [str(grid_file), "--jobs-dir", "jobs"])
    assert "single/fold-0 (start): finished" in result.output, result.output
    assert "single/fold-1 (start): finished" in result.output
    assert not (REPO / "jobs/cvgrid").exists()          # relative paths start where it ran
    assert "out-of-fold validation: 8 images in 2 folds" in (
        Path("jobs/cvgrid/single/fold-1/stdout").read_text())    # the last fold gathers
    Path("jobs/cvgrid/single/metrics.json").unlink()              # as if both ended at once
    columns, rows = grid_cil.summary_rows(Path("jobs/cvgrid"))
    assert rows[0]["status"] == "folds finished; gather: python main_cil.py --resume " \
                                "jobs/cvgrid/single"
    gathered = cli("--resume", "jobs/cvgrid/single")
    assert gathered.exit_code == 0, gathered.output
    assert "fold 1: finished earlier, kept" in gathered.output
    columns, rows = grid_cil.summary_rows(Path("jobs/cvgrid"))
    assert rows[0]["status"] == "finished" and "sd" in columns
    assert rows[0]["patch_f1"] == cross_validation("jobs/cvgrid/single")["spread"][
        "patch_f1"]["mean"]


def test_extra_pairs_train_every_fold_but_are_never_validated_scored_or_tuned_on(
        workdir, road_dir, monkeypatch):
    import pipeline_cil
    import predict_cil
    from data_cil import find_pairs, load_pairs, write_synthetic_dataset
    extra_dir = write_synthetic_dataset(workdir / "extra", count=4, size=64, seed=9)
    for path in extra_dir.glob("training/*/*.png"):
        path.rename(path.with_name(path.name.replace("synthetic", "extra")))
    extra = {image.tobytes() for image in load_pairs(find_pairs(extra_dir))[0]}
    trained, validated = [], []
    original_stream, original_valid = pipeline_cil.training_dataset, pipeline_cil.validation_arrays
    original_predicted = predict_cil.predicted

    def stream(images, masks, **options):
        trained.append(({image.tobytes() for image in images}, options["extra"]))
        return original_stream(images, masks, **options)

    def valid_arrays(images, masks, multiple):
        validated.extend(image.tobytes() for image in images)
        return original_valid(images, masks, multiple)

    def predicted(models, images, settings):
        validated.extend(image.tobytes() for image in images)
        return original_predicted(models, images, settings)

    monkeypatch.setattr(pipeline_cil, "training_dataset", stream)
    monkeypatch.setattr(pipeline_cil, "validation_arrays", valid_arrays)
    monkeypatch.setattr(predict_cil, "predicted", predicted)
    result = cli("--data-dir", road_dir, *TINY, "--folds", "2", "--patience", "0", "--tta", "1",
                 "--extra-data", extra_dir, "--extra-count", "2", "--run-name", "cv")
    assert result.exit_code == 0, result.output
    assert "extra data: 4 pairs from" in result.output
    assert result.output.count("+ 4 extra (2x)") == 2
    assert len(trained) >= 2 and all(extra <= images and count == 4 for images, count in trained)
    assert validated and not extra & set(validated)
    names = {path.name for path in (extra_dir / "training/images").iterdir()}
    oof = [json.loads(Path(f"logs/cv/fold-{fold}/split.json").read_text()) for fold in (0, 1)]
    assert not names & {name for split in oof for name in split["valid"] + split["train"]}
    assert not names & set(json.loads(Path("logs/cv/split.json").read_text())["fold_of"])
    outputs = [path.name for path in Path("data/valid/output/cv").rglob("*.png")]
    assert outputs and not any(name.startswith("extra") for name in outputs)
