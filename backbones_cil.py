"""Keras builders of the light ImageNet encoders whose weights come as PyTorch checkpoints:
MobileNetV2 as torchvision defines it, and EfficientNet-Lite0 as Google's TensorFlow release
does. Each is called like a keras.applications constructor (model_cil.BACKBONES) and builds its
layers in the order of the checkpoint's modules, so weights_cil maps the checkpoint onto it one
weighted layer after the other.

Padding decides whether the weights fit: torchvision's MobileNetV2 pads one pixel on every side
before its stride-2 3x3 convolutions, where keras.applications' MobileNetV2 pads only bottom and
right; with the latter the ImageNet check (tests/test_backbones.py) scored the cat 0.63 instead
of 0.79. EfficientNet-Lite was trained in TensorFlow with 'same' padding, which Keras shares.
"""

import keras
from keras import layers

IMAGENET_CLASSES = 1000
HEAD_FILTERS = 1280          # both networks end in a 1x1 convolution to 1280 channels
STEM_FILTERS = 32
CLASSIFIER_DROPOUT = 0.2     # both papers' rate; inactive at prediction

# (expansion, output channels, repeats, kernel, first stride) of each stage
MOBILENET_V2_STAGES = ((1, 16, 1, 3, 1), (6, 24, 2, 3, 2), (6, 32, 3, 3, 2), (6, 64, 4, 3, 2),
                       (6, 96, 3, 3, 1), (6, 160, 3, 3, 2), (6, 320, 1, 3, 1))
EFFICIENTNET_LITE0_STAGES = ((1, 16, 1, 3, 1), (6, 24, 2, 3, 2), (6, 40, 2, 5, 2),
                             (6, 80, 3, 3, 2), (6, 112, 3, 5, 1), (6, 192, 4, 5, 2),
                             (6, 320, 1, 3, 1))
TORCH_BATCHNORM_EPSILON = 1e-5       # torchvision's default
TENSORFLOW_BATCHNORM_EPSILON = 1e-3  # EfficientNet-Lite's

# The ImageNet statistics torchvision's weights were trained with (RGB in 0..1)
TORCHVISION_MEAN = (0.485, 0.456, 0.406)
TORCHVISION_STD = (0.229, 0.224, 0.225)


def torchvision_preprocessing():
    """0..255 RGB to what torchvision's ImageNet weights expect: (rgb/255 - mean) / std."""
    return layers.Rescaling([1 / (255 * s) for s in TORCHVISION_STD],
                            offset=[-m / s for m, s in zip(TORCHVISION_MEAN, TORCHVISION_STD)],
                            name="torchvision_preprocessing")


def lite_preprocessing():
    """0..255 RGB to what EfficientNet-Lite expects: (rgb - 127) / 128."""
    return layers.Rescaling(1 / 128, offset=-127 / 128, name="lite_preprocessing")


def _conv_unit(x, filters, kernel, stride, *, name, symmetric, epsilon, relu=True):
    """A convolution (depthwise where `filters` is None), batch norm and ReLU6 (none where not
    `relu`); with `symmetric`, a strided convolution pads kernel // 2 on every side, as torch
    does, instead of 'same''s bottom and right."""
    padding = "same"
    if stride > 1 and symmetric:
        x = layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
        padding = "valid"
    if filters is None:
        x = layers.DepthwiseConv2D(kernel, stride, padding=padding, use_bias=False,
                                   name=f"{name}_conv")(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding=padding, use_bias=False,
                          name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=epsilon, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x


def _inverted_residual(x, expansion, filters, kernel, stride, *, name, **unit):
    """MobileNetV2's block (EfficientNet-Lite's MBConv without squeeze-excitation): 1x1
    expansion, depthwise convolution, linear 1x1 projection, and the input added back where the
    shape allows."""
    y = x
    if expansion != 1:
        y = _conv_unit(y, x.shape[-1] * expansion, 1, 1, name=f"{name}_expand", **unit)
    y = _conv_unit(y, None, kernel, stride, name=f"{name}_depthwise", **unit)
    y = _conv_unit(y, filters, 1, 1, name=f"{name}_project", relu=False, **unit)
    if stride == 1 and x.shape[-1] == filters:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def _network(name, stages, *, symmetric, epsilon, include_top, weights, input_shape):
    if weights is not None:
        raise ValueError(f"{name} starts random here; weights_cil loads its packaged weights")
    unit = dict(symmetric=symmetric, epsilon=epsilon)
    inputs = keras.Input(input_shape or (None, None, 3))
    x = _conv_unit(inputs, STEM_FILTERS, 3, 2, name="stem", **unit)         # H, W halve
    block = 0
    for expansion, filters, repeats, kernel, stride in stages:
        for repeat in range(repeats):
            x = _inverted_residual(x, expansion, filters, kernel, stride if repeat == 0 else 1,
                                   name=f"block{block}", **unit)
            block += 1
    x = _conv_unit(x, HEAD_FILTERS, 1, 1, name="head", **unit)              # at H / 32
    if include_top:
        x = layers.GlobalAveragePooling2D(name="pool")(x)
        x = layers.Dropout(CLASSIFIER_DROPOUT, name="dropout")(x)
        x = layers.Dense(IMAGENET_CLASSES, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def mobilenet_v2(include_top=True, weights=None, input_shape=None):
    """MobileNetV2 1.0 with torchvision's layers and padding (3.5 M parameters with the
    classifier); without it, 1280 features at stride 32."""
    return _network("mobilenetv2", MOBILENET_V2_STAGES, symmetric=True,
                    epsilon=TORCH_BATCHNORM_EPSILON, include_top=include_top, weights=weights,
                    input_shape=input_shape)


def efficientnet_lite0(include_top=True, weights=None, input_shape=None):
    """EfficientNet-Lite0: EfficientNet-B0 with ReLU6, no squeeze-excitation and a fixed stem and
    head (4.7 M parameters with the classifier); without it, 1280 features at stride 32."""
    return _network("efficientnet_lite0", EFFICIENTNET_LITE0_STAGES, symmetric=False,
                    epsilon=TENSORFLOW_BATCHNORM_EPSILON, include_top=include_top,
                    weights=weights, input_shape=input_shape)
