"""Keras 3 twins of `twins.py`'s VGG and ResNet (functional models, NHWC, float64), carrying the
Linen twins' weights, so that jaxlrp on a Keras model is checked against zennit on the torch twin.

Keras's BatchNormalization and its means (`GlobalAveragePooling2D`, `ops.mean`) compute in float32
whatever their dtype, so a twin with them matches torch's to about 1e-7. With `fold=True` each
BatchNormalization is folded into the Conv2D before it, as zennit's `SequentialMergeBatchNorm`
folds the torch twin's, and the ResNet's global mean is an `AveragePooling2D` over the whole
map: a float64 twin whose maps must equal zennit's to float64 precision.

Keras is imported here, after `conftest` has set KERAS_BACKEND=jax.
"""

import numpy as np

import twins


def _keras():
    import peers

    keras = peers.require("keras")
    assert keras.backend.backend() == "jax", "conftest sets KERAS_BACKEND=jax before Keras is imported"
    return keras


def _conv_bn(keras, x, name, bn, features, kernel=3, stride=1, pad=1, fold=False, dtype="float64"):
    layers = keras.layers
    padding = "valid"
    if pad and stride == 1:
        padding = "same"  # torch's symmetric padding, inside the convolution (as Flat and ZBox see it)
    elif pad:  # "same" pads a strided convolution on one side only; torch pads both
        x = layers.ZeroPadding2D(pad, name=f"{name}_pad", dtype=dtype)(x)
    x = layers.Conv2D(features, kernel, stride, padding=padding, name=name, dtype=dtype)(x)
    return x if fold else layers.BatchNormalization(epsilon=twins.BN_EPS, name=bn, dtype=dtype)(x)


def _vgg(keras, width: int, image: int, fold: bool, dtype: str):
    layers = keras.layers
    x = inputs = keras.Input((image, image, 3), dtype=dtype)
    x = layers.ReLU(dtype=dtype)(_conv_bn(keras, x, "conv0", "bn0", width, fold=fold, dtype=dtype))
    x = layers.ReLU(dtype=dtype)(_conv_bn(keras, x, "conv1", "bn1", width, fold=fold, dtype=dtype))
    x = layers.MaxPooling2D(2, dtype=dtype)(x)
    x = layers.ReLU(dtype=dtype)(_conv_bn(keras, x, "conv2", "bn2", 2 * width, fold=fold, dtype=dtype))
    x = layers.AveragePooling2D(2, dtype=dtype)(x)
    x = layers.Flatten(dtype=dtype)(layers.Permute((3, 1, 2), dtype=dtype)(x))  # torch's flatten order
    x = layers.Dense(32, activation="relu", name="fc1", dtype=dtype)(x)
    return keras.Model(inputs, layers.Dense(10, name="fc2", dtype=dtype)(x), name="vgg")


def _block(keras, x, name: str, features: int, stride: int, fold: bool, dtype: str):
    layers = keras.layers
    norm = dict(fold=fold, dtype=dtype)
    h = layers.ReLU(dtype=dtype)(_conv_bn(keras, x, f"{name}_conv1", f"{name}_bn1", features, stride=stride, **norm))
    h = _conv_bn(keras, h, f"{name}_conv2", f"{name}_bn2", features, **norm)
    if stride != 1 or x.shape[-1] != features:
        x = _conv_bn(keras, x, f"{name}_sc_conv", f"{name}_sc_bn", features, kernel=1, stride=stride, pad=0, **norm)
    return layers.ReLU(dtype=dtype)(layers.Add(name=f"{name}_add", dtype=dtype)([h, x]))


def _resnet(keras, fold: bool, dtype: str):
    layers = keras.layers
    x = inputs = keras.Input((16, 16, 3), dtype=dtype)
    x = layers.ReLU(dtype=dtype)(_conv_bn(keras, x, "conv0", "bn0", 8, fold=fold, dtype=dtype))
    x = _block(keras, x, "block1", 8, 1, fold, dtype)
    x = _block(keras, x, "block2", 16, 2, fold, dtype)
    if fold:  # a float64 mean (GlobalAveragePooling2D's is float32)
        x = layers.Flatten(dtype=dtype)(layers.AveragePooling2D(8, dtype=dtype)(x))
    else:
        x = layers.GlobalAveragePooling2D(dtype=dtype)(x)
    return keras.Model(inputs, layers.Dense(10, name="fc", dtype=dtype)(x), name="resnet")


def _load(model, variables, fold: bool) -> None:
    """Copies the Linen twin's variables into the Keras model (Linen path `a/b` is layer `a_b`);
    with `fold`, each BatchNorm into the convolution before it (conv `X`, its norm `bnX`, or
    `X_conv` and `X_bn`)."""

    def flat(tree, prefix=""):
        for key, value in tree.items():
            name = f"{prefix}_{key}" if prefix else key
            if isinstance(value, dict) and not ({"kernel", "scale", "mean"} & set(value)):
                yield from flat(value, name)
            else:
                yield name, value

    params, stats = dict(flat(variables["params"])), dict(flat(variables.get("batch_stats", {})))
    norms = {name: (np.asarray(leaves["scale"]) / np.sqrt(np.asarray(stats[name]["var"]) + twins.BN_EPS),
                    np.asarray(leaves["bias"]), np.asarray(stats[name]["mean"]))
             for name, leaves in params.items() if "scale" in leaves}
    for name, leaves in params.items():
        if "kernel" in leaves:
            kernel, bias = np.asarray(leaves["kernel"]), np.asarray(leaves["bias"])
            norm = name[:-4] + "bn" if name.endswith("conv") else _norm_of(name)
            if fold and norm in norms:
                scale, shift, mean = norms[norm]
                kernel, bias = kernel * scale, (bias - mean) * scale + shift
            model.get_layer(name).set_weights([kernel, bias])
        elif not fold:
            model.get_layer(name).set_weights([np.asarray(leaves["scale"]), np.asarray(leaves["bias"]),
                                               np.asarray(stats[name]["mean"]), np.asarray(stats[name]["var"])])


def _norm_of(conv: str) -> str:
    """`conv1` -> `bn1`, `block1_conv2` -> `block1_bn2`."""
    head, _, digit = conv.rpartition("conv")
    return f"{head}bn{digit}"


def make(name: str, seed: int = 0, fold: bool = False, dtype: str = "float64"):
    """`(torch_model, keras_model, NHWC input shape)`: zennit's twin and a Keras one, same weights
    (`fold`: the BatchNorms folded into the Keras convolutions; `dtype`: the Keras model's)."""
    import peers

    keras = _keras()
    peers.zennit()  # the torch twin's residual sum is zennit's
    torch_model, _, variables, shape = twins.make(name, seed)
    model = _vgg(keras, 8, 16, fold, dtype) if name == "vgg" else _resnet(keras, fold, dtype)
    _load(model, variables, fold)
    return torch_model, model, (shape[0], *shape[2:], shape[1])
