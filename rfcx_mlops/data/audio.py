"""Windowed audio decoding: read only the frames a window needs, as float32 mono at the configured rate."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from rfcx_mlops.errors import UserError

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".flac", ".wav")
# Margin read on each side of a window that must be resampled, so the resampler's
# filter has real signal at the edges instead of zeros.
_RESAMPLE_MARGIN_S = 0.05


class AudioError(UserError):
    """A file that cannot be used as a recording; the message names the file."""


@dataclass(frozen=True)
class AudioInfo:
    path: Path
    sample_rate: int
    frames: int

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate


def probe(path: str | Path) -> AudioInfo:
    """Read a recording's header and its last frames; fail on anything a training run could not decode."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")
    try:
        info = sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(f"{path}: not a readable audio file ({_reason(exc)})") from None
    if info.frames <= 0:
        raise AudioError(f"{path}: holds no audio frames")
    result = AudioInfo(path, int(info.samplerate), int(info.frames))
    # A truncated FLAC keeps the full length in its header: decoding the tail is what reveals it.
    tail = min(result.frames, result.sample_rate // 10)
    _read_frames(result, result.frames - tail, result.frames)
    return result


def _reason(exc: Exception) -> str:
    """libsndfile's own words, without the file name it repeats ("Error opening '...': ")."""
    text = str(exc).strip().splitlines()
    return text[-1].rsplit("': ", 1)[-1] if text else type(exc).__name__


def _read_frames(info: AudioInfo, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) as float32 mono at the file's own rate; short reads are errors."""
    try:
        data, _ = sf.read(str(info.path), start=start, stop=stop, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioError(f"{info.path}: cannot decode frames {start}-{stop} ({_reason(exc)})") from None
    if data.shape[0] != stop - start:
        raise AudioError(
            f"{info.path}: truncated: the header promises {info.frames} frames "
            f"but decoding stopped at {start + data.shape[0]}"
        )
    # Mixing to mono by the mean keeps the level of a correlated stereo pair.
    return data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]


_warned_rates: set[Path] = set()


def resample(y: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    """``y`` (float32 mono at ``rate``) at ``sample_rate``, by soxr's high-quality filter."""
    return soxr.resample(y, rate, sample_rate, quality="HQ").astype(np.float32, copy=False)


def read_window(info: AudioInfo, start_s: float, seconds: float, sample_rate: int) -> np.ndarray:
    """``seconds`` of audio from ``start_s`` as float32 mono at ``sample_rate``.

    Only the needed frames are decoded.  A window reaching past the end of the
    recording (a recording shorter than the window) is padded with zeros at the end,
    so every window has exactly ``round(seconds * sample_rate)`` samples.
    """
    n_out = int(round(seconds * sample_rate))
    if info.sample_rate == sample_rate:
        start = max(0, int(round(start_s * sample_rate)))
        stop = min(info.frames, start + n_out)
        y = _read_frames(info, start, stop) if stop > start else np.zeros(0, np.float32)
    else:
        if info.path not in _warned_rates:
            _warned_rates.add(info.path)
            log.warning("%s: %d Hz, resampled to %d Hz", info.path, info.sample_rate, sample_rate)
        rate = info.sample_rate
        margin = int(round(_RESAMPLE_MARGIN_S * rate))
        start = max(0, int(round(start_s * rate)))
        lo, hi = max(0, start - margin), min(info.frames, start + int(np.ceil(seconds * rate)) + margin)
        raw = _read_frames(info, lo, hi) if hi > lo else np.zeros(0, np.float32)
        y = resample(raw, rate, sample_rate)
        skip = int(round((start - lo) * sample_rate / rate))
        y = y[skip : skip + n_out]
    if y.shape[0] < n_out:
        y = np.pad(y, (0, n_out - y.shape[0]))
    return y
