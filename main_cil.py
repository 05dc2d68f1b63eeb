"""Train and validate a U-Net on image/mask pairs, or train on all of them and write the Kaggle
submission. `python main_cil.py --help` lists the options; `python main_cil.py --demo` trains on
generated roads in under a minute.

    python main_cil.py                       # 90/10 split, validation outputs and metrics
    python main_cil.py --submit              # train on all images, test masks and the CSV
    python main_cil.py --submit --weights logs/<run>/best.keras   # predict with a saved model

This file is the command line and the order of the work; options_cil.py owns what a user can
type, settings_cil.py how a run's settings are resolved, runs_cil.py the run folder, and
TensorFlow is imported only once a run really starts.
"""

import contextlib
import hashlib
import math
import signal
import sys
from datetime import datetime
from pathlib import Path

import click
import numpy as np

from cli_cil import one_line_errors
from data_cil import (find_pairs, find_test_images, fold_assignment, load_pairs, parse_palette,
                      split_pairs, train_sample_size, write_synthetic_dataset)
from devices_cil import placement, start_backend
from io_cil import InputError, os_error_line, write_json
from options_cil import (CONTEXT, DEMO_IMAGES, DEMO_SEED, DEMO_SIZE, DEMO_TEST_IMAGES, OPTIONS,
                         GroupedCommand, input_multiple, learned_names, parse_class_weights,
                         parse_loss, tile_error)
from runs_cil import (Run, TrainingDiverged, TrainingInterrupted, close_run, create_or_join,
                      fold_folder, open_fold, open_run, path, read_metrics, read_state,
                      run_folder_of)
from settings_cil import check_environment_names, config_record, resolve_settings
from weights_cil import fetch_imagenet

# What to lower when memory runs out: the sizes that decide a step's activations.
MEMORY_HINT = ("lower --batch-size or --crop for training, --filters or --depth for the model, "
               "or pass --tile (e.g. 256) for prediction")


def echo(text="", err=False):
    click.echo(text, err=err)


# ---------------------------------------------------------------------------------------------
# Data


def selected_pairs(settings):
    if settings.demo and not (Path(settings.data_dir) / "training").is_dir():
        write_synthetic_dataset(settings.data_dir, count=DEMO_IMAGES, size=DEMO_SIZE,
                                seed=DEMO_SEED, test_count=DEMO_TEST_IMAGES)
        echo(f"generated {DEMO_IMAGES} synthetic road images in {settings.data_dir}")
    pairs = find_pairs(settings.data_dir)
    return pairs[:settings.limit] if settings.limit else pairs


def palette_of(settings):
    return parse_palette(settings.palette) if settings.palette else None


def load(pairs, settings):
    notes = {}
    images, masks = load_pairs(pairs, settings.classes, palette_of(settings), notes)
    for note, names in notes.items():
        echo(f"note: {len(names)} {note} (first: {names[0]})")
    return images, masks


def extra_count(settings):
    """How often each --extra-data image is shown per epoch: --extra-count, else --count."""
    return settings.extra_count or settings.count


def _pixels_digest(image):
    return hashlib.sha256(image.tobytes() + str(image.shape).encode()).hexdigest()


def extra_training_set(settings, official):
    """(images, masks) of the --extra-data folders, for training only (never validated, scored
    or tuned on); InputError for an extra image with the same pixels as one of `official`
    (pairs, images: every pair of --data-dir), which would put validation images into training."""
    if not settings.extra_data:
        return [], []
    pairs = [pair for folder in settings.extra_data for pair in find_pairs(folder, "--extra-data")]
    images, masks = load(pairs, settings)
    known = {_pixels_digest(image): pair for pair, image in zip(*official)}
    for pair, image in zip(pairs, images):
        twin = known.get(_pixels_digest(image))
        if twin and pair.image.resolve() == twin.image.resolve():
            raise InputError(f"{pair.image}: an image of --data-dir itself, which may be validated "
                             "on; pass --extra-data a folder of other pairs")
        if twin:
            raise InputError(f"{pair.image}: the same pixels as {twin.image} of --data-dir, which "
                             "may be validated on; remove it from the --extra-data folder")
    echo(f"extra data: {len(pairs)} pairs from {', '.join(map(str, settings.extra_data))}, "
         f"shown {extra_count(settings)}x per epoch, for training only")
    return images, masks


