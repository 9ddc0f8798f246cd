"""Tuning: the search space, the study in MLflow, resuming, failing trials, bad input, and many workers on PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import POSTGRES, free_port, needs_postgres, start_server
from rfcx_mlops import tune
from rfcx_mlops.config import Config, flatten, load, with_overrides
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.jobs import study as studies

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "tiny.yaml"
TINY_SEARCH = ROOT / "tests" / "tiny_search.yaml"


def write_space(tmp_path: Path, space: dict, **sections) -> Path:
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump({"space": space, **sections}, sort_keys=False))
    return path


def test_project_search_space_loads_and_keeps_max_above_min():
    space = studies.load_space(ROOT / tune.DEFAULT_SEARCH)
    assert [r.key for r in space.ranges] == ["augment.min_snr", "augment.max_snr", "data.crop_seconds",
                                             "train.learning_rate", "model.dropout", "model.activation",
                                             "model.loss", "model.unknown_weight", "model.head"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    drawn = []
    for _ in range(300):
        trial = study.ask()
        drawn.append(space.suggest(trial))
        study.tell(trial, 0.0)
    assert all(d["augment.max_snr"] > d["augment.min_snr"] for d in drawn)
    crops = {d["data.crop_seconds"] for d in drawn}
    assert crops <= set(np.arange(3.0, 8.01, 0.5)) and len(crops) > 5
    lr = np.log10([d["train.learning_rate"] for d in drawn])
    assert lr.min() >= np.log10(3e-4) and lr.max() <= -2 and np.median(lr) == pytest.approx(-2.76, abs=0.15)


def test_integer_keys_are_drawn_as_integers(tmp_path):
    space = studies.load_space(write_space(tmp_path, {"train.epochs": {"low": 2, "high": 9}}))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    value = space.suggest(trial)["train.epochs"]
    assert isinstance(value, int) and 2 <= value <= 9


def test_choices_are_drawn_as_categoricals_of_the_key_s_type(tmp_path):
    space = studies.load_space(write_space(tmp_path, {
        "model.activation": {"choices": ["softmax", "sigmoid"]}, "train.batch_size": {"choices": [16, 32]},
        "model.dropout": {"choices": [0, 0.5]}, "train.cache_audio": {"choices": [False, True]}}))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    drawn = []
    for _ in range(20):
        trial = study.ask()
        drawn.append(space.suggest(trial))
        assert drawn[-1] == trial.params
        assert all(isinstance(d, optuna.distributions.CategoricalDistribution) for d in trial.distributions.values())
        study.tell(trial, 0.0)
    for key, choices in [("model.activation", {"softmax", "sigmoid"}), ("train.batch_size", {16, 32}),
                         ("model.dropout", {0.0, 0.5}), ("train.cache_audio", {False, True})]:
        assert {d[key] for d in drawn} == choices, key
    assert all(type(d["train.batch_size"]) is int and type(d["model.dropout"]) is float and
               type(d["train.cache_audio"]) is bool for d in drawn)
    assert all(with_overrides(Config(), d) for d in drawn)


WEAK_LABELS = {  # a conditional range under a conditional choice, and a condition allowing a list of values
    "model.activation": {"choices": ["softmax", "sigmoid"]},
    "model.loss": {"choices": ["crossentropy", "masked"], "when": {"model.activation": "sigmoid"}},
    "model.unknown_weight": {"low": 0.0, "high": 0.5, "when": {"model.loss": ["masked"]}},
    "model.head": {"choices": ["pooled", "attention"], "when": {"model.activation": ["sigmoid"]}},
}


@pytest.mark.parametrize("sampler", [optuna.samplers.RandomSampler(seed=3),
                                     optuna.samplers.TPESampler(seed=3, n_startup_trials=5)])
def test_a_conditional_key_is_drawn_exactly_when_its_condition_holds(tmp_path, sampler):
    space = studies.load_space(write_space(tmp_path, WEAK_LABELS))
    study = optuna.create_study(sampler=sampler)
    for _ in range(20):
        trial = study.ask()
        drawn = space.suggest(trial)
        assert drawn == trial.params
        sigmoid = trial.params["model.activation"] == "sigmoid"
        assert ("model.loss" in trial.params) == sigmoid and ("model.head" in trial.params) == sigmoid
        assert ("model.unknown_weight" in trial.params) == (trial.params.get("model.loss") == "masked")
        with_overrides(Config(), drawn)  # every draw makes a valid config
        study.tell(trial, float(sigmoid))
    drawn_keys = {frozenset(t.params) for t in study.trials}
    assert len(drawn_keys) == 3, drawn_keys  # softmax alone, sigmoid with crossentropy, sigmoid with masked


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # trials asked for by hand, not by optimize
@pytest.mark.parametrize("preset, expected", [
    ("experiments/quick.yaml", {"model.activation": "softmax"}),
    ("experiments/ablation/b2-masked.yaml", {"model.activation": "sigmoid", "model.loss": "masked",
                                             "model.unknown_weight": 0.5, "model.head": "pooled"}),
])
def test_the_preset_s_values_run_first_and_once(tmp_path, preset, expected):
    space = studies.load_space(write_space(tmp_path, {"model.dropout": {"low": 0.0, "high": 0.6}, **WEAK_LABELS}))
    first = space.first_trial(flatten(load(ROOT / preset)))
    assert first == {"model.dropout": 0.3, **expected}

    def open_study():
        return studies.open_study(f"sqlite:///{tmp_path / 'optuna.db'}", "s", heartbeat=60, first_trial=first,
                                  sampler_for=lambda n: optuna.samplers.RandomSampler(seed=n),
                                  pruner=optuna.pruners.NopPruner())

    study = open_study()
    trial = study.ask()
    assert space.suggest(trial) == first and trial.user_attrs["preset"]
    study.tell(trial, 0.5)
    assert len(open_study().trials) == 1  # a worker opening the study again queues the preset no more


def test_a_preset_value_outside_the_choices_cannot_run_first(tmp_path):
    space = studies.load_space(write_space(tmp_path, {"model.activation": {"choices": ["sigmoid"]}}))
    with pytest.raises(ConfigError, match=r"^model.activation: the preset's 'softmax' is not among the choices "
                                          r"\(sigmoid\)"):
        space.first_trial(flatten(Config()))


def test_check_names_the_draw_a_preset_cannot_take(tmp_path):
    space = studies.load_space(write_space(tmp_path, WEAK_LABELS))
    space.check(load(ROOT / "experiments" / "quick.yaml"))
    with pytest.raises(ConfigError, match=r"^model.activation: 'softmax' makes an invalid config \(model.loss: "):
        space.check(load(ROOT / "experiments" / "ablation" / "b2-masked.yaml"))  # its masked loss stays with softmax


def test_check_takes_the_preset_and_every_combination_whatever_the_order(tmp_path):
    """A combination the defaults refuse is fine over a preset that allows it, and a range listed before the
    choice that makes its bound invalid is still checked with that choice."""
    head = studies.load_space(write_space(tmp_path, {"model.head": {"choices": ["pooled", "attention"]}}))
    head.check(load(ROOT / "experiments" / "ablation" / "b2-masked.yaml"))  # a sigmoid preset takes attention
    with pytest.raises(ConfigError, match=r"^model.head: 'attention' makes an invalid config \(model.head: attention"):
        head.check(load(ROOT / "experiments" / "quick.yaml"))
    mixed = studies.load_space(write_space(tmp_path, {"augment.mixup_p": {"low": 0.0, "high": 1.0},
                                                      "features.backend": {"choices": ["numpy", "tensorflow"]}}))
    with pytest.raises(ConfigError, match=r"^augment.mixup_p: 1.0 with features.backend: tensorflow makes an invalid"):
        mixed.check(load(ROOT / "experiments" / "quick.yaml"))


SIGMOID = {"model.activation": {"choices": ["softmax", "sigmoid"]}}


@pytest.mark.parametrize("space, sections, message", [
    ({"augment.min_snr": {"low": 20, "high": 10}}, {}, "augment.min_snr: empty or inverted range: low 20 must be below high 10"),
    ({"augment.min_snr": {"low": 5, "high": 5}}, {}, "empty or inverted range"),
    ({}, {}, "space: no ranges to search"),
    ({"train.learning_rate": {"low": 0, "high": 0.1, "log": True}}, {}, "a log range needs low > 0"),
    ({"train.nope": {"low": 0, "high": 1}}, {}, "train.nope: not a numeric config key"),
    ({"train.lr_schedule": {"low": 0, "high": 1}}, {}, "train.lr_schedule: not a numeric config key"),
    ({"model.dropout": {"low": 0, "hi": 1}}, {}, "model.dropout: expected {low, high}"),
    ({"augment.max_snr": {"low": 5, "high": 30, "above": "augment.min_snr"},
      "augment.min_snr": {"low": 0, "high": 10}}, {}, "above: augment.min_snr must be a range listed before it"),
    ({"augment.min_snr": {"low": 0, "high": 30}, "augment.max_snr": {"low": 5, "high": 20, "above": "augment.min_snr"}},
     {}, "high 20 must exceed the high of augment.min_snr (30)"),
    ({"model.dropout": {"low": 0, "high": 0.5}}, {"pruner": {"warmup_epochs": -1}}, "pruner.warmup_epochs must be"),
    ({"model.head": {"choices": ["pooled"], "weight": 1}}, {}, "model.head: expected {choices} and optionally when"),
    ({"model.dropout": {"choices": [0.1, 0.2], "low": 0, "high": 1}}, {}, "model.dropout: expected {choices}"),
    ({"model.head": {"choices": []}}, {}, "model.head: choices must be a non-empty list; got []"),
    ({"model.head": {"choices": "pooled"}}, {}, "model.head: choices must be a non-empty list; got 'pooled'"),
    ({"model.head": {"choices": ["pooled", "attention", "pooled"]}}, {}, "model.head: choices must be distinct"),
    ({"model.dropout": {"choices": [0.5, 0.50]}}, {}, "model.dropout: choices must be distinct"),
    ({"model.nope": {"choices": [1, 2]}}, {}, "model.nope: not a config key"),
    ({"train.batch_size": {"choices": [16, "32"]}}, {}, "train.batch_size: choices must be of type int, as the config "
                                                       "key; got '32'"),
    ({"model.dropout": {"choices": [0.1, True]}}, {},
     "model.dropout: choices must be of type float, as the config key; got True"),
    ({"model.activation": {"choices": ["softmax", ["sigmoid"]]}}, {}, "model.activation: choices must be of type str"),
    ({"model.activation": {"choices": ["softmax", "sigmod"]}}, {},
     "model.activation: 'sigmod' is not one of softmax, sigmoid"),
    ({"model.loss": {"choices": ["crossentropy", "masked"], "when": {"model.nope": "x"}}}, {},
     "model.loss: when: model.nope is not a key listed before it"),
    ({"model.loss": {"choices": ["crossentropy", "masked"], "when": {"model.activation": "sigmoid"}}, **SIGMOID}, {},
     "model.loss: when: model.activation is not a key listed before it"),
    ({"model.dropout": {"low": 0, "high": 0.5}, "model.head": {"choices": ["pooled"], "when": {"model.dropout": 0.1}}},
     {}, "model.head: when: model.dropout is a range; a condition needs a key with choices"),
    ({**SIGMOID, "model.loss": {"choices": ["crossentropy", "masked"], "when": {"model.activation": "sigmod"}}}, {},
     "model.loss: when: model.activation: 'sigmod' is not among its choices (softmax, sigmoid)"),
    ({**SIGMOID, "model.loss": {"choices": ["crossentropy"], "when": {"model.activation": ["sigmoid", "relu"]}}}, {},
     "model.loss: when: model.activation: ['sigmoid', 'relu'] is not among its choices"),
    ({**SIGMOID, "model.loss": {"choices": ["crossentropy"], "when": {"model.activation": []}}}, {},
     "model.loss: when: model.activation: [] is not among its choices"),
    ({**SIGMOID, "model.loss": {"choices": ["crossentropy"], "when": "model.activation"}}, {},
     "model.loss: when must map keys listed before it"),
    ({**SIGMOID, "model.dropout": {"low": 0, "high": 0.5, "when": {"model.activation": "tanh"}}}, {},
     "model.dropout: when: model.activation: 'tanh' is not among its choices"),
    ({**SIGMOID, "augment.min_snr": {"low": 0, "high": 10, "when": {"model.activation": "sigmoid"}},
      "augment.max_snr": {"low": 5, "high": 30, "above": "augment.min_snr"}}, {},
     "augment.max_snr: above: augment.min_snr must have the same when as augment.max_snr"),
    ({"augment.min_snr": {"choices": [0.0, 5.0]},
      "augment.max_snr": {"low": 5, "high": 30, "above": "augment.min_snr"}},
     {}, "augment.max_snr: above: augment.min_snr must be a range listed before it"),
])
def test_bad_search_space_is_one_clear_error(tmp_path, space, sections, message):
    path = write_space(tmp_path, space, **sections)
    with pytest.raises(ConfigError) as err:
        studies.load_space(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_storage_url_password_is_never_shown():
    assert studies.redact("postgresql://alice:s3cret@db.lab:5432/optuna") == "postgresql://alice:***@db.lab:5432/optuna"
    with pytest.raises(ConfigError, match=r"^--storage postgresql://alice:\*\*\*@127.0.0.1:1/x: cannot open"):
        studies.open_storage("postgresql://alice:s3cret@127.0.0.1:1/x", 60)


def test_retrain_command_sets_every_tuned_value():
    args = tune.parse_args(["--config", "experiments/quick.yaml"])
    cmd = tune.retrain_command(args, {"train.epochs": "9"}, {"model.dropout": 0.123456789, "augment.min_snr": 3.5}, 3)
    assert cmd == ("for fold in 1 2 3; do python -m rfcx_mlops.train --config experiments/quick.yaml --fold $fold "
                   "--set train.epochs=9 --set model.dropout=0.123456789 --set augment.min_snr=3.5; done")


def cli_error(capsys, argv) -> str:
    assert tune.main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def test_bad_input_is_one_line_and_writes_nothing(tiny_data, tracking, tmp_path, capsys):
    base = ["--config", str(TINY), "--data-dir", str(tiny_data), "--search", str(TINY_SEARCH)]
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="minimized", storage=storage, direction="minimize")
    inverted = write_space(tmp_path, {"model.dropout": {"low": 0.5, "high": 0.1}})
    cases = [
        (["--n-trials", "0"], "--n-trials must be > 0; got 0"),
        (["--storage", "redis://localhost/0"], "--storage redis://localhost/0: unknown scheme 'redis'"),
        (["--storage", "postgresql://u:pw@127.0.0.1:1/db"], "--storage postgresql://u:***@127.0.0.1:1/db: cannot open"),
        (["--storage", storage, "--study-name", "minimized"],
         "study 'minimized' in sqlite:///" + str(tmp_path / "optuna.db") + " exists with direction minimize"),
        (["--search", str(inverted)], "model.dropout: empty or inverted range: low 0.5 must be below high 0.1"),
        (["--folds", "3"], "--folds 3: each fold once, within 1..2"),
        (["--data-dir", str(tmp_path / "nowhere")], "nowhere"),
    ]
    for extra, message in cases:
        assert message in cli_error(capsys, base + extra), extra
    study = optuna.load_study(study_name="minimized", storage=storage)
    assert study.trials == [] and optuna.get_all_study_names(storage) == ["minimized"]
    client = MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_a_failing_trial_is_recorded_and_the_study_goes_on(tiny_data, tracking, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # The preset's own trial asks for 70 s crops of 60 s recordings: it fails inside training.
    argv = ["--config", str(TINY), "--data-dir", str(tiny_data), "--search", str(TINY_SEARCH), "--storage", storage,
            "--n-trials", "1", "--set", "train.epochs=1", "--set", "data.crop_seconds=70"]
    assert tune.main(argv) == 0
    study = optuna.load_study(study_name="tiny", storage=storage)
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE], states
    failed = study.trials[0]
    assert failed.params["data.crop_seconds"] == 70.0 and failed.user_attrs["preset"]
    assert "crop_seconds 70.0 is longer than the shortest recording" in failed.user_attrs["error"]
    client = MlflowClient()
    runs = {r.data.tags.get("trial_number"): r for r in client.search_runs([e.experiment_id for e in
                                                                            client.search_experiments()])}
    assert runs["0"].info.status == "FAILED" and runs["0"].data.tags["trial_state"] == "FAIL"
    assert "longer than the shortest recording" in runs["0"].data.tags["failure_reason"]
    assert runs["1"].info.status == "FINISHED" and runs["1"].data.tags["trial_state"] == "COMPLETE"
    assert runs[None].data.tags["mlflow.runName"] == "study-tiny"
    out = capsys.readouterr().out
    assert "1 complete, 1 fail" in out and "retrain the best configuration on every fold:" in out


@pytest.fixture(scope="module")
def mlflow_run_study(tiny_data, tmp_path_factory):
    """`mlflow run . -e tune` twice on one SQLite study: 2 trials, then the same command asking for 3."""
    home = tmp_path_factory.mktemp("tune_run")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    outputs = []
    for n_trials in ("2", "3"):
        cmd = ["mlflow", "run", str(ROOT), "-e", "tune", "--env-manager", "local", "--experiment-name", "tuning",
               "-P", f"config={TINY}", "-P", f"data_dir={tiny_data}", "-P", f"n_trials={n_trials}",
               "-P", f"storage=sqlite:///{home / 'optuna.db'}"]
        proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs.append(proc.stdout)
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("tuning").experiment_id],
                              order_by=["attributes.start_time ASC"])
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{home / 'optuna.db'}")
    return client, runs, study, outputs


def logged_as(param: str, value) -> bool:
    """Whether an MLflow param (text) holds the drawn ``value``."""
    return param == value if isinstance(value, str) else float(param) == pytest.approx(value)


def test_study_resumes_without_repeating_trial_numbers(mlflow_run_study):
    _, runs, study, outputs = mlflow_run_study
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    assert study.trials[0].user_attrs["preset"]
    assert study.trials[0].params == {"augment.min_snr": 5.0, "augment.max_snr": 20.0, "data.crop_seconds": 2.0,
                                      "train.learning_rate": 0.001, "model.dropout": 0.3, "model.activation": "softmax"}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and all(p.data.tags["mlflow.runName"] == "study-tiny" for p in parents)
    assert "best val_lwlrap" in outputs[1] and "--set data.data_dir=" in outputs[1]


def test_each_trial_is_a_nested_run_with_its_params_metrics_and_state(mlflow_run_study):
    client, runs, study, _ = mlflow_run_study
    parents = {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
    assert sorted(int(r.data.tags["trial_number"]) for r in children) == [0, 1, 2]
    for run in children:
        trial = study.trials[int(run.data.tags["trial_number"])]
        assert run.data.tags["trial_state"] == trial.state.name and run.data.tags["study"] == "tiny"
        assert run.data.tags["mlflow.runName"] == f"trial-{trial.number}"
        for key, value in trial.params.items():
            assert logged_as(run.data.params[key], value), key
        history = client.get_metric_history(run.info.run_id, "val_lwlrap")
        assert [m.step for m in history] == list(range(1, len(history) + 1)) and history
        assert trial.intermediate_values == pytest.approx({m.step: m.value for m in history})
        if trial.state == TrialState.COMPLETE:
            assert trial.value == pytest.approx(run.data.metrics["best_val_lwlrap"])
        # A trial keeps its metrics and plots, no model and no checkpoint (without --keep-models).
        assert "model_uri" not in run.data.tags and client.list_artifacts(run.info.run_id, "checkpoints") == []


def test_parent_run_holds_the_study_summary_and_plots(mlflow_run_study):
    client, runs, study, _ = mlflow_run_study
    last = [r for r in runs if "mlflow.parentRunId" not in r.data.tags][-1]
    assert last.data.tags["study"] == "tiny" and last.data.tags["storage"].startswith("sqlite:///")
    assert last.data.params["n_trials"] == "3"  # what `mlflow run` logged
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert last.data.metrics["best_value"] == pytest.approx(max(t.value for t in completed))
    assert last.data.metrics["trials_complete"] + last.data.metrics["trials_pruned"] == 3
    for key, value in study.best_params.items():
        assert logged_as(last.data.params[f"best.{key}"], value), key
    plots = {a.path for a in client.list_artifacts(last.info.run_id, "plots")}
    assert {"plots/optimization_history.png", "plots/slice.png", "plots/parallel_coordinate.png"} <= plots
    assert {a.path for a in client.list_artifacts(last.info.run_id)} >= {"search.yaml", "config.yaml",
                                                                          "best_params.json"}


def test_interrupted_study_queues_its_running_trial(tiny_data, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = worker(storage, uri, tmp_path, tiny_data, "--n-trials", "1", "--set", "train.epochs=3")
    for _ in range(600):  # until its first epoch is logged
        if any(r.data.metrics.get("val_lwlrap") is not None for r in all_runs(uri)) or proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # what `mlflow run` sends on Ctrl-C
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    said = err.strip().splitlines()
    assert said[-1].endswith("queued to run first next time")
    assert "stopping after the current training step..." in said[:-1]  # at once, before the step ends
    interrupted, queued = optuna.load_study(study_name="shared", storage=storage).trials
    assert interrupted.state == TrialState.FAIL and queued.state == TrialState.WAITING
    assert queued.system_attrs["fixed_params"] == interrupted.params
    runs = {r.data.tags.get("trial_number"): r for r in all_runs(uri)}
    assert runs["0"].info.status == "KILLED" and runs["0"].data.tags["trial_state"] == "FAIL"
    assert runs[None].info.status == "KILLED"
    assert MlflowClient(uri).list_artifacts(runs["0"].info.run_id, "checkpoints") == []  # it runs again from scratch


# --- many workers: PostgreSQL for the study, one MLflow tracking server for the runs -------------------------


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on 127.0.0.1, as the workers of a study on several machines would share it."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                         "--artifacts-destination", str(tmp_path / "artifacts")], f"{uri}/health", tmp_path)
    yield uri
    proc.terminate()
    proc.wait(30)


def worker(storage: str, tracking_uri: str, cwd: Path, data: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_EXPERIMENT_NAME": "workers"}
    cmd = [sys.executable, "-m", "rfcx_mlops.tune", "--config", str(TINY), "--search", str(TINY_SEARCH),
           "--data-dir", str(data), "--storage", storage, "--study-name", "shared", "--set", "train.epochs=1", *extra]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def all_runs(uri: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("workers")
    return client.search_runs([experiment.experiment_id]) if experiment else []


@needs_postgres
def test_two_workers_share_one_study(pg_database, mlflow_server, tiny_data, tmp_path):
    procs = [worker(pg_database, mlflow_server, tmp_path, tiny_data, "--n-trials", "3") for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage=pg_database)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))) and len(numbers) >= 3
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    runs = all_runs(mlflow_server)
    parents = {r.info.run_id for r in runs if "mlflow.parentRunId" not in r.data.tags}
    assert len(parents) == 2
    trial_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
    assert sorted(int(r.data.tags["trial_number"]) for r in trial_runs) == numbers  # each trial exactly once
    assert {r.info.status for r in runs} == {"FINISHED"}


@needs_postgres
def test_a_killed_worker_s_trial_is_run_again(pg_database, mlflow_server, tiny_data, tmp_path):
    first = worker(pg_database, mlflow_server, tmp_path, tiny_data, "--n-trials", "1", "--heartbeat", "1",
                   "--set", "train.epochs=3")
    for _ in range(600):  # wait until the first trial is training
        if any(r.data.tags.get("trial_number") == "0" and r.data.metrics.get("val_lwlrap") is not None
               for r in all_runs(mlflow_server)) or first.poll() is not None:
            break
        time.sleep(0.5)
    assert first.poll() is None, first.communicate()[1][-3000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(4)  # past the grace period of 3 heartbeats
    second = worker(pg_database, mlflow_server, tmp_path, tiny_data, "--n-trials", "1", "--heartbeat", "1")
    out, err = second.communicate(timeout=900)
    assert second.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name="shared", storage=pg_database)
    lost, retried = study.trials
    assert lost.state == TrialState.FAIL and retried.state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried.params == lost.params and retried.system_attrs["failed_trial"] == 0
    runs = {(r.data.tags.get("trial_number"), r.info.status): r for r in all_runs(mlflow_server)}
    assert "RUNNING" not in {status for _, status in runs}
    killed = runs[("0", "KILLED")]
    assert killed.data.tags["trial_state"] == "FAIL" and "stopped sending heartbeats" in \
        killed.data.tags["failure_reason"]
    assert MlflowClient(mlflow_server).list_artifacts(killed.info.run_id, "checkpoints") == []
    assert (None, "KILLED") in runs and (None, "FINISHED") in runs  # the lost worker's parent, the second's
    assert ("1", "FINISHED") in runs


def start_workers_together(rounds: int) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "worker_startup.py"), POSTGRES, "--workers", "4",
                           "--rounds", str(rounds)], capture_output=True, text=True, timeout=60 * rounds)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"failed: 0 in {rounds} rounds of 4 workers" in proc.stdout


@needs_postgres
def test_workers_starting_at_one_instant_on_a_new_database():
    """Four workers released together on a fresh database: the start-up lock lets every one through."""
    start_workers_together(3)


@pytest.mark.slow
@needs_postgres
def test_twenty_rounds_of_workers_starting_together():
    start_workers_together(20)
