"""U-Net family builders: plain functions returning uncompiled, fully convolutional Keras models.

Every model takes raw 0..255 pixels (the rescaling is the first layer, so a saved model predicts
on images as they are read) and returns probabilities: a sigmoid map for binary masks, a softmax
over the classes otherwise. Input height and width are free but must be multiples of
`required_multiple(model)`, because every pooling halves them.
"""

import keras
import tensorflow as tf
from keras import layers

from settings_cil import ACTIVATION, DEPTH, DROPOUT, FILTERS, INIT, MODEL_NAMES

BATCHNORM_MOMENTUM = 0.9     # Keras' 0.99 lags for hundreds of steps; short runs validated badly

# NVIDIA's TinyUNet (UNet_Industrial, model/unet.py, variant "tinyUNet"): widths of the input
# block, the three down blocks, the bottleneck and the output block.
TINY_INPUT_FILTERS = 32
TINY_BLOCK_FILTERS = (32, 64, 128)   # + the input block: settings_cil.TINY_UNET_POOLINGS
TINY_BOTTLENECK_FILTERS = 256
TINY_OUTPUT_FILTERS = 32


@keras.saving.register_keras_serializable(package="cil")
class FusedBatchNormalization(layers.BatchNormalization):
    """BatchNormalization through TensorFlow's fused kernel: the same variables and outputs; the
    moving variance takes the batch variance with the kernel's n/(n-1) correction.

    Keras 3 normalises with half a dozen separate elementwise ops; the one fused kernel trains
    the default U-Net about a third faster on 2 CPU cores (bench_cil.py, README "Speed"). It
    ties the model to the TensorFlow backend, which the tool uses anyway. Channels last only.
    """

    def call(self, inputs, training=None, mask=None):
        scale, offset = self.gamma.value, self.beta.value
        if training:
            empty = tf.zeros([0], scale.dtype)
            y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
                x=inputs, scale=scale, offset=offset, mean=empty, variance=empty,
                epsilon=self.epsilon, data_format="NHWC", is_training=True)
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                moving.assign(moving * self.momentum + batch * (1 - self.momentum))
            return y
        y, *_ = tf.raw_ops.FusedBatchNormV3(
            x=inputs, scale=scale, offset=offset, mean=self.moving_mean.value,
            variance=self.moving_variance.value, epsilon=self.epsilon, data_format="NHWC",
            is_training=False)
        return y


def conv_block(x, filters, *, batchnorm, activation, initializer, regularizer):
    """3x3 convolutions, one per entry of `filters`: the unit every U-Net level repeats."""
    for width in filters:
        x = layers.Conv2D(width, 3, padding="same", use_bias=not batchnorm,
                          kernel_initializer=initializer, kernel_regularizer=regularizer)(x)
        if batchnorm:
            x = FusedBatchNormalization(momentum=BATCHNORM_MOMENTUM)(x)
        x = layers.Activation(activation)(x)
    return x


def output_layer(x, classes):
    """1x1 convolution to probabilities, kept in float32 so mixed precision cannot saturate it."""
    if classes == 1:
        return layers.Conv2D(1, 1, activation="sigmoid", dtype="float32", name="probabilities")(x)
    return layers.Conv2D(classes, 1, activation="softmax", dtype="float32", name="probabilities")(x)


