"""Train and validate a U-Net on image/mask pairs, or train on all of them and write the Kaggle
submission. `python main_cil.py --help` lists the options; `python main_cil.py --demo` trains on
generated roads in about a minute.

    python main_cil.py                       # 90/10 split, validation outputs and metrics
    python main_cil.py --submit              # train on all images, test masks and the CSV
    python main_cil.py --submit --weights logs/<run>/best.keras   # predict with a saved model
"""

import json
import math
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import click
from click.core import ParameterSource

# data_cil first: it sets TensorFlow's C++ log level, which only counts before TensorFlow loads.
from data_cil import (InputError, find_pairs, find_test_images, load_pairs, parse_palette,
                      read_image, resolve_aug, split_pairs, train_sample_size, training_dataset,
                      validation_arrays, write_json, write_png, write_synthetic_dataset)
import keras
import numpy as np
import tensorflow as tf

from losses_cil import (LOSS_TERMS, PIXEL_THRESHOLD, SegmentationLoss, auto_class_weights,
                        default_monitor, parse_loss, training_metrics)
from mask_to_submission import check_output_path, write_submission
from model_cil import (ACTIVATIONS, DEFAULT_ACTIVATION, DEFAULT_DEPTH, DEFAULT_DROPOUT,
                       DEFAULT_FILTERS, DEFAULT_INIT, INITIALIZERS, MODEL_NAMES, build_model,
                       input_multiple, required_multiple)
from predict_cil import (TTA_CHOICES, contact_sheet, evaluate, labels_from, mask_png,
                         predict_probabilities, tune_threshold, write_validation_outputs)
from train_cil import (LR_SCHEDULES, OPTIMIZERS, PANEL_IMAGES, ImagePanel, RunCheckpoint,
                       TrainingDiverged, TrainingInterrupted, fit, learning_rate, make_optimizer,
                       read_state, run_callbacks, stop_on_signals)

# Training perturbations in ImageDataGenerator's vocabulary (data_cil.AUG_DEFAULTS says what each
# key means). Aerial images have no up or down, hence flips and quarter turns.
DATA_GEN_ARGS = dict(
    rotation_range=45,           # degrees; with quarter turns every angle occurs
    width_shift_range=0.0,       # the random crop already moves the window
    height_shift_range=0.0,
    zoom_range=0.1,              # 0.9x..1.1x per axis
    shear_range=0.0,
    horizontal_flip=True,
    vertical_flip=True,
    quarter_turns=True,
    fill_mode="reflect",         # mirrored roads at the border still look like roads
    brightness_range=(0.9, 1.1),
)

DATA_DIR = Path("data/roadseg")
DEMO_DIR = Path("data/demo")
LOGS_DIR = Path("logs")
VALID_OUTPUT_DIR = Path("data/valid/output")
SUBMIT_OUTPUT_DIR = Path("data/roadseg/submit_output")

EPOCHS = 60
BATCH_SIZE = 8               # per replica
LEARNING_RATE = 1e-3
CROP = 256                   # side of the square training crops; 0 trains on whole images
COUNT = 4                    # each image appears this many times (as other crops) per epoch
PATIENCE = 15                # epochs without a better monitored value before stopping
VALID_FRACTION = 0.1
SEED = 0
LOSS = "bce_dice"
# Flips and quarter turns averaged at prediction. On the 8 validation road images (README):
# TTA 1/2/4/8 gave patch F1 0.902/0.904/0.906/0.899 and pixel F1 0.884/0.887/0.890/0.888;
# 4 was best on both, a gain within the noise of 8 images, for 4x the prediction time.
TTA = 4

RECIPES = {
    # NVIDIA UNet_Industrial: README "Default configuration", model/unet.py, utils/losses.py.
    "nvidia-tinyunet": dict(
        model="tiny-unet", batch_size=16, optimizer="rmsprop", rho=0.9, momentum=0.8,
        centered=True, lr=1e-4, lr_schedule="step", lr_decay=0.8, lr_decay_steps=500,
        init="he_uniform", weight_decay=1e-5, loss="adaptive", batchnorm=False,
        aug=dict(horizontal_flip=True, quarter_turns=True)),
    # zhixuhao/unet, the Keras U-Net most course projects start from.
    "classic": dict(model="unet", filters=64, depth=4, optimizer="adam", lr=1e-4, loss="bce",
                    batchnorm=False, dropout=0.5),
}
# --demo: generated roads and a model small enough to learn them in about a minute.
DEMO = dict(data_dir=DEMO_DIR, filters=8, depth=3, crop=0, count=4, epochs=12, batch_size=8,
            patience=0, lr=3e-3)
