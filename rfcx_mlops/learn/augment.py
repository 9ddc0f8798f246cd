"""Waveform augmentations (the seed preset's, plus SpecAugment), deterministic and with checked arguments.

Every transform takes a mono float waveform ``y`` (1-D, float32 in the pipeline) and an
explicit ``numpy.random.Generator``; nothing here touches numpy's global RNG, so a sample's
augmentation is reproducible from the generator's seed alone, whatever else runs in the
process (data loader workers, Keras, other libraries).

A leaf transform splits the work the way audiomentations does: ``randomize_parameters``
draws every random value (noise is drawn as a seed, so the parameters stay a few scalars),
and ``apply`` is deterministic given those values.  ``transform(y, rng)`` returns
``(output, params)``; ``params`` is the small dict of drawn values, printed on plots of
augmented samples, and empty when the transform was skipped.  ``transform.apply(y, params)``
reproduces the output.

Pitch shift and volume can act on the spectrogram instead (``domain="spectrogram"``): they
then leave the waveform alone and hand the features a ``SpectralDraw``, the typed part of
the draw that ``features.MelFeatures`` applies to the mel power.  ``transform.draw(y, rng)``
returns all three, ``Drawn(y, params, spectral)``; calling a pipeline with spectrogram-domain
stages as ``(y, params)`` is refused, so a draw is never silently dropped.

Outputs have ``y``'s dtype and length.  The input is never modified in place; a transform
that changes nothing may return ``y`` itself.

``PitchShift`` draws whole semitones from -max_semitones to +max_semitones inclusive,
``TimeShift(padding="zero")`` with a shift of 0 leaves the window whole, and
``VolumeControl(mode="fade")`` accepts a one-sample window.
"""

from __future__ import annotations

import functools
import math
from numbers import Integral, Real
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Sequence

import librosa
import numpy as np
import scipy.fft
import scipy.special

from rfcx_mlops.config import AUGMENT_DOMAINS, SHIFT_PADDINGS, VOLUME_MODES, AugmentConfig

Params = dict[str, Any]

_SEED_BOUND = 2**63  # seeds drawn for noise and for Compose's stages


# -- argument checks: each names the argument, so a bad config value is easy to trace --------


def _real(name: str, value: Any, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number; got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return float(value)


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value!r}")
    return int(value)


