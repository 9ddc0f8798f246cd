"""Batches: shapes, every validation sample exactly once, seeded training draws, window labels."""

from __future__ import annotations

import collections

import numpy as np
import pandas as pd
import pytest
from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter  # what fit() iterates with

from conftest import make_data_dir
from rfcx_mlops import config
from rfcx_mlops.config import ModelConfig
from rfcx_mlops.data import folder
from rfcx_mlops.learn.batches import SpectrogramBatches, make_samples, mixup, targets, window_start
from rfcx_mlops.learn.metrics import UNKNOWN

TINY = {"features.n_mels": 32, "features.frames": 64, "features.n_fft": 512, "features.hop_length": 256,
        "data.crop_seconds": 2.0, "train.batch_size": 4, "augment.max_shift_seconds": 0.5}


@pytest.fixture
def data(tmp_path):
    rows = [(f"rec{i}", i % 5, 1, 1.0 + i % 4, 500.0, 2.0 + i % 4, 4000.0) for i in range(10)]
    rows.append(("rec0", 9, 1, 2.2, 500.0, 3.2, 4000.0))  # a second species inside rec0's window
    return folder.load(make_data_dir(tmp_path, rows, seconds=8.0), 24, 48000)


def batches(data, training, workers=1, **overrides):
    cfg = config.load(None, {**TINY, **overrides})
    samples = make_samples(data.tp, data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)
    return SpectrogramBatches(samples, data.recordings, cfg, training=training, workers=workers)


def test_window_start_is_centred_and_clipped():
    assert window_start(20.0, 22.0, 10.0, 60.0) == 16.0
    assert window_start(1.0, 2.0, 10.0, 60.0) == 0.0
    assert window_start(58.0, 59.5, 10.0, 60.0) == 50.0


def test_window_labels_include_overlapping_calls(data):
    samples = make_samples(data.tp, data.recordings, 2.0, 24)
    # rec0: species 0 calls at 1.0-2.0 s (window 0.5-2.5 s), species 9 at 2.2-3.2 s (window 1.7-3.7 s)
    assert list(np.flatnonzero(samples.labels[0])) == [0, 9]
    assert list(np.flatnonzero(samples.labels[10])) == [0, 9]
    assert list(np.flatnonzero(samples.labels[1])) == [1]
    narrow = make_samples(data.tp, data.recordings, 0.5, 24)  # 0.5 s windows no longer overlap
    assert list(np.flatnonzero(narrow.labels[0])) == [0]


def test_validation_yields_every_sample_once_in_order(data):
    val = batches(data, training=False)
    assert len(val) == 3  # 11 samples in batches of 4: the last one partial
    shapes = [val[i][0].shape for i in range(len(val))]
    assert shapes == [(4, 32, 64, 1), (4, 32, 64, 1), (3, 32, 64, 1)]
    labels = np.concatenate([val[i][1] for i in range(len(val))])
    np.testing.assert_array_equal(labels, val.samples.labels)
    x, y = val[0]
    assert x.dtype == np.float32 and y.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    clean = np.stack([val.features(val.waveform(i)) for i in range(4, 8)])[..., None]
    np.testing.assert_allclose(val[1][0], clean, atol=1e-6)  # every window through the clean mel path, unaugmented
    with pytest.raises(IndexError):
        val[3]


def test_training_is_seeded_shuffled_and_augmented(data):
    a, b = batches(data, training=True), batches(data, training=True)
    xa, ya = a[0]
    xb, yb = b[0]
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
    plain = batches(data, training=True, **{"augment.enabled": False})
    assert not np.allclose(plain[0][0], xa)  # same order, but augmented
    other_seed = batches(data, training=True, seed=28)
    assert not np.array_equal(other_seed.order, a.order)
    first_order = a.order.copy()
    a.on_epoch_end()
    assert sorted(a.order) == sorted(first_order) and not np.array_equal(a.order, first_order)
    b.set_epoch(1)
    np.testing.assert_array_equal(a[0][0], b[0][0])  # a resumed run draws what the first run would have