DEMO_IMAGES, DEMO_TEST_IMAGES, DEMO_SIZE, DEMO_SEED = 40, 4, 96, 1

# Settings that decide what a model learns; --resume takes them from the run, --from-run too.
TRAINING_KEYS = ("data_dir", "limit", "valid_fraction", "seed", "classes", "palette", "aug",
                 "crop", "count", "model", "filters", "depth", "dropout", "batchnorm",
                 "activation", "init", "weight_decay", "loss", "class_weights", "optimizer", "lr",
                 "lr_schedule", "lr_decay", "lr_decay_steps", "rho", "momentum", "centered",
                 "epochs", "batch_size", "monitor", "patience", "amp")
RESUME_OVERRIDES = ("epochs", "patience")   # what a resumed run may change


def echo(text="", err=False):
    click.echo(text, err=err)


# ---------------------------------------------------------------------------------------------
# Settings


def run_folder_of(path):
    """The run folder a path names: the folder itself, or the folder of a file inside it."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def read_run_json(path, name):
    file = run_folder_of(path) / name
    if not file.is_file():
        raise InputError(f"{file}: not found; is {run_folder_of(path)} a run folder of this tool?")
    return json.loads(file.read_text())


def earlier_run_layer(path):
    """Settings of an earlier validated run for --from-run: its training settings, its best
    epoch as the epoch count and its tuned threshold."""
    config = read_run_json(path, "config.json")
    layer = {key: config[key] for key in TRAINING_KEYS if key in config}
    metrics_file = run_folder_of(path) / "metrics.json"
    if metrics_file.is_file():
        metrics = json.loads(metrics_file.read_text())
        layer["epochs"] = metrics.get("best_epoch") or layer["epochs"]
        if metrics.get("threshold"):
            layer["threshold"] = metrics["threshold"]["threshold"]
    return layer


def _class_weights(text):
    if text in (None, "auto") or isinstance(text, list):
        return text
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InputError(f"--class-weights {text}: expected auto or numbers like 1,4") from None


def resolve_settings(options, explicit):
    """The run's settings: defaults < --recipe < --demo < --from-run < explicit flags; with
    --resume, the run's own training settings (--epochs and --patience may change)."""
    settings = dict(options)
    if options["resume"]:
        saved = read_run_json(options["resume"], "config.json")
        if read_state(run_folder_of(options["resume"])) is None:
            raise InputError(f"{run_folder_of(options['resume'])}: no checkpoint to resume from "
                             "(checkpoint/state.json); start a new run instead")
        ignored = sorted(k for k in explicit & set(TRAINING_KEYS) if k not in RESUME_OVERRIDES)
        if ignored:
            echo(f"note: --resume continues with the run's own settings; ignored "
                 f"{', '.join('--' + k.replace('_', '-') for k in ignored)}")
        settings.update({k: saved[k] for k in TRAINING_KEYS
                         if not (k in RESUME_OVERRIDES and k in explicit)})
        settings["run_name"] = saved["run_name"]
        settings["logs_dir"] = str(run_folder_of(options["resume"]).parent)
        return settings
    layers = []
    if options["recipe"]:
        layers.append(RECIPES[options["recipe"]])
    if options["demo"]:
        layers.append(DEMO)
    if options["from_run"]:
        layers.append(earlier_run_layer(options["from_run"]))
    elif options["weights"] and (run_folder_of(options["weights"]) / "config.json").is_file():
        layers.append(earlier_run_layer(options["weights"]))   # the run that saved the model
    for layer in layers:
        settings.update({k: v for k, v in layer.items() if k not in explicit})
    aug_base = next((layer["aug"] for layer in reversed(layers) if "aug" in layer), DATA_GEN_ARGS)
    settings["aug"] = resolve_aug({} if options["no_aug"] else aug_base, options["aug_overrides"])
    settings["class_weights"] = _class_weights(settings["class_weights"])
    settings["monitor"] = settings["monitor"] or default_monitor(settings["classes"])
    if options["recipe"] == "nvidia-tinyunet" and "batch_size" not in explicit and settings["gpus"]:
        # The recipe's 16 is its global batch: split it over the replicas.
        recipe_batch = RECIPES["nvidia-tinyunet"]["batch_size"]
        settings["batch_size"] = max(1, recipe_batch // settings["gpus"])
    return settings


def check_settings(settings):
    """InputError for options that cannot work together, naming what is allowed."""
    multiple = input_multiple(settings["model"], settings["depth"])
    if settings["crop"] and settings["crop"] % multiple:
        raise InputError(f"--crop must be a multiple of {multiple} (the model halves the image "
                         f"{int(math.log2(multiple))} times), got {settings['crop']}")
    try:
        terms = parse_loss(settings["loss"])
    except ValueError as error:
        raise InputError(str(error)) from None
    if settings["classes"] > 1 and "patch_f1" in terms:
        raise InputError("--loss patch_f1 scores the Kaggle road patches and needs binary masks "
                         "(--classes 1)")
    weights = settings["class_weights"]
    if isinstance(weights, list) and len(weights) != max(2, settings["classes"]):
        raise InputError(f"--class-weights needs {max(2, settings['classes'])} numbers "
                         f"(background first), got {len(weights)}")
    allowed = [f"val_{metric.name}" for metric in training_metrics(settings["classes"])]
    if settings["monitor"] not in allowed:
        raise InputError(f"--monitor {settings['monitor']}: choose one of {', '.join(allowed)}")
    if settings["palette"] and settings["classes"] == 1:
        raise InputError("--palette maps colours to classes; pass --classes N (N >= 2) with it")


# ---------------------------------------------------------------------------------------------
# Run folders


def default_run_name(settings):
    width = "" if settings["model"] == "tiny-unet" else str(settings["filters"])
    mode = "-submit" if settings["submit"] else ""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{settings['model']}{width}{mode}"


def is_run(folder):
    return (folder / "config.json").is_file()


def start_run(settings):
    """Create (or, with --resume, reopen) the run folder and write config.json; returns it.

    A folder that already holds a run is refused unless --force, which deletes that run and
    its outputs; a generated name that is taken gets a numbered suffix instead.
    """
    logs = Path(settings["logs_dir"])
    if settings["resume"]:
        return run_folder_of(settings["resume"])
    name = settings["run_name"]
    if name:
        run_dir = logs / name
        if is_run(run_dir):
            if not settings["force"]:
                raise InputError(f"{run_dir}: a run of that name exists; pass --force to replace "
                                 f"it, --resume {run_dir} to continue it, or another --run-name")
            for folder in (run_dir, *output_dirs(settings, name)):
                shutil.rmtree(folder, ignore_errors=True)
    else:
        name = default_run_name(settings)
        suffix = 1
        while (logs / name).exists():
            suffix += 1
            name = f"{default_run_name(settings)}-{suffix}"
        run_dir = logs / name
    run_dir.mkdir(parents=True, exist_ok=True)
    settings["run_name"] = name
    write_json(run_dir / "config.json", config_record(settings))
    return run_dir


def output_dirs(settings, name):
    return (Path(settings["valid_output_dir"]) / name, Path(settings["submit_output_dir"]) / name)


def config_record(settings):
    """Every resolved setting, plus what reproduces the run: command line and versions."""
    record = {key: str(value) if isinstance(value, Path) else value
              for key, value in settings.items()}
    record.update(command=" ".join(sys.argv), started=datetime.now().isoformat(timespec="seconds"),
                  versions=dict(keras=keras.__version__, tensorflow=tf.__version__,
                                numpy=np.__version__))
    return record


# ---------------------------------------------------------------------------------------------
# Devices, model, data


def distribution(gpus, amp):
    """(strategy, description, replicas): one device by default, MirroredStrategy over --gpus N
    (N >= 2), the CPU with --gpus 0. Mixed precision only where there is a GPU."""
    found = tf.config.list_physical_devices("GPU")
    if gpus == 0:
        tf.config.set_visible_devices([], "GPU")
        found = []
    if gpus and gpus > len(found):
        raise InputError(f"--gpus {gpus}: only {len(found)} GPU(s) visible to TensorFlow; "
                         f"pass --gpus {len(found)} or fewer")
    if amp and found:
        keras.mixed_precision.set_global_policy("mixed_float16")
    elif amp:
        echo("note: --amp ignored on the CPU: mixed_float16 is for GPUs (README 'Mixed "
             "precision'); training in float32")
    if gpus and gpus > 1:
        devices = [f"/gpu:{i}" for i in range(gpus)]
        return tf.distribute.MirroredStrategy(devices), f"MirroredStrategy over {devices}", gpus
    device = "GPU 0" if found else "CPU"
    return tf.distribute.get_strategy(), device, 1


def build_and_compile(settings, steps_per_epoch):
    model = build_model(settings["model"], classes=settings["classes"],
                        filters=settings["filters"], depth=settings["depth"],
                        dropout=settings["dropout"], batchnorm=settings["batchnorm"],
                        activation=settings["activation"], initializer=settings["init"],
                        weight_decay=settings["weight_decay"])
    rate = learning_rate(settings["lr_schedule"], settings["lr"], decay=settings["lr_decay"],
                         decay_steps=settings["lr_decay_steps"],
                         total_steps=steps_per_epoch * settings["epochs"])
    optimizer = make_optimizer(settings["optimizer"], rate, rho=settings["rho"],
                               momentum=settings["momentum"], centered=settings["centered"])
    model.compile(optimizer=optimizer,
                  loss=SegmentationLoss(settings["loss"], classes=settings["classes"],
                                        class_weights=settings["class_weights"]),
                  metrics=training_metrics(settings["classes"]))
    return model


def resolved_class_weights(settings, masks):
    """--class-weights as numbers: given, computed from the masks for auto (and for
    weighted_bce without weights), or None."""
    weights = settings["class_weights"]
    if weights is None and "weighted_bce" in parse_loss(settings["loss"]):
        weights = "auto"
    if weights == "auto":
        try:
            weights = auto_class_weights(masks, settings["classes"])
        except ValueError as error:
            raise InputError(str(error)) from None
        echo(f"class weights from the training masks: {weights}")
    return weights


def selected_pairs(settings):
    if settings["demo"] and not (Path(settings["data_dir"]) / "training").is_dir():
        write_synthetic_dataset(settings["data_dir"], count=DEMO_IMAGES, size=DEMO_SIZE,
                                seed=DEMO_SEED, test_count=DEMO_TEST_IMAGES)
        echo(f"generated {DEMO_IMAGES} synthetic road images in {settings['data_dir']}")
    pairs = find_pairs(settings["data_dir"])
    return pairs[:settings["limit"]] if settings["limit"] else pairs


def load(pairs, settings):
    notes = {}
    palette = parse_palette(settings["palette"]) if settings["palette"] else None
    images, masks = load_pairs(pairs, settings["classes"], palette, notes)
    for note, names in notes.items():
        echo(f"note: {len(names)} {note} (first: {names[0]})")
    return images, masks


# ---------------------------------------------------------------------------------------------
# Training


def train(settings, run_dir, strategy, replicas, train_images, train_masks, valid=None):
    """Build (or reload, when resuming), compile and fit; returns the RunCheckpoint summary."""
    global_batch = settings["batch_size"] * replicas
    steps = math.ceil(len(train_images) * settings["count"] / global_batch)
    state = read_state(run_dir) if settings["resume"] else None
    with strategy.scope():
        if state:
            model = keras.models.load_model(run_dir / "checkpoint" / state["file"])
        else:
            keras.utils.set_random_seed(settings["seed"])
            model = build_and_compile(settings, steps)
    crop = settings["crop"] or None
    sample = f"{crop}x{crop} crops" if crop else "whole images"
    echo(f"model {settings['model']}: {model.count_params():,} parameters; training on "
         f"{len(train_images)} images ({sample}, {settings['count']}x per epoch), batch "
         f"{global_batch}, {steps} steps per epoch, up to {settings['epochs']} epochs")

    def stream(step):
        return training_dataset(train_images, train_masks, batch_size=global_batch,
                                aug=settings["aug"], seed=settings["seed"],
                                count=settings["count"], crop=crop, start_step=step)

    valid_data, panel = None, None
    if valid:
        x, y = validation_arrays(*valid, required_multiple(model))
        valid_data = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch)
        panel = ImagePanel(run_dir, x[:PANEL_IMAGES], y[:PANEL_IMAGES], settings["classes"])
    checkpoint = RunCheckpoint(run_dir, monitor=settings["monitor"] if valid else None,
                               patience=settings["patience"] if valid else 0,
                               steps_per_epoch=steps, state=state)
    echo(f"run folder {run_dir}; watch it with: tensorboard --logdir {settings['logs_dir']}")
    with stop_on_signals():
        fit(model, stream, valid_data, epochs=settings["epochs"], steps_per_epoch=steps,
            callbacks=run_callbacks(run_dir, checkpoint=checkpoint, panel=panel,
                                    schedule=settings["lr_schedule"]),
            checkpoint=checkpoint, state=state)
    return checkpoint


