"""U-Net family builders: plain functions returning uncompiled, fully convolutional Keras models.

Every model takes raw 0..255 pixels (the rescaling, or a pretrained encoder's own preprocessing,
is part of the model, so a saved model predicts on images as they are read) and returns
probabilities: a sigmoid map for binary masks, a softmax over the classes otherwise. Input
height and width are free but must be multiples of `required_multiple(model)`, because every
pooling or strided step halves them. Decoders: Ronneberger's U-Net, or UNet++'s nested skips
(Zhou et al. 2018), on the model's own encoder or on a keras.applications backbone.
"""

import contextlib
import importlib
import zipfile
from pathlib import Path

import keras
import numpy as np
from keras import layers

from backbones_cil import (efficientnet_lite0, lite_preprocessing, mobilenet_v2,
                           torchvision_preprocessing)
from io_cil import InputError
from options_cil import (ACTIVATION, DEPTH, DROPOUT, ENCODER_POOLINGS, ENCODERS, FILTERS, INIT,
                         MODEL_NAMES, TINY_UNET_POOLINGS)
from weights_cil import PACKAGED, cached_weights_only, load_file, load_packaged

MULTIPLE_MARKER = "input_sides_multiple_of_"   # the name of a no-op layer after the input
# The modules whose classes a checkpoint of this tool names (registered under the package
# "cil": the losses and metrics, the optimizers with a slower encoder, and the fused batch norm
# that model files saved before 2026-12-02 name instead of Keras' own): load_model imports them
# all, so reading a file never depends on what happened to be imported before.
REGISTERING_MODULES = ("model_cil", "losses_cil", "train_cil")
PROBE_SIDE = 64              # input side at which an encoder's feature strides are read off

BATCHNORM_MOMENTUM = 0.9     # Keras' 0.99 lags for hundreds of steps; short runs validated badly

# NVIDIA's TinyUNet (UNet_Industrial, model/unet.py, variant "tinyUNet"): widths of the input
# block, the three down blocks, the bottleneck and the output block.
TINY_INPUT_FILTERS = 32
TINY_BLOCK_FILTERS = (32, 64, 128)   # + the input block: TINY_UNET_POOLINGS poolings
TINY_BOTTLENECK_FILTERS = 256
TINY_OUTPUT_FILTERS = 32