def _weight_decay_regularizer(weight_decay):
    # NVIDIA's recipe adds weight_decay * sum(w**2) / 2 (tf.nn.l2_loss); Keras' L2 has no 1/2.
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def build_unet(*, input_channels=3, classes=1, filters=FILTERS, depth=DEPTH, dropout=DROPOUT,
               batchnorm=True, activation=ACTIVATION, initializer=INIT, weight_decay=0.0):
    """Ronneberger's U-Net: `depth` poolings, widths filters * 2**level, transposed-conv upsampling.

    filters=64, depth=4, batchnorm=False is the classic 31.0 M-parameter network.
    """
    conv_args = dict(batchnorm=batchnorm, activation=activation, initializer=initializer,
                     regularizer=_weight_decay_regularizer(weight_decay))
    inputs = keras.Input((None, None, input_channels), name="image")
    x = layers.Rescaling(1 / 255)(inputs)
    skips = []
    for level in range(depth):
        x = conv_block(x, [filters * 2**level] * 2, **conv_args)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)                        # H, W halve
    x = conv_block(x, [filters * 2**depth] * 2, **conv_args)  # bottleneck at H / 2**depth
    if dropout:
        x = layers.Dropout(dropout)(x)
    for level in reversed(range(depth)):
        x = layers.Conv2DTranspose(filters * 2**level, 2, strides=2,
                                   kernel_initializer=initializer,
                                   kernel_regularizer=conv_args["regularizer"])(x)  # H, W double
        x = layers.Concatenate()([x, skips[level]])
        x = conv_block(x, [filters * 2**level] * 2, **conv_args)
    return keras.Model(inputs, output_layer(x, classes), name="unet")


def _upscale_conv(x, filters, *, activation, initializer, regularizer):
    """NVIDIA's 'deconv2d': nearest 2x upsampling then a 2x2 convolution and the activation."""
    x = layers.UpSampling2D(2)(x)
    x = layers.Conv2D(filters, 2, padding="same", kernel_initializer=initializer,
                      kernel_regularizer=regularizer)(x)
    return layers.Activation(activation)(x)


def build_tiny_unet(*, input_channels=3, classes=1, dropout=DROPOUT, batchnorm=False,
                    activation=ACTIVATION, initializer="he_uniform", weight_decay=0.0, **_):
    """NVIDIA's TinyUNet: an input block and 3 down blocks (two 3x3 convs, max pooling), a
    bottleneck, 3 up blocks (concatenate the skip, two 3x3 convs, upsample + 2x2 conv) and an
    output block. The widths and depth are fixed by the recipe: `filters` and `depth` are
    accepted, as every builder takes them, and ignored.
    """
    regularizer = _weight_decay_regularizer(weight_decay)
    conv_args = dict(batchnorm=batchnorm, activation=activation, initializer=initializer,
                     regularizer=regularizer)
    up_args = dict(activation=activation, initializer=initializer, regularizer=regularizer)
    inputs = keras.Input((None, None, input_channels), name="image")
    x = layers.Rescaling(1 / 255)(inputs)
    skips = []
    for width in (TINY_INPUT_FILTERS, *TINY_BLOCK_FILTERS):
        x = conv_block(x, [width, width], **conv_args)
        skips.append(x)
        x = layers.MaxPooling2D(2)(x)                                 # H, W halve, 4 times
    x = conv_block(x, [TINY_BOTTLENECK_FILTERS] * 2, **conv_args)
    if dropout:
        x = layers.Dropout(dropout)(x)
    x = _upscale_conv(x, TINY_BOTTLENECK_FILTERS // 2, **up_args)
    for width in reversed(TINY_BLOCK_FILTERS):
        x = layers.Concatenate()([x, skips.pop()])
        x = conv_block(x, [width, width // 2], **conv_args)
        x = _upscale_conv(x, width // 2, **up_args)
    x = layers.Concatenate()([x, skips.pop()])
    x = conv_block(x, [TINY_OUTPUT_FILTERS] * 2, **conv_args)
    return keras.Model(inputs, output_layer(x, classes), name="tiny_unet")


BUILDERS = {"unet": build_unet, "tiny-unet": build_tiny_unet}   # settings_cil.MODEL_NAMES


def build_model(name, **options):
    """The model `name` (one of MODEL_NAMES) built with `options`."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return BUILDERS[name](**options)


def required_multiple(model):
    """Input sides must be multiples of this: 2 ** (number of poolings)."""
    poolings = sum(isinstance(layer, layers.MaxPooling2D) for layer in model.layers)
    return 2**poolings