def test_draws_do_not_depend_on_batch_order(data):
    a = batches(data, training=True)
    img, params = a.sample(3, epoch=0)
    for i in range(len(a)):
        a[i]
    again, params_again = a.sample(3, epoch=0)
    np.testing.assert_array_equal(img, again)
    assert params == params_again and params  # the draws are reported


def test_steps_per_epoch_repeats_passes_with_fresh_draws(data):
    tr = batches(data, training=True, **{"train.steps_per_epoch": 7})
    assert len(tr) == 7 and len(tr.order) >= 28 and tr.samples_per_epoch == 28
    images = np.concatenate([tr[i][0] for i in range(len(tr))])
    n = len(tr.samples)
    first = int(np.flatnonzero(tr.order[n:28] == tr.order[0])[0]) + n  # sample order[0] again, second pass
    assert not np.allclose(images[0], images[first])  # augmented anew, not a copy


def test_worker_threads_share_one_cache_and_give_the_same_batches(data, monkeypatch):
    """Through Keras' own PyDataset workers: each window decoded once over two epochs, batches as with one worker."""
    decoded = collections.Counter()
    read = SpectrogramBatches.waveform
    monkeypatch.setattr(SpectrogramBatches, "waveform", lambda self, i: decoded.update([i]) or read(self, i))
    single = batches(data, training=True)
    expected = []
    for epoch in (0, 1):
        single.set_epoch(epoch)
        expected.append([single[k][0] for k in range(len(single))])
    decoded.clear()
    parallel = batches(data, training=True, workers=2)
    for epoch in (0, 1):
        parallel.set_epoch(epoch)
        got = [x for x, _ in PyDatasetAdapter(parallel, shuffle=False).get_numpy_iterator()]
        for a, b in zip(got, expected[epoch], strict=True):
            np.testing.assert_array_equal(a, b)
    assert set(decoded) == set(range(len(parallel.samples))) and set(decoded.values()) == {1}


def test_cached_audio_is_the_decoded_audio(data):
    tr = batches(data, training=True)
    for i in range(len(tr.samples)):
        np.testing.assert_array_equal(tr.window(i), tr.waveform(i))  # 16-bit files: exact


def test_every_sample_of_every_epoch_draws_its_own_noise(data):
    tr = batches(data, training=True)
    seeds = [tr.sample(i, epoch)[1].get("noise_seed") for epoch in range(3) for i in range(len(tr.samples))]
    assert None not in seeds and len(set(seeds)) == len(seeds)


def test_both_domains_draw_the_same_augmentations(data):
    spectral, waveform = batches(data, True), batches(data, True, **{"augment.domain": "waveform"})
    assert spectral.spectral and not waveform.spectral
    for i in range(len(spectral.samples)):
        assert spectral.sample(i, 0)[1] == waveform.sample(i, 0)[1]


def test_empty_samples_refused(data):
    cfg = config.load(None, TINY)
    empty = make_samples(data.tp.iloc[:0], data.recordings, 2.0, 24)
    with pytest.raises(ValueError, match="no samples"):
        SpectrogramBatches(empty, data.recordings, cfg, training=False)


def test_without_the_audio_cache_the_batches_are_the_same(data):
    for training in (True, False):
        cached, uncached = batches(data, training), batches(data, training, **{"train.cache_audio": False})
        np.testing.assert_array_equal(cached[0][0], uncached[0][0])  # 16-bit files: the cache is exact


@pytest.mark.parametrize("training", [True, False])
def test_waveform_batches_make_the_image_batches_in_the_model(data, training):
    """features.backend: tensorflow: the same windows and draws, the images made where the model runs:
    with each sample's spectral draw in training, from audio alone in validation (what the saved model takes)."""
    import dataclasses

    from rfcx_mlops.learn.batches import WaveformBatches, make_batches
    from rfcx_mlops.learn.features import MelFrontEnd, TFMelFeatures

    cfg = config.load(None, {**TINY, "features.backend": "tensorflow"})
    samples = make_samples(data.tp, data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)
    waves = make_batches(samples, data.recordings, cfg, training=training)
    assert isinstance(waves, WaveformBatches)
    images = batches(data, training)
    inputs, labels = waves[1]
    if training:
        mel = TFMelFeatures(cfg.features, cfg.data.sample_rate, cfg.augment.max_semitones)
        made = mel(inputs["audio"], inputs["semitones"], inputs["gain_db"])[..., None]
        assert inputs["semitones"].any() and inputs["gain_db"].any()
    else:
        made = MelFrontEnd(dataclasses.asdict(cfg.features), cfg.data.sample_rate)(inputs)
        assert isinstance(inputs, np.ndarray) and inputs.shape == (4, cfg.data.window_samples)
    np.testing.assert_allclose(np.asarray(made), images[1][0], atol=2e-3)
    np.testing.assert_array_equal(labels, images[1][1])