@keras.saving.register_keras_serializable(package="cil")
class FusedBatchNormalization(layers.BatchNormalization):
    """BatchNormalization through TensorFlow's fused kernel: the same variables and outputs; the
    moving variance takes the batch variance with the kernel's n/(n-1) correction.

    Keras 3 normalises with half a dozen separate elementwise ops; the one fused kernel trains
    the default U-Net about a third faster on 2 CPU cores (bench_cil.py, docs/speed.md). Under
    another backend it is Keras' own BatchNormalization, so its files load everywhere; saved
    files name only that class (standard_layers). Channels last only.
    """

    def call(self, inputs, training=None, mask=None):
        if keras.backend.backend() != "tensorflow":
            return super().call(inputs, training=training, mask=mask)
        from tensorflow import raw_ops, zeros
        scale, offset = self.gamma.value, self.beta.value
        if training:
            y, mean, variance, *_ = raw_ops.FusedBatchNormV3(
                x=inputs, scale=scale, offset=offset, mean=zeros([0], scale.dtype),
                variance=zeros([0], scale.dtype), epsilon=self.epsilon, data_format="NHWC",
                is_training=True)
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, variance)):
                moving.assign(moving * self.momentum + batch * (1 - self.momentum))
            return y
        y, *_ = raw_ops.FusedBatchNormV3(
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


def image_input(input_channels, multiple):
    """The model's input, and the no-op layer after it that records what its sides must be
    multiples of (saved with the model, read by required_multiple)."""
    inputs = keras.Input((None, None, input_channels), name="image")
    return inputs, layers.Identity(name=f"{MULTIPLE_MARKER}{multiple}")(inputs)


def _upsampled(x, width, conv_args):
    """H, W double: a 2x2 transposed convolution with stride 2."""
    return layers.Conv2DTranspose(width, 2, strides=2, kernel_initializer=conv_args["initializer"],
                                  kernel_regularizer=conv_args["regularizer"])(x)


def unet_decoder(features, widths, conv_args):
    """Ronneberger's decoder over encoder features, finest first, coarsest (the bottleneck)
    last: up from each level, concatenate that level's features (None: none there), two convs."""
    x = features[-1]
    for level in reversed(range(len(features) - 1)):
        x = _upsampled(x, widths[level], conv_args)
        if features[level] is not None:
            x = layers.Concatenate()([x, features[level]])
        x = conv_block(x, [widths[level]] * 2, **conv_args)
    return x


def nested_decoder(features, widths, conv_args):
    """UNet++ (Zhou et al. 2018): node (level, j) joins the level's earlier nodes with the
    upsampled node (level + 1, j - 1), so every skip passes through convolutions of its own;
    the output is node (0, deepest)."""
    nodes = {(level, 0): feature for level, feature in enumerate(features)}
    deepest = len(features) - 1
    for j in range(1, deepest + 1):
        for level in range(deepest - j + 1):
            joined = [nodes[(level, k)] for k in range(j) if nodes[(level, k)] is not None]
            joined.append(_upsampled(nodes[(level + 1, j - 1)], widths[level], conv_args))
            x = layers.Concatenate()(joined) if len(joined) > 1 else joined[0]
            nodes[(level, j)] = conv_block(x, [widths[level]] * 2, **conv_args)
    return nodes[(0, deepest)]


DECODERS = {"unet": unet_decoder, "unet++": nested_decoder}


def build_unet(*, input_channels=3, classes=1, filters=FILTERS, depth=DEPTH, dropout=DROPOUT,
               batchnorm=True, activation=ACTIVATION, initializer=INIT, weight_decay=0.0,
               decoder="unet"):
    """Ronneberger's U-Net: `depth` poolings, widths filters * 2**level, transposed-conv upsampling;
    with decoder="unet++" the nested skips of UNet++ on the same encoder.

    filters=64, depth=4, batchnorm=False is the classic 31.0 M-parameter network.
    """
    conv_args = dict(batchnorm=batchnorm, activation=activation, initializer=initializer,
                     regularizer=_weight_decay_regularizer(weight_decay))
    inputs, x = image_input(input_channels, 2**depth)
    x = layers.Rescaling(1 / 255)(x)
    features = []
    for level in range(depth):
        x = conv_block(x, [filters * 2**level] * 2, **conv_args)
        features.append(x)
        x = layers.MaxPooling2D(2)(x)                        # H, W halve
    x = conv_block(x, [filters * 2**depth] * 2, **conv_args)  # bottleneck at H / 2**depth
    features.append(layers.Dropout(dropout)(x) if dropout else x)
    widths = [filters * 2**level for level in range(depth)]
    x = DECODERS[decoder](features, widths, conv_args)
    return keras.Model(inputs, output_layer(x, classes), name="unet" if decoder == "unet"
                       else "unet_nested")


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
    inputs, x = image_input(input_channels, 2**TINY_UNET_POOLINGS)
    x = layers.Rescaling(1 / 255)(x)
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


# ---------------------------------------------------------------------------------------------
# U-Nets on keras.applications encoders


def _caffe_preprocessing():
    """What VGG's ImageNet weights expect: BGR, the ImageNet mean subtracted; a fixed 1x1
    convolution, so the saved model needs no custom code."""
    swap = np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], np.float32)[None, None]
    return layers.Conv2D(3, 1, trainable=False, name="caffe_preprocessing",
                         kernel_initializer=keras.initializers.Constant(swap),
                         bias_initializer=keras.initializers.Constant([-103.939, -116.779,
                                                                       -123.68]))


# options_cil.ENCODERS -> (keras.applications constructor, or backbones_cil's for the encoders
# whose weights come from PyTorch checkpoints; the preprocessing of 0..255 RGB it expects
# outside itself: None where the backbone includes its own)
APPLICATIONS = keras.applications
BACKBONES = {
    "vgg16": (APPLICATIONS.VGG16, _caffe_preprocessing),
    "resnet50": (APPLICATIONS.ResNet50, _caffe_preprocessing),
    "resnet50v2": (APPLICATIONS.ResNet50V2, lambda: layers.Rescaling(1 / 127.5, offset=-1)),
    **{f"efficientnetb{i}": (getattr(APPLICATIONS, f"EfficientNetB{i}"), None) for i in range(8)},
    **{f"efficientnetv2{size}": (getattr(APPLICATIONS, f"EfficientNetV2{size.upper()}"), None)
       for size in ("b0", "b1", "b2", "b3", "s", "m")},
    "convnext_tiny": (APPLICATIONS.ConvNeXtTiny, None),
    "mobilenetv3small": (APPLICATIONS.MobileNetV3Small, None),
    "mobilenetv3large": (APPLICATIONS.MobileNetV3Large, None),
    "mobilenetv2": (mobilenet_v2, torchvision_preprocessing),
    "efficientnet_lite0": (efficientnet_lite0, lite_preprocessing),
}


