"""The mel path: shape, range, the right frequency in the right bin, and the resize."""

from __future__ import annotations

import librosa
import numpy as np
import pytest
from skimage.transform import resize

from rfcx_mlops import config
from rfcx_mlops.features import MelFeatures, resize_time


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
    quiet, loud = (seed_features.log_mel(seed_features.power(a * tone(3000.0))) for a in (0.01, 0.1))
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
