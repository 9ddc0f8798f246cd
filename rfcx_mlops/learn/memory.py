"""The memory a training run needs, estimated from its config before it starts, and the memory this machine has.

A run's peak is in its training steps: the process (TensorFlow, ResNet50 and its optimizer's
state), the activations a step keeps for its backward pass, which grow with the micro-batch
(``train.batch_size / train.accumulate_steps``) and the image (``n_mels x frames``), and the
batches' caches (decoded training windows, validation images), which grow with the data set.
The figures are peak resident memory of ResNet50 training on a CPU, measured by
``benchmarks/memory.py`` (docs/experiments.md, "Memory").
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import psutil

from rfcx_mlops.config import Config
from rfcx_mlops.errors import UserError

GB = 1e9
# benchmarks/memory.py on a CPU (TensorFlow 2.21, Keras 3.15): peak RSS = process + micro-batch x image pixels x
# STEP_BYTES_PER_PIXEL + the caches.  Float32's figures serve mixed precision too, whose activations are smaller
# but were not measured (on a CPU it is too slow to use).
PROCESS_BYTES = 2.0e9
ACCUMULATION_BYTES = 0.6e9  # train.accumulate_steps > 1: the gradients' accumulators and Keras' conditional step
STEP_BYTES_PER_PIXEL = 2200.0
# On a GPU, its own memory: ResNet50's weights, gradients and Adam's moments (0.4 GB) and cuDNN's workspace.
# Not measured yet: benchmarks/memory.py prints TensorFlow's peak device memory where there is a GPU.
GPU_STATE_BYTES = 1.0e9
CLOSE = 0.8  # of what is available: a warning


class MemoryRefused(UserError):
    """A run that would need more memory than this machine has."""


@dataclass(frozen=True)
class Estimate:
    """Bytes at a run's peak, by what takes them."""

    process: float  # TensorFlow, the model and its optimizer's state
    step: float  # a training step's activations and gradients
    caches: float  # decoded training windows, validation images
    per_sample: float  # of the step, for each sample of the micro-batch

    @property
    def total(self) -> float:
        return self.process + self.step + self.caches


def micro_batch(cfg: Config) -> int:
    return cfg.train.batch_size // cfg.train.accumulate_steps


def sample_bytes(cfg: Config) -> float:
    """A training step's activations for one of ``cfg``'s images."""
    return cfg.features.n_mels * cfg.features.frames * STEP_BYTES_PER_PIXEL


def cache_bytes(cfg: Config, train_windows: int, val_windows: int) -> float:
    """The batches' caches once full: each training window's 16-bit audio (``train.cache_audio``), each validation
    window's float32 image (or audio, where the model makes its images)."""
    audio = cfg.data.crop_seconds * cfg.data.sample_rate * 2.0
    image = cfg.features.n_mels * cfg.features.frames * 4.0 if cfg.features.backend == "numpy" else audio * 2
    return train_windows * audio * cfg.train.cache_audio + val_windows * image


def estimate(cfg: Config, train_windows: int, val_windows: int, replicas: int = 0) -> Estimate:
    """The peak of a run of ``cfg`` on ``train_windows`` training and ``val_windows`` validation windows.

    ``replicas``: 0 on a CPU (the process's RAM); else the GPUs each micro-batch is split over
    (``train.distribute``), and the estimate is one GPU's own memory (the caches stay in RAM).
    """
    micro = micro_batch(cfg)
    accumulators = ACCUMULATION_BYTES * (cfg.train.accumulate_steps > 1)
    if not replicas:
        return Estimate(PROCESS_BYTES + accumulators, micro * sample_bytes(cfg),
                        cache_bytes(cfg, train_windows, val_windows), sample_bytes(cfg))
    share = math.ceil(micro / replicas)
    return Estimate(GPU_STATE_BYTES + accumulators, share * sample_bytes(cfg), 0.0, sample_bytes(cfg) * share / micro)


def largest_micro_batch(estimated: Estimate, available: float) -> int:
    """The largest micro-batch whose run fits in ``available`` bytes (0: not even one sample)."""
    return max(0, int((available - estimated.process - estimated.caches) // estimated.per_sample))


def ram_available() -> float:
    """Bytes of RAM the kernel can give this process without swapping, within its control group's limit."""
    free = float(psutil.virtual_memory().available)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = Path("/sys/fs/cgroup/memory.current").read_text().strip()
    except OSError:
        return free
    return min(free, float(limit) - float(used)) if limit.isdigit() and used.isdigit() else free


def gpu_free() -> float | None:
    """Free bytes on the fullest visible GPU, as ``nvidia-smi`` reports them; None where it cannot say."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return min(float(line) for line in out.split()) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def check(cfg: Config, estimated: Estimate, available: float, where: str, force: bool = False) -> str | None:
    """Refuse (``MemoryRefused``, one line) a run estimated beyond ``available`` bytes (``where``: what they are),
    naming what would fit, unless ``force``; a warning line where it fits with less than a fifth to spare, or is
    forced; else None."""
    need = f"{cfg.name} with train.batch_size {cfg.train.batch_size}" + (
        f" in {cfg.train.accumulate_steps} micro-batches" if cfg.train.accumulate_steps > 1 else "")
    figures = f"about {estimated.total / GB:.1f} GB at its peak, {where} {available / GB:.1f} GB"
    if estimated.total <= CLOSE * available:
        return None
    if estimated.total <= available:
        return f"{need} needs {figures}: close to the limit (docs/experiments.md, \"Memory\")"
    if force:
        return f"{need} needs {figures}: running it anyway (--force)"
    raise MemoryRefused(f"{need} needs {figures}; {_what_fits(cfg, estimated, available)}; --force runs it anyway")


def _what_fits(cfg: Config, estimated: Estimate, available: float) -> str:
    """The largest batch that fits with a fifth to spare, and the fewest micro-batches that fit the configured
    batch so."""
    available *= CLOSE
    micro = largest_micro_batch(estimated, available)
    if micro == 0:
        return "not even a batch of one fits: a smaller image does (experiments/quick.yaml)"
    fits = f"--batch-size {micro * cfg.train.accumulate_steps} fits"
    accumulating = estimated if cfg.train.accumulate_steps > 1 else dataclasses.replace(
        estimated, process=estimated.process + ACCUMULATION_BYTES)
    room, batch = largest_micro_batch(accumulating, available), cfg.train.batch_size
    steps = next((k for k in range(2, batch + 1) if batch % k == 0 and batch // k <= room), None)
    if steps is None:
        return fits
    return f"{fits}, or the same batch {batch} in micro-batches of {batch // steps} (--set train.accumulate_steps={steps})"
