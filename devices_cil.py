"""Where a run computes, under whichever Keras backend runs (KERAS_BACKEND, TensorFlow by
default): starting the backend quietly, the threads a scheduler granted, mixed precision, and
several replicas (TensorFlow's MirroredStrategy, keras.distribution.DataParallel under JAX).
The one module that asks which backend runs; TensorFlow is imported only when it is that one.
"""

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

import click

from io_cil import InputError

# Threads the backend may use, from what the scheduler granted the job (else all cores).
CORE_VARIABLES = ("SLURM_CPUS_PER_TASK", "LSB_DJOB_NUMPROC")
BFLOAT16_CPU_FLAGS = {"avx512_bf16", "amx_bf16"}   # /proc/cpuinfo's names
BFLOAT16_GPU_CAPABILITY = 8.0  # NVIDIA from Ampere on multiply bfloat16 at float16's rate
# The Keras backends this tool runs on (each is also the module it imports), and the command
# that installs each where it is missing.
BACKEND_INSTALLS = {"tensorflow": "pip install -r requirements.txt",
                    "jax": "pip install -r requirements-jax.txt",
                    "torch": "pip install torch==2.13.0 (its CPU build)"}
DEFAULT_BACKEND = "tensorflow"   # Keras' own default


def chosen_backend():
    """The backend Keras will start, read as Keras reads it (KERAS_BACKEND, else the
    "backend" of $KERAS_HOME/keras.json or ~/.keras/keras.json, else TensorFlow), and checked
    before Keras is imported: InputError naming the variable, the allowed values and the
    install command of a backend that is missing, instead of Keras' traceback."""
    name = os.environ.get("KERAS_BACKEND")
    where = f"KERAS_BACKEND={name}"
    if name is None:
        config = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "keras.json"
        try:
            name = json.loads(config.read_text()).get("backend")
            where = f"{config} (backend {name})"
        except (OSError, ValueError, AttributeError):
            name = None
        if not isinstance(name, str):
            name, where = DEFAULT_BACKEND, "KERAS_BACKEND is unset, so Keras runs on TensorFlow"
    allowed = ", ".join(BACKEND_INSTALLS)
    if name not in BACKEND_INSTALLS:
        raise InputError(f"{where}: not a backend of this tool; set KERAS_BACKEND to one of "
                         f"{allowed} (unset: {DEFAULT_BACKEND})")
    if importlib.util.find_spec(name) is None:
        raise InputError(f"{where}: {name} is not installed here; {BACKEND_INSTALLS[name]}, or "
                         f"set KERAS_BACKEND to another of {allowed} that is")
    return name


def backend_name():
    """The Keras backend this process runs, as KERAS_BACKEND (or ~/.keras/keras.json) says."""
    import keras
    return keras.backend.backend()


@contextlib.contextmanager
def c_stderr_silenced(enabled=True):
    """Send what C++ code writes to stderr to /dev/null while inside. TensorFlow prints its
    start-up lines before its log level is read (tensorflow#102212); Python errors still show."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def start_backend(quiet=True, cpu_only=False):
    """Import Keras with its backend; TensorFlow with its C++ info and warning lines off (the
    CPU-feature banner among them), its devices listed once: without a GPU driver, that first
    look prints a CUDA error line. `cpu_only` (--gpus 0) hides the GPUs from JAX and PyTorch,
    which choose their devices when they start. Returns the backend's name; InputError for one
    that is unknown or not installed (chosen_backend)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if cpu_only and chosen_backend() != "tensorflow":
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    chosen_backend()
    with c_stderr_silenced(quiet):
        name = backend_name()
        if name == "tensorflow":
            import tensorflow as tf
            tf.config.list_physical_devices("GPU")
            if quiet:      # its Python warnings too: retracing notes when an ensemble predicts
                tf.get_logger().setLevel("ERROR")
        elif name == "jax":
            import jax
            jax.devices()
    return name


def cpu_has_bfloat16():
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo;
    elsewhere bfloat16 is emulated, slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return bool(set(flags) & BFLOAT16_CPU_FLAGS)


