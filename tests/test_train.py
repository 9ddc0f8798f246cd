"""Training end to end on the tiny preset: the real `mlflow run` entry point, the MLflow record, faults, resume."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import COLUMNS, make_data_dir
from rfcx_mlops import config
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.infer import servable
from rfcx_mlops.infer.scorer import Scorer, download_weights
from rfcx_mlops.jobs.fit import train_fold
from rfcx_mlops.track import checkpoints

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


def test_a_training_run_keeps_library_noise_off_stderr(mlflow_run):
    """No TensorFlow C++ log, no MLflow pickling warning or progress bars, no scikit-learn fold warning."""
    _, _, proc = mlflow_run
    noise = re.compile(r"^[IWEF]\d{4} |absl::InitializeLog|oneDNN|cuInit|cuda drivers|cpu_feature_guard|CloudPickle|"
                       r"Downloading artifacts|least populated class")
    assert [line for line in proc.stderr.splitlines() if noise.search(line)] == []
    assert re.search(r"INFO rfcx_mlops.fit: training windows: \d+ on train_tp rows, 0 on train_fp rows, 0 at random "
                     r"places\n", proc.stderr)
    assert re.search(r"INFO rfcx_mlops.fit: fold 2: \d+ training windows and \d+ validation windows", proc.stderr)


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
    # the process, 6 samples of 32 x 64 images, the 2.5 s windows' audio and the validation images
    assert 2.0 < float(p["memory_estimate_gb"]) < 2.1


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
    (data,) = run.inputs.dataset_inputs  # the data folder as MLflow's run page shows it
    assert data.dataset.name == "tiny" and data.dataset.digest == tags["dataset_fingerprint"]
    assert json.loads(data.dataset.source) == {"uri": tags["data_dir"]} and data.dataset.source_type == "local"
    assert {t.key: t.value for t in data.tags} == {"mlflow.data.context": "training"}
    assert not any(name.startswith("system/") for name in run.data.metrics)  # system metrics are opt-in


def test_run_artifacts(mlflow_run, tmp_path):
    client, run, _ = mlflow_run
    rid = run.info.run_id
    names = {a.path for a in client.list_artifacts(rid)}
    assert {"config.yaml", "folds.csv", "augmentation_samples.png", "species_ap.csv", "species_ap.png", "species_pr.png",
            "species.csv", "pictures"} <= names
    folds_table = pd.read_csv(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/folds.csv", dst_path=str(tmp_path)))
    first = sorted(folds_table.loc[folds_table["fold"] == 2, "recording_id"].unique())[:3]  # the run is fold 2
    assert [a.path for a in client.list_artifacts(rid, "pictures")] == [f"pictures/{r}.png" for r in first]
    species = pd.read_csv(mlflow.artifacts.download_artifacts(f"{run.info.artifact_uri}/species.csv", dst_path=str(tmp_path)))
    assert list(species.columns) == ["species_id", "name", "f_low", "f_high"] and len(species) == 24
    assert client.list_artifacts(rid, "checkpoints") == []  # a finished run cannot be resumed: its model is enough
    cfg = config.from_dict(yaml.safe_load(mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")))
    assert cfg.train.epochs == 2 and cfg.seed == 27
    ap = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/species_ap.csv").splitlines()
    assert ap[0] == "species_id,average_precision" and len(ap) == 25
    weights = download_weights(run.data.tags["model_uri"], tmp_path, client)
    best = keras.models.load_model(weights, compile=False)
    assert best.input_shape == (None, 32, 64, 1) and best.output_shape == (None, 24)
    assert not optimizer_state(weights)
    model = client.get_logged_model(run.data.tags["model_uri"].removeprefix("models:/"))
    requirements = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model.artifact_location}/requirements.txt", dst_path=str(tmp_path / "req"),
        tracking_uri=client.tracking_uri)).read_text().split()
    # What serving needs, at the versions trained with; nothing for training or tuning (optuna, matplotlib, ...).
    assert sorted(r.split("==")[0] for r in requirements) == sorted(servable.SERVING_PACKAGES)


def test_resuming_a_finished_run_trains_and_logs_nothing(mlflow_run, tmp_path):
    client, run, _ = mlflow_run
    env = {**os.environ, "MLFLOW_TRACKING_URI": client.tracking_uri}
    proc = subprocess.run([sys.executable, "-m", "rfcx_mlops.train", "--resume", run.info.run_id], cwd=tmp_path,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"run {run.info.run_id} has finished: nothing left to train"
    after = client.get_run(run.info.run_id)
    assert after.info == run.info and after.data.tags == run.data.tags and after.data.metrics == run.data.metrics


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


def optimizer_state(keras_file) -> bool:
    """Whether a .keras file holds optimizer variables (Adam's slots triple a checkpoint's size)."""
    with zipfile.ZipFile(keras_file) as z, h5py.File(io.BytesIO(z.read("model.weights.h5"))) as weights:
        return "optimizer" in weights


def logged_model(run_id: str, folder: Path) -> keras.Model:
    model_uri = MlflowClient().get_run(run_id).data.tags["model_uri"]
    return keras.models.load_model(download_weights(model_uri, folder), compile=False)


HEADER = ",".join(COLUMNS) + "\n"


@pytest.mark.parametrize("tp, fp, message", [
    ("rec0,3,1,1.0,500,2.5,2000\n../secret,3,1,1.0,500,2.5,2000\n", "",
     "train_tp.csv line 3: recording_id '../secret' is not a plain file name (no folders, '..' or absolute paths)"),
    ("rec0,3,1,1.0,500,2.5,2000\n", "rec0,4,1,5.0,500,4.0,900\n", "train_fp.csv line 2: t_min 5.0 is not below t_max 4.0"),
    ("", "", "train_tp.csv: holds no labelled calls"),
])
def test_bad_data_fails_before_training(tmp_path, tp, fp, message):
    folder = make_data_dir(tmp_path / "data", [("rec0", 3, 1, 1.0, 500.0, 2.5, 2000.0)])
    (folder / "train_tp.csv").write_text(HEADER + tp)
    (folder / "train_fp.csv").write_text(HEADER + fp)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.run([sys.executable, "-m", "rfcx_mlops.train", "--config", str(TINY), "--data-dir", str(folder)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


class StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch: int, error: BaseException):
        super().__init__()
        self.epoch, self.error = epoch, error

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise self.error


def test_interrupt_then_resume_continues_the_same_run(tiny_data, tracking):
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 3, "train.keep_checkpoint": "always"})
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
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/last.keras"]


def test_checkpoints_hold_each_epoch_s_weights_once(tracking, tmp_path):
    """last.keras every epoch; the best epoch's weights go to best.keras (weights only) just before a worse
    epoch replaces them in last.keras; a finished run drops both."""
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    logger = checkpoints.EpochLogger(8, tmp_path, model)
    logger.set_model(model)
    client = MlflowClient()

    def stored(run_id):
        return sorted(a.path.split("/")[-1] for a in client.list_artifacts(run_id, "checkpoints"))

    with mlflow.start_run() as run:
        rid = run.info.run_id
        seen = []
        for epoch, val in enumerate([0.5, 0.7, 0.6, 0.65]):
            model.set_weights([np.full_like(w, epoch + 1) for w in model.get_weights()])  # epoch n's weights: n
            logger.on_epoch_begin(epoch)
            logger.on_epoch_end(epoch, {"loss": 1.0, "val_lwlrap": val})
            seen.append(stored(rid))
        assert seen == [["last.keras"], ["last.keras"], ["best.keras", "last.keras"], ["best.keras", "last.keras"]]
        best_file = client.download_artifacts(rid, "checkpoints/best.keras", str(tmp_path / "b"))
        best = keras.models.load_model(best_file)
        assert not optimizer_state(best_file) and all((w == 2).all() for w in best.get_weights())
        assert optimizer_state(client.download_artifacts(rid, "checkpoints/last.keras", str(tmp_path / "l")))
        assert all((w == 2).all() for w in logger.best_weights) and logger.best_epoch == 2
        tags = client.get_run(rid).data.tags
        assert (tags["checkpoint_epoch"], tags["best_epoch"]) == ("4", "2")
        resumed = checkpoints.best_weights(rid, 2, 4, model, tmp_path / "resume")
        assert all((w == 2).all() for w in resumed)  # from best.keras, not from the last epoch
        checkpoints.drop_checkpoints(rid, keep_last=False)
        assert stored(rid) == []


def test_resuming_a_run_without_checkpoint_is_refused_and_leaves_it_alone(tiny_data, tracking):
    client = MlflowClient()
    bare = client.create_run(mlflow.get_experiment_by_name("tests").experiment_id)
    with pytest.raises(ConfigError, match=f"resume: run {bare.info.run_id} has no checkpoint"):
        train_fold(tiny_cfg(tiny_data), 1, resume=bare.info.run_id)
    assert client.get_run(bare.info.run_id).info.status == "RUNNING"


def test_crash_marks_the_run_failed_with_its_reason(tiny_data, tracking):
    with pytest.raises(RuntimeError):
        train_fold(tiny_cfg(tiny_data), 1, callbacks=(StopAfter(1, RuntimeError("disk on fire")),))
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "RuntimeError: disk on fire"


def test_same_seed_same_result(tiny_data, tracking):
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1})
    a, b = train_fold(cfg, 1), train_fold(cfg, 1)
    assert a.best_value == pytest.approx(b.best_value, abs=1e-3)
    client = MlflowClient()
    loss = [client.get_metric_history(r.run_id, "train_loss")[0].value for r in (a, b)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-3)


@pytest.mark.slow
def test_training_learns(tiny_data, tracking):
    """Ten epochs on the tiny set without augmentation: the model fits its training windows (their LWLRAP
    rises well above chance, about 0.15) while the loss falls."""
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 10, "augment.enabled": False, "train.learning_rate": 0.003})
    result = train_fold(cfg, 1)
    client = MlflowClient()
    fit_ = [m.value for m in client.get_metric_history(result.run_id, "train_lwlrap")]
    loss = [m.value for m in client.get_metric_history(result.run_id, "train_loss")]
    assert max(fit_[-3:]) > fit_[0] + 0.15 and min(loss[-3:]) < loss[0] - 1.0, (fit_, loss)


def test_mixed_precision_on_a_distribution_strategy(tiny_data, tracking, tmp_path):
    """The GPU switches run anywhere: float16 compute, float32 weights and scores, the model built in the strategy."""
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1, "train.mixed_precision": True, "train.distribute": True})
    try:
        result = train_fold(cfg, 1)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert np.isfinite(result.best_value)
    model = logged_model(result.run_id, tmp_path)
    conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    assert conv.compute_dtype == "float16" and conv.variable_dtype == "float32"
    assert model.get_layer("species").compute_dtype == "float32"


def test_images_made_in_the_model(tiny_data, tracking, tmp_path, monkeypatch):
    """features.backend: tensorflow trains on waveforms; its model reloads and scores recordings.
    (The same run asks for MLflow's system metrics, sampled every second.)"""
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    cfg = tiny_cfg(tiny_data, **{"train.epochs": 1, "features.backend": "tensorflow", "train.system_metrics": True,
                                 "train.keep_checkpoint": "always"})
    result = train_fold(cfg, 1)
    last = keras.models.load_model(MlflowClient().download_artifacts(result.run_id, "checkpoints/last.keras",
                                                                     str(tmp_path / "last")))
    assert last.input.name == "audio" and int(last.optimizer.iterations.numpy()) > 0  # resumable, audio only
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    assert metrics["system/cpu_utilization_percentage"] >= 0 and metrics["system/system_memory_usage_megabytes"] > 0
    assert np.isfinite(result.best_value)
    model = logged_model(result.run_id, tmp_path)
    assert model.input.name == "audio" and model.get_layer("mel").dtype == "float32"  # audio only: no augmentation
    scorer = Scorer([model], cfg)
    y = scorer.read(next((tiny_data / "train").glob("*.flac")))
    scores = scorer.scores(y)
    assert scores.shape == (24,) and np.all(np.isfinite(scores))


def test_weak_label_recipe_picks_the_epoch_by_whole_recordings(tiny_data, tracking, tmp_path, caplog):
    """Masked loss, windows on train_fp rows and at random places, mixup, SpecAugment and the attention head
    train; val_recording_lwlrap is logged every epoch, picks the best one, and is what the logged model scores
    on the validation recordings, whole; the model scores them over time step by step."""
    from rfcx_mlops.data import folds
    from rfcx_mlops.jobs.fit import prepare
    from rfcx_mlops.learn.metrics import lwlrap

    cfg = tiny_cfg(tiny_data, **{
        "model.activation": "sigmoid", "model.loss": "masked", "model.unknown_weight": 0.1, "train.fp_windows": 0.5,
        "train.random_windows": 0.5, "model.head": "attention", "augment.mixup_p": 0.5, "augment.time_mask_p": 0.5, "augment.freq_mask_p": 0.5,
        "train.recording_eval_every": 1, "train.recording_hop_seconds": 2.5, "train.monitor": "val_recording_lwlrap"})
    with caplog.at_level("INFO", logger="rfcx_mlops.fit"):
        result = train_fold(cfg, 1)
    counts = re.search(r"training windows: (\d+) on train_tp rows, ([1-9]\d*) on train_fp rows, (\d+) at random", caplog.text)
    assert counts and int(counts[3]) == round(0.5 * int(counts[1])) > 0
    client = MlflowClient()
    run = client.get_run(result.run_id)
    history = [m.value for m in sorted(client.get_metric_history(result.run_id, "val_recording_lwlrap"),
                                       key=lambda m: m.step)]
    assert len(history) == cfg.train.epochs
    assert run.data.metrics["best_val_recording_lwlrap"] == pytest.approx(max(history)) == result.best_value
    assert result.best_epoch == 1 + int(np.argmax(history)) and "best_val_lwlrap" not in run.data.metrics

    data = prepare(cfg)
    _, val = folds.by_fold(data.tp, folds.assign_folds(data.tp, cfg.folds.n_splits, cfg.seed), 1)
    scorer = Scorer([logged_model(result.run_id, tmp_path)], cfg, hop_seconds=2.5)
    ids = sorted(val["recording_id"].unique())
    truth = np.zeros((len(ids), 24))
    for row, rid in enumerate(ids):
        truth[row, val.loc[val["recording_id"] == rid, "species_id"]] = 1
    scores = np.stack([scorer.scores(scorer.read(data.recordings[rid].path)) for rid in ids])
    assert lwlrap(truth, scores) == pytest.approx(result.best_value, abs=1e-4)
    clip, line = scorer.timeline(scorer.read(data.recordings[ids[0]].path))
    np.testing.assert_allclose(clip, scores[0], atol=1e-6)
    step = cfg.data.crop_seconds / (cfg.features.frames // 32)  # the attention head's steps, not whole windows
    assert np.diff(line.edges).max() == pytest.approx(step) and len(line.scores) >= round(60 / step)


def test_random_windows_are_a_seeded_draw_inside_the_training_recordings():
    from rfcx_mlops.data.audio import AudioInfo
    from rfcx_mlops.jobs.fit import _random_windows

    infos = {rid: AudioInfo(Path(f"{rid}.flac"), 48000, int(seconds * 48000)) for rid, seconds in (("a", 60.0), ("b", 7.0), ("c", 60.0))}
    cfg = config.load(None, {"data.crop_seconds": 5.0})
    placed = _random_windows(["a", "b"], infos, cfg, 400)
    assert len(placed) == 400 and set(placed["recording_id"]) == {"a", "b"}  # never "c", outside the pool
    room = placed["recording_id"].map({"a": 55.0, "b": 2.0})
    assert (placed["start"] >= 0).all() and (placed["start"] <= room).all() and placed["start"].max() > 50
    assert placed.equals(_random_windows(["a", "b"], infos, cfg, 400))
    assert not placed.equals(_random_windows(["a", "b"], infos, config.load(None, {"data.crop_seconds": 5.0, "seed": 1}), 400))


def test_a_run_of_hours_on_a_cpu_says_so_in_one_line(caplog):
    import tensorflow as tf

    from rfcx_mlops.jobs import fit

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is here: nothing to warn about")
    with caplog.at_level("WARNING", logger="rfcx_mlops.fit"):
        fit._warn_without_gpu(config.load(ROOT / "experiments" / "seed.yaml"), 810)  # the real fold's windows
        fit._warn_without_gpu(config.load(ROOT / "experiments" / "quick.yaml"), 320)
    assert len(caplog.records) == 1
    assert re.fullmatch(r"no GPU here: seed takes about \d+ min an epoch on this CPU \(\d+ cores\), [\d.]+ h for 10 "
                        r"epochs; experiments/quick.yaml is sized for a CPU", caplog.records[0].getMessage())


def test_a_run_with_long_steps_on_a_cpu_says_how_long_ctrl_c_takes(caplog):
    import tensorflow as tf

    from rfcx_mlops.jobs import fit

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("a GPU is here: its steps are short")
    seed = config.load(ROOT / "experiments" / "seed.yaml")
    with caplog.at_level("INFO", logger="rfcx_mlops.fit"):
        fit._warn_without_gpu(seed, 811)
        fit._warn_without_gpu(config.load(ROOT / "experiments" / "seed.yaml", {"train.accumulate_steps": 4}), 811)
        fit._warn_without_gpu(config.load(ROOT / "experiments" / "quick.yaml"), 321)  # steps of a second: no line
    said = [r.getMessage() for r in caplog.records if "Ctrl-C" in r.getMessage()]
    step = 128 * 1876 / (fit.CPU_PIXELS_PER_CORE_SECOND * (os.cpu_count() or 1))  # a sample's seconds
    assert said == [f"Ctrl-C takes effect after the current step, about {32 * step:.0f} s on this CPU (micro-batches "
                    "of 32; train.accumulate_steps makes them smaller)",
                    f"Ctrl-C takes effect after the current step, about {8 * step:.0f} s on this CPU (micro-batches "
                    "of 8; train.accumulate_steps makes them smaller)"]
