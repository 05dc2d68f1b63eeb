"""Speed and memory of the tool against the machine's limit and against the legacy input
pipeline, as one Markdown table (printed) and JSON (written).

    python bench_cil.py                    # docs/speed.md's numbers, about 5 minutes on 2 cores
    python bench_cil.py --quick            # a smoke run of every part, tiny sizes
    python bench_cil.py --policy mixed_bfloat16   # the models in bfloat16 (CPUs with AMX)

1. the float32 matrix-multiply peak (numpy, large square matrices, best of several);
2. per model: forward FLOPs per image counted from its convolutions, training images/s and the
   share of the peak reached (a trained image costs 3x its forward FLOPs), inference images/s
   at 608x608 and its share;
3. input pipeline images/s with the default perturbations against the legacy pair of Keras
   ImageDataGenerators sharing one seed, and the distinct mask values each leaves;
4. the peak resident memory of a training run of main_cil.py;
5. how long `--help` of each entry point takes, each in a fresh interpreter (startup);
6. with --part encoders: per keras.applications encoder (a U-Net decoder on it), parameters,
   training and inference images/s and the peak memory of measuring it, each in its own process;
7. with --part tiles: time and peak memory of predicting one image of 608, 2048 and 5000 pixels
   in 256-pixel tiles (and whole, where it fits), each in its own process.
Warm-up runs are excluded; each figure is the median of several repetitions.

    python bench_cil.py --part encoders --part tiles   # docs/speed.md's encoder and tile tables
"""

import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from cli_cil import HELP_OPTIONS, OneLineCommand, one_line_errors
from data_cil import IMAGES_SUBDIR, find_pairs, load_pairs, synthetic_road_pair
from devices_cil import backend_name, start_backend
from io_cil import InputError, write_json
from mask_to_submission import check_output_path
from options_cil import BATCH_SIZE, CROP, DATA_DIR, DATA_GEN_ARGS, LOSS, RECIPES, resolve_aug
from settings_cil import installed_version

# Keras, its backend and what builds on them are imported once the options are read
# (main), so -h and usage errors answer at once and a bad KERAS_BACKEND is one line.

MATMUL_SIDE = 4096           # large enough that numpy's BLAS runs at full speed
TEST_SIDE = 608              # the Kaggle test images
MODEL_KEYS = {"model": "name", "filters": "filters", "depth": "depth", "dropout": "dropout",
              "batchnorm": "batchnorm", "init": "initializer"}   # setting -> builder argument


def recipe_model(recipe):
    """The builder options of a recipe's model, as options_cil.RECIPES has them."""
    return {MODEL_KEYS[key]: value for key, value in RECIPES[recipe].items() if key in MODEL_KEYS}


MODELS = {"unet f=16 (default)": dict(name="unet"),          # label: builder options
          "unet f=64 (classic)": recipe_model("classic"),
          "tiny-unet": recipe_model("nvidia-tinyunet")}
POLICIES = ("float32", "mixed_bfloat16")   # mixed_float16 is --amp's policy, for GPUs
PARTS = ("peak", "models", "pipeline", "memory", "startup", "encoders", "tiles")
DEFAULT_PARTS = ("peak", "models", "pipeline", "memory", "startup")
ENTRY_POINTS = ("main_cil.py", "grid_cil.py", "mask_to_submission.py")
BENCH_ENCODERS = ("vgg16", "resnet50", "resnet50v2", "efficientnetb0", "efficientnetb3",
                  "efficientnetv2b0", "convnext_tiny", "mobilenetv3small", "mobilenetv3large",
                  "mobilenetv2", "efficientnet_lite0")
QUICK_ENCODER = "mobilenetv3small"     # the quickest to build
TILE_SIDES = (608, 2048, 5000)   # a test image, a larger aerial tile, a whole 5000x5000 scene
WHOLE_LIMIT = 2048               # sides predicted whole too; 5000 whole needs >20 GiB here
TILE, OVERLAP = 256, 64
CHECKED_BATCHES = 10         # batches whose mask values are counted, after the timed ones
# image_side: of the generated images, used when --data-dir holds no road images
QUICK = dict(side=256, repeats=1, train_steps=2, crop=64, batch=2, images=4, infer_side=64,
             pipeline_batches=5, image_side=96)
