"""Per-epoch metrics and the checkpoints a killed run resumes from; what a finished run keeps of them."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import mlflow
import numpy as np
from mlflow.entities import Metric, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

from rfcx_mlops.errors import ConfigError
from rfcx_mlops.files import atomic_path

CHECKPOINT_DIR = "checkpoints"


def weights_only(model: keras.Model, weights: list) -> keras.Model:
    """An uncompiled model of ``model``'s architecture holding ``weights``: saved, it has no optimizer state.

    ``keras.models.clone_model`` would not do: its clone shares the original's optimizer and saves its slots.
    """
    copy = type(model).from_config(model.get_config())
    copy.set_weights(weights)
    return copy


def _save(model: keras.Model, folder: Path, name: str) -> Path:
    """Write ``name``.keras whole, then log it: the checkpoint in the artifact store is replaced only by a
    complete file."""
    final = folder / f"{name}.keras"
    with atomic_path(final) as tmp:
        model.save(tmp)
    mlflow.log_artifact(str(final), CHECKPOINT_DIR)
    return final


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch metrics with step = epoch number (from 1), and the checkpoints a killed run resumes from.

    ``checkpoints/last.keras`` (weights and optimizer state) is replaced every epoch.  The best
    epoch's weights live in it as long as it is the last epoch; when a worse epoch is about to
    replace it, they are written first to ``checkpoints/best.keras`` (weights only).  So no
    epoch's weights are stored twice, and ``best_weights`` always holds the best epoch's.
    ``checkpointed`` is the model saved: the trained one, or the one a training wrapper trains;
    ``monitor`` the metric that says which epoch is best (an epoch without it never is).
    """

    def __init__(self, n_train_samples: int, folder: Path, checkpointed: keras.Model, monitor: str = "val_lwlrap",
                 *, best_so_far: float = -np.inf, best_epoch: int = 0, best_weights: list[np.ndarray] | None = None):
        super().__init__()
        self.n_train_samples = n_train_samples
        self.folder = folder
        self.checkpointed = checkpointed
        self.monitor = monitor
        self.best = best_so_far
        self.best_epoch = best_epoch
        self.best_weights = best_weights
        self._started = self._trained = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._trained = time.perf_counter()  # the last one marks the end of training, before validation

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        now = time.perf_counter()
        step = epoch + 1
        val = float(logs.get(self.monitor, np.nan))
        metrics = {
            "train_loss": logs.get("loss"),
            "train_lwlrap": logs.get("lwlrap"),
            "val_loss": logs.get("val_loss"),
            "val_lwlrap": logs.get("val_lwlrap", np.nan),
            "val_recording_lwlrap": logs.get("val_recording_lwlrap"),
            "learning_rate": float(keras.ops.convert_to_numpy(self.checkpointed.optimizer.learning_rate)),
            "epoch_seconds": now - self._started,
            "samples_per_second": self.n_train_samples / max(self._trained - self._started, 1e-9),
        }
        if not val > self.best and self.best_epoch == step - 1 and self.best_weights is not None:
            _save(weights_only(self.checkpointed, self.best_weights), self.folder, "best")
        _save(self.checkpointed, self.folder, "last")
        if val > self.best:
            self.best, self.best_epoch, self.best_weights = val, step, self.checkpointed.get_weights()
        # This epoch's metrics and the tags resume reads go out in one call, after the checkpoint:
        # an interruption anywhere leaves a run that resumes from a consistent epoch.
        timestamp = int(time.time() * 1000)
        mlflow.tracking.MlflowClient().log_batch(
            mlflow.active_run().info.run_id,
            metrics=[Metric(k, float(v), timestamp, step) for k, v in metrics.items() if v is not None],
            tags=[RunTag("checkpoint_epoch", str(step)), RunTag("best_epoch", str(self.best_epoch))])


def best_weights(run_id: str, best_epoch: int, last_epoch: int, last: keras.Model,
                 folder: Path) -> list[np.ndarray] | None:
    """The best epoch's weights of a run resumed from ``last`` (epoch ``last_epoch``): ``last``'s own, or its
    best.keras checkpoint's."""
    if best_epoch == 0:
        return None
    if best_epoch == last_epoch:
        return last.get_weights()
    return keras.models.load_model(download_checkpoint(run_id, "best", folder), compile=False).get_weights()


def check_resumable(run_id: str) -> None:
    """A ``ConfigError`` unless run ``run_id`` holds a checkpoint to resume from."""
    if f"{CHECKPOINT_DIR}/last.keras" not in {
            a.path for a in mlflow.MlflowClient().list_artifacts(run_id, CHECKPOINT_DIR)}:
        raise ConfigError(f"resume: run {run_id} has no checkpoint: it stopped before its first epoch ended; "
                          "start a new run")


def drop_checkpoints(run_id: str, keep_last: bool) -> None:
    """A finished or abandoned run is not resumed: its checkpoints go (``keep_last``: all but last.keras)."""
    repo = get_artifact_repository(mlflow.get_run(run_id).info.artifact_uri)
    repo.delete_artifacts(f"{CHECKPOINT_DIR}/best.keras" if keep_last else CHECKPOINT_DIR)


def download_checkpoint(run_id: str, name: str, dst: str | Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_DIR}/{name}.keras",
                                                    dst_path=str(dst)))
