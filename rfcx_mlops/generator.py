"""Batches of log-mel images for Keras: training (shuffled, augmented) and validation (every sample, in order)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from rfcx_mlops import augment
from rfcx_mlops.audio import AudioInfo, read_window
from rfcx_mlops.config import Config
from rfcx_mlops.features import MelFeatures


@dataclass(frozen=True)
class Samples:
    """One training or validation sample per labelled call: a crop window and its targets."""

    recording_ids: np.ndarray  # (n,) str
    starts: np.ndarray  # (n,) window start in seconds
    labels: np.ndarray  # (n, n_classes) float32 multi-hot

    def __len__(self) -> int:
        return len(self.starts)


def window_start(t_min: float, t_max: float, crop_seconds: float, duration: float) -> float:
    """Start of the crop centred on a call, moved inside the recording (the seed's rule)."""
    start = (t_min + t_max) / 2 - crop_seconds / 2
    return float(max(0.0, min(start, duration - crop_seconds)))


def make_samples(events: pd.DataFrame, recordings: dict[str, AudioInfo], crop_seconds: float,
                 n_classes: int) -> Samples:
    """A window centred on every event; its targets are every species with a call overlapping the window.

    Labelling the whole window (not just the row's species) keeps a second species
    audible in the same crop from counting as a wrong answer.
    """
    by_recording = {rid: rows for rid, rows in events.groupby("recording_id")}
    ids, starts, labels = [], [], np.zeros((len(events), n_classes), dtype=np.float32)
    for i, row in enumerate(events.itertuples(index=False)):
        start = window_start(row.t_min, row.t_max, crop_seconds, recordings[row.recording_id].duration)
        calls = by_recording[row.recording_id]
        overlapping = calls[(calls["t_max"] > start) & (calls["t_min"] < start + crop_seconds)]
        labels[i, overlapping["species_id"].to_numpy()] = 1.0
        ids.append(row.recording_id)
        starts.append(start)
    return Samples(np.array(ids), np.array(starts, dtype=np.float64), labels)


class SpectrogramBatches(keras.utils.PyDataset):
    """(batch, n_mels, frames, 1) float32 images and (batch, n_classes) float32 targets.

    Training mode reshuffles every epoch and augments each sample; validation mode
    yields every sample in order, the last partial batch included.  Every random
    draw comes from a Generator seeded by (seed, epoch, sample), so the batches
    depend only on the seed, never on worker count or timing.
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
        self.batch_size = cfg.train.batch_size
        self.sample_rate = cfg.data.sample_rate
        self.features = MelFeatures(cfg.features, self.sample_rate)
        self.transform = augment.from_config(cfg.augment, self.sample_rate) if training else None
        self.epoch = 0
        self.order = self._order()
        self._cache: dict[int, np.ndarray] = {}

    def _order(self) -> np.ndarray:
        n = len(self.samples)
        if not self.training:
            return np.arange(n)
        rng = np.random.default_rng([self.cfg.seed, self.epoch])
        steps = self.cfg.train.steps_per_epoch
        # A fixed number of steps may need more than one pass over the samples.
        passes = 1 if steps == 0 else math.ceil(steps * self.batch_size / n)
        return np.concatenate([rng.permutation(n) for _ in range(passes)])

    def __len__(self) -> int:
        if self.training and self.cfg.train.steps_per_epoch:
            return self.cfg.train.steps_per_epoch
        return math.ceil(len(self.samples) / self.batch_size)

    def waveform(self, i: int) -> np.ndarray:
        info = self.recordings[self.samples.recording_ids[i]]
        return read_window(info, self.samples.starts[i], self.cfg.data.crop_seconds, self.sample_rate)

    @property
    def samples_per_epoch(self) -> int:
        return min(len(self) * self.batch_size, len(self.order))

    def sample(self, i: int, epoch: int, repeat: int = 0) -> tuple[np.ndarray, dict]:
        """Sample ``i`` as drawn in ``epoch`` (its ``repeat``-th time there): its image and the drawn parameters."""
        if not self.training:
            # Validation images never change: compute each once.
            if i not in self._cache:
                self._cache[i] = self.features(self.waveform(i))
            return self._cache[i], {}
        rng = np.random.default_rng([self.cfg.seed, epoch, i, repeat])
        y, params = self.transform(self.waveform(i), rng)
        return self.features(y), params

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range (0..{len(self) - 1})")
        start = index * self.batch_size
        idx = self.order[start : start + self.batch_size]
        n = len(self.samples)  # the order holds whole passes: position // n is the pass
        images = np.stack([self.sample(int(i), self.epoch, (start + k) // n)[0] for k, i in enumerate(idx)])
        images = images[..., None]
        return images, self.samples.labels[idx]

    def set_epoch(self, epoch: int) -> None:
        """Continue the sequence of shuffles and draws from ``epoch`` (0-based), as when resuming a run."""
        self.epoch = epoch
        self.order = self._order()

    def on_epoch_end(self) -> None:
        if self.training:
            self.epoch += 1
            self.order = self._order()
