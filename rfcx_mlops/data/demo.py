"""Deterministic RFCX-format demo data set: synthetic rainforest recordings, weakly labelled like the real data.

`build(out_dir)` (the command line: `python -m rfcx_mlops.synth OUT_DIR`) writes the Kaggle layout::

    train_tp.csv            recording_id,species_id,songtype_id,t_min,f_min,t_max,f_max: SOME of the train calls
    train_fp.csv            same columns: distractor sounds in a species' box, that species absent
    train/<id>.flac         60 s, 48 kHz, mono, 16-bit
    test/<id>.flac
    test_labels.csv         recording_id,s0..s23 (0/1): every species calling in each test recording
    test_calls.csv          recording_id,species_id,t_min,f_min,t_max,f_max: every call of the test recordings
    train_calls.csv         the same for the train recordings: the truth training never reads, which
                            measures labels a model gives the calls train_tp.csv leaves out
    sample_submission.csv   recording_id,s0..s23, all 0.5, test ids sorted
    .rfcx_demo.json         marker: what built the folder (lets a rebuild reuse it)

Every recording is forest-like background (coloured noise with a slowly varying level, rain
drops, insect buzz), generic distractor chirps, distractors placed in the frequency boxes of
absent species (the train_fp rows) and the species' calls. The 24 species use the real
per-species frequency boxes and call durations of the competition's train_tp.csv
(`SPECIES_FACTS`, measured once and embedded here) and differ in the *pattern* of their calls
(`SPECIES_PATTERNS`: sweeps, trills, pulse trains, harmonic stacks, two-note calls, pulsed
noise), so that many species share frequency bands and only the time-frequency shape tells
them apart. Species look the same for every seed; the seed only changes which calls are
placed where, and the background.

The train set is labelled weakly, as the real one is (1216 train_tp rows over 1132
recordings that hold many more calls): a train recording holds calls of 2-4 species, each
calling once or more, and by default train_tp.csv labels ONE of those calls (of a species
chosen so that every species gets about as many labelled rows); the other calls, including
further calls of the labelled species, are in the audio but in no file.
`Difficulty.labelled_fraction` labels more of them. train_fp.csv rows are never of a species
that calls anywhere in their recording. The test truth is complete (test_labels.csv per
recording, test_calls.csv per call) and skewed like the real test set's: one species (3) calls
in most test recordings.

Each recording is synthesised from its own `SeedSequence` child, so its audio does not depend
on the order in which recordings are made or on how many worker processes make them. Which
calls are labelled does not change the audio either: the same seed and sizes give the same
recordings for any `labelled_fraction`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import json
import logging
import math
import multiprocessing
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
import scipy.fft
import soundfile as sf

from rfcx_mlops.config import Config, DataConfig
from rfcx_mlops.files import atomic_path
from rfcx_mlops.data.folder import COLUMNS, FP_FILE, SUBMISSION_FILE, TP_FILE

SAMPLE_RATE = DataConfig.sample_rate
DURATION_S = 60
N_SAMPLES = SAMPLE_RATE * DURATION_S
N_SPECIES = DataConfig.n_classes
PEAK = 0.89  # peak amplitude after normalisation (about -1 dBFS)
MARKER = ".rfcx_demo.json"
GENERATOR_VERSION = 3  # a new version is cached in a new folder (`cached`)
LABEL_COLUMNS = ("recording_id",) + tuple(f"s{k}" for k in range(N_SPECIES))
OUTPUT_FILES = (
    TP_FILE, FP_FILE, "train_calls.csv", "test_labels.csv", "test_calls.csv", SUBMISSION_FILE, MARKER
)
CALL_COLUMNS = ("recording_id", "species_id", "t_min", "f_min", "t_max", "f_max")
OUTPUT_DIRS = ("train", "test")
log = logging.getLogger("rfcx_mlops.demo")


# --------------------------------------------------------------------------------------------
# Facts measured once from the real train_tp.csv (1216 rows); embedded, never read at run time.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """One distinct annotation box of a species: its song type, band (Hz) and how many TP rows use it."""

    songtype_id: int
    f_min: float
    f_max: float
    rows: int


@dataclass(frozen=True)
class SpeciesFacts:
    """Per-species figures of the real train_tp.csv: TP rows, distinct boxes, call duration (s)."""

    species_id: int
    rows: int
    boxes: tuple[Box, ...]
    dur_min: float
    dur_median: float
    dur_max: float


SPECIES_FACTS: tuple[SpeciesFacts, ...] = (
    SpeciesFacts(0, 50, (Box(1, 5906.25, 7500.0, 10), Box(1, 5906.25, 8250.0, 40)), 0.7946, 0.7947, 1.2907),
    SpeciesFacts(1, 50, (Box(1, 3843.75, 5625.0, 50),), 0.8960, 0.8960, 0.8960),
    SpeciesFacts(2, 37, (Box(1, 468.75, 3000.0, 37),), 1.7760, 1.7760, 1.7760),
    SpeciesFacts(3, 50, (Box(1, 1031.25, 2812.5, 50),), 0.7413, 0.7413, 0.7414),
    SpeciesFacts(4, 50, (Box(1, 2343.75, 4218.75, 38), Box(1, 2531.25, 4031.25, 12)), 1.8560, 1.8560, 2.1867),
    SpeciesFacts(5, 50, (Box(1, 4781.25, 10406.2, 49), Box(1, 5062.5, 11250.0, 1)), 2.3520, 2.3520, 3.1093),
    SpeciesFacts(6, 50, (Box(1, 562.5, 3187.5, 9), Box(1, 562.5, 4406.25, 41)), 2.0213, 2.1440, 2.1440),
    SpeciesFacts(7, 50, (Box(1, 4687.5, 11437.5, 50),), 3.1413, 3.1413, 3.1414),
    SpeciesFacts(8, 50, (Box(1, 3750.0, 5531.25, 50),), 4.1226, 4.1227, 4.1227),
    SpeciesFacts(9, 34, (Box(1, 843.75, 5718.75, 23), Box(1, 1125.0, 5250.0, 11)), 2.8053, 3.5627, 3.5627),
    SpeciesFacts(10, 50, (Box(1, 947.461, 10852.7, 50),), 2.4438, 2.4439, 2.4439),
    SpeciesFacts(11, 50, (Box(1, 1808.79, 5684.77, 50),), 1.1377, 1.1378, 1.1378),
    SpeciesFacts(12, 50, (Box(1, 562.5, 3281.25, 50),), 3.1360, 3.1360, 3.1360),
    SpeciesFacts(13, 50, (Box(1, 93.75, 843.75, 49), Box(1, 93.75, 1406.25, 1)), 0.6240, 0.6240, 3.8720),
    SpeciesFacts(
        14, 50, (Box(1, 2531.25, 5531.25, 15), Box(1, 2812.5, 4406.25, 21), Box(1, 3750.0, 6468.75, 14)),
        0.2720, 0.5867, 0.9227,
    ),
    SpeciesFacts(15, 50, (Box(1, 93.75, 1125.0, 50),), 3.3440, 3.3440, 3.3440),
    SpeciesFacts(16, 50, (Box(4, 3093.75, 4593.75, 50),), 1.8346, 1.8347, 1.8347),
    SpeciesFacts(
        17, 68,
        (
            Box(1, 1312.5, 3937.5, 40), Box(4, 1312.5, 7406.25, 4),
            Box(4, 1406.25, 3937.5, 19), Box(4, 1464.26, 4565.04, 5),
        ),
        2.5333, 6.4533, 6.4534,
    ),
    SpeciesFacts(18, 50, (Box(1, 3187.5, 5062.5, 50),), 0.6933, 0.6933, 0.6934),
    SpeciesFacts(19, 43, (Box(1, 281.25, 2812.5, 43),), 1.5520, 1.5520, 1.5520),
    SpeciesFacts(20, 40, (Box(1, 1312.5, 6093.75, 17), Box(1, 2343.75, 5718.75, 23)), 3.4400, 3.4400, 5.3814),
    SpeciesFacts(21, 50, (Box(1, 3281.25, 4125.0, 50),), 1.0933, 1.0934, 1.0934),
    SpeciesFacts(22, 44, (Box(1, 10687.5, 13687.5, 44),), 1.6053, 1.6053, 1.6054),
    SpeciesFacts(23, 100, (Box(1, 7235.16, 11283.4, 50), Box(4, 6459.96, 11627.9, 50)), 6.0836, 7.0037, 7.9239),
)


# --------------------------------------------------------------------------------------------
# Invented call patterns: fixed per species, independent of the seed.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """How a species' call moves through its box.

    A call is a run of *elements*, `rate` per second (0: one element spans the call), each sounding
    for the fraction `duty` of its period. Within an element the frequency follows `track` between
    the log-positions `lo` and `hi` of the box (0 = f_min, 1 = f_max):

    - up / down: a sweep; chevron: up then down; flat: steady at the middle of lo..hi
    - sine: sinusoidal frequency modulation at `fm_rate` Hz (a trill)
    - alternate: elements alternate between lo and hi (a two-note call)
    - noise: band noise between lo and hi (no tonal track)

    `harmonics` adds the overtones of the track that fit below f_max (a harmonic stack).
    """

    kind: str
    track: str
    lo: float
    hi: float
    rate: float = 0.0
    duty: float = 1.0
    fm_rate: float = 0.0
    harmonics: bool = False


SPECIES_PATTERNS: tuple[Pattern, ...] = (
    Pattern("down-sweep", "down", 0.05, 0.95),  # 0
    Pattern("pulse-train", "down", 0.3, 0.7, rate=16.0, duty=0.45),  # 1
    Pattern("trill", "sine", 0.1, 0.9, fm_rate=22.0),  # 2
    Pattern("chevron", "chevron", 0.05, 0.95),  # 3
    Pattern("pulse-train", "up", 0.35, 0.65, rate=7.0, duty=0.5),  # 4
    Pattern("trill", "sine", 0.1, 0.9, fm_rate=8.0),  # 5
    Pattern("up-sweep", "up", 0.05, 0.95),  # 6
    Pattern("down-sweep-train", "down", 0.05, 0.95, rate=4.5, duty=0.6),  # 7
    Pattern("chevron-train", "chevron", 0.05, 0.95, rate=2.0, duty=0.8),  # 8
    Pattern("up-sweep-train", "up", 0.05, 0.95, rate=3.0, duty=0.7),  # 9
    Pattern("harmonic-stack", "down", 0.0, 0.04, harmonics=True),  # 10
    Pattern("trill", "sine", 0.15, 0.85, fm_rate=30.0),  # 11
    Pattern("two-note", "alternate", 0.25, 0.75, rate=4.0, duty=0.7),  # 12
    Pattern("pulsed-stack", "flat", 0.15, 0.15, rate=14.0, duty=0.5, harmonics=True),  # 13
    Pattern("up-sweep", "up", 0.05, 0.95),  # 14
    Pattern("harmonic-stack", "sine", 0.22, 0.3, fm_rate=4.0, harmonics=True),  # 15
    Pattern("trill", "sine", 0.1, 0.9, fm_rate=13.0),  # 16
    Pattern("pulsed-noise", "noise", 0.1, 0.9, rate=6.0, duty=0.5),  # 17
    Pattern("down-sweep", "down", 0.05, 0.95),  # 18
    Pattern("down-sweep", "down", 0.05, 0.95),  # 19
    Pattern("harmonic-stack", "up", 0.0, 0.12, harmonics=True),  # 20
    Pattern("two-note", "alternate", 0.15, 0.85, rate=6.0, duty=0.8),  # 21
    Pattern("pulse-train", "flat", 0.5, 0.5, rate=12.0, duty=0.4),  # 22
    Pattern("pulsed-noise", "noise", 0.1, 0.9, rate=2.5, duty=0.6),  # 23
)


@dataclass(frozen=True)
class Difficulty:
    """Knobs of the generator (levels in dB of band power over the background in the same band).

    Train recordings hold `train_species` species (a uniform draw within the inclusive range);
    each species present calls 1 + Poisson(`extra_calls_mean`) times, at most `max_calls` calls
    per recording (extra calls beyond it are dropped; every species present calls at least once).
    `labelled_fraction` None or 0: train_tp.csv labels exactly one call per train recording, of a
    species drawn so that the species are balanced over the set; a value in (0, 1]: that share of
    each recording's calls (rounded, at least the one call above), 1.0 labelling every call.
    Test recordings hold 1-3 species drawn as `test_species_p` says, all but `common_species`,
    plus `common_species` in round(`common_species_share` x test recordings) of them (None: no
    species is favoured).
    """

    call_snr_db: tuple[float, float] = (3.0, 15.0)
    distractor_snr_db: tuple[float, float] = (0.0, 12.0)
    train_species: tuple[int, int] = (2, 4)  # species calling in a train recording, inclusive range
    extra_calls_mean: float = 0.5  # each species present calls 1 + Poisson(this) times ...
    max_calls: int = 8  # ... with at most this many calls in a recording
    labelled_fraction: float | None = None  # None/0: one labelled call per train recording; else that share
    test_species_p: tuple[float, float, float] = (0.5, 0.3, 0.2)  # 1, 2, 3 species besides common_species
    common_species: int | None = 3  # the species calling in most test recordings (real: 3, in about 90 %)
    common_species_share: float = 0.75  # share of the test recordings where common_species calls
    fp_per_recording: tuple[int, int] = (1, 3)  # distractors in absent species' boxes (inclusive)
    chirp_clusters_mean: float = 3.0
    distractor_near_call_p: float = 0.5  # a distractor is placed within a few seconds of a call
    frequency_jitter: float = 0.03  # shift of the track, in box log-position
    rate_jitter: float = 0.07  # relative change of element and trill rates

    def __post_init__(self) -> None:
        lo, hi = self.train_species
        if not 1 <= lo <= hi <= N_SPECIES:
            raise ValueError(f"train_species must be a range within 1..{N_SPECIES}, got {self.train_species!r}")
        if self.max_calls < max(hi, len(self.test_species_p) + 1):
            raise ValueError(f"max_calls must allow one call of every species present, got {self.max_calls!r}")
        if self.extra_calls_mean < 0:
            raise ValueError(f"extra_calls_mean must be >= 0, got {self.extra_calls_mean!r}")
        if self.labelled_fraction is not None and not 0.0 <= self.labelled_fraction <= 1.0:
            raise ValueError(f"labelled_fraction must be within [0, 1] (0: one per recording), "
                             f"got {self.labelled_fraction!r}")
        if self.common_species is not None and not 0 <= self.common_species < N_SPECIES:
            raise ValueError(f"common_species must be a species id or None, got {self.common_species!r}")
        if not 0.0 <= self.common_species_share <= 1.0:
            raise ValueError(f"common_species_share must be within [0, 1], got {self.common_species_share!r}")


# --------------------------------------------------------------------------------------------
# Signal building blocks (vectorised float32 numpy; no per-sample Python loops)
# --------------------------------------------------------------------------------------------


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / np.float32(np.sqrt(np.mean(x**2)) + 1e-12)


def _taper(u: np.ndarray, frac: float) -> np.ndarray:
    """Tukey-like window over positions u in [0, 1]: raised-cosine ramps of width `frac` at each end."""
    edge = np.minimum(u, 1.0 - u).astype(np.float32)
    edge *= np.float32(1.0 / max(frac, 1e-6))
    np.clip(edge, 0.0, 1.0, out=edge)
    return np.sin(np.float32(0.5 * np.pi) * edge) ** 2  # float32 throughout: twice as fast as float64


def _band_noise(rng: np.random.Generator, n: int, f_lo: float, f_hi: float) -> np.ndarray:
    """White noise of length n limited to f_lo..f_hi Hz (made in the frequency domain)."""
    size = scipy.fft.next_fast_len(n, real=True)
    freqs = scipy.fft.rfftfreq(size, 1.0 / SAMPLE_RATE)
    band = (freqs >= f_lo) & (freqs <= f_hi)
    spec = np.zeros(freqs.size, dtype=np.complex64)
    k = int(band.sum())
    spec[band] = rng.standard_normal(k, dtype=np.float32) + 1j * rng.standard_normal(k, dtype=np.float32)
    return scipy.fft.irfft(spec, size)[:n].astype(np.float32)


def _band_power(x: np.ndarray, f_lo: float, f_hi: float) -> float:
    """Mean power per sample of x inside f_lo..f_hi Hz (Parseval over the zero-padded one-sided spectrum)."""
    size = scipy.fft.next_fast_len(x.size, real=True)
    spec = scipy.fft.rfft(x, size)
    freqs = scipy.fft.rfftfreq(size, 1.0 / SAMPLE_RATE)
    band = (freqs >= f_lo) & (freqs <= f_hi)
    return float(2.0 * np.sum(np.abs(spec[band]) ** 2) / (size * x.size))


def _log_position(box: Box, r: np.ndarray | float) -> np.ndarray | float:
    """Frequency (Hz) at log-position r of the box (0 = f_min, 1 = f_max)."""
    return box.f_min * (box.f_max / box.f_min) ** r


def _tone(freq: np.ndarray, harmonics: bool, f_max: float) -> np.ndarray:
    """Sine following the frequency track `freq` (Hz), plus its overtones below f_max if asked."""
    cycles = np.cumsum(freq, dtype=np.float64) / SAMPLE_RATE
    top = int(0.97 * f_max // float(freq.max())) if harmonics else 1
    out = np.zeros(freq.size, dtype=np.float32)
    for h in range(1, max(top, 1) + 1):
        # wrap in float64, then the sine in float32 (much faster, still exact enough)
        out += np.float32(h**-0.6) * np.sin(np.float32(2 * np.pi) * ((h * cycles) % 1.0).astype(np.float32))
    return out


def _species_call(pattern: Pattern, box: Box, n: int, rng: np.random.Generator, d: Difficulty) -> np.ndarray:
    """One call of a species with the given pattern inside `box`, n samples, unit RMS."""
    shift = rng.uniform(-d.frequency_jitter, d.frequency_jitter)
    lo = float(np.clip(pattern.lo + shift, 0.0, 1.0))
    hi = float(np.clip(pattern.hi + shift, 0.0, 1.0))
    rate = pattern.rate * rng.uniform(1 - d.rate_jitter, 1 + d.rate_jitter)
    fm_rate = pattern.fm_rate * rng.uniform(1 - d.rate_jitter, 1 + d.rate_jitter)
    t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
    period = 1.0 / rate if rate > 0 else n / SAMPLE_RATE
    pos = t / period
    index = np.floor(pos)
    phase_in = pos - index  # position within the element period, 0..1
    u = np.clip(phase_in / pattern.duty, 0.0, 1.0)  # position within the sounding part
    gate = np.where(phase_in < pattern.duty, _taper(u, 0.5 if rate > 0 else 0.08), 0.0).astype(np.float32)
    if pattern.track == "noise":
        sig = _band_noise(rng, n, _log_position(box, lo), _log_position(box, hi))
    else:
        if pattern.track == "up":
            r = lo + (hi - lo) * u
        elif pattern.track == "down":
            r = hi - (hi - lo) * u
        elif pattern.track == "chevron":
            r = lo + (hi - lo) * (1.0 - np.abs(2.0 * u - 1.0))
        elif pattern.track == "sine":
            r = 0.5 * (lo + hi) + 0.5 * (hi - lo) * np.sin(2.0 * np.pi * fm_rate * t + rng.uniform(0, 2 * np.pi))
        elif pattern.track == "alternate":
            r = np.where(index % 2 == 0, lo, hi)
        elif pattern.track == "flat":
            r = np.full(n, 0.5 * (lo + hi))
        else:
            raise ValueError(f"unknown track {pattern.track!r}")
        sig = _tone(_log_position(box, r), pattern.harmonics, box.f_max)
    sig *= gate * _taper(t / t[-1], min(0.5, 0.03 * SAMPLE_RATE / n))
    return _unit_rms(sig)


def _chirp(n: int, f_a: float, f_b: float) -> np.ndarray:
    """A short log sweep from f_a to f_b Hz with a Hann envelope."""
    u = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    return _tone(f_a * (f_b / f_a) ** u, False, f_b) * _taper(u, 0.5)


def _chirp_cluster(rng: np.random.Generator, n: int, f_lo: float, f_hi: float) -> np.ndarray:
    """Irregular chatter: 2-6 short random sweeps at random offsets within n samples, inside f_lo..f_hi."""
    out = np.zeros(n, dtype=np.float32)
    for _ in range(int(rng.integers(2, 7))):
        m = min(n, int(rng.uniform(0.04, 0.25) * SAMPLE_RATE))
        f_a, f_b = np.exp(rng.uniform(np.log(f_lo), np.log(f_hi), size=2))
        start = int(rng.integers(0, n - m + 1))
        out[start : start + m] += _chirp(m, f_a, f_b) * np.float32(rng.uniform(0.4, 1.0))
    return out


def _distractor(rng: np.random.Generator, box: Box, n: int) -> np.ndarray:
    """A sound filling a species' box that is not that species: noise burst, wavering whistle or chatter."""
    kind = int(rng.integers(0, 3))
    u = np.arange(n, dtype=np.float64) / max(n - 1, 1)
    if kind == 0:
        sig = _band_noise(rng, n, _log_position(box, 0.05), _log_position(box, 0.95)) * _taper(u, 0.3)
    elif kind == 1:
        t = u * n / SAMPLE_RATE
        wobble = sum(
            rng.uniform(0.03, 0.1) * np.sin(2 * np.pi * rng.uniform(0.3, 2.0) * t + rng.uniform(0, 2 * np.pi))
            for _ in range(2)
        )
        r = np.clip(rng.uniform(0.25, 0.75) + wobble, 0.0, 1.0)
        sig = _tone(_log_position(box, r), False, box.f_max) * _taper(u, 0.1)
    else:
        sig = _chirp_cluster(rng, n, _log_position(box, 0.05), _log_position(box, 0.95))
    return _unit_rms(sig)


