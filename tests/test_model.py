"""The model and its training wrapper: with features.backend tensorflow, augmentation reaches the images in
training only, and what is saved takes audio alone."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from rfcx_mlops import config
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.learn.model import Training, build, for_training, frame_model

TINY = Path(__file__).resolve().parent / "tiny.yaml"


def test_the_training_wrapper_shares_weights_and_optimizer_and_resumes_from_the_saved_model(tmp_path):
    cfg = config.load(TINY, {"features.backend": "tensorflow", "train.run_eagerly": False})
    keras.utils.set_random_seed(0)
    model = build(cfg, steps_per_epoch=1)
    wrapper = for_training(model, cfg)
    assert isinstance(wrapper, Training) and wrapper.optimizer is model.optimizer
    assert [id(v) for v in wrapper.trainable_variables] == [id(v) for v in model.trainable_variables]
    rng = np.random.default_rng(0)
    n, frames = cfg.data.window_samples, 1 + cfg.data.window_samples // cfg.features.hop_length
    audio = rng.normal(0, 0.1, (8, n)).astype(np.float32)
    drawn = {"audio": audio, "semitones": rng.integers(-5, 6, 8).astype(np.int32),
             "gain_db": rng.normal(0, 3, (8, frames)).astype(np.float32),
             "mel_kept": np.ones((8, cfg.features.n_mels), np.float32),
             "frames_kept": np.ones((8, cfg.features.frames), np.float32)}
    labels = np.eye(24, dtype=np.float32)[rng.integers(0, 24, 8)]
    before = model.predict(audio, verbose=0)
    wrapper.fit(drawn, labels, validation_data=(audio, labels), epochs=1, verbose=0)
    assert not np.allclose(model.predict(audio, verbose=0), before)  # training the wrapper trained the model

    model.save(tmp_path / "last.keras")
    saved = keras.models.load_model(tmp_path / "last.keras")
    assert saved.input.name == "audio" and int(saved.optimizer.iterations.numpy()) == 1
    np.testing.assert_allclose(saved.predict(audio, verbose=0), model.predict(audio, verbose=0), atol=1e-5)
    for_training(saved, cfg).fit(drawn, labels, epochs=1, verbose=0)
    assert int(saved.optimizer.iterations.numpy()) == 2  # the saved optimizer state carried on


def test_without_augmentation_the_model_trains_itself():
    images = config.load(TINY, {"train.run_eagerly": False})
    assert for_training(model := build(images, 1), images) is model


def test_pretrained_backbone_weights_from_a_file(tmp_path):
    cfg = config.load(TINY)
    keras.utils.set_random_seed(1)
    backbone = keras.applications.ResNet50(include_top=False, weights=None,
                                           input_shape=(cfg.features.n_mels, cfg.features.frames, 3))
    backbone.save_weights(tmp_path / "backbone.weights.h5")
    model = build(config.load(TINY, {"model.weights": str(tmp_path / "backbone.weights.h5")}), 1)
    for name in ("conv1_conv", "conv5_block3_3_conv"):
        for ours, theirs in zip(model.get_layer(name).get_weights(), backbone.get_layer(name).get_weights()):
            np.testing.assert_array_equal(ours, theirs)
    image = np.random.default_rng(0).random((1, cfg.features.n_mels, cfg.features.frames, 1), np.float32)
    rgb = keras.Model(model.input, model.get_layer("mel_to_rgb").output)(image)
    np.testing.assert_array_equal(np.asarray(rgb), np.repeat(image, 3, axis=-1))  # the mel image in each channel
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    dense.save_weights(tmp_path / "other.weights.h5")
    with pytest.raises(ConfigError, match="does not hold ResNet50 backbone weights"):
        build(config.load(TINY, {"model.weights": str(tmp_path / "other.weights.h5")}), 1)
    with pytest.raises(ConfigError, match="is not a file"):
        build(config.load(TINY, {"model.weights": str(tmp_path / "missing.weights.h5")}), 1)


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
def test_untrained_scores_start_at_the_species_prior(activation):
    """Sigmoid scores start near one in n_classes (not 0.5 each); a softmax's sum to 1 anyway."""
    cfg = config.load(TINY, {"model.activation": activation})
    model = build(cfg, 1)
    images = np.random.default_rng(0).normal(size=(8, cfg.features.n_mels, cfg.features.frames, 1)).astype("float32")
    scores = np.asarray(model.predict_on_batch(images))
    assert scores.mean() == pytest.approx(1 / cfg.data.n_classes, rel=0.5)
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-5) == (activation == "softmax")


@pytest.mark.parametrize("backend", ["numpy", "tensorflow"])
def test_the_attention_head_pools_its_steps_scores_by_learned_weights(backend):
    cfg = config.load(TINY, {"model.activation": "sigmoid", "model.head": "attention", "features.backend": backend})
    model = build(cfg, 1)
    steps = cfg.features.frames // 32
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, cfg.data.window_samples)) if backend == "tensorflow"
         else rng.normal(size=(3, cfg.features.n_mels, cfg.features.frames, 1))).astype("float32")
    clip = np.asarray(model.predict_on_batch(x))
    frames = np.asarray(frame_model(model).predict_on_batch(x))
    assert clip.shape == (3, 24) and frames.shape == (3, steps, 24)
    classifier = model.get_layer("classifier") if backend == "tensorflow" else model
    images = model.get_layer("mel")(x)[..., None] if backend == "tensorflow" else x
    logits = np.asarray(keras.Model(classifier.input, classifier.get_layer("attention").output)(images))
    weights = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(clip, (weights * frames).sum(axis=1), atol=1e-5)
    assert frame_model(build(config.load(TINY), 1)) is None  # the pooled head has no steps


@pytest.mark.parametrize("backend", ["numpy", "tensorflow"])
def test_the_attention_head_trains_on_its_clip_score_and_its_highest_step(backend):
    """The loss is the clip score's binary cross-entropy plus step_loss_weight times that of each species'
    highest step; the saved model keeps one output, the clip score."""
    cfg = config.load(TINY, {"model.activation": "sigmoid", "model.head": "attention", "features.backend": backend,
                             "model.step_loss_weight": 0.7})
    keras.utils.set_random_seed(0)
    model = build(cfg, 1)
    wrapper = for_training(model, cfg)
    assert isinstance(wrapper, Training) and wrapper.optimizer is model.optimizer
    rng = np.random.default_rng(0)
    x = (rng.normal(0, 0.1, size=(4, cfg.data.window_samples)) if backend == "tensorflow"
         else rng.normal(size=(4, cfg.features.n_mels, cfg.features.frames, 1))).astype("float32")
    y = np.eye(24, dtype="float32")[[0, 3, 3, 7]]

    def bce(p):
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))

    clip, steps = np.asarray(model.predict_on_batch(x)), np.asarray(frame_model(model).predict_on_batch(x))
    loss = wrapper.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(bce(clip) + 0.7 * bce(steps.max(axis=1)), rel=1e-4)
    assert loss > bce(clip) + 0.1  # the steps' term is there
    if backend == "numpy":  # images in: the same pass trains
        wrapper.fit(x, y, epochs=1, verbose=0)
        assert not np.allclose(model.predict_on_batch(x), clip)
    unweighted = config.load(TINY, {"model.activation": "sigmoid", "model.head": "attention",
                                    "model.step_loss_weight": 0})
    assert for_training(no_steps := build(unweighted, 1), unweighted) is no_steps
