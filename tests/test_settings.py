"""Settings: one owner for every default, the precedence of sources, config files and the
environment, the recipes, what --resume and --from-run restore, the help, and a command line
that does not load TensorFlow until a run starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

import weights_cil
from io_cil import InputError
from options_cil import (AUG_NEUTRAL, GROUPS, LEARNED_GROUPS, OPTIONS, RECIPES, learned_names,
                         resolve_aug)
from settings_cil import CONFIG_EXCLUDED, RESUME_OVERRIDES, Settings
from tests.conftest import REPO, checkpoint_state, cli, resolved, saved_run
from train_cil import learning_rate, make_optimizer


def test_precedence_command_line_environment_config_recipe_default(workdir, monkeypatch):
    config = workdir / "c.json"
    config.write_text(json.dumps({"lr": 0.02, "epochs": 7, "batch-size": 3, "filters": 12}))
    monkeypatch.setenv("CIL_EPOCHS", "9")
    monkeypatch.setenv("CIL_BATCH_SIZE", "5")
    settings = resolved("--recipe", "classic", "--config", config, "--batch-size", "6")
    assert settings.batch_size == 6 and settings.sources["batch_size"] == "command line"
    assert settings.epochs == 9 and settings.sources["epochs"] == "environment CIL_EPOCHS"
    assert settings.lr == 0.02 and settings.sources["lr"] == f"config {config}"
    assert settings.filters == 12                      # the config file beats the recipe
    assert settings.loss == "bce" and settings.sources["loss"] == "recipe classic"
    assert settings.patience == 15 and settings.sources["patience"] == "default"


def test_flags_and_perturbations_come_from_the_environment_too(workdir, monkeypatch):
    monkeypatch.setenv("CIL_BATCHNORM", "false")
    monkeypatch.setenv("CIL_AUG", "rotation_range=10 zoom_range=0.2")
    settings = resolved()
    assert settings.batchnorm is False and settings.aug["rotation_range"] == 10
    assert settings.aug["zoom_range"] == (0.8, 1.2) and settings.aug["quarter_turns"]


def test_a_config_file_may_hold_perturbations_and_flags_in_json(workdir):
    config = workdir / "c.json"
    config.write_text(json.dumps({"aug": {"rotation_range": 5}, "no_aug": False,
                                  "batchnorm": False, "tta": 8}))
    settings = resolved("--config", config)
    assert settings.aug["rotation_range"] == 5 and settings.aug["vertical_flip"]
    assert settings.batchnorm is False and settings.tta == 8


def test_settings_are_immutable_and_replace_records_the_source():
    settings = resolved()
    with pytest.raises(AttributeError):
        settings.epochs = 3
    changed = settings.replace("model file", classes=3)
    assert (settings.classes, changed.classes) == (1, 3)
    assert changed.sources["classes"] == "model file" and isinstance(changed, Settings)


# A value unlike the default for every learned option; a new learned option without an entry
# here makes the test below fail, so what --resume restores cannot silently miss one.
NOT_DEFAULT = dict(
    data_dir="elsewhere", limit=5, valid_fraction=0.3, seed=7, classes=3, palette=None,
    aug={"rotation_range": 12.0}, no_aug=True, crop=64, count=2, model="unet++", filters=5,
    extra_data=("more",), extra_count=1,
    encoder="vgg16", encoder_weights="imagenet", freeze_encoder=2, encoder_lr_scale=4.0,
    depth=3, dropout=0.25, batchnorm=False, activation="leaky_relu", init="he_uniform",
    weight_decay=0.01, epochs=9, batch_size=3, lr=0.05, optimizer="sgd", rho=0.5, momentum=0.7,
    centered=True, lr_schedule="cosine", lr_decay=0.5, lr_decay_steps=7, loss="dice",
    class_weights="1,2,3", monitor="val_mean_iou", patience=4, amp=True, folds=3, fold=1)


def test_resume_restores_every_learned_option(workdir):
    assert set(NOT_DEFAULT) == set(learned_names())
    defaults = resolved()
    folder = saved_run(workdir / "logs/r", **NOT_DEFAULT)
    settings = resolved("--resume", folder, "--epochs", "20", "--lr", "0.9")
    for name, value in NOT_DEFAULT.items():
        if name == "aug":
            assert settings.aug["rotation_range"] == 12.0
        elif name == "epochs":
            assert settings.epochs == 20                # a resumed run may train longer
        elif name == "data_dir":
            assert str(settings.data_dir) == value
        elif name == "extra_data":
            assert [str(folder) for folder in settings.extra_data] == list(value)
        elif value is not None:
            assert settings[name] == value != defaults[name], name
    # a fold's run (fold=1) belongs to the cross-validated run that holds it, here "logs"
    assert settings.run_name == "logs" and settings.logs_dir == workdir


def test_resume_predicts_as_the_run_was_started_unless_this_call_says_otherwise(workdir):
    folder = saved_run(workdir / "logs/r", tta=1, threshold=0.4, export=True)
    settings = resolved("--resume", folder)
    assert (settings.tta, settings.threshold, settings.export) == (1, 0.4, True)
    assert resolved("--resume", folder, "--tta", "8").tta == 8


def test_resume_says_which_flags_it_ignores(workdir):
    folder = saved_run(workdir / "logs/r", lr=0.05)
    result = cli("--resume", folder, "--lr", "0.9", "--data-dir", "nowhere")
    assert "note: --resume continues with the run's own settings; ignored --data-dir, --lr" \
        in result.output


@pytest.mark.parametrize("applied", [True, False])
def test_from_run_takes_learned_settings_best_epoch_and_thresholds_that_beat_the_defaults(
        workdir, applied):
    folder = saved_run(workdir / "logs/v", filters=6, crop=48, depth=3)
    (folder / "metrics.json").write_text(json.dumps(
        {"best_epoch": 4, "tuned": {"threshold": 0.35, "patch_threshold": 0.3,
                                    "applied": applied}}))
    settings = resolved("--submit", "--from-run", folder, "--crop", "32")
    assert (settings.filters, settings.epochs) == (6, 4)
    thresholds = (0.35, 0.3) if applied else (None, None)
    assert (settings.threshold, settings.patch_threshold) == thresholds
    assert settings.crop == 32 and settings.sources["filters"] == f"run {folder}"


def test_a_runs_config_json_reruns_it_as_a_config_file(workdir):
    folder = saved_run(workdir / "logs/v", filters=6, lr=0.05, run_name="v")
    settings = resolved("--config", folder / "config.json")
    assert (settings.filters, settings.lr, settings.run_name) == (6, 0.05, None)
    assert settings.sources["filters"] == f"config {folder / 'config.json'}"


def test_the_recipes_only_name_options():
    for recipe in RECIPES.values():
        assert set(recipe) <= {option.name for option in OPTIONS}
    assert set(CONFIG_EXCLUDED) <= {option.name for option in OPTIONS}
    assert set(RESUME_OVERRIDES) <= set(learned_names())


def test_help_lists_the_options_in_their_groups_with_defaults():
    result = cli("--help")
    assert result.exit_code == 0
    headings = [line.rstrip(":") for line in result.output.splitlines()
                if line.endswith(":") and not line.startswith(" ")]
    assert headings == [group.capitalize() for group in GROUPS] + ["Other"]
    assert "[default: 60" in result.output and "--epochs" in result.output
    assert all(option.group in GROUPS for option in OPTIONS)
    assert set(LEARNED_GROUPS) < set(GROUPS)


def python_modules_after(code):
    """The modules a fresh interpreter has loaded after running `code` in the repository."""
    probe = f"{code}\nimport sys\nprint('tensorflow' in sys.modules, 'keras' in sys.modules)"
    return subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("code", [
    "import main_cil, grid_cil, mask_to_submission, runs_cil, settings_cil",
    "import runpy, sys\nsys.argv = ['main_cil.py', '--help']\n"
    "try:\n    runpy.run_path('main_cil.py', run_name='__main__')\nexcept SystemExit:\n    pass",
    "import runpy, sys\nsys.argv = ['main_cil.py', '--epochz', '3']\n"
    "try:\n    runpy.run_path('main_cil.py', run_name='__main__')\nexcept SystemExit:\n    pass",
    "import runpy, sys\nsys.argv = ['grid_cil.py', '--help']\n"
    "try:\n    runpy.run_path('grid_cil.py', run_name='__main__')\nexcept SystemExit:\n    pass",
    "import runpy, sys\nsys.argv = ['mask_to_submission.py', '--help']\n"
    "try:\n    runpy.run_path('mask_to_submission.py', run_name='__main__')\nexcept SystemExit:\n"
    "    pass",
    "import runpy, sys\nsys.argv = ['bench_cil.py', '--help']\n"
    "try:\n    runpy.run_path('bench_cil.py', run_name='__main__')\nexcept SystemExit:\n    pass",
    "import runpy, sys\nsys.argv = ['bench_cil.py', '--part', 'nothing']\n"
    "try:\n    runpy.run_path('bench_cil.py', run_name='__main__')\nexcept SystemExit:\n    pass",
])
def test_help_usage_errors_grid_and_converter_never_import_tensorflow(code):
    result = python_modules_after(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_a_usage_error_is_one_line_and_quick(workdir):
    result = cli("--epochz", "3")
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--epochz" in lines[0]
    assert "--epochs" in lines[0]                          # the closest option is named


TOOLS = ("main_cil.py", "grid_cil.py", "mask_to_submission.py", "bench_cil.py")


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_takes_h_and_says_a_usage_error_in_one_line(tool):
    helped = subprocess.run([sys.executable, tool, "-h"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: ")
    wrong = subprocess.run([sys.executable, tool, "--no-such-option"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert len(wrong.stderr.splitlines()) == 1 and "--no-such-option" in wrong.stderr


def missing_backend():
    """A backend this tool runs on that is not installed here, or None."""
    import importlib.util

    from devices_cil import BACKEND_INSTALLS
    return next((name for name in BACKEND_INSTALLS if importlib.util.find_spec(name) is None),
                None)


@pytest.mark.parametrize("backend", ["bogus", "TensorFlow", "missing"])
@pytest.mark.parametrize("command", [["main_cil.py", "--demo"], ["main_cil.py", "--resume", "x"],
                                     ["main_cil.py", "--weights", "m.keras"],
                                     ["bench_cil.py", "--quick"]])
def test_a_keras_backend_that_cannot_start_is_one_line_before_anything_is_made(tmp_path, backend,
                                                                               command):
    if backend == "missing":
        backend = missing_backend()
        if backend is None:
            pytest.skip("every backend is installed here")
    if "--resume" in command:
        saved_run(tmp_path / "x")
        checkpoint_state(tmp_path / "x")
    if "--weights" in command:
        (tmp_path / "m.keras").write_bytes(b"")
    before = sorted(tmp_path.rglob("*"))
    env = {key: value for key, value in os.environ.items() if not key.startswith("CIL_")}
    result = subprocess.run([sys.executable, str(REPO / command[0]), *command[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env=dict(env, KERAS_BACKEND=backend))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: KERAS_BACKEND={backend}: ") and "tensorflow" in line
    assert sorted(tmp_path.rglob("*")) == before
    helped = subprocess.run([sys.executable, str(REPO / command[0]), "-h"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120,
                            env=dict(env, KERAS_BACKEND=backend))
    assert helped.returncode == 0 and helped.stdout.startswith("Usage: ")


def test_the_grid_help_shows_the_grid_file_form_and_whole_command_lines():
    helped = subprocess.run([sys.executable, "grid_cil.py", "-h"], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "100"})
    assert helped.stdout.startswith("Usage: grid_cil.py GRID.json [--scheduler local|lsf|slurm]")
    assert "record the exit code." in helped.stdout and "..." not in helped.stdout.split(
        "Commands:")[1]


def test_the_encoder_choices_and_the_patch_threshold_read_as_text():
    text = cli("--help").output
    assert "--encoder NAME" in text and "[vgg16|" not in text
    assert "counts as foreground when more than this share of its pixels are foreground" in \
        " ".join(text.split())


def test_bad_option_values_from_the_environment_name_the_variable(workdir, monkeypatch):
    monkeypatch.setenv("CIL_EPOCHS", "x")
    result = cli()
    assert result.exit_code == 2 and "CIL_EPOCHS" in result.output


def test_an_unsafe_run_name_is_refused_before_anything_is_read():
    with pytest.raises(InputError, match="a run name is one folder name"):
        resolved("--run-name", "../escape")


def test_the_readmes_config_file_example_resolves_as_it_says(workdir):
    """README, Options: python main_cil.py --config experiment.json."""
    config = workdir / "experiment.json"
    config.write_text('{"filters": 8, "loss": "bce", "aug": {"rotation_range": 90}}')
    settings = resolved("--config", config)
    assert (settings.filters, settings.loss, settings.aug["rotation_range"]) == (8, "bce", 90)
    assert settings.aug["quarter_turns"] and settings.sources["loss"] == f"config {config}"


# ---------------------------------------------------------------------------------------------
# Recipes


def test_the_nvidia_recipe_resolves_to_its_documented_values():
    settings = resolved("--recipe", "nvidia-tinyunet")
    assert (settings["model"], settings["batch_size"], settings["loss"]) == ("tiny-unet", 16,
                                                                           "adaptive")
    assert (settings["init"], settings["weight_decay"], settings["batchnorm"]) == ("he_uniform",
                                                                                 1e-5, False)
    assert settings["aug"] == resolve_aug(dict(AUG_NEUTRAL, horizontal_flip=True,
                                               quarter_turns=True))
    rate = learning_rate(settings["lr_schedule"], settings["lr"], decay=settings["lr_decay"],
                         decay_steps=settings["lr_decay_steps"])
    assert [float(rate(step)) for step in (0, 499, 500, 1000)] == pytest.approx(
        [1e-4, 1e-4, 0.8e-4, 0.64e-4])
    optimizer = make_optimizer(settings["optimizer"], rate, rho=settings["rho"],
                               momentum=settings["momentum"], centered=settings["centered"])
    config = optimizer.get_config()
    assert isinstance(optimizer, keras.optimizers.RMSprop)
    assert (config["rho"], config["momentum"], config["centered"]) == (0.9, 0.8, True)


def test_explicit_flags_override_a_recipe():
    settings = resolved("--recipe", "nvidia-tinyunet", "--lr", "0.001", "--loss", "bce",
                        "--aug", "rotation_range=10")
    assert (settings["lr"], settings["loss"], settings["optimizer"]) == (0.001, "bce", "rmsprop")
    assert settings["aug"]["rotation_range"] == 10 and settings["aug"]["quarter_turns"]


def test_the_classic_recipe_is_the_original_keras_unet():
    settings = resolved("--recipe", "classic")
    assert (settings["filters"], settings["lr"], settings["loss"], settings["batchnorm"]) == (
        64, 1e-4, "bce", False)


def test_the_pretrained_recipe_is_what_the_readme_measured(monkeypatch):
    monkeypatch.setattr(weights_cil, "installed_file", lambda name: Path("hed.weights.h5"))
    settings = resolved("--recipe", "vgg16-hed", "--epochs", "30")
    assert (settings["model"], settings["encoder"], settings["encoder_weights"]) == (
        "unet", "vgg16", "hed")
    assert (settings["freeze_encoder"], settings["encoder_lr_scale"], settings["count"],
            settings["patience"], settings["amp"]) == (5, 10, 4, 0, True)
    assert settings["epochs"] == 30 and settings.sources["epochs"] == "command line"
    assert settings.sources["count"] == "recipe vgg16-hed"


def test_the_global_batch_of_the_recipe_is_split_over_gpus():
    assert resolved("--recipe", "nvidia-tinyunet", "--gpus", "2")["batch_size"] == 8
