"""ResNet50 (random init, one input channel) with the seed's classification head, built from the config."""

from __future__ import annotations

import contextlib
import dataclasses

import keras

from rfcx_mlops.config import Config
from rfcx_mlops.features import MelFrontEnd
from rfcx_mlops.metrics import StreamingLWLRAP


def learning_rate(cfg: Config, steps_per_epoch: int):
    """A constant rate, or a cosine decay to zero over the run after a linear warm-up."""
    train = cfg.train
    if train.lr_schedule == "constant":
        return train.learning_rate
    warmup = train.warmup_epochs * steps_per_epoch
    total = max(1, train.epochs * steps_per_epoch - warmup)
    if warmup:
        return keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=total, warmup_target=train.learning_rate, warmup_steps=warmup
        )
    return keras.optimizers.schedules.CosineDecay(train.learning_rate, decay_steps=total)


def precision_and_devices(cfg: Config):
    """Set Keras' dtype policy from ``train.mixed_precision``; the scope to build the model in (all GPUs or default)."""
    keras.mixed_precision.set_dtype_policy("mixed_float16" if cfg.train.mixed_precision else "float32")
    if not cfg.train.distribute:
        return contextlib.nullcontext()
    import tensorflow as tf

    return tf.distribute.MirroredStrategy().scope()


def waveform_inputs(cfg: Config) -> dict:
    """The inputs of a ``features.backend: tensorflow`` model: a window of audio and its spectral draws."""
    return {"audio": keras.Input((cfg.data.window_samples,), name="audio"), "semitones": keras.Input((), dtype="int32", name="semitones"),
            "gain_db": keras.Input((), name="gain_db")}


def build(cfg: Config, steps_per_epoch: int) -> keras.Model:
    """The compiled model.  Weights draw from Keras' global seed: set it first (``keras.utils.set_random_seed``)."""
    f, m = cfg.features, cfg.model
    if f.backend == "tensorflow":
        inputs = waveform_inputs(cfg)
        images = MelFrontEnd(dataclasses.asdict(f), cfg.data.sample_rate, cfg.augment.max_semitones,
                             cfg.augment.volume_mode, name="mel")(inputs)
    else:
        inputs = images = keras.Input(shape=(f.n_mels, f.frames, 1), name="mel")
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=images)
    x = keras.layers.GlobalAveragePooling2D()(backbone.output)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(m.dropout)(x)
    x = keras.layers.Dense(m.dense_units, activation="relu", kernel_initializer="he_normal")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(m.dropout)(x)
    # float32 even under mixed precision: a softmax in float16 rounds small scores to 0.
    outputs = keras.layers.Dense(cfg.data.n_classes, activation=m.activation, kernel_initializer="he_normal",
                                 name="species", dtype="float32")(x)
    model = keras.Model(inputs, outputs, name="resnet50_rfcx")
    # With few steps per epoch the default momentum (0.99) leaves the moving
    # statistics far behind the weights, and validation stays at chance.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = m.bn_momentum
    loss = "categorical_crossentropy" if m.activation == "softmax" else "binary_crossentropy"
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(cfg, steps_per_epoch)),
        loss=loss,
        metrics=[StreamingLWLRAP(cfg.data.n_classes)],
    )
    return model


def weights_only(model: keras.Model, weights: list) -> keras.Model:
    """An uncompiled model of ``model``'s architecture holding ``weights``: saved, it has no optimizer state.

    ``keras.models.clone_model`` would not do: its clone shares the original's optimizer and saves its slots.
    """
    copy = type(model).from_config(model.get_config())
    copy.set_weights(weights)
    return copy