def load_saved_model(path):
    """A .keras model of this tool, or InputError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: weights file not found")
    try:
        model = keras.models.load_model(path)
    except Exception as error:  # a zip that is no model, a model of another tool, ...
        raise InputError(f"{path}: not a model saved by this tool ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}); pass a best.keras from a run "
                         "folder") from error
    channels = model.input_shape[-1]
    if channels != 3:
        raise InputError(f"{path}: the model expects {channels}-channel images but this tool "
                         "feeds RGB (3 channels); train a model on these images instead")
    return model


# ---------------------------------------------------------------------------------------------
# After training


def report_validation(model, settings, pairs, images, masks):
    """Full-size validation predictions, outputs, metric table and metrics.json fields."""
    classes = settings["classes"]
    probabilities = [predict_probabilities(model, image, tta=settings["tta"]) for image in images]
    tuned = tune_threshold(masks, probabilities) if classes == 1 else None
    threshold = settings["threshold"] or (tuned["threshold"] if tuned else PIXEL_THRESHOLD)
    folder = Path(settings["valid_output_dir"]) / settings["run_name"]
    folder.mkdir(parents=True, exist_ok=True)
    palette = parse_palette(settings["palette"]) if settings["palette"] else None
    for pair, image, mask, prob in zip(pairs, images, masks, probabilities):
        write_validation_outputs(folder, pair.name, image, mask, prob, classes,
                                 threshold=threshold, palette=palette)
    table = evaluate(masks, probabilities, classes)
    echo(f"\nvalidation, {len(images)} images at full size, pixel threshold "
         f"{PIXEL_THRESHOLD}, TTA {settings['tta']}:")
    echo(format_table(table, classes))
    if tuned:
        echo(f"tuned pixel threshold {tuned['threshold']}: patch F1 {tuned['patch_f1']:.4f} "
             f"(at 0.5: {tuned['patch_f1_at_0_5']:.4f}); --submit with --from-run uses it")
    echo(f"outputs: {folder}")
    return dict(valid=table, threshold=tuned, tta=settings["tta"])


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


def write_test_predictions(model, settings, run_dir, tests):
    """Masks for the test images {number: path}, the CSV (binary tasks) and a contact sheet;
    returns a summary."""
    started = time.perf_counter()
    classes = settings["classes"]
    folder = Path(settings["submit_output_dir"]) / settings["run_name"]
    csv_path = folder / "submission.csv"
    if folder.exists() and any(folder.iterdir()):
        raise InputError(f"{folder}: holds an earlier submission; choose another --run-name")
    folder.mkdir(parents=True, exist_ok=True)
    check_output_path(csv_path, force=False)
    threshold = settings["threshold"] or PIXEL_THRESHOLD
    images, labels = [], {}
    for number, path in tests.items():
        image = read_image(path)
        labels[number] = labels_from(predict_probabilities(model, image, tta=settings["tta"]),
                                     classes, threshold)
        write_png(folder / f"{path.stem}.png", mask_png(labels[number], classes))
        images.append(image)
    summary = dict(test_images=len(tests), threshold=threshold, tta=settings["tta"],
                   masks=str(folder))
    if classes == 1:
        lines = write_submission(csv_path, {n: m.astype(float) for n, m in labels.items()})
        road = sum(line.endswith(",1") for line in lines[1:]) / (len(lines) - 1)
        summary.update(csv=str(csv_path), csv_lines=len(lines) - 1, road_patch_share=round(road, 4))
    sheet = run_dir / "contact_sheet.png"
    write_png(sheet, contact_sheet(images, list(labels.values()), classes))
    summary["seconds"] = round(time.perf_counter() - started, 1)
    echo(f"\npredicted {len(tests)} test images (threshold {threshold}, TTA {settings['tta']}) "
         f"into {folder} in {summary['seconds']} s")
    if classes == 1:
        echo(f"wrote {csv_path}: {summary['csv_lines']} patches, "
             f"{summary['road_patch_share']:.1%} of them foreground")
    echo(f"contact sheet: {sheet}")
    return summary


def write_metrics(run_dir, checkpoint, extra):
    seconds = checkpoint.epoch_seconds if checkpoint else []
    record = dict(best_epoch=checkpoint.best_epoch if checkpoint else None,
                  best_value=checkpoint.best if checkpoint else None,
                  monitor=checkpoint.monitor if checkpoint else None,
                  epochs_run=len(seconds),
                  stopped_early=checkpoint.stopped_early if checkpoint else False,
                  seconds_per_epoch=round(float(np.median(seconds)), 2) if seconds else None,
                  train_seconds=round(sum(seconds), 1), **extra)
    write_json(run_dir / "metrics.json", record)


# ---------------------------------------------------------------------------------------------
# Commands


def train_and_validate(settings, strategy, replicas):
    pairs = selected_pairs(settings)
    train_pairs, valid_pairs = split_pairs(pairs, settings["valid_fraction"], settings["seed"])
    train_images, train_masks = load(train_pairs, settings)
    valid_images, valid_masks = load(valid_pairs, settings)
    train_sample_size(train_images, settings["crop"], settings["aug"])
    settings["class_weights"] = resolved_class_weights(settings, train_masks)
    run_dir = start_run(settings)
    write_json(run_dir / "split.json", dict(seed=settings["seed"],
                                            valid_fraction=settings["valid_fraction"],
                                            train=[p.name for p in train_pairs],
                                            valid=[p.name for p in valid_pairs]))
    echo(f"data {settings['data_dir']}: {len(pairs)} pairs, {len(train_pairs)} train, "
         f"{len(valid_pairs)} valid (names in {run_dir / 'split.json'})")
    checkpoint = train(settings, run_dir, strategy, replicas, train_images, train_masks,
                       valid=(valid_images, valid_masks))
    echo(f"\nbest {settings['monitor']} {checkpoint.best:.4f} at epoch {checkpoint.best_epoch}"
         f" of {len(checkpoint.epoch_seconds)}; model: {run_dir / 'best.keras'}")
    model = keras.models.load_model(run_dir / "best.keras")
    report = report_validation(model, settings, valid_pairs, valid_images, valid_masks)
    write_metrics(run_dir, checkpoint, report)


def train_and_submit(settings, strategy, replicas):
    pairs = selected_pairs(settings)
    images, masks = load(pairs, settings)
    tests = find_test_images(settings["data_dir"])   # fail now, not after hours of training
    train_sample_size(images, settings["crop"], settings["aug"])
    settings["class_weights"] = resolved_class_weights(settings, masks)
    run_dir = start_run(settings)
    echo(f"data {settings['data_dir']}: training on all {len(pairs)} pairs (no validation)")
    checkpoint = train(settings, run_dir, strategy, replicas, images, masks)
    model = keras.models.load_model(run_dir / "best.keras")
    write_metrics(run_dir, checkpoint,
                  dict(submission=write_test_predictions(model, settings, run_dir, tests)))


def predict_with_weights(settings):
    model = load_saved_model(settings["weights"])
    settings["classes"] = model.output_shape[-1]
    echo(f"model {settings['weights']}: {model.count_params():,} parameters, no training")
    if settings["submit"]:
        tests = find_test_images(settings["data_dir"])
        run_dir = start_run(settings)
        write_metrics(run_dir, None,
                      dict(submission=write_test_predictions(model, settings, run_dir, tests)))
        return
    _, valid_pairs = split_pairs(selected_pairs(settings), settings["valid_fraction"],
                                 settings["seed"])
    images, masks = load(valid_pairs, settings)
    run_dir = start_run(settings)
    write_metrics(run_dir, None, report_validation(model, settings, valid_pairs, images, masks))


def run(settings):
    if settings["weights"]:
        predict_with_weights(settings)
        return
    strategy, device, replicas = distribution(settings["gpus"], settings["amp"])
    echo(f"device: {device}")
    if settings["submit"]:
        train_and_submit(settings, strategy, replicas)
    else:
        train_and_validate(settings, strategy, replicas)


# ---------------------------------------------------------------------------------------------
# Command line


def loss_spec(ctx, param, value):
    try:
        parse_loss(value)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None
    return value


def settings_from(ctx):
    """Checked settings from a parsed command line (explicit flags win over presets)."""
    options = dict(ctx.params, tta=int(ctx.params["tta"]))
    explicit = {name for name in options
                if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE}
    settings = resolve_settings(options, explicit)
    check_settings(settings)
    return settings


@click.command(context_settings=dict(help_option_names=["-h", "--help"], max_content_width=100))
# data
@click.option("--data-dir", type=click.Path(path_type=Path), default=DATA_DIR, show_default=True,
              help="Folder with training/images and training/groundtruth (and the test images).")
@click.option("--demo", is_flag=True,
              help=f"Generate synthetic roads into {DEMO_DIR} and train a tiny model on them.")
@click.option("--limit", type=click.IntRange(min=2),
              help="Use only the first N pairs (smoke runs).")
@click.option("--valid-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=VALID_FRACTION, show_default=True,
              help="Share of pairs held out to validate.")
@click.option("--seed", type=int, default=SEED, show_default=True,
              help="Seeds the split, the weights and every random perturbation.")
@click.option("--classes", type=click.IntRange(min=1), default=1, show_default=True,
              help="1: binary masks (sigmoid); N >= 2: N exclusive classes (softmax).")
@click.option("--palette", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help='JSON mapping mask colours to classes, e.g. {"#ff0000": 1}.')
# perturbations
@click.option("--aug", "aug_overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a DATA_GEN_ARGS entry, e.g. --aug rotation_range=90 (repeatable).")
@click.option("--no-aug", is_flag=True, help="Train without perturbations (crops remain).")
@click.option("--crop", type=click.IntRange(min=0), default=CROP, show_default=True,
              help="Side of the random square training crops in pixels; 0 for whole images.")
@click.option("--count", type=click.IntRange(min=1), default=COUNT, show_default=True,
              help="Times each training image is shown per epoch.")
# model
@click.option("--model", type=click.Choice(MODEL_NAMES), default="unet", show_default=True,
              help="Architecture: the classic U-Net family or NVIDIA's TinyUNet.")
@click.option("--filters", type=click.IntRange(min=1), default=DEFAULT_FILTERS, show_default=True,
              help="U-Net width at the top level; it doubles at each level down.")
@click.option("--depth", type=click.IntRange(1, 7), default=DEFAULT_DEPTH, show_default=True,
              help="U-Net poolings; input sides must be multiples of 2**depth.")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=DEFAULT_DROPOUT,
              show_default=True, help="Dropout rate at the bottleneck.")
@click.option("--batchnorm/--no-batchnorm", default=True, show_default=True,
              help="Batch normalisation after each convolution.")
@click.option("--activation", type=click.Choice(ACTIVATIONS), default=DEFAULT_ACTIVATION,
              show_default=True, help="Activation after each convolution.")
@click.option("--init", type=click.Choice(INITIALIZERS), default=DEFAULT_INIT, show_default=True,
              help="Kernel initializer.")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="L2 penalty on kernels, NVIDIA's convention (weight_decay * sum(w**2) / 2).")
# training
@click.option("--recipe", type=click.Choice(sorted(RECIPES)),
              help="Preset of model and training settings; explicit flags override it.")
@click.option("--epochs", type=click.IntRange(min=1), default=EPOCHS, show_default=True,
              help="Most epochs to train.")
@click.option("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE, show_default=True,
              help="Images per batch on each replica; the global batch is this times --gpus.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=LEARNING_RATE,
              show_default=True, help="Learning rate; with N GPUs consider N times it "
              "(linear scaling for an N times larger global batch).")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default="adam", show_default=True,
              help="Optimizer.")
@click.option("--rho", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="RMSprop decay of the squared-gradient average.")
@click.option("--momentum", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Momentum of RMSprop and SGD.")
@click.option("--centered/--no-centered", default=False, show_default=True,
              help="Centred RMSprop (normalise by the gradient's variance).")
@click.option("--lr-schedule", type=click.Choice(LR_SCHEDULES), default="constant",
              show_default=True, help="step: lr * lr_decay ** floor(step / lr_decay_steps); "
              "cosine: to 0 over the run; plateau: halve when the monitor stalls.")
@click.option("--lr-decay", type=click.FloatRange(0, 1, min_open=True), default=0.8,
              show_default=True, help="Factor of the step schedule.")
@click.option("--lr-decay-steps", type=click.IntRange(min=1), default=500, show_default=True,
              help="Optimizer steps between two decays of the step schedule.")
@click.option("--loss", type=str, default=LOSS, show_default=True, callback=loss_spec,
              help=f"One of {', '.join(LOSS_TERMS)}, or a sum like bce_dice+patch_f1.")
@click.option("--class-weights", metavar="auto|W0,W1,...",
              help="Cross-entropy weight per class (background first); auto: inverse frequency.")
@click.option("--monitor", help="Validation metric for the best model and early stopping "
              "[default: val_f1, or val_mean_iou for several classes].")
@click.option("--patience", type=click.IntRange(min=0), default=PATIENCE, show_default=True,
              help="Stop after this many epochs without improvement; 0 never stops early.")
@click.option("--amp", is_flag=True, help="Mixed float16 precision on GPUs (ignored on the CPU).")
@click.option("--gpus", type=click.IntRange(min=0),
              help="GPUs to train on (MirroredStrategy from 2); 0 forces the CPU "
              "[default: one GPU if there is one].")
# prediction
@click.option("--submit", is_flag=True,
              help="Train on all pairs, then write test masks and the Kaggle CSV.")
@click.option("--weights", type=click.Path(path_type=Path),
              help="Skip training: predict with this saved .keras model.")
@click.option("--from-run", type=click.Path(path_type=Path, exists=True),
              help="Take settings, best epoch count and tuned threshold from an earlier run.")
@click.option("--tta", type=click.Choice([str(t) for t in TTA_CHOICES]), default=str(TTA),
              show_default=True, help="Average predictions over this many flips and turns.")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Pixel probability for foreground [default: tuned on validation, else 0.5].")
# run
@click.option("--run-name", help="Name of the run folder [default: time, model and width].")
@click.option("--force", is_flag=True, help="Replace an existing run of the same --run-name.")
@click.option("--resume", type=click.Path(path_type=Path, exists=True),
              help="Continue an interrupted run folder from its last checkpoint.")
@click.option("--logs-dir", type=click.Path(path_type=Path), default=LOGS_DIR, show_default=True,
              help="Where run folders go.")
@click.option("--valid-output-dir", type=click.Path(path_type=Path), default=VALID_OUTPUT_DIR,
              show_default=True, help="Where validation predictions go, one folder per run.")
@click.option("--submit-output-dir", type=click.Path(path_type=Path), default=SUBMIT_OUTPUT_DIR,
              show_default=True, help="Where test masks and the CSV go, one folder per run.")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx, **options):
    """Train a U-Net on image/mask pairs and validate it, or submit (see --submit)."""
    settings = None
    try:
        settings = settings_from(ctx)
        run(settings)
    except InputError as error:
        if options["debug"]:
            raise
        echo(f"error: {error}", err=True)
        sys.exit(2)
    except TrainingInterrupted as stop:
        run_dir = Path(settings["logs_dir"]) / settings["run_name"]
        echo(f"\n{stop}; checkpoint saved. Continue with: python main_cil.py --resume {run_dir}",
             err=True)
        sys.exit(128 + stop.signal_number)
    except TrainingDiverged as error:
        run_dir = Path(settings["logs_dir"]) / settings["run_name"]
        echo(f"\nerror: {error}; the last good state is in {run_dir / 'checkpoint'}. Try a "
             f"lower --lr (now {settings['lr']}) or --loss bce, then start a new run.", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