def resolved_class_weights(settings, masks):
    """--class-weights as numbers: given, computed from the masks for auto (and for
    weighted_bce without weights), or None."""
    from losses_cil import auto_class_weights
    weights = parse_class_weights(settings.class_weights)
    if weights is None and "weighted_bce" in parse_loss(settings.loss):
        weights = "auto"
    if weights == "auto":
        try:
            weights = auto_class_weights(masks, settings.classes)
        except ValueError as error:
            raise InputError(str(error)) from None
        echo(f"class weights from the training masks: {weights}")
    return weights


# ---------------------------------------------------------------------------------------------
# Devices and the run folder


def default_run_name(settings):
    width = "" if settings.model == "tiny-unet" else str(settings.filters)
    encoder = f"-{settings.encoder}" if settings.encoder else ""
    mode = "-submit" if settings.submit else ""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{settings.model}{width}{encoder}{mode}"


def run_name(settings):
    """--run-name, or a new name from the time, model and width (numbered when taken)."""
    if settings.run_name is not None:
        return settings.run_name
    name, suffix = default_run_name(settings), 1
    while (Path(settings.logs_dir) / name).exists():
        suffix += 1
        name = f"{default_run_name(settings)}-{suffix}"
    return name


def run_outputs(settings):
    """The output folders a run writes: test predictions when it submits, none when it only
    exports saved models, else validation pictures."""
    if settings.submit:
        return ("submit",)
    return () if settings.export and settings.weights else ("valid",)


@contextlib.contextmanager
def opened_run(settings, inside=None, *, resume=None, force=None):
    """The run (created, or reopened when resuming) with config.json written and its lock held
    while inside. `inside`, a cross-validated run, places a fold's run in its folders."""
    resume = bool(settings.resume) if resume is None else resume
    force = settings.force if force is None else force
    writes = run_outputs(settings)
    if inside is None:
        run, moved = open_run(settings.logs_dir, run_name(settings), settings.valid_output_dir,
                              settings.submit_output_dir, force=force, resume=resume,
                              writes=writes)
    else:
        run, moved = open_fold(inside, settings.fold, force=force, resume=resume, writes=writes)
    try:
        for folder in moved:
            echo(f"moved the earlier {run.name} aside to {folder}")
        if not resume:
            write_json(run.file("config"), config_record(settings, run.name))
        yield run
    except (InputError, OSError) as error:
        if read_state(run.folder) is None:
            raise
        line = str(error) if isinstance(error, InputError) else os_error_line(error)
        resumed = inside.folder if inside is not None else run.folder
        raise InputError(f"{line}; the last checkpoint in {run.folder} is intact: once that is "
                         f"mended, continue with python main_cil.py --resume {resumed}") from error
    finally:
        close_run(run)


# ---------------------------------------------------------------------------------------------
# Training


def build_and_compile(settings, steps_per_epoch, class_weights):
    from losses_cil import SegmentationLoss, training_metrics
    from model_cil import build_model
    from train_cil import learning_rate, make_optimizer
    model = build_model(settings.model, encoder=settings.encoder,
                        encoder_weights=settings.encoder_weights, classes=settings.classes,
                        filters=settings.filters, depth=settings.depth, dropout=settings.dropout,
                        batchnorm=settings.batchnorm, activation=settings.activation,
                        initializer=settings.init, weight_decay=settings.weight_decay)
    rate = learning_rate(settings.lr_schedule, settings.lr, decay=settings.lr_decay,
                         decay_steps=settings.lr_decay_steps,
                         total_steps=steps_per_epoch * settings.epochs)
    optimizer = make_optimizer(settings.optimizer, rate, rho=settings.rho,
                               momentum=settings.momentum, centered=settings.centered,
                               encoder_lr_scale=settings.encoder_lr_scale if settings.encoder
                               else None)
    model.compile(optimizer=optimizer,
                  loss=SegmentationLoss(settings.loss, classes=settings.classes,
                                        class_weights=class_weights),
                  metrics=training_metrics(settings.classes))
    return model