# -- weak labels: what is known in a window, windows on train_fp rows, mixup, SpecAugment ---------------------


def test_absences_are_known_and_can_centre_windows(data):
    # rec0's window (0.5-2.5 s) overlaps species 3's absence; rec1's window does not overlap species 4's
    fp = pd.DataFrame([("rec0", 3, 1, 2.0, 500.0, 2.4, 4000.0, 2), ("rec1", 4, 1, 6.0, 500.0, 7.0, 4000.0, 3)],
                      columns=data.tp.columns).astype(data.tp.dtypes.to_dict())
    samples = make_samples(data.tp, data.recordings, 2.0, 24, absences=fp, centred_on_absences=fp.iloc[1:])
    assert len(samples) == len(data.tp) + 1
    assert set(np.flatnonzero(samples.known[0])) == {0, 3, 9} and list(np.flatnonzero(samples.labels[0])) == [0, 9]
    assert set(np.flatnonzero(samples.known[1])) == {1}  # rec1's absence is outside its call's window
    extra = len(data.tp)  # the window on rec1's absence, 5.5-7.5 s: no call, species 4 known absent
    assert samples.recording_ids[extra] == "rec1" and samples.starts[extra] == 5.5
    assert not samples.labels[extra].any() and list(np.flatnonzero(samples.known[extra])) == [4]
    masked = targets(samples.labels, samples.known, ModelConfig(activation="sigmoid", loss="masked"))
    assert masked[extra, 4] == 0 and masked[extra, 5] == UNKNOWN and masked[0, 0] == 1
    np.testing.assert_array_equal(targets(samples.labels, samples.known, ModelConfig(activation="sigmoid")), samples.labels)
    even = targets(samples.labels, samples.known, ModelConfig())  # a softmax: the window with no call
    np.testing.assert_array_equal(even[:extra], samples.labels[:extra])
    assert even[extra, 4] == 0 and np.allclose(np.delete(even[extra], 4), 1 / 23)


def test_placed_windows_know_what_overlaps_them(data):
    fp = pd.DataFrame([("rec1", 4, 1, 6.0, 500.0, 7.0, 4000.0, 3)], columns=data.tp.columns).astype(data.tp.dtypes.to_dict())
    placed = pd.DataFrame({"recording_id": ["rec1", "rec1"], "start": [4.5, 3.5]})
    samples = make_samples(data.tp, data.recordings, 2.0, 24, absences=fp, placed=placed)
    assert len(samples) == len(data.tp) + 2
    near, far = len(data.tp), len(data.tp) + 1
    assert list(samples.recording_ids[near:]) == ["rec1", "rec1"] and list(samples.starts[near:]) == [4.5, 3.5]
    assert not samples.labels[near].any() and list(np.flatnonzero(samples.known[near])) == [4]
    assert not samples.known[far].any()  # nothing known: every species unknown to the masked loss
    call = data.tp[data.tp["recording_id"] == "rec1"].iloc[0]
    on_call = make_samples(data.tp, data.recordings, 2.0, 24, placed=pd.DataFrame(
        {"recording_id": ["rec1"], "start": [call.t_min - 1.0]}))
    assert list(np.flatnonzero(on_call.labels[-1])) == [call.species_id]