def _slow(values: np.ndarray, step_s: float, n: int) -> np.ndarray:
    """A slowly varying curve through `values` (one every step_s seconds), as n samples (10 ms steps)."""
    hop = SAMPLE_RATE // 100
    coarse = np.interp(np.arange(-(-n // hop)) * hop / SAMPLE_RATE, np.arange(values.size) * step_s, values)
    return np.repeat(coarse.astype(np.float32), hop)[:n]


def _background(rng: np.random.Generator) -> np.ndarray:
    """60 s of forest-like background: coloured noise with a drifting level, rain drops, insect buzz."""
    n = N_SAMPLES
    log_f = np.log(np.maximum(scipy.fft.rfftfreq(n, 1.0 / SAMPLE_RATE), 50.0)).astype(np.float32)
    # coloured noise: 1/f^alpha with a smooth random spectral shape and a drifting level
    anchors = np.linspace(np.log(50.0), np.log(SAMPLE_RATE / 2), 9)
    shape = np.interp(log_f, anchors, rng.normal(0.0, 3.0 * np.log(10) / 20, anchors.size)).astype(np.float32)
    amp = np.exp(np.float32(-rng.uniform(0.7, 1.5) / 2) * log_f + shape)
    amp[:2] = 0.0  # no DC
    phase = np.float32(2 * np.pi) * rng.random(log_f.size, dtype=np.float32)  # random-phase noise
    spec = np.empty(log_f.size, dtype=np.complex64)
    spec.real, spec.imag = amp * np.cos(phase), amp * np.sin(phase)
    noise = scipy.fft.irfft(spec, n).astype(np.float32)
    noise *= _slow(10 ** (rng.normal(0.0, 2.5, DURATION_S // 4 + 2) / 20), 4.0, n)
    rms = float(np.sqrt(np.mean(noise**2)))
    out = noise
    # rain: random drops (band-limited short decaying bursts), rate drifting over the minute
    if rng.random() < 0.5:
        count = int(rng.poisson(rng.uniform(5.0, 60.0) * DURATION_S))
        m = 384
        idx = rng.integers(0, n - m, size=count)
        weights = rng.lognormal(0.0, 0.6, size=count) * np.sin(np.pi * idx / n * rng.uniform(0.5, 3.0)) ** 2
        f_lo, f_hi = rng.uniform(800.0, 3000.0), rng.uniform(6000.0, 16000.0)
        kernel = _band_noise(rng, m, f_lo, f_hi) * np.exp(-np.arange(m) / rng.uniform(30, 90)).astype(np.float32)
        rain = np.bincount(
            (idx[:, None] + np.arange(m)).ravel(), weights=(weights[:, None] * kernel).ravel(), minlength=n
        ).astype(np.float32)
        out = out + _unit_rms(rain) * np.float32(rms * rng.uniform(0.5, 2.0))
    # insects: steady narrowband chorus at a high band, amplitude-modulated, patchy over the minute
    for _ in range(int(rng.choice(3, p=(0.3, 0.5, 0.2)))):
        fc = float(np.exp(rng.uniform(np.log(3000.0), np.log(13000.0))))
        bw = rng.uniform(80.0, 500.0)
        # the carrier repeats every 2**16 samples (1.4 s): seamless, as an inverse FFT is periodic
        buzz = np.resize(_band_noise(rng, 2**16, fc - bw / 2, fc + bw / 2), n)
        period = int(SAMPLE_RATE / rng.uniform(15.0, 70.0))  # samples per pulse of the buzz
        depth = rng.uniform(0.3, 1.0)
        pulse = (0.5 + 0.5 * np.cos(2 * np.pi * np.arange(period) / period)) ** rng.uniform(1.0, 4.0)
        buzz *= np.resize((1 - depth + depth * pulse).astype(np.float32), n)
        buzz *= _slow(rng.uniform(0.0, 1.0, DURATION_S // 5 + 2) ** 0.5, 5.0, n)
        band_noise_power = _band_power(noise[: SAMPLE_RATE * 4], fc - bw / 2, fc + bw / 2)
        gain = math.sqrt(band_noise_power * 10 ** (rng.uniform(6.0, 20.0) / 10) / (float(np.mean(buzz**2)) + 1e-20))
        out = out + buzz * np.float32(gain)
    return out


# --------------------------------------------------------------------------------------------
# One recording
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Job:
    split: str  # "train" or "test"
    recording_id: str
    species: tuple[int, ...]  # every species calling in the recording
    calls: tuple[tuple[int, bool], ...]  # (species_id, labelled) of each call, in placement order
    seed: np.random.SeedSequence
    path: Path
    difficulty: Difficulty


def _duration(rng: np.random.Generator, facts: SpeciesFacts) -> float:
    """A call length within the species' range (widened to +-15 % of the median where it is narrower)."""
    left = min(facts.dur_min, 0.85 * facts.dur_median)
    right = max(facts.dur_max, 1.15 * facts.dur_median)
    return float(rng.triangular(left, facts.dur_median, right))


def _pick_box(rng: np.random.Generator, facts: SpeciesFacts) -> Box:
    weights = np.array([b.rows for b in facts.boxes], dtype=np.float64)
    return facts.boxes[int(rng.choice(len(facts.boxes), p=weights / weights.sum()))]


class _Scene:
    """One recording being mixed: the background, the events added so far and where the calls are."""

    GAP_S = 0.25  # silence kept between a call and any other event in its band

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.background = _background(rng)
        self.mix = self.background.copy()
        self.calls: list[tuple[float, float, float, float]] = []  # (t0, t1, f_lo, f_hi) of the species' calls

    def _clashes(self, t0: float, t1: float, band: tuple[float, float] | None) -> bool:
        return any(
            t0 < c1 + self.GAP_S and c0 < t1 + self.GAP_S and (band is None or (band[0] < g_hi and g_lo < band[1]))
            for c0, c1, g_lo, g_hi in self.calls
        )

    def near_a_call(self, p: float) -> float | None:
        """With probability p, the centre (s) of a random call placed so far, else None."""
        if self.calls and self.rng.random() < p:
            c0, c1, _, _ = self.calls[int(self.rng.integers(len(self.calls)))]
            return 0.5 * (c0 + c1)
        return None

    def add(
        self,
        make: Callable[[int], np.ndarray],
        dur: float,
        f_lo: float,
        f_hi: float,
        snr_db: float,
        *,
        call: bool,
        near: float | None = None,
        required: bool = False,
    ) -> tuple[int, int] | None:
        """Place an event of `dur` s and mix `make(n)` in at snr_db band power over the background in f_lo..f_hi.

        A species' call overlaps no other call; a distractor overlaps no call in its band. Returns (start, n)
        in samples, or None when no free slot was found (never when `required`: then, after 60 tries, it may
        overlap).
        """
        rng = self.rng
        for attempt in range(60):
            centre = near + rng.uniform(-6.0, 6.0) if near is not None else rng.uniform(0.0, DURATION_S)
            t0 = min(max(centre - dur / 2, 0.2), DURATION_S - 0.2 - dur)
            if not self._clashes(t0, t0 + dur, None if call else (f_lo, f_hi)) or (required and attempt == 59):
                break
        else:
            return None
        start, n = int(round(t0 * SAMPLE_RATE)), int(round(dur * SAMPLE_RATE))
        sig = make(n)
        ref = _band_power(self.background[start : start + n], f_lo, f_hi)
        self.mix[start : start + n] += sig * np.float32(math.sqrt(ref * 10 ** (snr_db / 10)))
        if call:
            self.calls.append((t0, t0 + dur, f_lo, f_hi))
        return start, n


def _make_recording(job: _Job) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Synthesise one recording, write its FLAC and return its (labelled calls, fp rows, every call) as box rows."""
    d = job.difficulty
    rng = np.random.default_rng(job.seed)
    scene = _Scene(rng)
    tp: list[tuple] = []
    fp: list[tuple] = []
    calls: list[tuple] = []

    def row(species_id: int, box: Box, placed: tuple[int, int]) -> tuple:
        start, n = placed
        return (job.recording_id, species_id, box.songtype_id, start / SAMPLE_RATE, box.f_min,
                (start + n) / SAMPLE_RATE, box.f_max)

    for species_id, labelled in job.calls:  # every planned call is placed (labelled or not: the audio is the same)
        facts, pattern = SPECIES_FACTS[species_id], SPECIES_PATTERNS[species_id]
        box = _pick_box(rng, facts)
        placed = scene.add(
            lambda n, box=box: _species_call(pattern, box, n, rng, d), _duration(rng, facts), box.f_min, box.f_max,
            rng.uniform(*d.call_snr_db), call=True, required=True,
        )
        assert placed is not None  # required
        calls.append(row(species_id, box, placed))
        if labelled:
            tp.append(calls[-1])

    absent = np.setdiff1d(np.arange(N_SPECIES), job.species)
    n_fp = int(rng.integers(d.fp_per_recording[0], d.fp_per_recording[1] + 1))
    for species_id in rng.choice(absent, size=min(n_fp, absent.size), replace=False).tolist():
        facts = SPECIES_FACTS[species_id]
        box = _pick_box(rng, facts)
        placed = scene.add(
            lambda n, box=box: _distractor(rng, box, n), _duration(rng, facts), box.f_min, box.f_max,
            rng.uniform(*d.distractor_snr_db), call=False, near=scene.near_a_call(d.distractor_near_call_p),
        )
        if placed:
            fp.append(row(species_id, box, placed))

    for _ in range(int(rng.poisson(d.chirp_clusters_mean))):
        f_c = float(np.exp(rng.uniform(np.log(500.0), np.log(12000.0))))
        f_lo, f_hi = f_c / rng.uniform(1.2, 2.0), min(f_c * rng.uniform(1.2, 2.0), 15000.0)
        scene.add(
            lambda n, f_lo=f_lo, f_hi=f_hi: _unit_rms(_chirp_cluster(rng, n, f_lo, f_hi)), rng.uniform(0.3, 1.5),
            f_lo, f_hi, rng.uniform(*d.distractor_snr_db), call=False,
            near=scene.near_a_call(d.distractor_near_call_p),
        )

    mix = scene.mix
    pcm = np.round(mix * np.float32(PEAK * 32767 / float(np.max(np.abs(mix))))).astype(np.int16)
    sf.write(job.path, pcm, SAMPLE_RATE, subtype="PCM_16", format="FLAC")
    return tp, fp, calls


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------


def _recording_ids(rng: np.random.Generator, count: int) -> list[str]:
    """`count` distinct 9-hex-digit ids, in draw order."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        rid = f"{int(rng.integers(0, 16**9)):09x}"
        if rid not in seen:
            seen.add(rid)
            ids.append(rid)
    return ids


def _balanced(rng: np.random.Generator, count: int, pool: Sequence[int] | None = None) -> np.ndarray:
    """`count` species ids of `pool` (default: all), each appearing count // len(pool) or one more times, in
    random order."""
    pool = np.arange(N_SPECIES) if pool is None else np.asarray(pool)
    rounds = np.concatenate([rng.permutation(pool) for _ in range(-(-count // pool.size))])
    return rounds[:count]


def _with_extra(
    rng: np.random.Generator, primary: int, total: int, pool: Sequence[int] | None = None
) -> tuple[int, ...]:
    """`primary` first, then total - 1 other species of `pool` (default: all), drawn at random."""
    pool = np.arange(N_SPECIES) if pool is None else np.asarray(pool)
    others = rng.choice(np.setdiff1d(pool, [primary]), size=total - 1, replace=False)
    return (primary, *map(int, others))


class Planned(NamedTuple):
    """One recording of the plan."""

    split: str  # "train" or "test"
    recording_id: str
    species: tuple[int, ...]  # every species calling in it, sorted
    calls: tuple[tuple[int, bool], ...]  # (species_id, labelled) of each call, in placement order (not time)


def _calls(rng: np.random.Generator, species: tuple[int, ...], d: Difficulty) -> list[int]:
    """The species of each call: one call of every species (in the given order), then their extra calls."""
    extra = [k for k in species for _ in range(int(rng.poisson(d.extra_calls_mean)))]
    extra = [extra[i] for i in rng.permutation(len(extra))[: max(0, d.max_calls - len(species))]]
    return [*species, *extra]


def _labels(rng: np.random.Generator, n_calls: int, fraction: float | None) -> list[bool]:
    """Which of n_calls train calls are labelled: the first always (its species is the balanced one); with a
    fraction, as many more as make round(fraction x n_calls), chosen at random."""
    total = max(1, round(fraction * n_calls)) if fraction else 1
    more = {int(i) + 1 for i in rng.choice(n_calls - 1, size=total - 1, replace=False)}
    return [i == 0 or i in more for i in range(n_calls)]


def plan(recordings: int, test_recordings: int, seed: int, difficulty: Difficulty = Difficulty()) -> list[Planned]:
    """Every recording's split, id, species and calls, train first; cheap and deterministic.

    The labels come from a random stream of their own: `labelled_fraction` changes which calls are
    labelled and nothing else.
    """
    d = difficulty
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    label_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(3,)))
    ids = _recording_ids(rng, recordings + test_recordings)
    out: list[Planned] = []
    labelled_species = _balanced(rng, recordings)  # the species of each train recording's (first) labelled call
    for i in range(recordings):
        total = int(rng.integers(d.train_species[0], d.train_species[1] + 1))
        species = _with_extra(rng, int(labelled_species[i]), total)
        calls = _calls(rng, species, d)
        labels = _labels(label_rng, len(calls), d.labelled_fraction)
        out.append(Planned("train", ids[i], tuple(sorted(species)), tuple(zip(calls, labels))))
    common = d.common_species
    pool = [k for k in range(N_SPECIES) if k != common]
    with_common = set()
    if common is not None:
        size = round(d.common_species_share * test_recordings)
        with_common = set(rng.choice(test_recordings, size=size, replace=False).tolist())
    test_primary = _balanced(rng, test_recordings, pool)
    for j in range(test_recordings):
        total = int(rng.choice(len(d.test_species_p), p=d.test_species_p)) + 1
        species = _with_extra(rng, int(test_primary[j]), total, pool) + ((common,) if j in with_common else ())
        calls = _calls(rng, species, d)
        out.append(Planned("test", ids[recordings + j], tuple(sorted(species)), tuple((k, False) for k in calls)))
    return out


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def _format_box(row: tuple) -> list[str]:
    rid, species, songtype, t_min, f_min, t_max, f_max = row
    return [rid, str(species), str(songtype), f"{t_min:.4f}", repr(float(f_min)), f"{t_max:.4f}", repr(float(f_max))]


def _format_call(row: tuple) -> list[str]:
    """A box row without its songtype_id: a row of train_calls.csv or test_calls.csv."""
    rid, species, _, t_min, f_min, t_max, f_max = row
    return [rid, str(species), f"{t_min:.4f}", repr(float(f_min)), f"{t_max:.4f}", repr(float(f_max))]


def _prepare(out: Path) -> None:
    """Make `out` ready: new, empty, or a previous demo build (whose outputs are removed)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise FileExistsError(f"{out} is not empty and is not a demo build; choose a new or empty folder")
        for name in OUTPUT_DIRS:
            shutil.rmtree(out / name, ignore_errors=True)
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _write_marker(
    out: Path, recordings: int, test_recordings: int, seed: int, difficulty: Difficulty, complete: bool
) -> None:
    info = {
        "difficulty": asdict(difficulty),
        "generator": "rfcx_mlops.synth",
        "version": GENERATOR_VERSION,
        "recordings": recordings,
        "test_recordings": test_recordings,
        "seed": seed,
        "complete": complete,
    }
    (out / MARKER).write_text(json.dumps(info, sort_keys=True, indent=2) + "\n")


def _jobs(out: Path, recordings: int, test_recordings: int, seed: int, difficulty: Difficulty) -> list[_Job]:
    """One job per recording of the plan, each with its own SeedSequence child, writing into out/<split>/."""
    train_seeds = np.random.SeedSequence(seed, spawn_key=(1,)).spawn(recordings)
    test_seeds = np.random.SeedSequence(seed, spawn_key=(2,)).spawn(test_recordings)
    seeds = train_seeds + test_seeds
    return [
        _Job(p.split, p.recording_id, p.species, p.calls, child, out / p.split / f"{p.recording_id}.flac", difficulty)
        for p, child in zip(plan(recordings, test_recordings, seed, difficulty), seeds, strict=True)
    ]


def build(
    out_dir: str | os.PathLike,
    recordings: int = 240,
    test_recordings: int | None = None,
    seed: int = 27,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    difficulty: Difficulty = Difficulty(),
) -> Path:
    """Write a demo RFCX data set into out_dir and return its path.

    recordings: train recordings; test_recordings: test recordings (default recordings // 5, at
    least 1); seed: everything follows from it (same seed and sizes -> identical files);
    workers: processes (default: CPU count; at most one per 4 recordings; 1 = in this process);
    progress(done, total) is called after each recording; difficulty: the generator's knobs (`Difficulty`;
    e.g. Difficulty(labelled_fraction=1.0) labels every train call).
    Refuses (FileExistsError) a non-empty folder that is not a demo build; a previous demo build
    there is replaced.
    """
    if isinstance(recordings, bool) or not isinstance(recordings, int) or recordings < 1:
        raise ValueError(f"recordings must be an integer >= 1, got {recordings!r}")
    if test_recordings is None:
        test_recordings = max(1, recordings // 5)
    if isinstance(test_recordings, bool) or not isinstance(test_recordings, int) or test_recordings < 1:
        raise ValueError(f"test_recordings must be an integer >= 1, got {test_recordings!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    out = Path(out_dir)
    _prepare(out)
    _write_marker(out, recordings, test_recordings, seed, difficulty, complete=False)
    for name in OUTPUT_DIRS:
        (out / name).mkdir()

    jobs = _jobs(out, recordings, test_recordings, seed, difficulty)
    workers = min(workers or os.cpu_count() or 1, max(1, len(jobs) // 4))  # tiny sets: no process start-up
    with contextlib.ExitStack() as stack:
        if workers == 1:
            made = map(_make_recording, jobs)
        else:  # forkserver: safe even when the caller has loaded TensorFlow (fork is not)
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx))
            made = pool.map(_make_recording, jobs, chunksize=2)
        results = []
        for result in made:
            results.append(result)
            if progress:
                progress(len(results), len(jobs))

    def boxes(split: str, which: int) -> list[tuple]:  # which: 0 labelled calls, 1 fp rows, 2 every call
        rows = [r for job, result in zip(jobs, results) if job.split == split for r in result[which]]
        return sorted(rows, key=lambda r: (r[0], r[3], r[1]))

    _write_csv(out / TP_FILE, COLUMNS, [_format_box(r) for r in boxes("train", 0)])
    _write_csv(out / FP_FILE, COLUMNS, [_format_box(r) for r in boxes("train", 1)])
    _write_csv(out / "train_calls.csv", CALL_COLUMNS, [_format_call(r) for r in boxes("train", 2)])
    test_calls = boxes("test", 2)
    _write_csv(out / "test_calls.csv", CALL_COLUMNS, [_format_call(r) for r in test_calls])
    present: dict[str, set[int]] = {job.recording_id: set() for job in jobs if job.split == "test"}
    for r in test_calls:
        present[r[0]].add(r[1])
    test_ids = sorted(present)
    _write_csv(
        out / "test_labels.csv",
        LABEL_COLUMNS,
        [[rid, *("1" if k in present[rid] else "0" for k in range(N_SPECIES))] for rid in test_ids],
    )
    _write_csv(out / SUBMISSION_FILE, LABEL_COLUMNS, [[rid, *["0.5"] * N_SPECIES] for rid in test_ids])
    _write_marker(out, recordings, test_recordings, seed, difficulty, complete=True)
    return out


def cached(cfg: Config) -> Path:
    """The demo data set of ``cfg.data`` under ``data.demo_dir``: built the first time, then reused.

    The set is built under a temporary name and renamed into place, so a half-built set is
    never taken for a cached one; of two runs building it at once, the second uses the first's.
    """
    name = f"n{cfg.data.demo_recordings}-seed{cfg.data.demo_seed}-v{GENERATOR_VERSION}"
    folder = Path(cfg.data.demo_dir) / name
    if (folder / TP_FILE).is_file():
        log.info("using the cached demo data set in %s", folder)
        return folder
    log.info("no data_dir given: building the demo data set (%d recordings) in %s", cfg.data.demo_recordings, folder)
    with atomic_path(folder) as tmp:
        build(tmp, recordings=cfg.data.demo_recordings, seed=cfg.data.demo_seed)
    return folder
