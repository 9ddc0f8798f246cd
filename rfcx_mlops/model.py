"""ResNet50 (random, ImageNet's or a file's weights) with the seed's classification head, built from the config;
the wrapper that trains it on augmented images made in the model."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings

import keras

from rfcx_mlops.config import Config, ConfigError, check_files
from rfcx_mlops.features import MelFrontEnd, TFMelFeatures
from rfcx_mlops.metrics import MaskedBinaryCrossentropy, StreamingLWLRAP

FRAME_SCORES = "frame_scores"  # the attention head's per-step scores


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


def build(cfg: Config, steps_per_epoch: int) -> keras.Model:
    """The compiled model.  Weights draw from Keras' global seed: set it first (``keras.utils.set_random_seed``).

    It takes what serving gives it: images, or with ``features.backend: tensorflow`` a window
    of audio, which its ``MelFrontEnd`` turns into images before its ``classifier``.  Training
    wraps it (``for_training``) where augmentation has to reach the images.
    """
    f = cfg.features
    if f.backend != "tensorflow":
        model = _classifier(cfg, "resnet50_rfcx")
    else:
        audio = keras.Input((cfg.data.window_samples,), name="audio")
        images = MelFrontEnd(dataclasses.asdict(f), cfg.data.sample_rate, name="mel")(audio)
        model = keras.Model(audio, _classifier(cfg, "classifier")(images), name="resnet50_rfcx")
    model.compile(optimizer=keras.optimizers.Adam(learning_rate(cfg, steps_per_epoch)), **_compiled(cfg))
    return model


def _classifier(cfg: Config, name: str) -> keras.Model:
    """ResNet50 and a head: (batch, n_mels, frames, 1) images -> (batch, n_classes) scores.

    ``model.head: pooled`` is the seed's: the feature map averaged, two dense layers.
    ``attention`` (SED-style) scores each of the feature map's time steps (``frame_scores``,
    frames / 32 of them) and pools them over time with a learned weight per species and step.
    """
    f, m = cfg.features, cfg.model
    images = keras.Input(shape=(f.n_mels, f.frames, 1), name="mel")
    features = _backbone(cfg, images).output  # (batch, n_mels / 32, frames / 32, 2048)
    if m.head == "attention":
        steps = features.shape[2]
        x = keras.layers.AveragePooling2D(pool_size=(features.shape[1], 1))(features)  # the frequency axis away
        x = keras.layers.Reshape((steps, features.shape[3]))(x)
    else:
        x = keras.layers.GlobalAveragePooling2D()(features)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(m.dropout)(x)
    x = keras.layers.Dense(m.dense_units, activation="relu", kernel_initializer="he_normal")(x)  # per step, too
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(m.dropout)(x)
    # Sigmoid scores start at a species' prior (one in n_classes), not at 0.5: otherwise the first
    # epochs go into pushing every absent species down.
    prior = -math.log(max(cfg.data.n_classes - 1, 1)) if m.activation == "sigmoid" else 0.0
    # float32 even under mixed precision: a softmax in float16 rounds small scores to 0.
    scores = keras.layers.Dense(cfg.data.n_classes, activation=m.activation, kernel_initializer="he_normal",
                                bias_initializer=keras.initializers.Constant(prior), dtype="float32",
                                name="species" if m.head == "pooled" else FRAME_SCORES)(x)
    if m.head == "pooled":
        outputs = scores
    else:
        weights = keras.layers.Dense(cfg.data.n_classes, dtype="float32", name="attention")(x)
        weights = keras.layers.Softmax(axis=1, dtype="float32")(weights)  # over the steps, per species
        pooled = keras.layers.GlobalAveragePooling1D(dtype="float32")(
            keras.layers.Multiply(dtype="float32")([weights, scores]))
        outputs = keras.layers.Rescaling(float(steps), dtype="float32", name="species")(pooled)  # the mean, times steps
    model = keras.Model(images, outputs, name=name)
    # With few steps per epoch the default momentum (0.99) leaves the moving
    # statistics far behind the weights, and validation stays at chance.
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = m.bn_momentum
    return model


def _backbone(cfg: Config, images) -> keras.Model:
    """ResNet50 without its top: random (``model.weights: none``), or ImageNet's or a file's filters.

    Pretrained filters expect 3 channels: the one-channel mel image is repeated into each (the
    first convolution then sums its three filters; batch normalisation after it absorbs the scale).
    """
    weights = cfg.model.weights
    if weights == "none":
        return keras.applications.ResNet50(include_top=False, weights=None, input_tensor=images)
    rgb = keras.layers.Concatenate(name="mel_to_rgb")([images] * 3)
    check_files(cfg)
    try:
        with warnings.catch_warnings():  # a file of another model: one warning per layer before the error
            warnings.simplefilter("ignore", UserWarning)
            return keras.applications.ResNet50(include_top=False, weights=weights, input_tensor=rgb)
    except Exception as exc:  # a download (URLError, HTTP errors) or a file of another model (ValueError)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if weights == "imagenet":
            raise ConfigError("model.weights: imagenet: the ImageNet weights could not be downloaded "
                              f"({reason}); give the path of a ResNet50 .weights.h5 file instead") from None
        raise ConfigError(f"model.weights: {weights} does not hold ResNet50 backbone weights ({reason})") from None


def _compiled(cfg: Config) -> dict:
    if cfg.model.loss == "masked":
        loss = MaskedBinaryCrossentropy(cfg.model.unknown_weight)
    else:
        loss = "categorical_crossentropy" if cfg.model.activation == "softmax" else "binary_crossentropy"
    return {"loss": loss, "metrics": [StreamingLWLRAP(cfg.data.n_classes)]}


def frame_model(model: keras.Model) -> keras.Model | None:
    """A model sharing ``model``'s layers that gives its per-step scores, (batch, steps, n_classes), from its
    input; None for a pooled head."""
    nested = {layer.name: layer for layer in model.layers}.get("classifier")
    classifier = nested if isinstance(nested, keras.Model) else model
    if FRAME_SCORES not in {layer.name for layer in classifier.layers}:
        return None
    frames = keras.Model(classifier.input, classifier.get_layer(FRAME_SCORES).output)
    if classifier is model:
        return frames
    audio = keras.Input(model.input_shape[1:])
    return keras.Model(audio, frames(model.get_layer("mel")(audio)))


def for_training(model: keras.Model, cfg: Config) -> keras.Model:
    """The model ``fit`` trains: ``model`` itself, or, with ``features.backend: tensorflow`` and
    augmentation, an ``Augmented`` wrapper sharing its weights and optimizer."""
    if cfg.features.backend != "tensorflow" or not cfg.augment.enabled:
        return model
    wrapper = Augmented(model, TFMelFeatures(cfg.features, cfg.data.sample_rate, cfg.augment.max_semitones))
    wrapper.compile(optimizer=model.optimizer, **_compiled(cfg))
    return wrapper


class Augmented(keras.Model):
    """Trains ``model``'s classifier on images that carry each sample's spectrogram-domain draw.

    Training batches are ``{"audio", "semitones" (batch,), "gain_db" (batch, STFT frames),
    "mel_kept" (batch, n_mels), "frames_kept" (batch, frames)}`` (``generator.WaveformBatches``); validation batches are audio, which go through ``model``
    unchanged.  So the augmentation never becomes part of ``model``: what is saved, resumed
    and served takes audio only.  The wrapper itself is never saved.
    """

    def __init__(self, model: keras.Model, mel: TFMelFeatures):
        super().__init__(name="augmented")
        self.inference = model
        self.mel = mel

    def call(self, inputs, training=False):
        if not isinstance(inputs, dict):
            return self.inference(inputs, training=training)
        images = self.mel(inputs["audio"], inputs["semitones"], inputs["gain_db"], inputs["mel_kept"],
                          inputs["frames_kept"])[..., None]
        return self.inference.get_layer("classifier")(images, training=training)


def weights_only(model: keras.Model, weights: list) -> keras.Model:
    """An uncompiled model of ``model``'s architecture holding ``weights``: saved, it has no optimizer state.

    ``keras.models.clone_model`` would not do: its clone shares the original's optimizer and saves its slots.
    """
    copy = type(model).from_config(model.get_config())
    copy.set_weights(weights)
    return copy
