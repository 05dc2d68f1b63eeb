"""Every kind of model the tool saves reloads wherever a model is read, each in a fresh process,
as a user meets them: --weights (alone and mixed), --from-run with its fold ensemble, --refit,
--resume, a fold's own model, and plain `keras.models.load_model` without the project's code."""

import json
import subprocess
import sys

import numpy as np
import pytest

from data_cil import write_synthetic_dataset
from model_cil import load_model
from predict_cil import predict_probabilities
from settings_cil import Settings
from tests.conftest import REPO, TINY, cli, make_pair, resolved

pytestmark = pytest.mark.slow        # trains seven small models, then reads them in new processes

SMALL = "mobilenetv3small"
ENCODER = ["--encoder", SMALL, "--epochs", "1"]
# kind -> main_cil.py options on top of TINY
KINDS = {"unet": [], "unet-nested": ["--model", "unet++"], "tiny-unet": ["--model", "tiny-unet"],
         "encoder": ENCODER, "frozen-encoder": [*ENCODER, "--freeze-encoder", "3"],
         "three-classes": ["--classes", "3", "--crop", "0"]}


def three_class_data(folder):
    rng = np.random.default_rng(0)
    for index in range(6):
        mask = np.zeros((32, 32), np.uint8)
        mask[:, 8 + index:16 + index] = 1
        mask[20:28, 20:28] = 2
        image = (np.array([[90, 90, 90], [200, 200, 200], [30, 160, 30]], np.uint8)[mask]
                 + rng.integers(0, 20, (32, 32, 3)).astype(np.uint8))
        make_pair(folder, f"p{index}.png", image, mask)
    (folder / "test_images").mkdir()
    make_pair(folder, "p9.png", image, mask)
    (folder / "training/images/p9.png").rename(folder / "test_images/test_9.png")
    (folder / "training/groundtruth/p9.png").unlink()
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(project folder, {kind: its run folder}): one small run of every kind, trained here, and
    a two-fold cross-validated encoder run ("cv")."""
    root = tmp_path_factory.mktemp("reload")
    roads = write_synthetic_dataset(root / "roads", count=8, size=64, seed=0, test_count=2)
    three = three_class_data(root / "three")
    places = ["--logs-dir", root / "logs", "--valid-output-dir", root / "valid",
              "--submit-output-dir", root / "submit"]
    runs = {}
    for kind, options in {**KINDS, "cv": [*ENCODER, "--folds", "2"]}.items():
        data = three if kind == "three-classes" else roads
        result = cli("--data-dir", data, *TINY, *options, *places, "--tta", "1",
                     "--run-name", kind)
        assert result.exit_code == 0, result.output
        runs[kind] = root / "logs" / kind
    return root, roads, three, runs


def fresh(root, *args):
    """main_cil.py in a new interpreter, in `root`: the exit code and what it printed."""
    done = subprocess.run([sys.executable, str(REPO / "main_cil.py"), *map(str, args)],
                          cwd=root, capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout + done.stderr


def test_every_binary_kind_predicts_through_weights_alone_and_mixed(trained):
    root, roads, _, runs = trained
    models = [runs[kind] / "best.keras" for kind in KINDS if kind != "three-classes"]
    models.append(runs["cv"] / "fold-0/best.keras")            # a fold's model is a model
    code, output = fresh(root, "--data-dir", roads, "--submit", "--tta", "1",
                         *[word for model in models for word in ("--weights", model)],
                         "--run-name", "mixed")
    assert code == 0, output
    assert output.count("no training") == len(models)
    assert (roads / "submit_output/mixed/submission.csv").is_file()


def test_a_several_class_model_predicts_through_weights(trained):
    root, _, three, runs = trained
    code, output = fresh(root, "--data-dir", three, "--submit", "--weights",
                         runs["three-classes"] / "best.keras", "--run-name", "three-again")
    assert code == 0, output
    assert "3 classes" in output or "class" in output


def test_a_cross_validated_encoder_run_submits_its_fold_ensemble_and_refits(trained):
    root, roads, _, runs = trained
    code, output = fresh(root, "--submit", "--from-run", runs["cv"], "--run-name", "ensemble")
    assert code == 0, output
    assert output.count("no training") == 2                    # both fold models
    config = json.loads((root / "logs/ensemble/config.json").read_text())["settings"]
    assert config["weights"] == [str(runs["cv"] / f"fold-{i}/best.keras") for i in (0, 1)]
    code, output = fresh(root, "--submit", "--from-run", runs["cv"], "--refit", "--run-name",
                         "refit")
    assert code == 0, output
    assert (root / "logs/refit/best.keras").is_file()


def test_an_encoder_run_resumes_in_a_fresh_process(trained):
    root, _, _, runs = trained
    code, output = fresh(root, "--resume", runs["frozen-encoder"], "--epochs", "2")
    assert code == 0, output
    assert "resuming from the checkpoint after epoch 1" in output and "Epoch 2/2" in output


def test_a_fold_is_a_run_for_from_run(trained):
    _, _, _, runs = trained
    settings = resolved("--from-run", runs["cv"] / "fold-0", "--submit")
    assert isinstance(settings, Settings) and settings.folds is None
    assert settings.weights == () and settings.encoder == SMALL


LOAD_PLAINLY = """
import json, sys
import keras, numpy as np
image = np.load(sys.argv[1])
outputs = [keras.models.load_model(file).predict_on_batch(image) for file in sys.argv[3:]]
assert not [name for name in sys.modules if name.endswith("_cil")], "project code imported"
np.savez(sys.argv[2], *outputs)
"""


def test_the_readmes_load_model_works_in_a_fresh_python_without_the_project(trained, tmp_path):
    """README: `keras.models.load_model("logs/<run>/best.keras")` in a fresh Python started in
    the project folder; each model predicts as it does inside the tool."""
    _, _, _, runs = trained
    files = [runs[kind] / "best.keras" for kind in KINDS]
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)).astype(np.float32)
    np.save(tmp_path / "image.npy", image)
    done = subprocess.run([sys.executable, "-c", LOAD_PLAINLY, str(tmp_path / "image.npy"),
                           str(tmp_path / "out.npz"), *map(str, files)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as outputs:
        for index, file in enumerate(files):
            expected = predict_probabilities(load_model(file), image[0])
            assert np.allclose(outputs[f"arr_{index}"][0], expected, atol=1e-5), file
