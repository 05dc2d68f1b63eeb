"""How a run's settings are resolved from what the user typed (options_cil.py): the layering
of where a value comes from, --resume and --from-run, the checks of options that cannot work
together, and config.json in and out.

Precedence, lowest first: defaults < --recipe < --demo < --from-run (or the run that saved
--weights) < --config FILE.json < environment (CIL_<OPTION>) < command line. `--resume` takes the
run's own settings instead; only --epochs, --patience and the options outside the learned groups
may change then. The result is an immutable `Settings` value that records each value's source.

No TensorFlow here: `--help`, usage errors and the grid read this module only.
"""

import difflib
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

from io_cil import InputError, unique_keys
from options_cil import (APPLICATION_ENCODERS, AUG_NEUTRAL, DATA_GEN_ARGS, DEMO, ENV_PREFIX,
                         GLOBAL_BATCH_RECIPES, OPTIONS, RECIPES, SUBMIT_SUBDIR, aug_overrides,
                         closest_option, default_monitor, input_multiple, learned_names,
                         monitored_metrics, options_by_name, parse_class_weights, parse_loss,
                         resolve_aug, tile_error)
from runs_cil import (CONFIG_FORMAT, check_run_name, fold_folder, host_name, read_metrics,
                      read_record, read_state, run_folder_of)
from weights_cil import PACKAGED, packaged_file, weights_record

RESUME_OVERRIDES = ("epochs", "patience")    # learned settings a resumed run may change
# What else a resumed run keeps of its own: what it does, and where its outputs go.
RESUME_KEEPS = ("submit", "valid_output_dir", "submit_output_dir")
# What a resumed run cannot take: its folder is its own, and it starts nothing anew.
RESUME_REFUSED = ("run_name", "logs_dir", "force", "from_run", "weights", "fold", "folds")
# How a resumed run predicts once trained: as it was started, unless this call says otherwise.
RESUME_PREDICTS = ("tta", "threshold", "patch_threshold", "tile", "overlap", "export")
CONFIG_EXCLUDED = ("config", "resume", "force")   # decided per call, never read from a file
# Whose versions config.json records; the Keras backend's name is recorded beside them.
RECORDED_PACKAGES = ("keras", "tensorflow", "jax", "torch", "numpy", "scikit-image", "click")


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
    settings = record["settings"]                  # read_record checked it is an object
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


def check_environment_names():
    """InputError for a CIL_ variable that names no option: it would be ignored silently."""
    known = [f"{ENV_PREFIX}_{option.name.upper()}" for option in OPTIONS]
    for variable in sorted(os.environ):
        if variable.startswith(f"{ENV_PREFIX}_") and variable not in known:
            match = difflib.get_close_matches(variable, known, n=1)
            guess = f"did you mean {match[0]}?" if match else f"they are {ENV_PREFIX}_<OPTION>"
            raise InputError(f"environment {variable}: names no option of main_cil.py; {guess}")


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
    record = dict(format=CONFIG_FORMAT, settings=_jsonable({**settings, "run_name": run_name}),
                  sources={**settings.sources, "run_name": settings.sources.get("run_name",
                                                                                "generated")},
                  command=" ".join(sys.argv), started=datetime.now().isoformat(timespec="seconds"),
                  host=host_name(), backend=keras_backend(),
                  versions={name: version for name, version in versions.items() if version})
    if settings.encoder and not settings.weights:
        record["encoder_weights"] = weights_record(settings.encoder_weights)
    return record
