"""ResNet50 (random, ImageNet's or a file's weights) with the seed preset's classification head or an attention head,
built from the config; the wrapper that trains it where training needs more than the saved model holds."""

from __future__ import annotations

import contextlib
import math
import warnings

import keras

from rfcx_mlops.config import Config, check_files
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.learn.features import AugmentedAudio, TFMelFeatures, front_end
from rfcx_mlops.learn.metrics import MaskedBinaryCrossentropy, StreamingLWLRAP

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
    """The compiled model, whose optimizer steps ``steps_per_epoch`` times an epoch.  Weights draw from Keras'
    global seed: set it first (``keras.utils.set_random_seed``).

    It takes what serving gives it: images, or with ``features.backend: tensorflow`` a window
    of audio, which its ``MelFrontEnd`` turns into images before its ``classifier``.  Training
    wraps it (``for_training``) where augmentation has to reach the images.
    """
    model = front_end(cfg).model(lambda name: _classifier(cfg, name))
    model.compile(optimizer=optimizer(cfg, steps_per_epoch), **_compiled(cfg))
    return model


def optimizer(cfg: Config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam at ``learning_rate``'s rates.  With ``train.accumulate_steps``, it steps once every that many batches,
    on the mean of their gradients (each of its micro-batch's mean loss): the whole batch's gradient, the
    micro-batches being the same size, at the whole batch's rate."""
    rate, accumulate = learning_rate(cfg, steps_per_epoch), cfg.train.accumulate_steps
    if accumulate == 1:
        return keras.optimizers.Adam(rate)
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        rate = PerStep(rate, accumulate)
    return keras.optimizers.Adam(rate, gradient_accumulation_steps=accumulate)


@keras.saving.register_keras_serializable(package="rfcx_mlops")
class PerStep(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule`` by optimizer step, for an optimizer that steps once ``every`` batches: Keras gives a schedule
    the batches counted so far (Keras 3.15), though its ``iterations`` count steps."""

    def __init__(self, schedule: keras.optimizers.schedules.LearningRateSchedule, every: int):
        self.schedule, self.every = schedule, every

    def __call__(self, step):
        return self.schedule(step // self.every)

    def get_config(self) -> dict:
        return {"schedule": keras.saving.serialize_keras_object(self.schedule), "every": self.every}

    @classmethod
    def from_config(cls, config: dict) -> PerStep:
        return cls(keras.saving.deserialize_keras_object(config["schedule"]), config["every"])


def _classifier(cfg: Config, name: str) -> keras.Model:
    """ResNet50 and a head: (batch, n_mels, frames, 1) images -> (batch, n_classes) scores.

    ``model.head: pooled`` is the seed preset's: the feature map averaged, two dense layers.
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


def _loss(cfg: Config) -> keras.losses.Loss:
    if cfg.model.loss == "masked":
        return MaskedBinaryCrossentropy(cfg.model.unknown_weight)
    if cfg.model.activation == "softmax":
        return keras.losses.CategoricalCrossentropy()
    return keras.losses.BinaryCrossentropy()


def _compiled(cfg: Config) -> dict:
    return {"loss": _loss(cfg), "metrics": [StreamingLWLRAP(cfg.data.n_classes)]}


def frame_model(model: keras.Model) -> keras.Model | None:
    """A model sharing ``model``'s layers that gives its per-step scores, (batch, steps, n_classes), from its
    input; None for a pooled head."""
    classifier = _classifier_of(model)
    if FRAME_SCORES not in {layer.name for layer in classifier.layers}:
        return None
    frames = keras.Model(classifier.input, classifier.get_layer(FRAME_SCORES).output)
    if classifier is model:
        return frames
    audio = keras.Input(model.input_shape[1:])
    return keras.Model(audio, frames(model.get_layer("mel")(audio)))


def _classifier_of(model: keras.Model) -> keras.Model:
    """The part of ``model`` that takes images: its nested ``classifier`` (``features.backend: tensorflow``), or itself."""
    nested = {layer.name: layer for layer in model.layers}.get("classifier")
    return nested if isinstance(nested, keras.Model) else model


def for_training(model: keras.Model, cfg: Config) -> keras.Model:
    """The model ``jobs.fit`` trains: ``model`` itself, or a ``Training`` wrapper sharing its weights and optimizer
    where training needs what the saved model must not carry (images augmented in the model, a loss on steps)."""
    augmented = front_end(cfg).in_model and cfg.augment.enabled
    step_loss_weight = cfg.model.step_loss_weight if cfg.model.head == "attention" else 0.0
    if not augmented and not step_loss_weight:
        return model
    mel = TFMelFeatures(cfg.features, cfg.data.sample_rate, cfg.augment.max_semitones) if augmented else None
    wrapper = Training(model, mel, step_loss_weight, _loss(cfg))
    wrapper.compile(optimizer=model.optimizer, **_compiled(cfg))
    return wrapper


class Training(keras.Model):
    """Trains ``model`` with what only training needs; the wrapper itself is never saved.

    - ``mel`` (``features.backend: tensorflow`` with augmentation): training batches are
      ``features.AugmentedAudio`` (``batches.WaveformBatches``), made into images that carry each
      sample's spectrogram-domain draw before ``model``'s classifier.  Validation batches are audio, which go
      through ``model`` unchanged.  So the augmentation never becomes part of ``model``: what is saved, resumed
      and served takes audio only.
    - ``step_loss_weight`` (the attention head): the loss adds, with this weight, ``step_loss`` on each
      species' highest step score.  The pooled clip score alone leaves a step the pooling weighs little
      with whatever score it drifts to; this term holds every step of an absent species down, and lifts
      at least one step of a present one.
    """

    def __init__(self, model: keras.Model, mel: TFMelFeatures | None, step_loss_weight: float,
                 step_loss: keras.losses.Loss):
        super().__init__(name="training")
        self.inference = model
        self.mel = mel
        self.classifier = _classifier_of(model)
        self.step_loss_weight, self.step_loss = step_loss_weight, step_loss
        self.with_steps = None
        if step_loss_weight:  # one pass gives both: the same layers, two outputs
            self.with_steps = keras.Model(self.classifier.input, [self.classifier.output,
                                                                  self.classifier.get_layer(FRAME_SCORES).output])

    def call(self, inputs, training=False):
        if isinstance(inputs, dict):
            images = self.mel(*AugmentedAudio(**inputs))[..., None]
        elif self.with_steps is None:
            return self.inference(inputs, training=training)
        else:
            images = inputs if self.classifier is self.inference else self.inference.get_layer("mel")(inputs)
        net = self.classifier if self.with_steps is None else self.with_steps
        return net(images, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if self.with_steps is None:
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        clip, steps = y_pred
        highest = keras.ops.max(steps, axis=1)
        return (super().compute_loss(x, y, clip, sample_weight, training)
                + self.step_loss_weight * self.step_loss(y, highest, sample_weight))

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        return super().compute_metrics(x, y, y_pred if self.with_steps is None else y_pred[0], sample_weight)
