"""Speed and memory of the tool against the machine's limit and against the legacy input
pipeline, as one Markdown table (printed) and JSON (written).

    python bench_cil.py                    # the README's numbers, about 5 minutes on 2 cores
    python bench_cil.py --quick            # a smoke run of every part, tiny sizes
    python bench_cil.py --policy mixed_bfloat16   # the models in bfloat16 (CPUs with AMX)

1. the float32 matrix-multiply peak (numpy, large square matrices, best of several);
2. per model: forward FLOPs per image counted from its convolutions, training images/s and the
   share of the peak reached (a trained image costs 3x its forward FLOPs), inference images/s
   at 608x608 and its share;
3. input pipeline images/s with the default perturbations against the legacy pair of Keras
   ImageDataGenerators sharing one seed, and the distinct mask values each leaves;
4. the peak resident memory of a training run of main_cil.py.
Warm-up runs are excluded; each figure is the median of several repetitions.
"""

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

from data_cil import InputError, find_pairs, load_pairs, synthetic_road_pair
from main_cil import import_tensorflow
from settings_cil import BATCH_SIZE, CROP, DATA_DIR, DATA_GEN_ARGS, LOSS, resolve_aug

# TensorFlow first, without its C++ start-up lines; then what builds on it.
tf = import_tensorflow()
import keras

from losses_cil import SegmentationLoss, training_metrics
from mask_to_submission import check_output_path
from model_cil import build_model
from pipeline_cil import training_dataset