FULL = dict(side=MATMUL_SIDE, repeats=3, train_steps=4, crop=CROP, batch=BATCH_SIZE, images=72,
            infer_side=TEST_SIDE, pipeline_batches=40, image_side=400)


def median_rate(run, repeats, items):
    """Median items/s over `repeats` timed calls of run(), after one untimed warm-up call."""
    run()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        rates.append(items / (time.perf_counter() - start))
    return statistics.median(rates)


def gpu_kind():
    """The GPU the model rows run on (JAX's device kind), or None on the CPU."""
    if backend_name() != "jax":
        return None
    import jax
    device = jax.devices()[0]
    return device.device_kind if device.platform == "gpu" else None


def device_name():
    """What the model rows ran on: the GPU's name, or the CPU's with its core count."""
    if gpu_kind():
        return gpu_kind()
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return f"{len(names)} cores, {names[0]}" if names else "CPU"


def matmul_peak(side, repeats, dtype="float32"):
    """FLOP/s of a large matrix multiply, the best of `repeats`: numpy's float32 on the CPU; on a
    GPU, JAX's in the models' compute dtype (bfloat16 under mixed_bfloat16)."""
    if gpu_kind():
        import jax
        import jax.numpy as jnp
        a = jnp.asarray(np.random.default_rng(0).random((side, side)), dtype)
        b = jnp.asarray(np.random.default_rng(1).random((side, side)), dtype)
        product = jax.jit(jnp.matmul)
        product(a, b).block_until_ready()
        best = min(_timed(lambda: product(a, b).block_until_ready()) for _ in range(repeats))
        return 2 * side**3 / best
    a = np.random.default_rng(0).random((side, side), np.float32)
    b = np.random.default_rng(1).random((side, side), np.float32)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * side**3 / best


def _timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def forward_flops(model, side):
    """Multiply-adds x 2 of every convolution for one side x side image (other layers are
    memory-bound and small next to them)."""
    import keras
    convolutions = [layer for layer in model.layers
                    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
    probe = keras.Model(model.inputs, [layer.input for layer in convolutions])
    inputs = probe.predict_on_batch(np.zeros((1, side, side, model.input_shape[-1]), np.float32))
    total = 0
    for layer, tensor in zip(convolutions, inputs):
        # Same-padded stride-1 convolutions and 2x2/2 transposed ones both cost one kernel
        # application per input position.
        _, height, width, channels = tensor.shape
        kh, kw = layer.kernel_size
        total += 2 * height * width * kh * kw * channels * layer.filters
    return total


def training_rate(model, side, batch, steps, repeats):
    """Images/s of train steps as main_cil.py runs them (its loss and metrics), data in memory
    so only the model is timed."""
    import keras

    from losses_cil import SegmentationLoss, training_metrics
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=SegmentationLoss(LOSS),
                  metrics=training_metrics(1))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch, side, side, 3)).astype(np.float32)
    y = (rng.random((batch, side, side, 1)) < 0.2).astype(np.float32)

    def run():
        for _ in range(steps):
            model.train_on_batch(x, y)

    return median_rate(run, repeats, steps * batch)


def inference_rate(model, side, repeats):
    image = np.random.default_rng(0).integers(0, 256, (1, side, side, 3)).astype(np.float32)
    return median_rate(lambda: model.predict_on_batch(image), repeats, 1)


def road_images(data_dir, count, side):
    """(images, masks): the training pairs of `data_dir`, or generated roads where it is None."""
    if data_dir is not None:
        return load_pairs(find_pairs(data_dir)[:count])
    rng = np.random.default_rng(0)
    pairs = [synthetic_road_pair(rng, side) for _ in range(count)]
    return [image for image, _ in pairs], [(mask > 0).astype(np.uint8) for _, mask in pairs]