def train(settings, run, place, train_images, train_masks, class_weights, valid=None,
          extra=([], [])):
    """Build (or reload the run's checkpoint), compile and fit on the training pairs and the
    `extra` (images, masks) of --extra-data; returns the RunCheckpoint."""
    import keras

    from model_cil import load_model, required_multiple
    from pipeline_cil import training_dataset, validation_arrays, validation_batches
    from train_cil import (PANEL_IMAGES, ImagePanel, RunCheckpoint, fit, progress_kind,
                           run_callbacks, stop_on_signals)
    global_batch = settings.batch_size * place.replicas
    extra_shown = extra_count(settings)
    shown = len(train_images) * settings.count + len(extra[0]) * extra_shown
    steps = math.ceil(shown / global_batch)
    state = read_state(run.folder)
    with place.scope():
        if state:
            model = load_model(run.file("checkpoint_dir") / state["file"])
        else:
            keras.utils.set_random_seed(settings.seed)
            model = build_and_compile(settings, steps, class_weights)
    crop = settings.crop or None
    sample = f"{crop}x{crop} crops" if crop else "whole images"
    encoder = f" on {settings.encoder}" if settings.encoder else ""
    extras = f" + {len(extra[0])} extra ({extra_shown}x)" if extra[0] else ""
    echo(f"model {settings.model}{encoder}: {model.count_params():,} parameters; training on "
         f"{len(train_images)} images ({sample}, {settings.count}x per epoch){extras}, batch "
         f"{global_batch}, {steps} steps per epoch, up to {settings.epochs} epochs")
    if state:
        within = f", {state['step']} steps into epoch {state['epoch'] + 1}" if state["step"] else ""
        echo(f"resuming from the checkpoint after epoch {state['epoch']}{within}")

    def stream(step):
        return training_dataset([*train_images, *extra[0]], [*train_masks, *extra[1]],
                                batch_size=global_batch, aug=settings.aug, seed=settings.seed,
                                count=settings.count, crop=crop, start_step=step,
                                extra=len(extra[0]), extra_count=extra_shown)

    valid_data, panel = (None, None), None
    if valid:
        x, y = validation_arrays(*valid, required_multiple(model))
        valid_data = validation_batches(x, y, global_batch)
        panel = ImagePanel(run.folder, x[:PANEL_IMAGES], y[:PANEL_IMAGES], settings.classes,
                           epochs=settings.epochs)
    checkpoint = RunCheckpoint(run.folder, monitor=settings.monitor if valid else None,
                               patience=settings.patience if valid else 0,
                               steps_per_epoch=steps, state=state)
    progress = progress_kind(settings.verbose)
    echo(f"run folder {run.folder}; watch it with: tensorboard --logdir {run.folder.parent}")
    with stop_on_signals():
        fit(model, stream, valid_data, epochs=settings.epochs, steps_per_epoch=steps,
            callbacks=run_callbacks(run.folder, checkpoint=checkpoint, epochs=settings.epochs,
                                    panel=panel, schedule=settings.lr_schedule,
                                    progress=progress),
            checkpoint=checkpoint, state=state, verbose=1 if progress == "bar" else 0,
            freeze_epochs=settings.freeze_encoder)
    return checkpoint


# ---------------------------------------------------------------------------------------------
# Commands


def finish(settings, run, models, report=None):
    """After training or loading: the SavedModel export of the models (their mean, as they
    predicted) when asked, and the HParams entry of a validated run (its learned settings and
    validation table)."""
    from board_cil import log_hparams
    if settings.export:
        from export_cil import ONNX_FILE, export_saved_model
        export, no_onnx = export_saved_model(models, run.file("export_dir"))
        mean = f" (the mean of {len(models)} models)" if len(models) > 1 else ""
        echo(f"exported a SavedModel{mean}: {export}" + (
            f" (no {ONNX_FILE}: {no_onnx})" if no_onnx else
            f"; for ONNX Runtime: {export / ONNX_FILE}"))
    if report:
        log_hparams(run.folder, settings, [*learned_names(), "tta", "threshold"],
                    report["valid"])


