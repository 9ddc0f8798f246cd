"""The one mel-spectrogram path shared by training, validation and prediction.

Pitch shift and volume can be applied here, on the spectrogram, instead of on the
waveform (``augment.domain: spectrogram``): a pitch shift by n semitones moves the
energy at frequency f to f * 2^(n/12), which a mel filter centred at c picks up where
the unshifted filter would have seen c * 2^(-n/12), so a shifted sample's mel image
is the clean power spectrum through a filterbank warped by 2^(n/12) (one per
semitone, built once); a volume envelope that changes slowly against one STFT frame
(43 ms) scales each frame's power by its gain squared.  Both are free next to the
phase vocoder the waveform path runs.  What to apply comes from the augmentation as an
``augment.SpectralDraw``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable, NamedTuple

import keras
import librosa
import numpy as np
import scipy.fft
import scipy.sparse
from numpy.lib.stride_tricks import sliding_window_view

from rfcx_mlops.config import Config, FeatureConfig

if TYPE_CHECKING:
    from rfcx_mlops.learn.augment import SpectralDraw

_BLOCK_FRAMES = 128  # 1 MB of float32 frames at n_fft 2048


def mel_filterbank(sample_rate: int, cfg: FeatureConfig, ratio: float = 1.0) -> np.ndarray:
    """(n_mels, 1 + n_fft/2) float32 Slaney mel filters, responding at f as librosa's do at ``ratio`` * f.

    ``ratio`` = 1 is ``librosa.filters.mel``; ``ratio`` = 2^(n/12) reads a spectrum as if
    pitch-shifted by n semitones.
    """
    freqs = librosa.fft_frequencies(sr=sample_rate, n_fft=cfg.n_fft) * ratio
    edges = librosa.mel_frequencies(cfg.n_mels + 2, fmin=cfg.fmin, fmax=cfg.fmax)
    ramps = edges[:, None] - freqs[None, :]
    width = np.diff(edges)
    lower = -ramps[:-2] / width[:-1, None]
    upper = ramps[2:] / width[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return weights.astype(np.float32)


class MelFeatures:
    """Waveform -> float32 (n_mels, frames) log-mel image scaled to [0, 1].

    Power mel spectrogram, ``power_to_db`` (10 log10 for a power: ``amplitude_to_db``'s
    20 log10 would double every level and leave top_db half the dynamic range), optionally
    each band's median level subtracted (what stands above the steady background), the time
    axis resized to ``frames`` by linear interpolation, then min-max scaling per sample.

    ``max_semitones`` > 0 prepares the warped filterbanks for pitch shifts in
    [-max_semitones, max_semitones].
    """

    def __init__(self, cfg: FeatureConfig, sample_rate: int, max_semitones: int = 0):
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.window = librosa.filters.get_window("hann", cfg.n_fft, fftbins=True).astype(np.float32)
        banks = {n: mel_filterbank(sample_rate, cfg, 2 ** (n / 12)) for n in range(-max_semitones, max_semitones + 1)}
        # Only the bins some filter reads are squared and summed; the filters are sparse (two per bin at most).
        self.n_bins = 1 + max(int(np.nonzero(b.any(axis=0))[0].max()) for b in banks.values())
        self.banks = {n: scipy.sparse.csr_array(b[:, : self.n_bins]) for n, b in banks.items()}

    def mel_power(self, y: np.ndarray, semitones: int = 0) -> np.ndarray:
        """(n_mels, native frames) float32: the power of ``librosa.stft(y)`` (centred) through the filterbank.

        Frames go through in blocks that stay in the CPU's cache: the whole STFT of a 10 s
        window is 8 MB, and writing it out and reading it back cost more than the FFT.
        """
        n_fft, hop = self.cfg.n_fft, self.cfg.hop_length
        padded = np.pad(np.asarray(y, dtype=np.float32), n_fft // 2)
        frames = sliding_window_view(padded, n_fft)[::hop]
        bank = self.bank(semitones)
        mel = np.empty((self.cfg.n_mels, len(frames)), np.float32)
        for start in range(0, len(frames), _BLOCK_FRAMES):
            spectrum = scipy.fft.rfft(frames[start : start + _BLOCK_FRAMES] * self.window, axis=-1)[:, : self.n_bins]
            mel[:, start : start + _BLOCK_FRAMES] = bank @ (spectrum.real**2 + spectrum.imag**2).T
        return mel

    def bank(self, semitones: int) -> scipy.sparse.csr_array:
        if semitones not in self.banks:
            raise ValueError(f"a pitch shift of {semitones} semitones is outside the prepared "
                             f"±{max(self.banks)}: make the features with a larger max_semitones")
        return self.banks[semitones]

    def log_mel(self, y: np.ndarray, draw: SpectralDraw | None = None) -> np.ndarray:
        """Mel power in dB (10 log10: it is power) at the native frame rate, pitch-shifted and scaled as drawn."""
        mel = self.mel_power(y, draw.semitones if draw else 0)
        if draw and draw.volume:
            mel *= (10.0 ** (draw.frame_gain_db(len(y), self.cfg.hop_length) / 10)).astype(np.float32)
        return 10.0 * np.log10(np.maximum(mel, 1e-10))

    def from_log_mel(self, db: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """The image: median-subtracted as configured, floored at top_db, resized, scaled to [0, 1] into ``out``."""
        if self.cfg.band_median:
            # Rain, insects and wind are steady within a window; calls are not.
            db = np.maximum(db - np.median(db, axis=1, keepdims=True), 0.0)
        db = resize_time(np.maximum(db, db.max() - self.cfg.top_db), self.cfg.frames)
        low, span = db.min(), db.max() - db.min()
        out = np.empty_like(db) if out is None else out
        if span > 0:
            np.divide(np.subtract(db, low, out=out), span, out=out)
        else:
            out[...] = 0.0
        return out

    def __call__(self, y: np.ndarray, draw: SpectralDraw | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """``y``'s image, written into ``out`` when given (a batch's slot: no copy), masked as drawn."""
        image = self.from_log_mel(self.log_mel(y, draw), out)
        if draw and (draw.time_masks or draw.freq_masks):
            mel_kept, frames_kept = draw.kept(*image.shape)
            image *= mel_kept[:, None]
            image *= frames_kept
        return image


def resize_time(image: np.ndarray, frames: int) -> np.ndarray:
    """Linear interpolation along the last axis with pixel-centre alignment (skimage's ``resize``, order 1)."""
    if image.shape[-1] == frames:
        return image.astype(np.float32, copy=False)
    lo, hi, w = _resize_weights(image.shape[-1], frames)
    return (image[..., lo] * (1 - w) + image[..., hi] * w).astype(np.float32, copy=False)


def _resize_weights(n: int, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = np.clip((np.arange(frames) + 0.5) * (n / frames) - 0.5, 0, n - 1)
    lo = np.floor(pos).astype(np.int32)
    return lo, np.minimum(lo + 1, n - 1), (pos - lo).astype(np.float32)


class TFMelFeatures:
    """``MelFeatures`` for a batch, as TensorFlow ops: they run on the GPU when there is one.

    ``(batch, samples)`` float32 waveforms -> ``(batch, n_mels, frames)`` images, the same as
    ``MelFeatures`` gives one by one (tested on the CPU to 1e-3).  For training, each sample's
    spectrogram-domain draw comes as ``semitones`` (batch,), ``gain_db`` (batch, STFT frames:
    ``SpectralDraw.frame_gain_db``) and the masks' ``kept`` vectors (batch, n_mels), (batch, frames).  The waveform work left to the data workers (cached
    window, noise, time shift) is then a few ms a sample.
    """

    def __init__(self, cfg: FeatureConfig, sample_rate: int, max_semitones: int = 0):
        import tensorflow as tf

        self.tf = tf
        self.cfg = cfg
        self.max_semitones = max_semitones
        reference = MelFeatures(cfg, sample_rate, max_semitones)
        self.n_bins = reference.n_bins
        self.window = tf.constant(reference.window)
        self.banks = tf.constant(np.stack([reference.banks[n].toarray().T for n in sorted(reference.banks)]))

    def __call__(self, audio, semitones=None, gain_db=None, mel_kept=None, frames_kept=None):
        tf, cfg = self.tf, self.cfg
        audio = tf.convert_to_tensor(audio, tf.float32)
        padded = tf.pad(audio, [[0, 0], [cfg.n_fft // 2, cfg.n_fft // 2]])
        frames = tf.signal.frame(padded, cfg.n_fft, cfg.hop_length)  # (batch, frames, n_fft)
        spectrum = tf.signal.rfft(frames * self.window)[..., : self.n_bins]
        power = tf.math.square(tf.math.real(spectrum)) + tf.math.square(tf.math.imag(spectrum))
        if semitones is None:
            mel = tf.linalg.matmul(power, self.banks[self.max_semitones])
        else:
            mel = tf.linalg.matmul(power, tf.gather(self.banks, tf.cast(semitones, tf.int32) + self.max_semitones))
        mel = tf.transpose(mel, [0, 2, 1])  # (batch, n_mels, frames)
        if gain_db is not None:
            mel *= tf.pow(10.0, tf.cast(gain_db, tf.float32)[:, None, :] / 10.0)
        db = 10.0 * tf.math.log(tf.maximum(mel, 1e-10)) / np.log(10.0)
        if cfg.band_median:
            db = tf.maximum(db - _median_last_axis(tf, db), 0.0)
        db = tf.maximum(db, tf.reduce_max(db, axis=[1, 2], keepdims=True) - cfg.top_db)
        if db.shape[-1] != cfg.frames:
            lo, hi, w = _resize_weights(int(db.shape[-1]), cfg.frames)
            db = tf.gather(db, lo, axis=-1) * (1 - w) + tf.gather(db, hi, axis=-1) * w
        low = tf.reduce_min(db, axis=[1, 2], keepdims=True)
        span = tf.reduce_max(db, axis=[1, 2], keepdims=True) - low
        image = tf.where(span > 0, (db - low) / tf.where(span > 0, span, 1.0), 0.0)
        if mel_kept is not None:
            image *= tf.cast(mel_kept, tf.float32)[:, :, None] * tf.cast(frames_kept, tf.float32)[:, None, :]
        return image


@keras.saving.register_keras_serializable(package="rfcx_mlops")
class MelFrontEnd(keras.layers.Layer):
    """TFMelFeatures as the model's first layer (``features.backend: tensorflow``).

    Takes ``(batch, samples)`` audio and gives ``(batch, n_mels, frames, 1)`` images, always
    in float32.  It knows nothing of augmentation: ``model.Training`` adds that for training.
    """

    def __init__(self, features: dict, sample_rate: int, **kwargs):
        super().__init__(**{"dtype": "float32", **kwargs})
        self.settings = {"features": features, "sample_rate": sample_rate}
        self.mel = TFMelFeatures(FeatureConfig(**features), sample_rate)

    def call(self, audio):
        return self.mel(audio)[..., None]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.mel.cfg.n_mels, self.mel.cfg.frames, 1)

    def get_config(self):
        return {**super().get_config(), **self.settings}


class AugmentedAudio(NamedTuple):
    """A training batch for ``ImagesInModel`` with augmentation: the windows after the waveform-domain
    augmentations, and each one's spectrogram-domain draw, which ``TFMelFeatures`` applies as it makes the
    images.  Keras is given it as a dict of these fields."""

    audio: np.ndarray  # (batch, samples) float32
    semitones: np.ndarray  # (batch,) int32
    gain_db: np.ndarray  # (batch, STFT frames) float32
    mel_kept: np.ndarray  # (batch, n_mels) float32
    frames_kept: np.ndarray  # (batch, frames) float32


class ImagesByWorkers:
    """``features.backend: numpy``: the data workers make the images; the model takes (n_mels, frames, 1) images."""

    in_model = False

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.mel = MelFeatures(cfg.features, cfg.data.sample_rate)

    @property
    def window_bytes(self) -> int:
        """A window's model input in float32."""
        return 4 * self.cfg.features.n_mels * self.cfg.features.frames

    def model_inputs(self, windows: np.ndarray) -> np.ndarray:
        """The model input of (n, samples) windows of audio."""
        return np.stack([self.mel(w) for w in windows])[..., None]

    def model(self, classifier: Callable[[str], keras.Model]) -> keras.Model:
        """The model around ``classifier(name)``, which takes images."""
        return classifier("resnet50_rfcx")


class ImagesInModel(ImagesByWorkers):
    """``features.backend: tensorflow``: the model's first layer (``MelFrontEnd``) makes the images, where the
    model runs (a GPU); the model takes windows of audio, and the data workers send them."""

    in_model = True

    @property
    def window_bytes(self) -> int:
        return 4 * self.cfg.data.window_samples

    def model_inputs(self, windows: np.ndarray) -> np.ndarray:
        return windows

    def model(self, classifier: Callable[[str], keras.Model]) -> keras.Model:
        audio = keras.Input((self.cfg.data.window_samples,), name="audio")
        images = MelFrontEnd(dataclasses.asdict(self.cfg.features), self.cfg.data.sample_rate, name="mel")(audio)
        return keras.Model(audio, classifier("classifier")(images), name="resnet50_rfcx")


def front_end(cfg: Config) -> ImagesByWorkers:
    """Where a window of audio becomes the model's image: the one place ``features.backend`` is read."""
    return ImagesInModel(cfg) if cfg.features.backend == "tensorflow" else ImagesByWorkers(cfg)


def _median_last_axis(tf, x):
    """numpy's median along the last axis (the mean of the two middle values for an even count), kept as an axis."""
    ordered = tf.sort(x, axis=-1)
    n = int(x.shape[-1])
    middle = (ordered[..., (n - 1) // 2] + ordered[..., n // 2]) / 2
    return middle[..., None]