def feature_indices(constructor):
    """For strides 2, 4, ..., 2**ENCODER_POOLINGS, the index of the backbone's last layer at
    that resolution (padding layers aside), or None where it has none (ConvNeXt starts at 4):
    read off a copy built at a fixed PROBE_SIDE, so the skips are derived, never listed."""
    probe = constructor(include_top=False, weights=None, input_shape=(PROBE_SIDE, PROBE_SIDE, 3))
    indices = []
    for stride in (2**level for level in range(1, ENCODER_POOLINGS + 1)):
        side = PROBE_SIDE // stride
        at = [index for index, layer in enumerate(probe.layers)
              if not isinstance(layer, layers.ZeroPadding2D)
              and tuple(layer.output.shape[1:3]) == (side, side)]
        indices.append(at[-1] if at else None)
    return indices


def backbone(name, weights="none", download=True):
    """The encoder `name` without its classifier, for inputs of any size, starting from the
    weights weights_cil names: random (none), ImageNet's (imagenet, from Keras' cache first), a
    package's (hed), or those of a weights file (a path)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown encoder {name!r}; choose one of {', '.join(ENCODERS)}")
    constructor, _ = BACKBONES[name]
    with cached_weights_only(name, download):
        model = constructor(include_top=False, input_shape=(None, None, 3),
                            weights="imagenet" if weights == "imagenet" else None)
    if weights in PACKAGED:
        load_packaged(model, weights)
    elif weights not in ("imagenet", "none", None):
        load_file(model, name, weights)
    if weights in ("none", None):
        _follow_batch_statistics(model)
    return model


def _follow_batch_statistics(network):
    """Every batch norm of a randomly initialised `network` at BATCHNORM_MOMENTUM: with
    MobileNetV3's 0.999 the moving statistics, which validation uses, are still mostly their
    initial values after a 17-epoch run (0.999**544 = 0.58), and a from-scratch encoder U-Net
    then predicted no road at all on validation while it fitted its training crops."""
    for layer in network.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = BATCHNORM_MOMENTUM


def build_encoder_unet(encoder, *, encoder_weights="none", classes=1, filters=FILTERS,
                       dropout=DROPOUT, batchnorm=True, activation=ACTIVATION, initializer=INIT,
                       weight_decay=0.0, decoder="unet", input_channels=3, **_):
    """A U-Net (or UNet++) decoder on a keras.applications encoder: skips at strides 2, 4, 8 and
    16, the bottleneck at 32, decoder widths filters * 2, 4, 8, 16 there and a last block of
    `filters` at full resolution. The encoder's preprocessing is part of the model; the encoder
    is the layer named "encoder" (--freeze-encoder acts on it)."""
    if input_channels != 3:
        raise ValueError("pretrained encoders take RGB images (3 channels)")
    conv_args = dict(batchnorm=batchnorm, activation=activation, initializer=initializer,
                     regularizer=_weight_decay_regularizer(weight_decay))
    constructor, preprocessing = BACKBONES[encoder]
    indices = feature_indices(constructor)
    network = backbone(encoder, encoder_weights)
    present = [index for index in indices if index is not None]
    encoder_model = keras.Model(network.input, [network.layers[i].output for i in present],
                                name="encoder")
    inputs, x = image_input(3, 2**ENCODER_POOLINGS)
    if preprocessing is not None:
        x = preprocessing()(x)
    outputs = iter(encoder_model(x))
    features = [next(outputs) if index is not None else None for index in indices]
    if dropout:
        features[-1] = layers.Dropout(dropout)(features[-1])
    widths = [filters * 2**level for level in range(1, ENCODER_POOLINGS)]
    x = DECODERS[decoder](features, widths, conv_args)         # at stride 2
    x = conv_block(_upsampled(x, filters, conv_args), [filters] * 2, **conv_args)
    name = f"{'unet' if decoder == 'unet' else 'unet_nested'}_{encoder}"
    return keras.Model(inputs, output_layer(x, classes), name=name)


BUILDERS = {"unet": build_unet,                                     # options_cil.MODEL_NAMES
            "unet++": lambda **options: build_unet(decoder="unet++", **options),
            "tiny-unet": build_tiny_unet}


def build_model(name, *, encoder=None, **options):
    """The model `name` (one of MODEL_NAMES) built with `options`; on the keras.applications
    `encoder` when one is named (U-Net and UNet++)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if encoder:
        options.pop("depth", None)
        return build_encoder_unet(encoder, decoder="unet" if name == "unet" else "unet++",
                                  **options)
    options.pop("encoder_weights", None)
    return BUILDERS[name](**options)