def test_masked_batches_carry_unknown_targets(data):
    masked = batches(data, True, **{"model.activation": "sigmoid", "model.loss": "masked"})
    _, y = masked[0]
    labelled = masked.samples.labels[masked.order[:4]]
    np.testing.assert_array_equal(y, np.where(labelled > 0, 1.0, UNKNOWN))  # no absences given: the rest unknown


def test_mixup_mixes_images_and_takes_the_union_of_what_calls():
    cfg = config.load(None, {**TINY, "model.activation": "sigmoid", "augment.mixup_p": 1.0})
    images = np.stack([np.full((32, 64, 1), v, np.float32) for v in (0.0, 1.0)])
    labels = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    known = np.array([[1, 1, 0], [1, 1, 1]], bool)
    mixed, y, k = mixup(images, labels, known, cfg, np.random.default_rng(0))
    w = 1.0 - mixed[0, 0, 0, 0]  # sample 0 (all 0) mixed with sample 1 (all 1) at weight w
    assert 0 < w < 1 and np.allclose(mixed[0], 1 - w) and np.allclose(mixed[1], mixed[1, 0, 0, 0])
    np.testing.assert_array_equal(y, [[1, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(k, [[1, 1, 0], [1, 1, 0]])  # class 2: unknown in sample 0, so unknown mixed
    again = mixup(images, labels, known, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(again[0], mixed)
    never = config.load(None, {**TINY, "augment.mixup_p": 0.0, "model.activation": "sigmoid"})
    assert mixup(images, labels, known, never, np.random.default_rng(0))[0] is images


def test_mixup_with_a_softmax_mixes_the_targets_by_weight():
    cfg = config.load(None, {**TINY, "augment.mixup_p": 1.0})
    images = np.stack([np.zeros((32, 64, 1), np.float32), np.ones((32, 64, 1), np.float32)])
    labels = np.eye(2, dtype=np.float32)
    mixed, y, _ = mixup(images, labels, np.ones((2, 2), bool), cfg, np.random.default_rng(1))
    w0 = 1.0 - mixed[0, 0, 0, 0]
    np.testing.assert_allclose(y[0], [w0, 1 - w0], atol=1e-6)
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-6)
    # a window with no labelled call brings even shares of the species not known absent into the mix
    quiet = np.array([[1, 0, 0, 0], [0, 0, 0, 0]], np.float32)
    known = np.array([[1, 0, 0, 0], [0, 0, 0, 1]], bool)
    mixed, y, _ = mixup(images, quiet, known, cfg, np.random.default_rng(1))
    w0 = 1.0 - mixed[0, 0, 0, 0]
    np.testing.assert_allclose(y[0], [w0 + (1 - w0) / 3, (1 - w0) / 3, (1 - w0) / 3, 0.0], atol=1e-6)


def test_training_batches_with_mixup_are_seeded(data):
    a, b = (batches(data, True, **{"augment.mixup_p": 1.0}) for _ in range(2))
    plain = batches(data, True)
    np.testing.assert_array_equal(a[0][0], b[0][0])
    assert not np.allclose(a[0][0], plain[0][0])
    assert not np.array_equal(a[0][1], plain[0][1]) and ((0 <= a[0][1]) & (a[0][1] <= 1)).all()


def test_spec_augment_masks_are_at_the_images_floor(data):
    masked = batches(data, True, **{"augment.time_mask_p": 1.0, "augment.freq_mask_p": 1.0,
                                    "augment.max_time_mask": 0.2, "augment.max_freq_mask": 0.2})
    plain = batches(data, True)
    image, params = masked.sample(2, epoch=0)
    reference, plain_params = plain.sample(2, epoch=0)
    assert {k: v for k, v in params.items() if not k.endswith("_masks")} == plain_params  # other draws unchanged
    rows = np.zeros(32, bool)
    for start, width in params["freq_masks"]:
        rows[round(start * 32) : round((start + width) * 32)] = True
    columns = np.zeros(64, bool)
    for start, width in params["time_masks"]:
        columns[round(start * 64) : round((start + width) * 64)] = True
    assert rows.any() and columns.any()
    hidden = rows[:, None] | columns[None, :]
    assert (image[hidden] == 0).all()
    np.testing.assert_array_equal(image[~hidden], reference[~hidden])