def mixed_policy(gpu_capability):
    """Keras' mixed-precision policy for --amp: on a GPU (its compute capability given)
    bfloat16 from Ampere on, else float16 with loss scaling; on a CPU bfloat16 where it has the
    instructions, else None (float32)."""
    if gpu_capability is not None:
        return "mixed_bfloat16" if gpu_capability >= BFLOAT16_GPU_CAPABILITY else "mixed_float16"
    return "mixed_bfloat16" if cpu_has_bfloat16() else None


def granted_cores():
    """The cores a scheduler granted this job, or None outside a job."""
    cores = next((os.environ[name] for name in CORE_VARIABLES if os.environ.get(name)), None)
    return int(cores) if cores and cores.isdigit() else None


class Placement:
    """Where a run's model is built and trained: `scope()` to build it in, `replicas` that each
    take --batch-size images of a step."""

    def __init__(self, replicas=1, strategy=None):
        self.replicas, self.strategy = replicas, strategy

    def scope(self):
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()


def _tensorflow_devices(settings, cores):
    import tensorflow as tf
    if cores:
        try:
            tf.config.threading.set_intra_op_parallelism_threads(cores)
            tf.config.threading.set_inter_op_parallelism_threads(min(2, cores))
        except RuntimeError:        # TensorFlow already ran in this process: threads are set
            cores = None
    found = tf.config.list_physical_devices("GPU")
    if settings.gpus == 0 and found:
        tf.config.set_visible_devices([], "GPU")
        found = []
    capability = None
    if found:
        details = tf.config.experimental.get_device_details(found[0])
        capability = float("{}.{}".format(*details.get("compute_capability", (0, 0))))
    return found, capability, cores


def _jax_devices(settings):
    import jax
    found = [device for device in jax.devices() if device.platform == "gpu"]
    if settings.gpus == 0:
        found = []
    capability = float(getattr(found[0], "compute_capability", 0) or 0) if found else None
    return found, capability


def placement(settings):
    """The run's Placement: one device by default, the CPU with --gpus 0, several replicas with
    --gpus N (N >= 2); threads as the scheduler granted; the precision policy of --amp."""
    import keras
    name, cores = backend_name(), granted_cores()
    if name == "tensorflow":
        found, capability, cores = _tensorflow_devices(settings, cores)
    elif name == "jax":
        found, capability = _jax_devices(settings)
    else:
        import torch
        found = list(range(torch.cuda.device_count())) if settings.gpus != 0 else []
        capability = (float("{}.{}".format(*torch.cuda.get_device_capability(0)))
                      if found else None)
    if settings.gpus and settings.gpus > len(found):
        fix = f"pass --gpus {len(found)} or fewer" if found else "pass --gpus 0 (the CPU)"
        raise InputError(f"--gpus {settings.gpus}: only {len(found)} GPU(s) visible to "
                         f"{name}; {fix}")
    policy = mixed_policy(capability) if settings.amp else None
    if settings.amp and policy:
        click.echo(f"precision: {policy} (--amp)")
    elif settings.amp:
        click.echo("note: --amp ignored: this CPU has no bfloat16 instructions (avx512_bf16 or "
                   "amx_bf16), where mixed precision runs slower than float32; training in "
                   "float32")
    keras.mixed_precision.set_global_policy(policy or "float32")   # the process's, per run
    threads = f", {cores} threads" if cores else ""
    if settings.gpus and settings.gpus > 1:
        return _replicated(name, settings.gpus, threads)
    click.echo(f"device: {'GPU 0' if found else 'CPU'} ({name}){threads}")
    return Placement()


def _replicated(name, gpus, threads):
    """A Placement of `gpus` replicas: MirroredStrategy under TensorFlow, DataParallel under JAX;
    InputError under PyTorch, whose several-GPU training Keras leaves to torchrun."""
    if name == "tensorflow":
        import tensorflow as tf
        devices = [f"/gpu:{i}" for i in range(gpus)]
        click.echo(f"device: MirroredStrategy over {devices}{threads}")
        return Placement(gpus, tf.distribute.MirroredStrategy(devices))
    if name == "jax":
        import keras
        devices = keras.distribution.list_devices("gpu")[:gpus]
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
        click.echo(f"device: DataParallel over {devices}{threads}")
        return Placement(gpus)
    raise InputError(f"--gpus {gpus}: several GPUs need the tensorflow or jax backend "
                     "(KERAS_BACKEND); under torch pass --gpus 1")