def preflight(settings, images):
    """What can fail before training fails now, before the run folder exists: the sample sizes
    against the model, and an encoder's starting weights (found, and fitting)."""
    train_sample_size(images, settings.crop, settings.aug,
                      input_multiple(settings.model, settings.depth, settings.encoder))
    if (settings.encoder and settings.encoder_weights != "none" and not settings.resume
            and not settings.weights):
        from model_cil import backbone
        backbone(settings.encoder, settings.encoder_weights)


def validated_run(settings, run, place, train_set, valid_set, extra):
    """Train on train_set (and the `extra` images and masks) and validate on valid_set, each
    (pairs, images, masks): the best model, its full-size validation (outputs, table,
    metrics.json); returns its probabilities."""
    from model_cil import load_model
    from predict_cil import predicted
    from report_cil import report_validation
    (_, train_images, train_masks), (valid_pairs, valid_images, valid_masks) = train_set, valid_set
    class_weights = resolved_class_weights(settings, [*train_masks, *extra[1]])
    checkpoint = train(settings, run, place, train_images, train_masks, class_weights,
                       valid=(valid_images, valid_masks), extra=extra)
    echo(f"\nbest {settings.monitor} {checkpoint.best:.4f} at epoch {checkpoint.best_epoch}"
         f" of {len(checkpoint.epoch_seconds)}; model: {run.file('best_model')}")
    model = load_model(run.file("best_model"))
    probabilities = predicted([model], valid_images, settings)
    report = report_validation(settings, run, valid_pairs, valid_images, valid_masks,
                               probabilities, palette_of(settings))
    write_json(run.file("metrics"), dict(checkpoint.summary(), class_weights=class_weights,
                                         **report))
    finish(settings, run, [model], report)
    return probabilities


def train_and_validate(settings):
    pairs = selected_pairs(settings)
    train_pairs, valid_pairs = split_pairs(pairs, settings.valid_fraction, settings.seed)
    train_set = (train_pairs, *load(train_pairs, settings))
    valid_set = (valid_pairs, *load(valid_pairs, settings))
    extra = extra_training_set(settings, ([*train_pairs, *valid_pairs],
                                          [*train_set[1], *valid_set[1]]))
    preflight(settings, [*train_set[1], *extra[0]])
    place = placement(settings)
    with opened_run(settings) as run:
        write_json(run.file("split"), dict(seed=settings.seed,
                                           valid_fraction=settings.valid_fraction,
                                           train=[p.name for p in train_pairs],
                                           valid=[p.name for p in valid_pairs]))
        echo(f"data {settings.data_dir}: {len(pairs)} pairs, {len(train_pairs)} train, "
             f"{len(valid_pairs)} valid (names in {run.file('split')})")
        validated_run(settings, run, place, train_set, valid_set, extra)


def cross_validation_run(settings, pairs, assignment):
    """The folder of a cross-validated run with its config.json and split.json, made by the
    first fold to start and joined by the others (runs_cil.create_or_join); with --force, an
    earlier run of the name is moved aside."""
    parent_settings = settings.replace("cross-validation", fold=None,
                                       run_name=run_name(settings))
    split = dict(seed=settings.seed, folds=settings.folds,
                 fold_of={pair.name: fold for pair, fold in zip(pairs, assignment)})
    if settings.force:
        with opened_run(parent_settings) as run:
            write_json(run.file("split"), split)
        return run
    name = parent_settings.run_name
    run = Run.named(settings.logs_dir, name, settings.valid_output_dir,
                    settings.submit_output_dir)
    compared = [key for key in learned_names() if key != "fold"]
    return create_or_join(run, config_record(parent_settings, name), split, compared)