MATMUL_SIDE = 4096           # large enough that numpy's BLAS runs at full speed
TEST_SIDE = 608              # the Kaggle test images
MODELS = {                   # label: builder options
    "unet f=16 (default)": dict(name="unet"),
    "unet f=64 (classic)": dict(name="unet", filters=64, batchnorm=False, dropout=0.5),
    "tiny-unet": dict(name="tiny-unet", batchnorm=False, initializer="he_uniform"),
}
POLICIES = ("float32", "mixed_bfloat16")   # mixed_float16 is --amp's policy, for GPUs
CHECKED_BATCHES = 10         # batches whose mask values are counted, after the timed ones
# image_side: of the generated images, used when --data-dir holds no road images
QUICK = dict(side=256, repeats=2, train_steps=2, crop=64, batch=2, images=4, infer_side=64,
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


def matmul_peak(side, repeats):
    """float32 FLOP/s of numpy's matrix multiply: the best of `repeats` products."""
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
    """(images, masks): the real training pairs when there, else generated roads."""
    if (Path(data_dir) / "training/images").is_dir():
        return load_pairs(find_pairs(data_dir)[:count])
    rng = np.random.default_rng(0)
    pairs = [synthetic_road_pair(rng, side) for _ in range(count)]
    return [image for image, _ in pairs], [(mask > 0).astype(np.uint8) for _, mask in pairs]


def pipeline_rate(images, masks, crop, batch, batches, repeats):
    """(images/s, distinct mask values) of main_cil.py's training stream."""
    stream = iter(training_dataset(images, masks, batch_size=batch,
                                   aug=resolve_aug(DATA_GEN_ARGS), seed=0, crop=crop))
    return stream_rate(stream, batch, batches, repeats)


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
        if quick or not (Path(data_dir) / "training/images").is_dir():
            args += ["--demo", "--limit", "8", "--count", "1"]
        else:
            args += ["--data-dir", str(Path(data_dir).resolve())]
        subprocess.run(args, check=True, capture_output=True, cwd=folder)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def measure(data_dir, quick):
    p = QUICK if quick else FULL
    rows = {}
    peak = matmul_peak(p["side"], p["repeats"])
    rows["matmul peak"] = dict(gflops=peak / 1e9)
    for label, options in MODELS.items():
        options = dict(options)
        model = build_model(options.pop("name"), **options)
        flops = forward_flops(model, p["crop"])
        train = training_rate(model, p["crop"], p["batch"], p["train_steps"], p["repeats"])
        infer_flops = forward_flops(model, p["infer_side"])
        infer = inference_rate(model, p["infer_side"], p["repeats"])
        rows[label] = dict(params=model.count_params(), gflops_per_image=flops / 1e9,
                           train_images_per_s=train, train_share=3 * flops * train / peak,
                           infer_images_per_s=infer, infer_share=infer_flops * infer / peak)
    images, masks = road_images(data_dir, p["images"], p["image_side"])
    ours, ours_values = pipeline_rate(images, masks, p["crop"], p["batch"], p["pipeline_batches"],
                                      p["repeats"])
    full, _ = pipeline_rate(images, masks, None, p["batch"], p["pipeline_batches"], p["repeats"])
    legacy, legacy_values = legacy_pair_rate(images, masks, p["batch"], p["pipeline_batches"],
                                             p["repeats"])
    rows["pipeline"] = dict(crop_images_per_s=ours, full_images_per_s=full,
                            legacy_images_per_s=legacy, mask_values=ours_values,
                            legacy_mask_values=legacy_values)
    rows["memory"] = dict(peak_mib=peak_training_memory(data_dir, quick))
    return dict(settings=p, results=rows, versions=dict(tensorflow=tf.__version__,
                                                        keras=keras.__version__))


def markdown(report):
    r = report["results"]
    p = report["settings"]
    peak = r["matmul peak"]["gflops"]
    default = r["unet f=16 (default)"]
    lines = [f"matmul peak (numpy float32, {p['side']}x{p['side']}): {peak:.0f} GFLOP/s; "
             f"models run with Keras' {report['policy']} policy", "",
             f"| model | parameters | GFLOP/image at {p['crop']}x{p['crop']} | train images/s "
             f"(batch {p['batch']}) | train share of peak | inference images/s at "
             f"{p['infer_side']}x{p['infer_side']} | inference share of peak |",
             "|---|---|---|---|---|---|---|"]
    for label, row in r.items():
        if "params" in row:
            lines.append(f"| {label} | {row['params']:,} | {row['gflops_per_image']:.2f} | "
                         f"{row['train_images_per_s']:.2f} | {row['train_share']:.0%} | "
                         f"{row['infer_images_per_s']:.2f} | {row['infer_share']:.0%} |")
    pipe = r["pipeline"]
    lines += ["", "| input pipeline | images/s | vs legacy pair | vs default model training "
              "| distinct mask values |", "|---|---|---|---|---|",
              f"| tf.data, default perturbations, {p['crop']}x{p['crop']} crops | "
              f"{pipe['crop_images_per_s']:.0f} | "
              f"{pipe['crop_images_per_s'] / pipe['legacy_images_per_s']:.1f}x | "
              f"{pipe['crop_images_per_s'] / default['train_images_per_s']:.0f}x | "
              f"{pipe['mask_values']} |",
              f"| tf.data, default perturbations, whole images | {pipe['full_images_per_s']:.0f} | "
              f"{pipe['full_images_per_s'] / pipe['legacy_images_per_s']:.1f}x | | |",
              f"| two ImageDataGenerators, one seed, whole images | "
              f"{pipe['legacy_images_per_s']:.1f} | 1x | | {pipe['legacy_mask_values']} |",
              "", f"peak resident memory of a training run: {r['memory']['peak_mib']:.0f} MiB"]
    return "\n".join(lines)


@click.command()
@click.option("--quick", is_flag=True, help="Tiny sizes and few repetitions: a smoke test.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=DATA_DIR, show_default=True,
              help="Road images for the pipeline and memory runs (generated ones if missing).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("bench_results.json"),
              show_default=True, help="Where the JSON goes.")
@click.option("--policy", type=click.Choice(POLICIES), default="float32", show_default=True,
              help="Keras dtype policy of the model rows; the peak and its shares stay float32.")
def main(quick, data_dir, output, policy):
    """Measure training, inference and input speed against the machine's peak."""
    try:
        check_output_path(output, force=True)      # before minutes of measuring, not after
    except InputError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    keras.mixed_precision.set_global_policy(policy)
    report = dict(measure(data_dir, quick), policy=policy)
    output.write_text(json.dumps(report, indent=2) + "\n")
    click.echo(markdown(report))


if __name__ == "__main__":
    main()