def required_multiple(model):
    """Input sides must be multiples of this: what the model's builder recorded, or for model
    files saved before it did (2026-11-22, models without encoders), 2 ** (number of
    poolings)."""
    for layer in model.layers:
        if layer.name.startswith(MULTIPLE_MARKER):
            return int(layer.name.removeprefix(MULTIPLE_MARKER))
    return 2**sum(isinstance(layer, layers.MaxPooling2D) for layer in model.layers)


def encoder_layer(model):
    """The pretrained encoder inside a model, or None."""
    return next((layer for layer in model.layers if layer.name == "encoder"), None)


# ---------------------------------------------------------------------------------------------
# Saving and loading


@contextlib.contextmanager
def standard_layers(model):
    """While inside, the model's fused batch norms are Keras' own BatchNormalization, whose
    variables and configuration they share: a file saved then names Keras classes only and
    loads with plain `keras.models.load_model`, without this code (fuse_batch_norms undoes it
    after loading)."""
    fused = [layer for layer in model.layers if type(layer) is FusedBatchNormalization]
    for layer in fused:
        layer.__class__ = layers.BatchNormalization
    try:
        yield
    finally:
        for layer in fused:
            layer.__class__ = FusedBatchNormalization


@contextlib.contextmanager
def without_training_state(model):
    """While inside, the model counts as not compiled and has no optimizer: a file saved then
    holds the network alone (a third of a checkpoint's size with Adam), and loading it needs
    neither the tool's losses nor its optimizers."""
    compiled, optimizer = model.compiled, getattr(model, "optimizer", None)
    model.compiled = False
    object.__setattr__(model, "optimizer", None)     # untracked: the model keeps its own
    try:
        yield
    finally:
        model.compiled = compiled
        object.__setattr__(model, "optimizer", optimizer)


def save_model(model, path, *, training_state):
    """`model` as a .keras file of Keras layers only; with its optimizer, loss and metrics
    (`training_state`, what --resume continues) or the network alone (what predicts)."""
    with standard_layers(model), (contextlib.nullcontext() if training_state
                                   else without_training_state(model)):
        model.save(path)


def fuse_batch_norms(model):
    """The model's own batch norms (not those inside a keras.applications encoder) computed by
    the fused kernel again under TensorFlow, as when it was built; returns the model."""
    if keras.backend.backend() != "tensorflow":
        return model
    for layer in model.layers:
        if type(layer) is layers.BatchNormalization and layer.axis in (-1, 3, [-1], [3]):
            layer.__class__ = FusedBatchNormalization
    return model


def load_model(path):
    """A .keras file of this tool (checkpoint or model alone) as it was saved, whichever
    modules were imported before."""
    for module in REGISTERING_MODULES:
        importlib.import_module(module)
    return fuse_batch_norms(keras.models.load_model(path))


def load_saved_model(path, classes=None):
    """A segmentation model saved by this tool, or InputError naming the file and the fix:
    RGB images in, one map of probabilities per class out (`classes`, when given)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a folder, not a model file; pass {path / 'best.keras'}, or "
                         f"--from-run {path} for a run's settings and models")
    if not path.is_file():
        raise InputError(f"{path}: " + ("not a regular file; pass a best.keras from a run "
                                        "folder" if path.exists() else "weights file not found"))
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a .keras model file (those are zip archives); pass a "
                         "best.keras from a run folder")
    try:
        model = load_model(path)
    except Exception as error:  # a zip that is no model, a model of another tool, ...
        raise InputError(f"{path}: not a model saved by this tool ({type(error).__name__}: "
                         f"{str(error).splitlines()[0][:200]}); pass a best.keras from a run "
                         "folder") from error
    if len(model.input_shape) != 4 or len(model.output_shape) != 4:
        raise InputError(f"{path}: maps {model.input_shape} to {model.output_shape}, not images to "
                         "masks; pass a segmentation model (a best.keras of this tool)")
    if model.input_shape[-1] != 3:
        raise InputError(f"{path}: the model expects {model.input_shape[-1]}-channel images but "
                         "this tool feeds RGB (3 channels); train a model on these images instead")
    if classes is not None and model.output_shape[-1] != classes:
        raise InputError(f"{path}: the model predicts {model.output_shape[-1]} class map(s), not "
                         f"{classes} (--classes {classes}); drop --classes or pass the matching "
                         "model")
    return model


def model_classes(model):
    """--classes of a model: 1 for one sigmoid map, else the number of softmax maps."""
    return model.output_shape[-1]
