"""Shared fixtures: small synthetic datasets written to temporary folders. Before TensorFlow
starts: two logical CPU devices, so MirroredStrategy is tested without GPUs, and deterministic
ops, so a resumed run can be compared with an uninterrupted one."""

import pytest
import tensorflow as tf

from data_cil import write_synthetic_dataset

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
tf.config.experimental.enable_op_determinism()


@pytest.fixture
def road_dir(tmp_path):
    """8 synthetic 64x64 road pairs and 2 test images in the CIL layout."""
    return write_synthetic_dataset(tmp_path / "roads", count=8, size=64, seed=0, test_count=2)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in an empty folder, so the CLI's default logs/ and data/ land in it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
