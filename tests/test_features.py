"""The mel path: shape, range, the right frequency in the right bin, the resize, and the spectrogram-domain
augmentations against the waveform ones."""

from __future__ import annotations

import dataclasses

import colorednoise
import keras
import librosa
import numpy as np
import pytest
from skimage.transform import resize

from rfcx_mlops import config
from rfcx_mlops.learn import augment
from rfcx_mlops.learn.augment import SpectralDraw
from rfcx_mlops.learn.features import MelFeatures, MelFrontEnd, TFMelFeatures, mel_filterbank, resize_time


@pytest.fixture
def seed_features():
    cfg = config.load(None)
    return MelFeatures(cfg.features, cfg.data.sample_rate)


def tone(freq, seconds=10.0, sr=48000):
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def test_shape_dtype_and_range(seed_features):
    x = seed_features(tone(2000.0) + np.random.default_rng(0).normal(0, 0.01, 480000).astype(np.float32))
    assert x.shape == (128, 1876) and x.dtype == np.float32
    assert x.min() == pytest.approx(0.0, abs=1e-6) and x.max() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("freq", [300.0, 1500.0, 6000.0, 12000.0])
def test_a_tone_lights_its_mel_bin(seed_features, freq):
    x = seed_features(tone(freq))
    centres = librosa.mel_frequencies(n_mels=128 + 2, fmin=84.0, fmax=15056.0)[1:-1]
    assert abs(int(np.argmax(x.mean(axis=1))) - int(np.argmin(np.abs(centres - freq)))) <= 1


def test_power_to_db_not_amplitude_to_db(seed_features):
    """Ten times the amplitude is 20 dB more (the seed's amplitude_to_db on power made it 40)."""
    quiet, loud = (seed_features.log_mel(a * tone(3000.0)) for a in (0.01, 0.1))
    band = int(np.argmax(loud.mean(axis=1)))
    assert np.median(loud[band] - quiet[band]) == pytest.approx(20.0, abs=0.1)


def test_silence_gives_zeros(seed_features):
    assert not seed_features(np.zeros(48000 * 10, np.float32)).any()


def test_resize_time_matches_skimage_inside_the_edges():
    image = np.random.default_rng(2).random((16, 938)).astype(np.float32)
    ours = resize_time(image, 1876)
    theirs = resize(image, (16, 1876), order=1, anti_aliasing=False, mode="edge")
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert resize_time(image, 938) is image or np.array_equal(resize_time(image, 938), image)


# -- the spectrogram-domain pitch shift and volume against the waveform path ------------------------------------

SR = 48000


@pytest.fixture(scope="module")
def shifting():
    cfg = config.load(None)
    return MelFeatures(cfg.features, SR, max_semitones=5)


def shift(semitones):
    return SpectralDraw(semitones=semitones)


def test_unshifted_filterbank_is_librosas():
    cfg = config.load(None).features
    np.testing.assert_allclose(mel_filterbank(SR, cfg), librosa.filters.mel(
        sr=SR, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax), rtol=1e-5, atol=1e-9)


def test_log_mel_is_librosas_power_to_db(shifting):
    y = tone(1500.0, seconds=3.0) + np.random.default_rng(1).normal(0, 0.05, 3 * SR).astype(np.float32)
    f = shifting.cfg
    theirs = librosa.power_to_db(librosa.feature.melspectrogram(
        y=y, sr=SR, n_fft=f.n_fft, hop_length=f.hop_length, n_mels=f.n_mels, fmin=f.fmin, fmax=f.fmax,
        pad_mode="constant"), ref=1.0, amin=1e-10, top_db=None)
    np.testing.assert_allclose(shifting.log_mel(y), theirs, atol=0.01)


@pytest.mark.parametrize("semitones", [-5, -2, 3, 5])
def test_a_shifted_tone_peaks_in_the_same_mel_bin_either_way(shifting, semitones):
    centres = librosa.mel_frequencies(n_mels=128 + 2, fmin=84.0, fmax=15056.0)[1:-1]
    target = 70  # the bin the shifted tone lands in: 3.3 kHz
    y = tone(centres[target] * 2 ** (-semitones / 12), seconds=2.0)
    waveform = librosa.effects.pitch_shift(y, sr=SR, n_steps=semitones)
    peak = [int(np.argmax(shifting.log_mel(waveform).mean(axis=1))),
            int(np.argmax(shifting.log_mel(y, shift(semitones)).mean(axis=1)))]
    assert peak == [target, target]


@pytest.mark.parametrize("semitones", [-5, 4])
def test_shifted_white_noise_keeps_its_power_per_hz(shifting, semitones):
    """Shifting by n semitones spreads the same power over 2^(n/12) times the bandwidth: -10 log10(2^(n/12)) dB.

    The phase vocoder loses 3-4 dB more on noise (its overlap-add of frames with unrelated
    phases), so the waveform path's noise sits that much lower after a shift; calls, being
    tonal, keep their level either way (previous test).
    """
    y = np.random.default_rng(abs(semitones)).normal(0, 0.05, 3 * SR).astype(np.float32)
    change = shifting.log_mel(y, shift(semitones)).mean() - shifting.log_mel(y).mean()
    assert change == pytest.approx(-10 * np.log10(2 ** (semitones / 12)), abs=0.3)
    vocoder = shifting.log_mel(librosa.effects.pitch_shift(y, sr=SR, n_steps=semitones)).mean()
    assert 2.0 < shifting.log_mel(y, shift(semitones)).mean() - vocoder < 5.0


