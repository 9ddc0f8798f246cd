"""Training end to end on the tiny preset: the real `mlflow run` entry point, the MLflow record, faults, resume."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from rfcx_mlops import config
from rfcx_mlops.predict import Scorer
from rfcx_mlops.train import train_fold

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny.yaml"


def tiny_cfg(data_dir: Path, **overrides) -> config.Config:
    return config.load(TINY, {"data.data_dir": str(data_dir), **overrides})


@pytest.fixture(scope="session")
def mlflow_run(tiny_data, tmp_path_factory):
    """One run of the real entry point, with every MLproject parameter set; shared by the tests that read it."""
    home = tmp_path_factory.mktemp("mlflow_run")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
    params = {"fold": "2", "config": str(TINY), "data_dir": str(tiny_data), "epochs": "2", "batch_size": "6",
              "learning_rate": "0.002", "dropout": "0.25", "min_snr": "6", "max_snr": "18", "crop_seconds": "2.5",
              "seed": ""}  # left to the preset, as `make demo` does
    cmd = ["mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "e2e"]
    for k, v in params.items():
        cmd += ["-P", f"{k}={v}"]
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert len(runs) == 1
    return client, runs[0], proc


def test_entry_point_params_reach_the_run(mlflow_run):
    _, run, _ = mlflow_run
    p = run.data.params
    assert (p["train.epochs"], p["train.batch_size"], p["train.learning_rate"], p["model.dropout"]) == \
        ("2", "6", "0.002", "0.25")
    assert (p["augment.min_snr"], p["augment.max_snr"], p["data.crop_seconds"], p["run.seed"]) == \
        ("6.0", "18.0", "2.5", "27")
    assert p["features.n_mels"] == "32" and p["run.name"] == "tiny"
    assert p["epochs"] == "2"  # what `mlflow run` itself logged: the request
    assert Path(p["data.data_dir"]).name == "tiny"


def test_run_metrics_tags_and_status(mlflow_run):
    client, run, _ = mlflow_run
    assert run.info.status == "FINISHED"
    for name in ("train_loss", "train_lwlrap", "val_loss", "val_lwlrap", "learning_rate", "epoch_seconds",
                 "samples_per_second"):
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    val = [m.value for m in client.get_metric_history(run.info.run_id, "val_lwlrap")]
    assert run.data.metrics["best_val_lwlrap"] == pytest.approx(max(val))
    assert run.data.metrics["best_epoch"] == 1 + int(np.argmax(val))
    tags = run.data.tags
    assert tags["mlflow.runName"] == "tiny-fold2" and tags["fold"] == "2" and tags["preset"] == "tiny"
    assert len(tags["dataset_fingerprint"]) == 16 and tags["git_commit"] and tags["device"].startswith("CPU")
    assert tags["demo_data"] == "False"


def test_run_artifacts(mlflow_run, tmp_path):
    client, run, _ = mlflow_run
    rid = run.info.run_id
    names = {a.path for a in client.list_artifacts(rid)} | {a.path for a in client.list_artifacts(rid, "checkpoints")}
    assert {"config.yaml", "folds.csv", "augmentation_samples.png", "species_ap.csv", "species_ap.png",
            "checkpoints/best.keras", "checkpoints/last.keras"} <= names
    cfg = config.from_dict(yaml.safe_load(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")))
    assert cfg.train.epochs == 2 and cfg.seed == 27
    ap = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/species_ap.csv").splitlines()
    assert ap[0] == "species_id,average_precision" and len(ap) == 25
    best = keras.models.load_model(client.download_artifacts(rid, "checkpoints/best.keras", str(tmp_path)))
    assert best.input_shape == (None, 32, 64, 1) and best.output_shape == (None, 24)


def test_bad_configuration_fails_before_training(tiny_data, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    cases = [
        (["--fold", "3"], "fold must be within 1..2"),
        (["--min-snr", "30"], "augment.min_snr (30.0) must not exceed augment.max_snr"),
        (["--learning-rate", "0"], "train.learning_rate must be > 0"),
        (["--crop-seconds", "75"], "data.crop_seconds 75.0 is longer than the shortest recording (60.00 s)"),
        (["--set", "train.nope=1"], "unknown config key train.nope"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "rfcx_mlops.train", "--config", str(TINY), "--data-dir",
                               str(tiny_data), *args], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and message in errors[0], (args, errors)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


class StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch: int, error: BaseException):
        super().__init__()
        self.epoch, self.error = epoch, error

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise self.error


def test_interrupt_then_resume_continues_the_same_run(tiny_data, tracking):
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 3})
    with pytest.raises(KeyboardInterrupt):
        train_fold(cfg, 1, callbacks=(StopAfter(1, KeyboardInterrupt()),))
    client = MlflowClient()
    (run,) = client.search_runs([mlflow.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "KILLED" and "interrupted" in run.data.tags["failure_reason"]
    interrupted = keras.models.load_model(client.download_artifacts(run.info.run_id, "checkpoints/last.keras",
                                                                    str(Path.cwd() / "interrupted")))
    steps_per_epoch = int(interrupted.optimizer.iterations.numpy())
    assert steps_per_epoch > 0

    result = train_fold(cfg, 1, resume=run.info.run_id)
    assert result.run_id == run.info.run_id
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_lwlrap")] == [1, 2, 3]
    last = keras.models.load_model(client.download_artifacts(run.info.run_id, "checkpoints/last.keras",
                                                             str(Path.cwd() / "resumed")))
    assert int(last.optimizer.iterations.numpy()) == 3 * steps_per_epoch  # optimizer state carried over


def test_crash_marks_the_run_failed_with_its_reason(tiny_data, tracking):
    with pytest.raises(RuntimeError):
        train_fold(tiny_cfg(tiny_data), 1, callbacks=(StopAfter(1, RuntimeError("disk on fire")),))
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "RuntimeError: disk on fire"


def test_same_seed_same_result(tiny_data, tracking):
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1})
    a, b = train_fold(cfg, 1), train_fold(cfg, 1)
    assert a.best_val_lwlrap == pytest.approx(b.best_val_lwlrap, abs=1e-3)
    client = MlflowClient()
    loss = [client.get_metric_history(r.run_id, "train_loss")[0].value for r in (a, b)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-3)


def test_mixed_precision_on_a_distribution_strategy(tiny_data, tracking, tmp_path):
    """The GPU switches run anywhere: float16 compute, float32 weights and scores, the model built in the strategy."""
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1, "train.mixed_precision": True, "train.distribute": True})
    try:
        result = train_fold(cfg, 1)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert np.isfinite(result.best_val_lwlrap)
    model = keras.models.load_model(MlflowClient().download_artifacts(result.run_id, "checkpoints/best.keras",
                                                                       str(tmp_path)), compile=False)
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.compute_dtype == "float16" and conv.variable_dtype == "float32"
    assert model.get_layer("species").compute_dtype == "float32"


def test_images_made_in_the_model(tiny_data, tracking, tmp_path):
    """features.backend: tensorflow trains on waveforms; its checkpoint reloads and scores recordings."""
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1, "features.backend": "tensorflow"})
    result = train_fold(cfg, 1)
    assert np.isfinite(result.best_val_lwlrap)
    model = keras.models.load_model(MlflowClient().download_artifacts(result.run_id, "checkpoints/best.keras",
                                                                       str(tmp_path)), compile=False)
    assert set(model.input) == {"audio", "semitones", "gain_db"} and model.get_layer("mel").dtype == "float32"
    scorer = Scorer([model], cfg)
    y = scorer.read(next((tiny_data / "train").glob("*.flac")))
    scores = scorer.scores(y)
    assert scores.shape == (24,) and np.all(np.isfinite(scores))