def pipeline_rate(images, masks, crop, batch, batches, repeats):
    """(images/s, distinct mask values) of main_cil.py's training stream under this backend:
    tf.data under TensorFlow, the NumPy stream otherwise."""
    from pipeline_cil import training_dataset
    stream = training_dataset(images, masks, batch_size=batch, aug=resolve_aug(DATA_GEN_ARGS),
                              seed=0, crop=crop)
    batches_of = (iter(stream) if backend_name() == "tensorflow"
                  else (stream[index] for index in itertools.count()))
    return stream_rate(batches_of, batch, batches, repeats)


def legacy_pair_rate(images, masks, batch, batches, repeats):
    """(images/s, distinct mask values) of two ImageDataGenerators sharing a seed, the classic
    Keras recipe, with the same perturbations (no quarter turns: it has none)."""
    from keras.src.legacy.preprocessing.image import ImageDataGenerator  # gone from the public API
    args = dict(DATA_GEN_ARGS)
    args.pop("quarter_turns")                   # ImageDataGenerator has none
    image_flow = ImageDataGenerator(**args).flow(np.stack(images).astype(np.float32),
                                                 batch_size=batch, seed=1)
    # Masks as users load them from PNG (0/255); they threshold after the generator.
    mask_flow = ImageDataGenerator(**args).flow(np.stack(masks)[..., None].astype(np.float32) * 255,
                                                batch_size=batch, seed=1)
    return stream_rate(zip(image_flow, mask_flow), batch, batches, repeats)


def stream_rate(stream, batch, batches, repeats):
    """(images/s, distinct mask values) of an endless iterator of (images, masks) batches. The
    values are counted on CHECKED_BATCHES further batches, outside the timing: counting is the
    benchmark's work, not the pipeline's."""

    def run():
        for _ in range(batches):
            next(stream)

    rate = median_rate(run, repeats, batches * batch)
    values = set()
    for _ in range(CHECKED_BATCHES):
        values.update(np.unique(next(stream)[1]).tolist())
    return rate, len(values)


def peak_training_memory(data_dir, quick):
    """Peak resident MiB of one epoch of main_cil.py (in its own process)."""
    with tempfile.TemporaryDirectory() as folder:
        args = [sys.executable, str(Path(__file__).with_name("main_cil.py")), "--epochs", "1",
                "--logs-dir", folder, "--valid-output-dir", folder, "--patience", "0"]
        if quick or data_dir is None:
            args += ["--demo", "--limit", "8", "--count", "1"]
        else:
            args += ["--data-dir", str(Path(data_dir).resolve())]
        if quick:
            args += ["--filters", "4", "--depth", "2", "--tta", "1"]
        subprocess.run(args, check=True, capture_output=True, cwd=folder)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def startup_seconds(repeats):
    """{entry point: median seconds of `python <it> --help`} in fresh interpreters."""
    folder = Path(__file__).parent
    times = {}
    for script in ENTRY_POINTS:
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run([sys.executable, str(folder / script), "--help"], check=True,
                           capture_output=True)
            runs.append(time.perf_counter() - start)
        times[script] = statistics.median(runs)
    return times


def encoder_row_of(encoder, p):
    """Parameters, training and inference images/s of a U-Net on `encoder` (this process)."""
    from model_cil import build_model
    model = build_model("unet", encoder=encoder)
    return dict(params=model.count_params(),
                encoder_params=model.get_layer("encoder").count_params(),
                train_images_per_s=training_rate(model, p["crop"], p["batch"], p["train_steps"],
                                                 p["repeats"]),
                infer_images_per_s=inference_rate(model, p["infer_side"], p["repeats"]))


def in_own_process(option, value, quick):
    """Run this script with `option value` in a fresh process, under this process's precision
    policy; its JSON answer and peak MiB."""
    import keras
    args = [sys.executable, __file__, option, str(value), "--policy",
            keras.mixed_precision.global_policy().name] + (["--quick"] if quick else [])
    answer = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(answer.stdout.strip().splitlines()[-1])