@pytest.mark.parametrize("ours, seeds", [
    (augment.GaussianNoiseSNR, lambda n, rng: rng.standard_normal(n)),
    (augment.PinkNoiseSNR, lambda n, rng: colorednoise.powerlaw_psd_gaussian(1, n, random_state=rng)),
])
def test_fast_noise_has_the_seeds_level_and_colour(shifting, ours, seeds):
    """The float32 draws at an SNR give the mel levels of the seed's numpy / colorednoise noise, band by band."""
    y = tone(2000.0, seconds=10.0)
    rng = np.random.default_rng(0)
    theirs = seeds(len(y), rng)
    theirs = y + theirs / np.abs(theirs).max() * np.abs(y).max() / 10 ** (10 / 20)
    mine = ours(10.0, 10.0).apply(y, {"snr_db": 10.0, "noise_seed": 1})
    level = [shifting.log_mel(x.astype(np.float32)).mean(axis=1) for x in (theirs, mine)]
    assert abs(level[0].mean() - level[1].mean()) < 1.0
    assert np.median(np.abs(level[0] - level[1])) < 1.0


@pytest.mark.parametrize("mode", ["uniform", "fade", "cosine", "sine"])
def test_volume_per_frame_matches_volume_per_sample(mode):
    cfg = config.load(None)
    features = MelFeatures(cfg.features, SR)
    y = np.random.default_rng(3).normal(0, 0.05, 10 * SR).astype(np.float32)
    waveform = augment.VolumeControl(10.0, mode=mode).apply(y, {"gain_db": 9.0})
    louder = SpectralDraw(volume=((mode, 9.0),))
    difference = np.abs(features.log_mel(waveform) - features.log_mel(y, louder))
    assert difference.mean() < 0.02 and difference.max() < 0.5  # where the envelope is steepest, within a frame
    if mode == "uniform":
        assert features.log_mel(y, louder).mean() - features.log_mel(y).mean() == pytest.approx(9.0, abs=1e-3)


def test_a_shift_outside_the_prepared_filterbanks_is_refused(shifting):
    with pytest.raises(ValueError, match="6 semitones is outside the prepared ±5"):
        shifting.log_mel(tone(440.0, seconds=0.1), shift(6))


def test_a_time_shift_moves_whole_frames(shifting):
    """TimeShift acts on the waveform in both domains: a shift by k hops moves the image k frames."""
    y = np.random.default_rng(4).normal(0, 0.01, 5 * SR).astype(np.float32)
    y[2 * SR : 2 * SR + 480] += 0.8  # a 10 ms click at 2 s
    hop = shifting.cfg.hop_length
    shifted = augment.TimeShift(SR, 2.0).apply(y, {"shift_samples": 40 * hop, "shift_seconds": 0.0})
    before, after = shifting.log_mel(y), shifting.log_mel(shifted)
    np.testing.assert_allclose(after[:, 45:-5], before[:, 5:-45], atol=1e-3)
    assert int(np.argmax(after.max(axis=0))) - int(np.argmax(before.max(axis=0))) == 40


@pytest.mark.parametrize("overrides", [{}, {"features.band_median": True, "features.frames": 300}])
def test_tensorflow_ops_give_the_numpy_images(overrides):
    cfg = config.load(None, overrides)
    ours = MelFeatures(cfg.features, SR, max_semitones=5)
    theirs = TFMelFeatures(cfg.features, SR, max_semitones=5)
    rng = np.random.default_rng(5)
    audio = np.stack([tone(f, seconds=3.0) + rng.normal(0, 0.02, 3 * SR).astype(np.float32) for f in (700.0, 5000.0)])
    draws = [SpectralDraw(-4, (("sine", 7.5),), time_masks=((0.2, 0.1),), freq_masks=((0.5, 0.05), (0.1, 0.1))),
             SpectralDraw(5, (("sine", -3.0), ("fade", 2.0)))]
    expected = np.stack([ours(y, draw) for y, draw in zip(audio, draws)])
    semitones = np.array([d.semitones for d in draws])
    gains = np.stack([d.frame_gain_db(audio.shape[1], cfg.features.hop_length) for d in draws]).astype(np.float32)
    kept = [d.kept(cfg.features.n_mels, cfg.features.frames) for d in draws]
    made = theirs(audio, semitones, gains, np.stack([m for m, _ in kept]), np.stack([f for _, f in kept])).numpy()
    np.testing.assert_allclose(made, expected, atol=2e-3)
    assert (expected[0][:, round(0.2 * cfg.features.frames)] == 0).all()  # a masked frame, in both
    np.testing.assert_allclose(theirs(audio).numpy(), np.stack([ours(y) for y in audio]), atol=2e-3)


def test_the_front_end_layer_saves_and_gives_the_numpy_images(tmp_path):
    cfg = config.load(None, {"features.frames": 300})
    layer = MelFrontEnd(dataclasses.asdict(cfg.features), SR)
    audio = keras.Input((SR,), name="audio")
    keras.Model(audio, layer(audio)).save(tmp_path / "front.keras")
    reloaded = keras.models.load_model(tmp_path / "front.keras")
    y = tone(3000.0, seconds=1.0)[None]
    expected = MelFeatures(cfg.features, SR)(y[0])
    np.testing.assert_allclose(np.asarray(reloaded(y))[0, ..., 0], expected, atol=2e-3)
