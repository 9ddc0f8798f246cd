"""Batches of log-mel images for Keras: training (shuffled, augmented) and validation (every sample, in order)."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import threading
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from rfcx_mlops import streams
from rfcx_mlops.config import AugmentConfig, Config, ModelConfig
from rfcx_mlops.data.audio import AudioInfo, read_window
from rfcx_mlops.data.folder import no_events
from rfcx_mlops.learn import augment
from rfcx_mlops.learn.features import AugmentedAudio, MelFeatures, front_end
from rfcx_mlops.learn.metrics import UNKNOWN
from rfcx_mlops.streams import Purpose


@dataclass(frozen=True)
class Samples:
    """Training or validation windows and what is known of each species in them."""

    recording_ids: np.ndarray  # (n,) str
    starts: np.ndarray  # (n,) window start in seconds
    labels: np.ndarray  # (n, n_classes) float32: 1 where a labelled call (train_tp) overlaps the window
    known: np.ndarray  # (n, n_classes) bool: labelled, or verified absent (a train_fp row overlaps the window)
    pseudo: np.ndarray  # (n,) bool: a window labelled by a teacher model (self-training), not by the rows

    def __len__(self) -> int:
        return len(self.starts)

    def __add__(self, other: Samples) -> Samples:
        return Samples(*(np.concatenate([a, b]) for a, b in zip(dataclasses.astuple(self),
                                                                 dataclasses.astuple(other))))


def targets(labels: np.ndarray, known: np.ndarray, model: ModelConfig) -> np.ndarray:
    """What the loss is given.

    ``model.loss: masked``: the labels where known, ``UNKNOWN`` elsewhere.  A softmax: the labels,
    except that a window with no labelled call (one on a train_fp row or at a random place) is
    given the same share for every species not known absent there, so that between calls the
    model learns to favour none, instead of naming whichever species the background resembles.
    """
    if model.loss == "masked":
        return np.where(known, labels, np.float32(UNKNOWN))
    if model.activation != "softmax":
        return labels
    unlabelled = ~labels.any(axis=1)
    possible = (~known[unlabelled]).astype(np.float32)
    out = labels.copy()
    out[unlabelled] = possible / np.maximum(possible.sum(axis=1, keepdims=True), 1.0)
    return out


def mixup(images: np.ndarray, labels: np.ndarray, known: np.ndarray, cfg: Config,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """With probability ``augment.mixup_p`` each image is mixed with another of the batch, weight ~ Beta(a, a).

    Sounds add up, so with sigmoid outputs a species is present in the mix where present in
    either (the union), known absent where known absent in both, and unknown otherwise; with a
    softmax the targets mix with the images' weights, as in the original mixup.
    """
    n = len(images)
    mixed = rng.random(n) < cfg.augment.mixup_p
    partner = (np.arange(n) + rng.integers(1, max(n, 2), n)) % n  # another sample of the batch
    weight = rng.beta(cfg.augment.mixup_alpha, cfg.augment.mixup_alpha, n).astype(np.float32)
    if n < 2 or not mixed.any():
        return images, labels, known
    w = np.where(mixed, weight, np.float32(1.0))
    images = w[:, None, None, None] * images + (1 - w[:, None, None, None]) * images[partner]
    if cfg.model.activation == "softmax":
        mixed_targets = targets(labels, known, cfg.model)  # a window without calls mixes in its even shares
        return images, w[:, None] * mixed_targets + (1 - w[:, None]) * mixed_targets[partner], known
    other_labels = np.where(mixed[:, None], labels[partner], labels)
    other_known = np.where(mixed[:, None], known[partner], known)
    labels = np.maximum(labels, other_labels)
    return images, labels, (labels > 0) | (known & other_known)


def window_start(t_min: float, t_max: float, crop_seconds: float, duration: float) -> float:
    """Start of the crop centred on a call, moved inside the recording (the seed preset's crop rule)."""
    start = (t_min + t_max) / 2 - crop_seconds / 2
    return float(max(0.0, min(start, duration - crop_seconds)))


def make_samples(events: pd.DataFrame, recordings: dict[str, AudioInfo], crop_seconds: float, n_classes: int,
                 absences: pd.DataFrame | None = None, centred_on_absences: pd.DataFrame | None = None,
                 placed: pd.DataFrame | None = None) -> Samples:
    """A window centred on every labelled call of ``events`` (train_tp rows), then on every row of
    ``centred_on_absences`` (train_fp rows), then at every (recording_id, start) of ``placed``.

    A window's labels are every species with a labelled call overlapping it: labelling the whole
    window (not just the row's species) keeps a second species audible in the same crop from
    counting as a wrong answer.  A species with a row of ``absences`` overlapping the window, and
    no labelled call there, is known absent; the other species are unknown.
    """
    absences = no_events() if absences is None else absences
    centres = pd.concat([events, no_events() if centred_on_absences is None else centred_on_absences])
    ids = centres["recording_id"].to_numpy(dtype=str)
    starts = np.array([window_start(t_min, t_max, crop_seconds, recordings[rid].duration)
                       for rid, t_min, t_max in zip(ids, centres["t_min"], centres["t_max"])], dtype=float)
    if placed is not None:
        ids = np.concatenate([ids, placed["recording_id"].to_numpy(dtype=str)])
        starts = np.concatenate([starts, placed["start"].to_numpy(dtype=float)])
    return window_labels(ids, starts, events, absences, crop_seconds, n_classes)


def window_labels(ids: np.ndarray, starts: np.ndarray, events: pd.DataFrame, absences: pd.DataFrame,
                  crop_seconds: float, n_classes: int) -> Samples:
    """The windows at (``ids``, ``starts``) labelled by the rows: ``make_samples``' rule."""
    calls = {rid: rows for rid, rows in events.groupby("recording_id")}
    absent = {rid: rows for rid, rows in absences.groupby("recording_id")}
    labels, known = np.zeros((len(ids), n_classes), np.float32), np.zeros((len(ids), n_classes), bool)
    for i, (rid, start) in enumerate(zip(ids, starts)):
        for table, out in ((absent, known), (calls, labels)):
            rows = table.get(rid)
            if rows is not None:
                inside = rows[(rows["t_max"] > start) & (rows["t_min"] < start + crop_seconds)]
                out[i, inside["species_id"].to_numpy()] = 1
    known |= labels > 0
    return Samples(ids, starts, labels, known, np.zeros(len(ids), bool))


class Batches(keras.utils.PyDataset):
    """What both kinds of batches share: the order of samples, their windows and their draws.

    Training mode reshuffles every epoch and augments each sample; validation mode
    yields every sample in order, the last partial batch included.  Every random
    draw comes from a stream of ``streams`` keyed by epoch and sample (or batch), so the
    batches depend only on the seed, never on worker count or timing.

    Workers are threads sharing one cache: a training window is decoded once (kept as
    16-bit PCM, what the recordings hold), a validation image computed once.  The numpy
    and scipy kernels doing the work release the GIL, so threads use every core.
    """

    def __init__(self, samples: Samples, recordings: dict[str, AudioInfo], cfg: Config, *, training: bool,
                 workers: int = 1):
        super().__init__(workers=workers, use_multiprocessing=False)
        if len(samples) == 0:
            raise ValueError("no samples to batch")
        self.samples = samples
        self.recordings = recordings
        self.cfg = cfg
        self.training = training
        # Training: a step's batch in train.accumulate_steps micro-batches, whose gradients the optimizer sums.
        # Validation batches are micro-batch sized: no step of a run needs the memory of a whole batch.
        self.micro = cfg.train.accumulate_steps if training else 1
        self.batch_size = cfg.train.batch_size if training else cfg.train.batch_size // cfg.train.accumulate_steps
        self.sample_rate = cfg.data.sample_rate
        self.transform = augment.from_config(cfg.augment if training else AugmentConfig(enabled=False),
                                             self.sample_rate)
        self.spectral = self.transform.spectral  # part of each draw is applied to the spectrogram
        self.mixup = training and cfg.augment.mixup_p > 0
        self.set_epoch(0)
        self._cache: dict[int, np.ndarray] = {}  # training: 16-bit audio; validation: images
        self._locks = [threading.Lock() for _ in range(64)]  # per sample (striped): no work done twice

    def _order(self) -> np.ndarray:
        n = len(self.samples)
        if not self.training:
            return np.arange(n)
        rng = streams.rng(self.cfg.seed, Purpose.EPOCH_ORDER, self.epoch)
        steps = self.cfg.train.steps_per_epoch
        pseudo = self.samples.pseudo
        if pseudo.any():
            return self._shared_order(np.flatnonzero(~pseudo), np.flatnonzero(pseudo), rng)
        # A fixed number of steps may need more than one pass over the samples.
        passes = 1 if steps == 0 else math.ceil(steps * self.batch_size / n)
        order = np.concatenate([rng.permutation(n) for _ in range(passes)])
        short = len(order) % self.batch_size
        # A last step too small to give every micro-batch a sample: its few samples wait for the next shuffle.
        return order[:-short] if 0 < short < self.micro else order

    def _shared_order(self, original: np.ndarray, pseudo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Every batch: ``pseudo.share`` of it on the original rows' windows, the rest on pseudo-labelled ones.

        An epoch is as long as without pseudo-labels (one pass over the original windows), so a student costs
        what its teacher did; each kind is drawn in passes of its own shuffles.
        """
        size = self.batch_size
        own = min(size - 1, max(1, round(self.cfg.pseudo.share * size)))
        steps = self.cfg.train.steps_per_epoch or math.ceil(len(original) / size)

        def drawn(pool: np.ndarray, k: int) -> np.ndarray:
            return np.concatenate([rng.permutation(pool) for _ in range(math.ceil(k / len(pool)))])[:k]

        return np.concatenate([drawn(original, steps * own).reshape(steps, own),
                               drawn(pseudo, steps * (size - own)).reshape(steps, size - own)], axis=1).ravel()

    @property
    def steps(self) -> int:
        """Optimizer steps an epoch (training); batches (validation)."""
        if self.training and self.cfg.train.steps_per_epoch:
            return self.cfg.train.steps_per_epoch
        return math.ceil(len(self.order) / self.batch_size)

    def __len__(self) -> int:
        return self.steps * self.micro

    def waveform(self, i: int) -> np.ndarray:
        info = self.recordings[self.samples.recording_ids[i]]
        return read_window(info, self.samples.starts[i], self.cfg.data.crop_seconds, self.sample_rate)

    def _cached(self, i: int, compute) -> np.ndarray:
        with self._locks[i % len(self._locks)]:
            if i not in self._cache:
                self._cache[i] = compute(i)
            return self._cache[i]

    def window(self, i: int) -> np.ndarray:
        """Sample ``i``'s decoded window, from the cache after the first time."""
        if not self.cfg.train.cache_audio:
            return self.waveform(i)
        pcm = self._cached(i, lambda j: to_pcm16(self.waveform(j)))
        return np.multiply(pcm, np.float32(1 / 32768), dtype=np.float32)

    @property
    def samples_per_epoch(self) -> int:
        return min(self.steps * self.batch_size, len(self.order))

    def draw(self, i: int, epoch: int, repeat: int = 0) -> augment.Drawn:
        """Sample ``i``'s waveform after the waveform-domain augmentations, every drawn value, and the
        spectrogram-domain draw, as drawn in ``epoch`` (its ``repeat``-th time there)."""
        return self.transform.draw(self.window(i), self.rng(i, epoch, repeat))

    def rng(self, i: int, epoch: int, repeat: int = 0) -> np.random.Generator:
        """The Generator of sample ``i``'s draws in ``epoch`` (its ``repeat``-th time there)."""
        return streams.rng(self.cfg.seed, Purpose.SAMPLE_DRAWS, epoch, i, repeat)

    def _batch(self, index: int) -> list[tuple[int, int]]:
        """The (sample, repeat) pairs of batch ``index`` (a micro-batch where a step has several)."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (0..{len(self) - 1})")
        step, part = divmod(index, self.micro)
        # Strided: each micro-batch of a self-training step holds both the rows' windows and pseudo-labelled ones.
        positions = slice(step * self.batch_size + part, (step + 1) * self.batch_size, self.micro)
        return list(zip(self.order[positions].tolist(), self.repeats[positions].tolist()))

    def labels(self, batch: list[tuple[int, int]]) -> np.ndarray:
        idx = [i for i, _ in batch]
        return targets(self.samples.labels[idx], self.samples.known[idx], self.cfg.model)

    def set_epoch(self, epoch: int) -> None:
        """Continue the sequence of shuffles and draws from ``epoch`` (0-based), as when resuming a run."""
        self.epoch = epoch
        self.order = self._order()
        self.repeats = occurrences(self.order)

    def on_epoch_end(self) -> None:
        if self.training:
            self.set_epoch(self.epoch + 1)


class SpectrogramBatches(Batches):
    """(batch, n_mels, frames, 1) float32 images and (batch, n_classes) float32 targets."""

    def __init__(self, samples: Samples, recordings: dict[str, AudioInfo], cfg: Config, *, training: bool,
                 workers: int = 1):
        super().__init__(samples, recordings, cfg, training=training, workers=workers)
        self.features = MelFeatures(cfg.features, self.sample_rate,
                                    max_semitones=cfg.augment.max_semitones if self.spectral else 0)

    def sample(self, i: int, epoch: int, repeat: int = 0, out: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
        """Sample ``i`` as drawn in ``epoch`` (its ``repeat``-th time there): its image and the drawn values.

        ``out``, where given, receives the image.
        """
        if not self.training:
            image = self._cached(i, lambda j: self.features(self.waveform(j)))
            if out is not None:
                out[...] = image
            return image, {}
        y, params, spectral = self.draw(i, epoch, repeat)
        return self.features(y, spectral, out=out), params

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        batch = self._batch(index)
        f = self.cfg.features
        images = np.empty((len(batch), f.n_mels, f.frames, 1), np.float32)
        for k, (i, repeat) in enumerate(batch):
            self.sample(i, self.epoch, repeat, out=images[k, ..., 0])
        if not self.mixup:
            return images, self.labels(batch)
        idx = [i for i, _ in batch]
        images, labels, known = mixup(images, self.samples.labels[idx], self.samples.known[idx], self.cfg,
                                      streams.rng(self.cfg.seed, Purpose.MIXUP, self.epoch, index))
        return images, targets(labels, known, self.cfg.model)


class WaveformBatches(Batches):
    """Batches for ``features.backend: tensorflow``, whose model makes the images where it runs.

    Training with augmentation: ``features.AugmentedAudio``, the windows after the waveform-domain
    augmentations (noise, time shift) and each one's spectrogram-domain draw: the gain per STFT
    frame and the masks (what ``model.Training`` applies).  Otherwise (validation): the windows as
    ``(batch, samples)`` audio, what the saved model takes.
    """

    def __getitem__(self, index: int) -> tuple[np.ndarray | dict[str, np.ndarray], np.ndarray]:
        batch = self._batch(index)
        drawn = [self.draw(i, self.epoch, repeat) for i, repeat in batch]
        audio = np.stack([d.y for d in drawn])
        if not self.spectral:
            return audio, self.labels(batch)
        n, f = self.cfg.data.window_samples, self.cfg.features
        kept = [d.spectral.kept(f.n_mels, f.frames) for d in drawn]
        inputs = AugmentedAudio(
            audio=audio, semitones=np.array([d.spectral.semitones for d in drawn], np.int32),
            gain_db=np.stack([d.spectral.frame_gain_db(n, f.hop_length) for d in drawn]).astype(np.float32),
            mel_kept=np.stack([m for m, _ in kept]), frames_kept=np.stack([t for _, t in kept]))
        return inputs._asdict(), self.labels(batch)


@functools.cache
def reuse_freed_memory() -> None:
    """Have glibc keep freed blocks of up to 32 MB for reuse instead of unmapping them.

    A sample allocates a dozen 2-8 MB arrays; by default each is a fresh mmap whose pages
    fault in on first touch and are returned on free, which costs as much as the FFT and
    serialises worker threads on the kernel's memory lock.  Process-wide and harmless
    (the memory is reused, not leaked); a no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD: its maximum on 64-bit
    libc.mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD: keep that much free memory at the top of the heap


def occurrences(order: np.ndarray) -> np.ndarray:
    """For each position of ``order``, how often its sample came earlier: the repeat its draws are keyed by."""
    ranked = np.argsort(order, kind="stable")
    firsts = np.searchsorted(order[ranked], order[ranked])  # where each sample's run starts in sorted order
    out = np.empty(len(order), dtype=np.int64)
    out[ranked] = np.arange(len(order)) - firsts
    return out


def to_pcm16(y: np.ndarray) -> np.ndarray:
    """float in [-1, 1) -> int16, exact for audio decoded from 16-bit files (soundfile divides by 32768)."""
    return np.clip(np.round(y * 32768), -32768, 32767).astype(np.int16)


def make_batches(samples: Samples, recordings: dict[str, AudioInfo], cfg: Config, *, training: bool,
            workers: int = 1) -> Batches:
    """The batches the configured model takes: images, or waveforms for ``features.backend: tensorflow``."""
    kind = WaveformBatches if front_end(cfg).in_model else SpectrogramBatches
    return kind(samples, recordings, cfg, training=training, workers=workers)
