"""Everything a training run writes to MLflow: params, per-epoch metrics, artifacts, tags and plots."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import matplotlib

matplotlib.use("Agg")  # files only: runs have no display
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from rfcx_mlops.config import Config, flatten, to_yaml  # noqa: E402

DEFAULT_EXPERIMENT = "rfcx"
CHECKPOINT_DIR = "checkpoints"
PROJECT_DIR = Path(__file__).resolve().parents[1]


def use_default_experiment() -> None:
    """Log to the ``rfcx`` experiment unless ``mlflow run`` or the environment already chose one."""
    if not any(os.environ.get(v) for v in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")):
        mlflow.set_experiment(DEFAULT_EXPERIMENT)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_DIR, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_DIR,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device() -> str:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return f"{len(gpus)} GPU: " + ", ".join(tf.config.experimental.get_device_details(g).get("device_name", g.name)
                                                 for g in gpus)
    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def config_params(cfg: Config) -> dict[str, str]:
    """Every config value under its dotted name; top-level keys as ``run.<key>``.

    ``mlflow run`` logs its own parameters first (``seed`` among them, empty when
    the preset decides), and MLflow refuses a second value for a param, so the
    resolved values must not share those names.
    """
    return {(k if "." in k else f"run.{k}"): str(v) for k, v in flatten(cfg).items()}


def log_config(cfg: Config) -> None:
    """Every config value as a param (``config_params``), and the resolved config as config.yaml."""
    params = config_params(cfg)
    keys = list(params)
    for i in range(0, len(keys), 100):  # MLflow takes at most 100 params a call
        mlflow.log_params({k: params[k] for k in keys[i : i + 100]})
    mlflow.log_text(to_yaml(cfg), "config.yaml")


def log_file(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path)


def save_checkpoints(model: keras.Model, folder: Path, best: bool) -> None:
    """Write last.keras (and best.keras, a copy of it, when ``best``) atomically, then log them.

    Each file is written under a temporary name and renamed into place, so an
    interrupted save never leaves a half-written checkpoint behind.
    """
    last, tmp = folder / "last.keras", folder / ".partial.keras"
    model.save(tmp)
    os.replace(tmp, last)
    mlflow.log_artifact(str(last), CHECKPOINT_DIR)
    if best:
        shutil.copyfile(last, tmp)
        os.replace(tmp, folder / "best.keras")
        mlflow.log_artifact(str(folder / "best.keras"), CHECKPOINT_DIR)


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics with step = epoch number (from 1), and the checkpoints: last always, best on improvement."""

    def __init__(self, n_train_samples: int, folder: Path, best_so_far: float = -np.inf, best_epoch: int = 0):
        super().__init__()
        self.n_train_samples = n_train_samples
        self.folder = folder
        self.best = best_so_far
        self.best_epoch = best_epoch
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = time.perf_counter() - self._started
        step = epoch + 1
        val = float(logs.get("val_lwlrap", np.nan))
        # Checkpoints first: a run interrupted now still has this epoch's weights.
        improved = val > self.best
        if improved:
            self.best, self.best_epoch = val, step
        save_checkpoints(self.model, self.folder, best=improved)
        lr = self.model.optimizer.learning_rate
        metrics = {
            "train_loss": logs.get("loss"),
            "train_lwlrap": logs.get("lwlrap"),
            "val_loss": logs.get("val_loss"),
            "val_lwlrap": val,
            "learning_rate": float(keras.ops.convert_to_numpy(lr)),
            "epoch_seconds": seconds,
            "samples_per_second": self.n_train_samples / seconds,
        }
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)
        mlflow.set_tags({"checkpoint_epoch": step, "best_epoch": self.best_epoch})


def augmentation_grid(before: list[np.ndarray], after: list[np.ndarray], titles: list[str],
                      params: list[dict[str, Any]]) -> plt.Figure:
    """Each sample's mel image before (left) and after (right) augmentation, with labels and drawn parameters."""
    fig, axes = plt.subplots(len(before), 2, figsize=(12, 2.4 * len(before)), squeeze=False)
    for row, (b, a, title, p) in enumerate(zip(before, after, titles, params)):
        drawn = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
        for ax, image, label in ((axes[row, 0], b, f"{title}: original"), (axes[row, 1], a, f"augmented: {drawn}")):
            ax.imshow(image, origin="lower", aspect="auto", cmap="magma", vmin=0, vmax=1)
            ax.set_title(label, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("mel bin")
    fig.tight_layout()
    return fig


def log_species_ap(ap: pd.Series, best_epoch: int) -> None:
    """Per-species average precision of the best epoch, as CSV and as a bar chart."""
    table = ap.rename("average_precision").rename_axis("species_id").reset_index()
    mlflow.log_text(table.to_csv(index=False), "species_ap.csv")
    fig, ax = plt.subplots(figsize=(10, 3.5))
    ax.bar(table["species_id"], table["average_precision"].fillna(0), color="tab:green")
    ax.set_xticks(table["species_id"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("species_id")
    ax.set_ylabel("validation AP")
    ax.set_title(f"Per-species validation average precision, best epoch ({best_epoch})")
    fig.tight_layout()
    mlflow.log_figure(fig, "species_ap.png")
    plt.close(fig)


def log_figure(fig: plt.Figure, name: str) -> None:
    mlflow.log_figure(fig, name)
    plt.close(fig)


def download_checkpoint(run_id: str, name: str, dst: str | Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_DIR}/{name}.keras",
                                                    dst_path=str(dst)))


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="rfcx-run-")
