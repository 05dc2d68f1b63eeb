"""Shared fixtures and helpers: small synthetic datasets in temporary folders, the command line
through click's runner. Before TensorFlow starts: two logical CPU devices, so MirroredStrategy
is tested without GPUs, and deterministic ops, so a resumed run can be compared with an
uninterrupted one."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import skimage.io
from click.testing import CliRunner

from data_cil import write_synthetic_dataset
from devices_cil import start_backend
from main_cil import main
from runs_cil import own_folder
from settings_cil import Settings, config_record, resolve_settings

# quiet: TensorFlow's C++ start-up lines would pass the capture of pytest-xdist's workers.
# That sets TF_QUIET, as main_cil.py does; jobs a test starts are given an environment
# without it, so their quiet logs show the tool quieting TensorFlow by itself.
BACKEND = start_backend()
TF_QUIET = "TF_CPP_MIN_LOG_LEVEL"
if BACKEND == "tensorflow":
    import tensorflow as tf
    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    tf.config.experimental.enable_op_determinism()
# What only TensorFlow has: tf.data, SavedModel export, MirroredStrategy, the fused batch norm.
needs_tensorflow = pytest.mark.skipif(BACKEND != "tensorflow",
                                      reason=f"TensorFlow only; KERAS_BACKEND is {BACKEND}")

REPO = Path(__file__).resolve().parents[1]
# The smallest training main_cil.py runs in a few seconds on the 64x64 road_dir images.
TINY = ["--filters", "4", "--depth", "2", "--crop", "32", "--count", "1", "--batch-size", "4",
        "--epochs", "2", "--valid-fraction", "0.25"]


def tree(folder):
    """Every path under `folder`, relative and sorted: compared before and after, it shows that
    a refused command wrote nothing."""
    return sorted(str(path.relative_to(folder)) for path in Path(folder).rglob("*"))


def one_line_error(output, *named):
    """The output ends in exactly one error line, which names everything in `named` (the file,
    the option, the fix that matters), and holds no traceback."""
    lines = output.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), output
    assert all(part in lines[-1] for part in named), output
    assert sum(line.startswith("error: ") for line in lines) == 1 and "Traceback" not in output


def cli(*args, env=None):
    """main_cil.py's command line in this process; the click result."""
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def refused_leaving(folder, *args, named, env=None):
    """main_cil.py with `args` exits 2 with one error line naming `named`, and nothing under
    `folder` was written, moved or deleted."""
    before = tree(folder)
    result = cli(*args, env=env)
    assert result.exit_code == 2, result.output
    one_line_error(result.output, named)
    assert tree(folder) == before


def resolved(*args):
    """The Settings a command line resolves to (with the CIL_ variables of the environment)."""
    return resolve_settings(main.make_context("main_cil.py", [str(a) for a in args]))[0]


LOAD_AND_PREDICT = """
import sys
import numpy as np
import tensorflow as tf
assert not any("cil" in name for name in sys.modules), "project code was imported"
model = tf.saved_model.load(sys.argv[1])
image = np.load(sys.argv[2])
out = [model.signatures["serving_default"](images=tf.constant(image[None], tf.float32)),
       model.signatures["serving_uint8"](images=tf.constant(image[None]))]
np.save(sys.argv[3], np.stack([each["probabilities"].numpy()[0] for each in out]))
"""


def run_alone(script, model_file, image, scratch):
    """What `script` saves to argv[3] after reading the model (argv[1]) and the image saved
    to argv[2], run in a fresh interpreter that has only the installed packages: no project on
    its path."""
    np.save(scratch / "image.npy", image)
    alone = scratch / "alone"
    alone.mkdir(exist_ok=True)
    # -I: no user site, no current folder, no PYTHONPATH
    done = subprocess.run([sys.executable, "-I", "-c", script, str(Path(model_file).resolve()),
                           str(scratch / "image.npy"), str(scratch / "out.npy")], cwd=alone,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return np.load(scratch / "out.npy")


def predicted_alone(export, image, scratch):
    """(float, uint8) signatures' probabilities for `image` from a SavedModel loaded alone."""
    return tuple(run_alone(LOAD_AND_PREDICT, export, image, scratch))


def checkpoint_state(run_dir, **changes):
    """A checkpoint/state.json as training writes it, after epoch 1, and the model file it
    names (an empty archive: tests of settings never load it)."""
    state = dict(file="model-0001-000000.keras", epoch=1, step=0, best=0.5, best_epoch=1,
                 wait=0, monitor="val_f1", epoch_seconds=[1.0], **changes)
    folder = Path(run_dir) / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    zipfile.ZipFile(folder / state["file"], "w").close()
    (folder / "state.json").write_text(json.dumps(state))
    return folder / "state.json"


def saved_run(folder, **changes):
    """A run folder whose config.json records non-default values of every learned option."""
    settings = dict(resolved(), **changes)
    record = config_record(Settings(settings, {}), folder.name)
    own_folder(folder, "run folder")
    (folder / "config.json").write_text(json.dumps(record))
    checkpoint_state(folder)
    return folder


def save(path, array):
    """Write an image file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    skimage.io.imsave(path, np.asarray(array), check_contrast=False)
    return path


def make_pair(root, name, image, mask):
    """An image and its mask under root/training/."""
    save(root / "training/images" / name, image)
    save(root / "training/groundtruth" / name, mask)


def rgb(size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8)


def road_mask(size=32):
    """A vertical road, 237 like the real masks, with anti-aliased 118 edges."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 4 + 1:size // 2] = 237
    mask[:, size // 4] = mask[:, size // 2] = 118
    return mask


@pytest.fixture(scope="session", autouse=True)
def the_repository_stays_as_it_was():
    """No test writes runs or outputs into the project's own data/, logs/ or jobs/."""
    def listing():
        return sorted(str(path) for name in ("data", "logs", "jobs")
                      for path in (REPO / name).rglob("*"))
    before = listing()
    yield
    assert listing() == before, "a test wrote into the repository's data/, logs/ or jobs/"


@pytest.fixture
def road_dir(tmp_path):
    """8 synthetic 64x64 road pairs and 2 test images in the CIL layout."""
    return write_synthetic_dataset(tmp_path / "roads", count=8, size=64, seed=0, test_count=2)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder, so the CLI's default logs/ and data/ land in it; no CIL_
    variables from the caller's environment."""
    monkeypatch.chdir(tmp_path)
    for key in [key for key in os.environ if key.startswith("CIL_")]:
        monkeypatch.delenv(key)
    return tmp_path