def tile_row_of(side, quick):
    """Seconds and peak MiB of predicting one side x side image in tiles, and whole."""
    from model_cil import build_model
    from predict_cil import predict_probabilities, predict_tiled
    model = build_model("unet")
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3)).astype(np.uint8)
    tile = 64 if quick else TILE
    predict_tiled(model, image[:tile, :tile], tile=tile, overlap=OVERLAP // 4 if quick
                  else OVERLAP)                         # warm-up
    start = time.perf_counter()
    predict_tiled(model, image, tile=tile, overlap=OVERLAP // 4 if quick else OVERLAP)
    row = dict(tiled_seconds=time.perf_counter() - start, tiled_peak_mib=peak_mib())
    if side <= WHOLE_LIMIT:
        predict_probabilities(model, image)               # warm-up: traced for this size
        start = time.perf_counter()
        predict_probabilities(model, image)
        row.update(whole_seconds=time.perf_counter() - start, whole_peak_mib=peak_mib())
    return row


def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(data_dir, quick, parts, sizes=None, labels=tuple(MODELS), chosen_encoders=()):
    """Every part asked for, on the road pairs of `data_dir` (None: generated roads)."""
    import keras

    from model_cil import build_model
    p = dict(QUICK if quick else FULL, **(sizes or {}))
    rows = {}
    if "peak" in parts or "models" in parts:
        dtype = keras.mixed_precision.global_policy().compute_dtype
        peak = matmul_peak(p["side"], p["repeats"], dtype)
        rows["matmul peak"] = dict(gflops=peak / 1e9, of=f"JAX {dtype}" if gpu_kind()
                                   else "numpy float32")
    for label in (labels if "models" in parts else ()):
        options = dict(MODELS[label])
        model = build_model(options.pop("name"), **options)
        flops = forward_flops(model, p["crop"])
        train = training_rate(model, p["crop"], p["batch"], p["train_steps"], p["repeats"])
        infer_flops = forward_flops(model, p["infer_side"])
        infer = inference_rate(model, p["infer_side"], p["repeats"])
        rows[label] = dict(params=model.count_params(), gflops_per_image=flops / 1e9,
                           train_images_per_s=train, train_share=3 * flops * train / peak,
                           infer_images_per_s=infer, infer_share=infer_flops * infer / peak)
    if "pipeline" in parts:
        images, masks = road_images(data_dir, p["images"], p["image_side"])
        ours, ours_values = pipeline_rate(images, masks, p["crop"], p["batch"],
                                          p["pipeline_batches"], p["repeats"])
        full, _ = pipeline_rate(images, masks, None, p["batch"], p["pipeline_batches"],
                                p["repeats"])
        legacy, legacy_values = legacy_pair_rate(images, masks, p["batch"],
                                                 p["pipeline_batches"], p["repeats"])
        rows["pipeline"] = dict(crop_images_per_s=ours, full_images_per_s=full,
                                legacy_images_per_s=legacy, mask_values=ours_values,
                                legacy_mask_values=legacy_values)
    if "memory" in parts:
        rows["memory"] = dict(peak_mib=peak_training_memory(data_dir, quick))
    if "startup" in parts:
        rows["startup"] = startup_seconds(2 if quick else 5)
    if "encoders" in parts:
        encoders = chosen_encoders or ((QUICK_ENCODER,) if quick else BENCH_ENCODERS)
        rows["encoders"] = {name: in_own_process("--encoder-row", name, quick)
                            for name in encoders}
    if "tiles" in parts:
        sides = (96, 160) if quick else TILE_SIDES
        rows["tiles"] = {side: in_own_process("--tile-row", side, quick) for side in sides}
    backend = backend_name()
    return dict(settings=p, results=rows, backend=backend, device=device_name(),
                data=str(data_dir) if data_dir else "generated roads",
                versions={name: installed_version(name) for name in ("keras", backend)})


def markdown(report):
    r = report["results"]
    p = report["settings"]
    stream = "tf.data" if report["backend"] == "tensorflow" else "NumPy stream"
    lines = []
    if any("gflops_per_image" in row for row in r.values()):
        peak = r["matmul peak"]["gflops"]
        lines += [f"{report['backend']} on {report['device']}; matmul peak "
                  f"({r['matmul peak']['of']}, {p['side']}x{p['side']}): {peak:.0f} GFLOP/s; "
                  f"models run with Keras' {report['policy']} policy", "",
                  f"| model | parameters | GFLOP/image at {p['crop']}x{p['crop']} | train "
                  f"images/s (batch {p['batch']}) | train share of peak | inference images/s at "
                  f"{p['infer_side']}x{p['infer_side']} | inference share of peak |",
                  "|---|---|---|---|---|---|---|"]
        for label, row in r.items():
            if "gflops_per_image" in row:
                lines.append(f"| {label} | {row['params']:,} | {row['gflops_per_image']:.2f} | "
                             f"{row['train_images_per_s']:.2f} | {row['train_share']:.0%} | "
                             f"{row['infer_images_per_s']:.2f} | {row['infer_share']:.0%} |")
    if "pipeline" in r:
        pipe = r["pipeline"]
        default = r.get("unet f=16 (default)")
        versus = (f"{pipe['crop_images_per_s'] / default['train_images_per_s']:.0f}x"
                  if default else "")
        lines += ["", "| input pipeline | images/s | vs legacy pair | vs default model "
                  "training | distinct mask values |", "|---|---|---|---|---|",
                  f"| {stream}, default perturbations, {p['crop']}x{p['crop']} crops | "
                  f"{pipe['crop_images_per_s']:.0f} | "
                  f"{pipe['crop_images_per_s'] / pipe['legacy_images_per_s']:.1f}x | {versus} | "
                  f"{pipe['mask_values']} |",
                  f"| {stream}, default perturbations, whole images | "
                  f"{pipe['full_images_per_s']:.0f} | "
                  f"{pipe['full_images_per_s'] / pipe['legacy_images_per_s']:.1f}x | | |",
                  f"| two ImageDataGenerators, one seed, whole images | "
                  f"{pipe['legacy_images_per_s']:.1f} | 1x | | {pipe['legacy_mask_values']} |"]
    if "memory" in r:
        lines += ["", f"peak resident memory of a training run: {r['memory']['peak_mib']:.0f} MiB"]
    if "startup" in r:
        lines += ["", "| `--help` of | seconds (median, fresh interpreter) |", "|---|---|"]
        lines += [f"| {script} | {seconds:.2f} |" for script, seconds in r["startup"].items()]
    if "encoders" in r:
        lines += ["", f"| encoder (U-Net decoder, 16 filters) | parameters (encoder) | train "
                  f"images/s at {p['crop']}x{p['crop']}, batch {p['batch']} | inference images/s "
                  f"at {p['infer_side']}x{p['infer_side']} | peak memory MiB |",
                  "|---|---|---|---|---|"]
        lines += [f"| {name} | {row['params']:,} ({row['encoder_params']:,}) | "
                  f"{row['train_images_per_s']:.2f} | {row['infer_images_per_s']:.2f} | "
                  f"{row['peak_mib']:.0f} |" for name, row in r["encoders"].items()]
    if "tiles" in r:
        lines += ["", f"| image side | tiled ({TILE}, overlap {OVERLAP}) seconds | tiled peak "
                  "MiB | whole seconds | whole peak MiB |", "|---|---|---|---|---|"]
        for side, row in r["tiles"].items():
            whole = (f"{row['whole_seconds']:.1f} | {row['whole_peak_mib']:.0f}"
                     if "whole_seconds" in row else "not run | not run")
            lines.append(f"| {side} | {row['tiled_seconds']:.1f} | {row['tiled_peak_mib']:.0f} | "
                         f"{whole} |")
    return "\n".join(lines)


def measured_data(data_dir, given):
    """The folder whose road pairs the pipeline and memory runs read, or None for generated
    roads: InputError when a --data-dir `given` on the command line holds no pairs, which would
    otherwise be measured on generated images without a word."""
    if (Path(data_dir) / IMAGES_SUBDIR).is_dir():
        return Path(data_dir)
    if given:
        raise InputError(f"--data-dir {data_dir}: no {IMAGES_SUBDIR} folder inside; pass a "
                         "folder of road pairs, or leave --data-dir out to measure on generated "
                         "roads")
    return None


def check_replaceable(output):
    """InputError when `output` is a file that holds no earlier results of the benchmark (a JSON
    object with their policy): the benchmark replaces its own results, never another file."""
    if not output.is_file():
        return
    try:
        earlier = json.loads(output.read_text())
    except (OSError, ValueError):
        earlier = None
    if not (isinstance(earlier, dict) and "policy" in earlier):
        raise InputError(f"{output}: exists and holds no results of this benchmark; choose "
                         "another -o (it replaces only its own results)")


@click.command(cls=OneLineCommand, context_settings=HELP_OPTIONS)
@click.pass_context
@click.option("--quick", is_flag=True, help="Tiny sizes and few repetitions: a smoke test.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=DATA_DIR, show_default=True,
              help="Road images for the pipeline and memory runs (generated ones if missing).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("bench_results.json"),
              show_default=True, help="Where the JSON goes.")
@click.option("--policy", type=click.Choice(POLICIES), default="float32", show_default=True,
              help="Keras dtype policy of the model rows; the CPU's peak stays numpy float32, a "
                   "GPU's is measured in the policy's compute dtype.")
@click.option("--part", "parts", type=click.Choice(PARTS), multiple=True,
              help=f"What to measure (repeatable) [default: {', '.join(DEFAULT_PARTS)}].")
@click.option("--side", type=click.IntRange(min=16), help="Side of the model rows' training "
              f"images [default: {CROP}; quick {QUICK['crop']}].")
@click.option("--batch", type=click.IntRange(min=1), help="Batch of the model rows' training "
              f"steps [default: {BATCH_SIZE}; quick {QUICK['batch']}].")
@click.option("--row", "rows", type=click.Choice(list(MODELS)), multiple=True,
              help="Only these model rows (repeatable) [default: all].")
@click.option("--encoder", "encoders", type=click.Choice(BENCH_ENCODERS), multiple=True,
              help="With --part encoders: only these (repeatable) [default: all listed].")
@click.option("--encoder-row", hidden=True)
@click.option("--tile-row", type=int, hidden=True)
def main(ctx, quick, data_dir, output, policy, parts, side, batch, rows, encoders, encoder_row,
         tile_row):
    """Measure training, inference and input speed against the machine's peak."""
    with one_line_errors():
        start_backend()       # TensorFlow without its C++ start-up lines; a bad KERAS_BACKEND
    import keras
    keras.mixed_precision.set_global_policy(policy)
    if encoder_row or tile_row:                     # one row, in its own process
        p = QUICK if quick else FULL
        row = encoder_row_of(encoder_row, p) if encoder_row else tile_row_of(tile_row, quick)
        click.echo(json.dumps(dict(row, peak_mib=peak_mib())))
        return
    with one_line_errors():                        # before minutes of measuring, not after
        check_replaceable(output)
        check_output_path(output, force=True, example=output.name)
        data_dir = measured_data(data_dir, ctx.get_parameter_source("data_dir")
                                 != click.core.ParameterSource.DEFAULT)
    if data_dir is None and set(parts or DEFAULT_PARTS) & {"pipeline", "memory"}:
        click.echo(f"note: no road pairs in {DATA_DIR}: the pipeline and memory runs use "
                   "generated roads")
    sizes = {key: value for key, value in (("crop", side), ("batch", batch)) if value}
    with one_line_errors(memory_hint="lower --side or --batch"):
        report = dict(measure(data_dir, quick, parts or DEFAULT_PARTS, sizes,
                              rows or list(MODELS), encoders), policy=policy)
    click.echo(markdown(report))                    # shown even if writing it fails
    with one_line_errors():
        write_json(output, report)
        click.echo(f"written to {output}")


if __name__ == "__main__":
    main()