def cross_validate(settings):
    """--folds K: each fold (or only --fold i) trained and validated in its own run inside the
    cross-validated run, resumed where interrupted, kept where finished; once every fold is,
    the out-of-fold report. With --weights (one model per fold, as --from-run of a
    cross-validated run gives them) the folds are predicted again, not trained."""
    from report_cil import cross_validation_report, write_oof
    pairs = selected_pairs(settings)
    images, masks = load(pairs, settings)
    extra = ([], []) if settings.weights else extra_training_set(settings, (pairs, images))
    preflight(settings, [*images, *extra[0]])
    assignment = fold_assignment([float(np.mean(mask > 0)) for mask in masks], settings.folds,
                                 settings.seed)
    place = placement(settings)
    parent = cross_validation_run(settings, pairs, assignment)
    echo(f"data {settings.data_dir}: {len(pairs)} pairs in {settings.folds} folds stratified by "
         f"foreground share (in {parent.file('split')}); run folder {parent.folder}")
    for fold in range(settings.folds) if settings.fold is None else [settings.fold]:
        fold_settings = settings.replace("cross-validation", fold=fold)
        folder = fold_folder(parent.folder, fold)
        if path(folder, "oof").is_file():
            echo(f"fold {fold}: finished earlier, kept")
            continue
        resume = read_state(folder) is not None
        chosen = [index for index, f in enumerate(assignment) if f != fold]
        left_out = [index for index, f in enumerate(assignment) if f == fold]
        train_set, valid_set = ([[pairs[i] for i in indices], [images[i] for i in indices],
                                 [masks[i] for i in indices]] for indices in (chosen, left_out))
        echo(f"\nfold {fold} of {settings.folds}: {len(chosen)} train, {len(left_out)} valid"
             f"{' (resumed)' if resume else ''}")
        with opened_run(fold_settings, parent, resume=resume, force=not resume) as run:
            if not resume:
                write_json(run.file("split"), dict(fold=fold, train=[p.name for p in train_set[0]],
                                                   valid=[p.name for p in valid_set[0]]))
            if settings.weights:
                probabilities = revalidated_fold(fold_settings, run, valid_set)
            else:
                probabilities = validated_run(fold_settings, run, place, train_set, valid_set,
                                              extra)
            write_oof(run.file("oof"), valid_set[0], valid_set[2], probabilities)
    finished = [fold for fold in range(settings.folds)
                if path(fold_folder(parent.folder, fold), "oof").is_file()]
    if len(finished) < settings.folds:
        echo(f"\n{len(finished)} of {settings.folds} folds finished; once all are, gather them: "
             f"python main_cil.py --resume {parent.folder}")
        return
    report = cross_validation_report(parent.folder, settings.folds, settings)
    write_json(parent.file("metrics"), dict(cross_validation=report))
    echo(f"out-of-fold report: {parent.file('metrics')}")


def check_tile(settings, models, files=None):
    """InputError when --tile is no multiple of what a model of --weights takes: each model
    records its own (model_cil.required_multiple), whatever the settings' depth says."""
    from model_cil import required_multiple
    for file, model in zip(files or settings.weights, models):
        multiple = required_multiple(model)
        if settings.tile and settings.tile % multiple:
            raise InputError(f"{file}: {tile_error(settings.tile, multiple)}")


def revalidated_fold(settings, run, valid_set):
    """A fold's held-out images predicted by its saved model (settings.weights[fold]), with this
    run's prediction settings; the outputs, table and metrics.json as if it had trained."""
    from model_cil import load_saved_model
    from predict_cil import predicted
    from report_cil import report_validation
    weights = settings.weights[settings.fold]
    model = load_saved_model(weights, settings.classes)
    check_tile(settings, [model], [weights])
    echo(f"model {weights}: predicting its held-out images again, no training")
    probabilities = predicted([model], valid_set[1], settings)
    report = report_validation(settings, run, *valid_set, probabilities, palette_of(settings))
    best_epoch = read_metrics(run_folder_of(weights)).get("best_epoch")
    write_json(run.file("metrics"), dict(weights=str(weights), best_epoch=best_epoch, **report))
    return probabilities


def train_and_submit(settings):
    from model_cil import load_model
    from predict_cil import write_test_predictions
    pairs = selected_pairs(settings)
    images, masks = load(pairs, settings)
    tests = find_test_images(settings.data_dir)    # fail now, not after hours of training
    extra = extra_training_set(settings, (pairs, images))
    preflight(settings, [*images, *extra[0]])
    class_weights = resolved_class_weights(settings, [*masks, *extra[1]])
    place = placement(settings)
    with opened_run(settings) as run:
        echo(f"data {settings.data_dir}: training on all {len(pairs)} pairs (no validation)")
        checkpoint = train(settings, run, place, images, masks, class_weights, extra=extra)
        model = load_model(run.file("best_model"))
        submission = write_test_predictions([model], settings, run, tests, palette_of(settings))
        write_json(run.file("metrics"), dict(checkpoint.summary(), class_weights=class_weights,
                                             submission=submission))
        finish(settings, run, [model])


