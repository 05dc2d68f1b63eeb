"""Model builders: shapes, parameter counts, and that a tiny model can learn at all."""

import keras
import numpy as np
import pytest

from losses_cil import SegmentationLoss
from model_cil import (BUILDERS, FusedBatchNormalization, build_model, build_tiny_unet, build_unet,
                       required_multiple)
from options_cil import MODEL_NAMES, TINY_UNET_POOLINGS, input_multiple


@pytest.mark.parametrize("size", [(32, 32), (48, 80), (400 // 16 * 16, 64)])
@pytest.mark.parametrize("classes", [1, 3])
def test_output_has_the_input_size_and_one_channel_per_class(size, classes):
    model = build_unet(filters=4, depth=3, classes=classes)
    out = model.predict_on_batch(np.zeros((1, *size, 3), np.float32))
    assert out.shape == (1, *size, classes)
    assert np.all((out >= 0) & (out <= 1))
    if classes > 1:
        assert np.allclose(out.sum(axis=-1), 1, atol=1e-5)


def test_the_classic_configuration_is_the_31_million_parameter_unet():
    model = build_unet(filters=64, depth=4, batchnorm=False)
    assert model.count_params() == 31_031_745
    # Ronneberger et al.: "In total the network has 23 convolutional layers", widths 64..1024.
    convolutions = [layer for layer in model.layers
                    if isinstance(layer, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
    assert len(convolutions) == 23
    assert max(layer.filters for layer in convolutions) == 1024


def test_tiny_unet_has_nvidias_widths_and_about_1_8_million_parameters():
    model = build_tiny_unet()
    # NVIDIA's comment says 1,824,945 for their grey-input variant; counting their blocks
    # layer by layer gives 1,850,305 for one input channel, 1,850,881 for RGB.
    assert model.count_params() == 1_850_881
    assert build_tiny_unet(input_channels=1).count_params() == 1_850_305
    assert required_multiple(model) == 16
    assert model.predict_on_batch(np.zeros((2, 64, 48, 3), np.float32)).shape == (2, 64, 48, 1)


def test_required_multiple_follows_the_depth_and_the_settings_know_it():
    assert required_multiple(build_model("unet", filters=2, depth=2)) == 4 == input_multiple(
        "unet", 2)
    tiny = build_model("tiny-unet", filters=99, depth=99)
    assert required_multiple(tiny) == 2**TINY_UNET_POOLINGS == input_multiple("tiny-unet", 99)


def test_every_model_name_has_exactly_one_builder_and_unknown_names_fail():
    assert set(BUILDERS) == set(MODEL_NAMES)
    expected = "unknown model 'vnet'; choose one of unet, unet\\+\\+, tiny-unet"
    with pytest.raises(ValueError, match=expected):
        build_model("vnet")


def test_builders_return_uncompiled_models():
    assert not build_unet(filters=2, depth=1).compiled


def test_a_tiny_model_overfits_one_batch():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    y = (x.mean(axis=-1, keepdims=True) > 127).astype(np.float32)   # a pixel-wise rule to learn
    keras.utils.set_random_seed(0)
    model = build_unet(filters=8, depth=2)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss=SegmentationLoss("bce_dice"))
    first = model.train_on_batch(x, y)
    for _ in range(60):
        last = model.train_on_batch(x, y)
    assert last < 0.2 * first


def test_fused_batchnorm_matches_keras_batchnorm_in_both_modes():
    x = np.random.default_rng(0).normal(2, 3, (4, 8, 8, 5)).astype(np.float32)
    fused, plain = FusedBatchNormalization(momentum=0.9), keras.layers.BatchNormalization(
        momentum=0.9)
    for layer in (fused, plain):
        layer.build(x.shape)
        layer.set_weights([np.linspace(0.5, 2, 5), np.linspace(-1, 1, 5), np.ones(5) * 0.3,
                           np.ones(5) * 2.0])
    numpy = keras.ops.convert_to_numpy
    assert np.allclose(numpy(fused(x, training=True)), numpy(plain(x, training=True)), atol=1e-4)
    # the moving variance differs only by the fused kernel's n/(n-1) correction (n = 256 here)
    for a, b in zip(fused.get_weights()[2:], plain.get_weights()[2:]):
        assert np.allclose(a, b, rtol=1e-2)
    assert np.allclose(numpy(fused(x, training=False)), numpy(plain(x, training=False)),
                       atol=1e-2)
