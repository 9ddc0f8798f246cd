"""The one mel-spectrogram path shared by training, validation and prediction."""

from __future__ import annotations

import librosa
import numpy as np

from rfcx_mlops.config import FeatureConfig


class MelFeatures:
    """Waveform -> float32 (n_mels, frames) log-mel image scaled to [0, 1].

    Power mel spectrogram, ``power_to_db`` (the seed applied ``amplitude_to_db`` to
    power, which halved its dynamic range), optionally each band's median level
    subtracted (what stands above the steady background), the time axis resized to
    ``frames`` by linear interpolation, then min-max scaling per sample.
    """

    def __init__(self, cfg: FeatureConfig, sample_rate: int):
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.mel_basis = librosa.filters.mel(
            sr=sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, dtype=np.float32
        )
        self.window = librosa.filters.get_window("hann", cfg.n_fft, fftbins=True).astype(np.float32)

    def power(self, y: np.ndarray) -> np.ndarray:
        """Power spectrogram (1 + n_fft/2, native frames), float32."""
        stft = librosa.stft(y, n_fft=self.cfg.n_fft, hop_length=self.cfg.hop_length, window=self.window,
                            center=True, pad_mode="constant")
        return (stft.real**2 + stft.imag**2).astype(np.float32, copy=False)

    def log_mel(self, power: np.ndarray) -> np.ndarray:
        """Mel power in dB (10 log10: it is power), at the native frame rate."""
        return 10.0 * np.log10(np.maximum(self.mel_basis @ power, 1e-10))

    def from_power(self, power: np.ndarray) -> np.ndarray:
        db = self.log_mel(power)
        if self.cfg.band_median:
            # Rain, insects and wind are steady within a window; calls are not.
            db = np.maximum(db - np.median(db, axis=1, keepdims=True), 0.0)
        db = resize_time(np.maximum(db, db.max() - self.cfg.top_db), self.cfg.frames)
        span = db.max() - db.min()
        return (db - db.min()) / span if span > 0 else np.zeros_like(db)

    def __call__(self, y: np.ndarray) -> np.ndarray:
        return self.from_power(self.power(y))


def resize_time(image: np.ndarray, frames: int) -> np.ndarray:
    """Linear interpolation along the last axis with pixel-centre alignment (skimage's ``resize``, order 1)."""
    n = image.shape[-1]
    if n == frames:
        return image.astype(np.float32, copy=False)
    pos = np.clip((np.arange(frames) + 0.5) * (n / frames) - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo).astype(np.float32)
    return (image[..., lo] * (1 - w) + image[..., hi] * w).astype(np.float32, copy=False)