def predict_with_weights(settings):
    """No training: validate, submit or export with the saved model (several: their mean)."""
    from model_cil import load_saved_model, model_classes
    from predict_cil import predicted, write_test_predictions
    from report_cil import report_validation
    explicit = settings.sources["classes"] == "command line"
    models = [load_saved_model(file, settings.classes if explicit else None)
              for file in settings.weights]
    classes = {model_classes(model) for model in models}
    if len(classes) > 1:
        raise InputError(f"--weights: the models predict {sorted(classes)} classes; average "
                         "models of one task")
    settings = settings.replace(f"model {settings.weights[0]}", classes=classes.pop())
    check_tile(settings, models)
    weights = [str(file) for file in settings.weights]
    for file, model in zip(weights, models):
        echo(f"model {file}: {model.count_params():,} parameters, no training")
    if settings.submit:
        tests = find_test_images(settings.data_dir)
        with opened_run(settings) as run:
            submission = write_test_predictions(models, settings, run, tests, palette_of(settings))
            write_json(run.file("metrics"), dict(weights=weights, submission=submission))
            finish(settings, run, models)
        return
    if settings.export:
        with opened_run(settings) as run:
            finish(settings, run, models)
        return
    _, valid_pairs = split_pairs(selected_pairs(settings), settings.valid_fraction, settings.seed)
    images, masks = load(valid_pairs, settings)
    with opened_run(settings) as run:
        report = report_validation(settings, run, valid_pairs, images, masks,
                                   predicted(models, images, settings), palette_of(settings))
        write_json(run.file("metrics"), dict(weights=weights, **report))
        finish(settings, run, models, report)


def run(settings):
    backend = start_backend(quiet=not settings.debug, cpu_only=settings.gpus == 0)
    if settings.export and backend != "tensorflow":
        raise InputError(f"--export writes a TensorFlow SavedModel, which the {backend} backend "
                         "cannot; run with KERAS_BACKEND=tensorflow (its best.keras loads there "
                         "as it is), or leave --export out")
    if settings.fetch_weights:
        parameters, cache = fetch_imagenet(settings.fetch_weights)
        echo(f"{settings.fetch_weights}: ImageNet weights ({parameters:,} parameters) are in "
             f"Keras' cache {cache}; jobs find them there (or set KERAS_HOME to a shared copy)")
    elif settings.folds:
        cross_validate(settings)
    elif settings.weights:
        predict_with_weights(settings)
    elif settings.submit:
        train_and_submit(settings)
    else:
        train_and_validate(settings)


# ---------------------------------------------------------------------------------------------
# Command line


@click.command(cls=GroupedCommand, params=OPTIONS, context_settings=CONTEXT)
@click.pass_context
def main(ctx, **options):
    """Train a U-Net on image/mask pairs and validate it, or submit (see --submit)."""
    settings = None
    # LSF's warning of the run limit matters while training, which handles it; elsewhere
    # (reading data, predicting) it must not end the process as SIGUSR2 does by default.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        with one_line_errors(debug=options["debug"], memory_hint=MEMORY_HINT):
            check_environment_names()
            settings, notes = resolve_settings(ctx)
            for note in notes:
                echo(note)
            run(settings)
    except TrainingInterrupted as stop:
        echo(f"\n{stop}; checkpoint saved. Continue with: python main_cil.py --resume "
             f"{stop.run_dir}", err=True)
        sys.exit(128 + stop.signal_number)
    except TrainingDiverged as error:
        echo(f"\nerror: {error}; the last good state is in {error.run_dir / 'checkpoint'}. Try a "
             f"lower --lr (now {settings.lr}) or --loss bce, then start a new run.", err=True)
        sys.exit(3)


if __name__ == "__main__":
    main()
