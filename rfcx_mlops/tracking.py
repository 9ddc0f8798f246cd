"""Everything a training run writes to MLflow: params, per-epoch metrics, artifacts, tags and plots."""

from __future__ import annotations

import math
import os
import platform
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import keras
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure  # drawn without pyplot: no global backend or figure state
from mlflow.entities import Metric, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from sklearn.metrics import average_precision_score, precision_recall_curve

from rfcx_mlops.config import DEFAULT_EXPERIMENT, Config, flatten, to_yaml
from rfcx_mlops.metrics import lwlrap
from rfcx_mlops.model import weights_only

CHECKPOINT_DIR = "checkpoints"
PROJECT_DIR = Path(__file__).resolve().parents[1]


def use_default_experiment() -> None:
    """Log to $MLFLOW_EXPERIMENT_NAME or ``rfcx``, unless ``mlflow run`` or $MLFLOW_EXPERIMENT_ID chose one.

    Workers started together against a fresh tracking server race to create the
    experiment: the loser uses the winner's.
    """
    if os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    try:
        mlflow.set_experiment(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        mlflow.set_experiment(name)


@contextmanager
def tracked_run(**start_run) -> Iterator[mlflow.ActiveRun]:
    """``mlflow.start_run(**start_run)``, always ended: FINISHED, or FAILED or KILLED with a ``failure_reason``.

    Single folds, cross-validation runs and tuning workers all end their runs through it.
    """
    run = mlflow.start_run(**start_run)
    try:
        yield run
    except KeyboardInterrupt:
        _ignore_interrupts()  # `mlflow run` follows Ctrl-C with SIGTERM: it must not cut the marking short
        mlflow.set_tag("failure_reason", "interrupted (Ctrl-C or SIGTERM)")
        mlflow.end_run("KILLED")
        raise
    except BaseException as exc:
        mlflow.set_tag("failure_reason", f"{type(exc).__name__}: {exc}"[:5000])
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def _ignore_interrupts() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


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


def log_dataset(data_dir: Path, digest: str, is_demo: bool) -> None:
    """The data folder as the run's training input: the run page shows its name, digest and path."""
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    name = f"rfcx-demo-{data_dir.name}" if is_demo else data_dir.resolve().name
    mlflow.log_input(MetaDataset(LocalArtifactDatasetSource(str(data_dir.resolve())), name=name, digest=digest),
                     context="training")


def _save(model: keras.Model, folder: Path, name: str) -> Path:
    """Write ``name``.keras under a temporary name, rename it into place, then log it.

    The checkpoint in the artifact store is replaced only by a complete file.
    """
    final, tmp = folder / f"{name}.keras", folder / f".{name}.partial.keras"
    model.save(tmp)
    os.replace(tmp, final)
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


def drop_checkpoints(run_id: str, keep_last: bool) -> None:
    """A finished or abandoned run is not resumed: its checkpoints go (``keep_last``: all but last.keras)."""
    repo = get_artifact_repository(mlflow.get_run(run_id).info.artifact_uri)
    repo.delete_artifacts(f"{CHECKPOINT_DIR}/best.keras" if keep_last else CHECKPOINT_DIR)


def augmentation_grid(before: list[np.ndarray], after: list[np.ndarray], titles: list[str],
                      params: list[dict[str, Any]]) -> Figure:
    """Each sample's mel image before (left) and after (right) augmentation, with labels and drawn parameters."""
    fig = Figure(figsize=(12, 2.4 * len(before)))
    axes = fig.subplots(len(before), 2, squeeze=False)
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


def log_species_ap(ap: pd.Series, title: str, folds: pd.DataFrame | None = None) -> None:
    """Per-species average precision as CSV (with each fold's column, for a CV run) and as a bar chart."""
    table = ap.rename("average_precision").rename_axis("species_id").reset_index()
    if folds is not None:
        table = table.join(folds.reset_index(drop=True))
    mlflow.log_text(table.to_csv(index=False), "species_ap.csv")
    fig = Figure(figsize=(10, 3.5))
    ax = fig.subplots()
    ax.bar(table["species_id"], table["average_precision"].fillna(0), color="tab:green")
    ax.set_xticks(table["species_id"])
    ax.set_ylim(0, 1)
    ax.set_xlabel("species_id")
    ax.set_ylabel("validation AP")
    ax.set_title(title)
    fig.tight_layout()
    mlflow.log_figure(fig, "species_ap.png")


def log_species_pr(predictions: pd.DataFrame, title: str) -> None:
    """Each species' precision-recall curve over the validation windows (``y<k>`` truth, ``s<k>`` scores)."""
    truth, scores = predictions.filter(regex=r"^y\d+$").to_numpy(), predictions.filter(regex=r"^s\d+$").to_numpy()
    n = truth.shape[1]
    cols = 6
    fig = Figure(figsize=(2.2 * cols, 2.0 * math.ceil(n / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(n / cols), cols, sharex=True, sharey=True, squeeze=False).ravel()
    for k, ax in enumerate(axes):
        if k >= n:
            ax.set_axis_off()
            continue
        if not truth[:, k].any():
            ax.set_title(f"s{k}: no calls", fontsize=8)
            continue
        precision, recall, _ = precision_recall_curve(truth[:, k], scores[:, k])
        ax.plot(recall, precision, color="tab:blue")
        ax.set_title(f"s{k}: AP {average_precision_score(truth[:, k], scores[:, k]):.2f}", fontsize=8)
    axes[0].set_xlim(0, 1)
    axes[0].set_ylim(0, 1.02)
    fig.supxlabel("recall")
    fig.supylabel("precision")
    fig.suptitle(title)
    mlflow.log_figure(fig, "species_pr.png")


def log_cv_summary(results: list, monitor: str) -> None:
    """On a cross-validation run: mean and std of the folds' best ``monitor``, per-species AP averaged over
    folds, and the out-of-fold predictions (each validation window scored by its fold's best model)."""
    best = np.array([r.best_value for r in results])
    oof = pd.concat([r.predictions for r in results], ignore_index=True)
    truth, scores = oof.filter(regex=r"^y\d+$").to_numpy(), oof.filter(regex=r"^s\d+$").to_numpy()
    mlflow.log_metrics({f"best_{monitor}": float(best.mean()), f"best_{monitor}_std": float(best.std()),
                        "oof_lwlrap": lwlrap(truth, scores),
                        **{f"best_{monitor}_fold{r.fold}": r.best_value for r in results}})
    per_fold = pd.DataFrame({f"fold{r.fold}": r.species_ap for r in results})
    log_species_ap(per_fold.mean(axis=1), f"Per-species validation AP, mean over {len(results)} folds", per_fold)
    mlflow.log_text(oof.to_csv(index=False, float_format="%.6g"), "oof_predictions.csv")


def download_checkpoint(run_id: str, name: str, dst: str | Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"{CHECKPOINT_DIR}/{name}.keras",
                                                    dst_path=str(dst)))
