"""An MLflow run's record: its lifecycle, params, tags and data set, and reading a run back.

Single folds, cross-validation runs, tuning trials and studies all start and end their runs
through ``tracked_run`` and tag them through ``tags``.
"""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import yaml

from rfcx_mlops.config import DEFAULT_EXPERIMENT, Config, flatten, from_dict, to_yaml

PROJECT_DIR = Path(__file__).resolve().parents[2]


def use_default_experiment(default: str = DEFAULT_EXPERIMENT) -> None:
    """Log to $MLFLOW_EXPERIMENT_NAME or ``default``, unless ``mlflow run`` or $MLFLOW_EXPERIMENT_ID chose one.

    Workers started together against a fresh tracking server race to create the
    experiment: the loser uses the winner's.
    """
    if os.environ.get("MLFLOW_RUN_ID") or os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or default
    try:
        mlflow.set_experiment(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        mlflow.set_experiment(name)


@contextmanager
def tracked_run(**start_run) -> Iterator[mlflow.ActiveRun]:
    """``mlflow.start_run(**start_run)``, always ended: FINISHED, or FAILED or KILLED with a ``failure_reason``."""
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


def tags(cfg: Config, **extra) -> dict[str, str]:
    """The tags every run of ``cfg`` carries (its preset, the code's commit), and ``extra``."""
    return {"preset": cfg.name, "git_commit": git_commit(), **{k: str(v) for k, v in extra.items()}}


def data_tags(data_dir: Path, demo: bool) -> dict[str, str]:
    """Where a run's data came from."""
    return {"data_dir": str(data_dir.resolve()), "demo_data": str(demo)}


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


def logged_config(run: mlflow.entities.Run) -> Config:
    """The config ``run`` was started with, read back from its config.yaml (MlflowException where it has none)."""
    return from_dict(yaml.safe_load(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")))


def hand_launcher_to(run_id: str) -> None:
    """Under ``mlflow run``, which opened a run of its own for this invocation: tag that run with the run
    ``run_id`` it continues, and keep it from becoming the active run."""
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    if launcher and launcher != run_id:
        mlflow.tracking.MlflowClient().set_tag(launcher, "resumed_run_id", run_id)