def _probability(p: Any) -> float:
    p = _real("p", p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be within [0, 1]; got {p!r}")
    return p


def _choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _peak(y: np.ndarray) -> float:
    return float(np.max(np.abs(y))) if y.size else 0.0


# -- what a draw hands on ----------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralDraw:
    """The spectrogram-domain part of a sample's draw: what the features apply to its mel power.

    ``semitones``: the pitch shift; ``volume``: one ``(envelope mode, gain_db)`` per volume
    change, their gains in dB adding up; ``time_masks`` and ``freq_masks``: SpecAugment's
    bands of the image set to its floor, each ``(start, width)`` as shares of the frames or mel
    bands.  ``SpectralDraw()`` changes nothing.
    """

    semitones: int = 0
    volume: tuple[tuple[str, float], ...] = ()
    time_masks: tuple[tuple[float, float], ...] = ()
    freq_masks: tuple[tuple[float, float], ...] = ()

    def __add__(self, other: SpectralDraw) -> SpectralDraw:
        return SpectralDraw(self.semitones + other.semitones, self.volume + other.volume,
                            self.time_masks + other.time_masks, self.freq_masks + other.freq_masks)

    def kept(self, n_mels: int, frames: int) -> tuple[np.ndarray, np.ndarray]:
        """float32 (n_mels,) and (frames,) vectors, 0 inside a mask and 1 elsewhere: the image is multiplied by both."""
        return _kept(self.freq_masks, n_mels), _kept(self.time_masks, frames)

    def gain_db(self, t: np.ndarray, n: int) -> np.ndarray:
        """The gain in dB at samples ``t`` of an ``n``-sample window."""
        total = np.zeros(len(t))
        for mode, gain_db in self.volume:
            total += gain_db * envelope(mode, t, n)
        return total

    def frame_gain_db(self, n: int, hop: int) -> np.ndarray:
        """The gain in dB of each centred STFT frame of an ``n``-sample window: the gain at the frame's centre.

        A volume envelope changes slowly against a frame (43 ms), so scaling each frame's
        power by its gain is what the waveform path does, to a fraction of a dB.
        """
        return self.gain_db(np.arange(1 + n // hop) * hop, n)


def _kept(masks: tuple[tuple[float, float], ...], n: int) -> np.ndarray:
    keep = np.ones(n, np.float32)
    for start, width in masks:
        keep[round(start * n) : round((start + width) * n)] = 0.0
    return keep


class Drawn(NamedTuple):
    """A stage's result: the waveform, the drawn values (for plots) and the spectrogram-domain draw."""

    y: np.ndarray
    params: Params
    spectral: SpectralDraw = SpectralDraw()


class Stage(Protocol):
    """A transform, OneOf or Compose."""

    name: str
    spectral: bool  # whether it may hand on a spectrogram-domain draw

    def draw(self, y: np.ndarray, rng: np.random.Generator) -> Drawn: ...


def _waveform_only(stage: Stage, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Params]:
    """``stage``'s ``(output, params)``, refused where part of its draw would be for the spectrogram."""
    if stage.spectral:
        raise ValueError(f"{stage!r} acts on the spectrogram: call its draw() and pass the SpectralDraw to the features")
    y, params, _ = stage.draw(y, rng)
    return y, params


# -- the base class ----------------------------------------------------------------------------


class Transform:
    """A random waveform transform applied with probability ``p``.

    ``draw`` always draws its coin (``rng.random() < p``), also for p = 0 or 1, so p's
    value never changes which numbers the parameters are drawn from; the parameters are
    drawn only when the transform applies.  A transform with ``spectral`` set hands its
    draw on as a ``SpectralDraw`` (``to_spectral``) instead of applying it.
    """

    name = "transform"  # the key prefix / OneOf label that identifies it in params
    spectral = False

    def __init__(self, p: float = 1.0) -> None:
        self.p = _probability(p)

    def randomize_parameters(self, y: np.ndarray, rng: np.random.Generator) -> Params:
        raise NotImplementedError

    def apply(self, y: np.ndarray, params: Params) -> np.ndarray:
        raise NotImplementedError

    def to_spectral(self, params: Params) -> SpectralDraw:
        raise NotImplementedError

    def draw(self, y: np.ndarray, rng: np.random.Generator) -> Drawn:
        y = np.asarray(y)
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.floating):
            raise ValueError(f"expected a 1-D float waveform; got shape {y.shape}, dtype {y.dtype}")
        if rng.random() >= self.p:
            return Drawn(y, {})
        params = self.randomize_parameters(y, rng)
        if self.spectral:
            return Drawn(y, params, self.to_spectral(params))
        return Drawn(self.apply(y, params), params)

    def __call__(self, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Params]:
        return _waveform_only(self, y, rng)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


# -- noise -------------------------------------------------------------------------------------


class _NoiseSNR(Transform):
    """Adds noise at an SNR drawn uniformly from [min_snr_db, max_snr_db] (dB).

    As in the seed preset, the SNR is a ratio of peak amplitudes over the window,
    ``20*log10(peak(y) / peak(noise))``, not of powers: rainforest calls are short and loud,
    so a power ratio would bury them under noise scaled to the window's mostly quiet average.
    Negative SNRs (noise louder than the signal) are allowed.  A silent window stays silent,
    and so does one shorter than two samples (pink noise needs two).
    """

    def __init__(self, min_snr_db: float = 5.0, max_snr_db: float = 20.0, p: float = 1.0) -> None:
        super().__init__(p)
        self.min_snr_db = _real("min_snr_db", min_snr_db)
        self.max_snr_db = _real("max_snr_db", max_snr_db)
        if self.min_snr_db > self.max_snr_db:
            raise ValueError(f"min_snr_db ({min_snr_db}) must not exceed max_snr_db ({max_snr_db})")

    def randomize_parameters(self, y: np.ndarray, rng: np.random.Generator) -> Params:
        return {
            "snr_db": float(rng.uniform(self.min_snr_db, self.max_snr_db)),
            "noise_seed": int(rng.integers(_SEED_BOUND)),
        }

    def apply(self, y: np.ndarray, params: Params) -> np.ndarray:
        peak = _peak(y)
        if peak == 0.0 or y.size < 2:  # nothing to measure the SNR against / no spectrum
            return y
        noise = self._noise(y.size, np.random.default_rng(params["noise_seed"])).astype(y.dtype, copy=False)
        noise *= peak / 10 ** (params["snr_db"] / 20) / _peak(noise)
        noise += y
        return noise

    def _noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


class GaussianNoiseSNR(_NoiseSNR):
    """White Gaussian noise at a peak SNR in [min_snr_db, max_snr_db] dB."""

    name = "gaussian"

    def _noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return standard_normal(rng, n)


class PinkNoiseSNR(_NoiseSNR):
    """Pink (1/f power) noise at a peak SNR in [min_snr_db, max_snr_db] dB.

    Pink noise has equal power per octave, closer to the rain, wind and insect background of
    the recordings than white noise, whose power sits mostly in the highest octave.
    """

    name = "pink"

    def _noise(self, n: int, rng: np.random.Generator) -> np.ndarray:
        # colorednoise.powerlaw_psd_gaussian(1, n)'s construction (Timmer & Koenig: Gaussian spectrum
        # scaled by f^-1/2), in float32 and with the scale cached: a quarter of its time.
        scale = _pink_scale(n)
        spectrum = standard_normal(rng, 2 * len(scale)).view(np.complex64)  # (re, im) pairs
        spectrum *= scale
        return scipy.fft.irfft(spectrum, n)


def standard_normal(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` float32 draws from N(0, 1): one of 2^16 equally likely bins, then a point in it.

    Inside, a bin stands for its median (a step of 0.0004 sd near 0, 0.1 sd at 4 sd);
    the two outer bins draw exactly from the tails beyond +-4.3 sd, where the peak of a
    window of noise lies (what the SNR is set against).  Three times as fast as numpy's
    ziggurat here, and noise is the costliest augmentation where pitch and volume act on the
    spectrogram.
    """
    bins = rng.integers(0, _NORMAL_BINS, n, dtype=np.uint16)
    z = _normal_quantiles()[bins]
    tails = np.flatnonzero((bins == 0) | (bins == _NORMAL_BINS - 1))
    if tails.size:
        z_tail = scipy.special.ndtri(rng.random(tails.size) / _NORMAL_BINS).astype(np.float32)
        z[tails] = np.where(bins[tails] == 0, z_tail, -z_tail)
    return z


_NORMAL_BINS = 2**16


@functools.cache
def _normal_quantiles() -> np.ndarray:
    return scipy.special.ndtri((np.arange(_NORMAL_BINS) + 0.5) / _NORMAL_BINS).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _pink_scale(n: int) -> np.ndarray:
    f = np.fft.rfftfreq(n)
    scale = np.zeros(len(f), np.float32)
    scale[1:] = f[1:] ** -0.5  # no DC: the noise has zero mean
    if n % 2 == 0:
        scale[-1] *= np.sqrt(2)  # the Nyquist bin is real: its power comes from one component
    return scale


# -- pitch, time, volume -----------------------------------------------------------------------


class PitchShift(Transform):
    """Shifts the pitch by a whole number of semitones drawn from [-max_semitones, +max_semitones].

    Duration is kept (phase vocoder + resampling, ``librosa.effects.pitch_shift``); ``sr`` is
    the waveform's sample rate in Hz.  A species' call moves in frequency between individuals
    and recorders, which is what this imitates.  With ``domain="spectrogram"`` the shift is
    handed on (``SpectralDraw.semitones``) and ``MelFeatures`` applies it, at no cost.
    """

    name = "pitch_shift"

    def __init__(self, sr: int, max_semitones: int = 5, p: float = 1.0, domain: str = "waveform") -> None:
        super().__init__(p)
        self.sr = _integer("sr", sr, 1)
        self.max_semitones = _integer("max_semitones", max_semitones, 0)
        self.domain = _choice("domain", domain, AUGMENT_DOMAINS)
        self.spectral = self.domain == "spectrogram"

    def randomize_parameters(self, y: np.ndarray, rng: np.random.Generator) -> Params:
        n = int(rng.integers(-self.max_semitones, self.max_semitones, endpoint=True))
        return {"semitones": n}

    def apply(self, y: np.ndarray, params: Params) -> np.ndarray:
        if params["semitones"] == 0:  # the phase vocoder costs 0.2 s a window
            return y
        shifted = librosa.effects.pitch_shift(y, sr=self.sr, n_steps=params["semitones"])
        return shifted.astype(y.dtype)

    def to_spectral(self, params: Params) -> SpectralDraw:
        return SpectralDraw(semitones=params["semitones"])


class TimeShift(Transform):
    """Rolls the window by a whole number of samples drawn from ±max_shift_seconds * sr.

    ``padding="replace"`` wraps what leaves one end around to the other (the window stays
    full of real audio); ``"zero"`` silences the wrapped part instead, as if the recording
    had started or ended there.  ``sr`` is the sample rate in Hz.
    """

    name = "time_shift"

    def __init__(
        self, sr: int, max_shift_seconds: float = 4.0, padding: str = "replace", p: float = 1.0
    ) -> None:
        super().__init__(p)
        self.sr = _integer("sr", sr, 1)
        self.max_shift_seconds = _real("max_shift_seconds", max_shift_seconds, 0.0)
        self.padding = _choice("padding", padding, SHIFT_PADDINGS)

    def randomize_parameters(self, y: np.ndarray, rng: np.random.Generator) -> Params:
        limit = round(self.max_shift_seconds * self.sr)
        shift = int(rng.integers(-limit, limit, endpoint=True))
        return {"shift_samples": shift, "shift_seconds": round(shift / self.sr, 3)}

    def apply(self, y: np.ndarray, params: Params) -> np.ndarray:
        shift = params["shift_samples"]
        shifted = np.roll(y, shift)
        if self.padding == "zero":
            # a shift of 0 wraps nothing, so nothing is zeroed (`[0:] = 0` would zero the whole window)
            if shift > 0:
                shifted[:shift] = 0
            elif shift < 0:
                shifted[shift:] = 0
        return shifted


def envelope(mode: str, t: np.ndarray, n: int) -> np.ndarray:
    """VolumeControl's multiplier of gain_db at samples ``t`` of an ``n``-sample window."""
    if mode == "uniform":
        return np.ones(len(t))
    if mode == "fade":
        return 1.0 - t / max(n - 1, 1)  # arange(n)[::-1]/(n-1), also defined for n = 1
    phase = 2 * np.pi * t / n
    if mode == "cosine":
        return np.cos(phase)
    if mode == "sine":
        return np.sin(phase)
    raise ValueError(f"mode must be one of {', '.join(VOLUME_MODES)}; got {mode!r}")


class VolumeControl(Transform):
    """Scales the window by a gain of ``gain_db`` dB, drawn from [-max_db, +max_db], times an envelope.

    The gain in dB at sample t of n is ``gain_db * env(t)``, with env = 1 (``"uniform"``),
    a line from 1 down to 0 (``"fade"``), ``cos(2*pi*t/n)`` (``"cosine"``) or
    ``sin(2*pi*t/n)`` (``"sine"``): the seed preset's envelopes, imitating a caller moving relative
    to the recorder.  With ``domain="spectrogram"`` the gain is handed on
    (``SpectralDraw.volume``) and ``MelFeatures`` scales each STFT frame by it.
    """

    name = "volume"

    def __init__(self, max_db: float = 10.0, mode: str = "uniform", p: float = 1.0, domain: str = "waveform") -> None:
        super().__init__(p)
        self.max_db = _real("max_db", max_db, 0.0)
        self.mode = _choice("mode", mode, VOLUME_MODES)
        self.domain = _choice("domain", domain, AUGMENT_DOMAINS)
        self.spectral = self.domain == "spectrogram"

    def randomize_parameters(self, y: np.ndarray, rng: np.random.Generator) -> Params:
        return {"gain_db": float(rng.uniform(-self.max_db, self.max_db))}

    def envelope(self, n: int) -> np.ndarray:
        """The per-sample multiplier of gain_db, in [-1, 1]."""
        return envelope(self.mode, np.arange(n), n)

    def apply(self, y: np.ndarray, params: Params) -> np.ndarray:
        gain = 10 ** (params["gain_db"] * self.envelope(y.size) / 20)
        return (y * gain).astype(y.dtype)

    def to_spectral(self, params: Params) -> SpectralDraw:
        return SpectralDraw(volume=((self.mode, params["gain_db"]),))


# -- SpecAugment -------------------------------------------------------------------------------


class _Masks(Transform):
    """SpecAugment (Park et al. 2019): ``n_masks`` bands of the image, each up to ``max_width`` of its axis wide,
    set to the image's floor.  It exists only on the spectrogram: the draw is handed on."""

    spectral = True

    def __init__(self, n_masks: int = 2, max_width: float = 0.1, p: float = 1.0) -> None:
        super().__init__(p)
        self.n_masks = _integer("n_masks", n_masks, 0)
        self.max_width = _real("max_width", max_width, 0.0)
        if self.max_width > 1.0:
            raise ValueError(f"max_width must be within [0, 1]; got {max_width!r}")

    def randomize_parameters(self, y: np.ndarray, rng: np.random.Generator) -> Params:
        widths = rng.uniform(0.0, self.max_width, self.n_masks)
        starts = rng.uniform(0.0, 1.0, self.n_masks) * (1.0 - widths)
        return {self.name: tuple((round(float(s), 4), round(float(w), 4)) for s, w in zip(starts, widths))}


class TimeMask(_Masks):
    """Silences ``n_masks`` stretches of time (each up to ``max_width`` of the window)."""

    name = "time_masks"

    def to_spectral(self, params: Params) -> SpectralDraw:
        return SpectralDraw(time_masks=params[self.name])


class FrequencyMask(_Masks):
    """Silences ``n_masks`` bands of mel bins (each up to ``max_width`` of them)."""

    name = "freq_masks"

    def to_spectral(self, params: Params) -> SpectralDraw:
        return SpectralDraw(freq_masks=params[self.name])


# -- combinators -------------------------------------------------------------------------------


class OneOf:
    """With probability ``p``, applies one of ``transforms``, chosen uniformly.

    Its params are the chosen transform's, plus ``{label: chosen.name}`` saying which
    (``{"noise": "pink", "snr_db": 12.3, ...}`` in the seed preset's pipeline); empty when skipped,
    or when the chosen transform skipped itself.  The coin is always drawn, the choice only
    when it applies.
    """

    name = "one_of"

    def __init__(self, transforms: Sequence[Stage], p: float = 1.0, label: str = "choice") -> None:
        self.transforms = list(transforms)
        if not self.transforms or not all(hasattr(t, "draw") for t in self.transforms):
            raise ValueError(f"transforms must be a non-empty list of transforms; got {transforms!r}")
        self.p = _probability(p)
        self.label = label
        self.spectral = any(t.spectral for t in self.transforms)

    def draw(self, y: np.ndarray, rng: np.random.Generator) -> Drawn:
        if rng.random() >= self.p:
            return Drawn(y, {})
        chosen = self.transforms[int(rng.integers(len(self.transforms)))]
        out, params, spectral = chosen.draw(y, rng)
        if not params:
            return Drawn(out, {})
        return Drawn(out, {self.label: chosen.name, **params}, spectral)

    def __call__(self, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Params]:
        return _waveform_only(self, y, rng)

    def __repr__(self) -> str:
        return f"OneOf({self.transforms!r}, p={self.p!r}, label={self.label!r})"


class Compose:
    """Applies ``transforms`` in order; ``Compose([])`` is the identity.

    Each stage runs on its own Generator, seeded by one draw from ``rng`` (all drawn up
    front), so whether a stage applies, or which child a OneOf picks, never shifts the numbers
    the later stages draw: tuning ``noise_p`` leaves the pitch shifts of every sample as they
    were.  The stages' params are merged into one flat dict; a key that an earlier stage
    already used gets a suffix (``snr_db#2``).  Their spectrogram-domain draws add up.
    """

    name = "compose"

    def __init__(self, transforms: Sequence[Stage]) -> None:
        self.transforms = list(transforms)
        if not all(hasattr(t, "draw") for t in self.transforms):
            raise ValueError(f"transforms must be a list of transforms; got {transforms!r}")
        self.spectral = any(t.spectral for t in self.transforms)

    def seeded(self, rng: np.random.Generator) -> list[tuple[Stage, np.random.Generator]]:
        """Each stage with its own Generator, seeded by one draw from ``rng`` (all drawn up front)."""
        if not self.transforms:  # the identity draws nothing
            return []
        seeds = rng.integers(_SEED_BOUND, size=len(self.transforms))
        return [(transform, np.random.default_rng(seed)) for transform, seed in zip(self.transforms, seeds)]

    def draw(self, y: np.ndarray, rng: np.random.Generator) -> Drawn:
        merged: Params = {}
        spectral = SpectralDraw()
        for transform, stage_rng in self.seeded(rng):
            y, params, stage_spectral = transform.draw(y, stage_rng)
            spectral += stage_spectral
            for key, value in params.items():
                unique, n = key, 1
                while unique in merged:
                    n += 1
                    unique = f"{key}#{n}"
                merged[unique] = value
        return Drawn(y, merged, spectral)

    def __call__(self, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, Params]:
        return _waveform_only(self, y, rng)

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


def from_config(cfg: AugmentConfig, sr: int) -> Compose:
    """The seed preset's pipeline, set by ``cfg``: noise (Gaussian or pink), pitch shift, time shift, volume;
    then SpecAugment's time and frequency masks where their p > 0.

    ``sr`` is the waveform's sample rate in Hz.  ``cfg.enabled = False`` gives the identity.
    With ``cfg.domain = "spectrogram"`` the pitch shift and volume are drawn here and handed
    to the features as the draw's ``SpectralDraw``, as the masks always are.  Stages are only
    ever appended, so that a new one leaves the draws of the others as they were.
    """
    if not cfg.enabled:
        return Compose([])
    snr = {"min_snr_db": cfg.min_snr, "max_snr_db": cfg.max_snr}
    masks = [mask(n_masks, width, p=p) for mask, n_masks, width, p in (
        (TimeMask, cfg.time_masks, cfg.max_time_mask, cfg.time_mask_p),
        (FrequencyMask, cfg.freq_masks, cfg.max_freq_mask, cfg.freq_mask_p)) if p > 0]
    return Compose([
        OneOf([GaussianNoiseSNR(**snr), PinkNoiseSNR(**snr)], p=cfg.noise_p, label="noise"),
        PitchShift(sr, max_semitones=cfg.max_semitones, p=cfg.pitch_p, domain=cfg.domain),
        TimeShift(
            sr, max_shift_seconds=cfg.max_shift_seconds, padding=cfg.shift_padding, p=cfg.time_shift_p
        ),
        VolumeControl(max_db=cfg.max_volume_db, mode=cfg.volume_mode, p=cfg.volume_p, domain=cfg.domain),
        *masks,
    ])
