"""The Model Registry on real stores: register, evaluate, promote past the gate, score by alias, model cards."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from sklearn.metrics import average_precision_score

from conftest import ROOT, free_port, needs_postgres, start_server
from rfcx_mlops import predict, registry, report
from rfcx_mlops.infer.scorer import ModelError, check_ensemble
from rfcx_mlops.learn.metrics import lwlrap
from rfcx_mlops.track import registry as tracked

TINY = ROOT / "tests" / "tiny.yaml"
NAME = "gate"  # the README's commands register the same runs as rfcx (test_cli)


@dataclass
class Session:
    """What a user's registry session on the cross-validation run's store said and left."""

    client: MlflowClient
    runs: dict[int, str]  # version -> its run
    codes: list[int]  # exit codes of the promotions, in order
    outputs: list[str]  # what each command printed
    better: int  # the version with the higher test LWLRAP
    worse: int
    evaluations_before_refusal: int  # metrics on the worse version's model before it was refused
    tmp: Path


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture(scope="module")
def session(cv_run, tiny_data, tmp_path_factory) -> Session:
    """Register both folds, evaluate them on the demo test set, then put them to the gate: the worse becomes
    champion (there is none); the better is refused a margin of 1 it cannot reach, then replaces it with none;
    the worse is refused; the champion is put to the gate again and holds."""
    tmp = tmp_path_factory.mktemp("registry")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", cv_run.tracking_uri)
        patch.chdir(tmp)
        mlflow.set_tracking_uri(cv_run.tracking_uri)
        capsys = _Capture()
        outputs, runs = [], {}
        for n, fold in enumerate(cv_run.folds, 1):
            code, out = capsys.call(registry.main, ["register", "--run-id", fold.info.run_id, "--name", NAME])
            assert code == 0 and f"as {NAME} version {n}: models:/{NAME}/{n}" in out, out
            runs[n] = fold.info.run_id
            outputs.append(out)
        for n in runs:
            code, out = capsys.call(registry.main, ["evaluate", "--model", f"models:/{NAME}/{n}", "--data-dir",
                                                    str(tiny_data)])
            assert code == 0, out
            outputs.append(out)
        client = MlflowClient()
        scores = {n: _lwlrap(client, n) for n in runs}
        assert scores[1] != scores[2]
        better, worse = sorted(runs, key=scores.get, reverse=True)
        codes = []
        steps = [(worse, "0"), (better, "1"), (better, "0"), (worse, "0"), (better, "0")]
        for step, (n, margin) in enumerate(steps):
            if step == 3:
                before = len(client.get_logged_model(tracked.model_id(client.get_model_version(NAME, str(worse))))
                             .metrics)
            code, out = capsys.call(registry.main, ["promote", "--model", f"models:/{NAME}/{n}", "--data-dir",
                                                    str(tiny_data), "--min-gain", margin])
            codes.append(code)
            outputs.append(out)
        yield Session(client, runs, codes, outputs, better, worse, before, tmp)


class _Capture:
    """stdout and stderr of an in-process command, for a module-scoped fixture (capsys is per test)."""

    def call(self, main, argv: list[str]) -> tuple[int, str]:
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
        return code, out.getvalue() + err.getvalue()


def _lwlrap(client: MlflowClient, version: int) -> float:
    model_id = tracked.model_id(client.get_model_version(NAME, str(version)))
    return tracked.evaluations(model_id, client).set_index("dataset").loc["tiny/test", "lwlrap"]


def _submission(argv: list[str], out: Path, capsys) -> pd.DataFrame:
    code, text = run_cli(predict.main, [*argv, "--out", str(out)], capsys)
    assert code == 0, text
    return pd.read_csv(out, dtype={"recording_id": str})


def test_a_version_carries_its_run_s_data_config_commit_and_figures(session, cv_run):
    for n, run_id in session.runs.items():
        version = session.client.get_model_version(NAME, str(n))
        run = session.client.get_run(run_id)
        (training,) = [i.dataset for i in run.inputs.dataset_inputs]
        config = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
        assert version.run_id == run_id and tracked.model_id(version) == run.data.tags["model_uri"][len("models:/"):]
        assert version.tags["dataset_digest"] == training.digest and version.tags["dataset_name"] == training.name
        assert version.tags["config_digest"] == hashlib.sha256(config.encode()).hexdigest()[:16]
        assert version.tags["git_commit"] == run.data.tags["git_commit"] and version.tags["preset"] == "tiny"
        assert version.tags["best_val_lwlrap"] == f"{run.data.metrics['best_val_lwlrap']:.4f}"
    assert registry.main(["register", "--run-id", session.runs[1], "--name", NAME]) == 0  # the same model: no second version
    assert len(session.client.search_model_versions(f"name = '{NAME}'")) == 2


def test_evaluation_figures_are_those_of_predict_s_scores(session, tiny_data, capsys, tmp_path):
    truth = pd.read_csv(tiny_data / "test_labels.csv", dtype={"recording_id": str}).set_index("recording_id")
    for n, run_id in session.runs.items():
        scores = _submission(["--run-id", run_id], tmp_path / f"{n}.csv", capsys).set_index("recording_id")
        y, s = truth.loc[scores.index].to_numpy(), scores.to_numpy()
        model = session.client.get_logged_model(tracked.model_id(session.client.get_model_version(NAME, str(n))))
        logged = {m.key: m for m in model.metrics if m.dataset_name == "tiny/test"}
        assert logged["lwlrap"].value == pytest.approx(lwlrap(y, s), abs=1e-6)
        species = int(np.argmax(y.sum(axis=0)))
        assert logged[f"ap_s{species}"].value == pytest.approx(average_precision_score(y[:, species], s[:, species]),
                                                               abs=1e-6)
        assert logged["recordings"].value == len(truth) and "event_recall" in logged
        assert {m.dataset_digest for m in logged.values()} == {logged["lwlrap"].dataset_digest}


def test_the_gate_promotes_the_first_and_the_better_and_refuses_the_worse(session):
    assert session.codes == [0, 3, 0, 3, 0]
    first, short, second, refused, held = session.outputs[-5:]
    assert "promoted: no @champion yet" in first and "promoted: LWLRAP" in second
    assert re.search(r"refused: LWLRAP .* gain \+[0-9.]+, under the margin 1$", short, re.M), short
    assert re.search(r"refused: LWLRAP [0-9.]+ against [0-9.]+ of version \d on tiny/test@\w+: gain -[0-9.]+, "
                     "not better", refused), refused
    assert f"version {session.better} is @champion already" in held
    model = session.client.get_registered_model(NAME)
    assert model.aliases == {"champion": session.better, "challenger": session.better}
    worse = session.client.get_model_version(NAME, str(session.worse))
    assert worse.tags["promotion"].startswith("refused")
    # The refusal compared figures recorded before: nothing was scored again.
    assert len(session.client.get_logged_model(tracked.model_id(worse)).metrics) == \
        session.evaluations_before_refusal
    table = tracked.promotions(NAME)
    assert table["decision"].tolist() == ["promoted", "refused", "promoted", "refused", "held"]
    assert table["candidate"].tolist() == [str(v) for v in (session.worse, session.better, session.better,
                                                            session.worse, session.better)]
    assert table["min_gain"].tolist() == [0, 1, 0, 0, 0]
    assert table.loc[3, "gain"] == pytest.approx(table.loc[3, "candidate_lwlrap"] - table.loc[3, "against_lwlrap"])
    assert f"promotions of {NAME}:" in refused and refused.count("promoted") >= 2


def test_the_champion_scores_through_predict_and_mlflow_models_serve(session, cv_run, tiny_data, capsys, tmp_path):
    champion_run = session.runs[session.better]
    by_run = _submission(["--run-id", champion_run], tmp_path / "run.csv", capsys)
    by_alias = _submission(["--model", f"models:/{NAME}@champion"], tmp_path / "alias.csv", capsys)
    pd.testing.assert_frame_equal(by_alias, by_run)

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cv_run.tracking_uri, "RFCX_SERVE_AUDIO_ROOT": str(tiny_data / "test"),
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    server = start_server(["mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
                           "--host", "127.0.0.1", "--port", str(port)], f"http://127.0.0.1:{port}/ping", tmp_path, env)
    try:
        ids = by_run["recording_id"].tolist()[:3]
        body = json.dumps({"dataframe_records": [{"path": f"{rid}.flac"} for rid in ids]}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        served = json.loads(urllib.request.urlopen(request, timeout=120).read())["predictions"]
    finally:
        server.terminate()
        server.wait(30)
    expected = by_run.set_index("recording_id").loc[ids].to_numpy()
    np.testing.assert_allclose([[row[f"s{i}"] for i in range(24)] for row in served], expected, atol=2e-6)


def test_a_cross_validation_run_is_one_version_scoring_with_its_folds_mean(session, cv_run, tiny_data, capsys,
                                                                          tmp_path, monkeypatch):
    code, out = run_cli(registry.main, ["register", "--run-id", cv_run.parent.info.run_id, "--name", NAME], capsys)
    assert code == 0, out
    version = session.client.get_model_version(NAME, "3")
    model = session.client.get_logged_model(tracked.model_id(version))
    assert model.source_run_id == cv_run.parent.info.run_id and model.experiment_id == cv_run.experiment_id
    downloaded = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(tmp_path))
    files = [p for p in Path(downloaded).rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix == ".keras"]  # it names its folds' weights, holds none
    (folds,) = [p for p in files if p.name == "folds.txt"]
    assert folds.read_text().split() == [r.data.tags["model_uri"][len("models:/"):] for r in cv_run.folds]
    check_ensemble(cv_run.parent, folds.read_text().split())
    with pytest.raises(ModelError, match="fold models changed since it was registered"):
        check_ensemble(cv_run.parent, folds.read_text().split()[:1])  # as if a fold had been deleted since
    by_run = _submission(["--run-id", cv_run.parent.info.run_id], tmp_path / "run.csv", capsys)
    by_version = _submission(["--model", f"models:/{NAME}/3"], tmp_path / "version.csv", capsys)
    pd.testing.assert_frame_equal(by_version, by_run)
    monkeypatch.setenv("RFCX_SERVE_AUDIO_ROOT", str(tiny_data / "test"))
    served = mlflow.pyfunc.load_model(f"models:/{NAME}/3").predict(
        pd.DataFrame({"path": [f"{by_run['recording_id'].iloc[0]}.flac"]}))
    np.testing.assert_allclose(served.to_numpy()[0], by_run.iloc[0, 1:].to_numpy(float), atol=2e-6)


def test_the_model_card_says_what_the_version_is(session, cv_run):
    version = session.client.get_model_version(NAME, str(session.better))
    card = version.description
    run = session.client.get_run(session.runs[session.better])
    species = pd.read_csv(session.client.download_artifacts(run.info.run_id, "species.csv", str(session.tmp)))
    row = species.iloc[3]
    assert f"| {row.species_id} | {row['name']} | {row.f_low:.0f}-{row.f_high:.0f} | 0.5 |" in card
    figure = _lwlrap(session.client, session.better)
    assert re.search(rf"\| tiny/test \| `\w+` \| 9 \| {figure:.4f} \|", card), card
    for text in (f"# {NAME} version {session.better}", version.tags["dataset_digest"], "## Known limits",
                 f"fold {run.data.tags['fold']}: trained on", "preset `tiny`"):
        assert text in card


def test_report_lists_versions_with_aliases_and_figures(session, capsys, tmp_path):
    code, out = run_cli(report.main, ["--experiment", "cv", "--out", str(tmp_path / "runs.csv")], capsys)
    assert code == 0
    listed = out.split("registered models")[1]
    figure = _lwlrap(session.client, session.better)
    assert re.search(rf"{NAME} +{session.better} +@challenger, @champion +{session.runs[session.better][:8]}",
                     listed)
    assert re.search(rf"{NAME} +{session.worse} +{session.runs[session.worse][:8]}", listed)
    assert f"{figure:.4f} on tiny/test@" in listed


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (.ci/run installs it)")
def test_the_version_page_shows_the_card_and_the_figures(session, cv_run, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "1", "--backend-store-uri", cv_run.tracking_uri], f"{url}/health", tmp_path)
    try:
        page = f"{url}/#/models/{NAME}/versions/{session.better}"
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              "--disable-background-networking", "--disable-component-update", "--disable-sync",
                              f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=20000", "--dump-dom",
                              page], check=True, capture_output=True, text=True, timeout=180).stdout
    finally:
        server.terminate()
        server.wait(30)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    for shown in (f"{NAME} version {session.better}", "Known limits", "Species and thresholds", "champion",
                  f"{_lwlrap(session.client, session.better):.4f}", "tiny/test"):
        assert shown in text, shown


def test_bad_input_is_one_line_and_changes_nothing(session, cv_run, tiny_data, capsys, tmp_path):
    client = session.client
    runs_before = len(client.search_runs([client.get_experiment_by_name(f"{NAME}-registry").experiment_id]))
    aliases = client.get_registered_model(NAME).aliases
    versions = len(client.search_model_versions(f"name = '{NAME}'"))
    bare = client.create_run(cv_run.experiment_id, run_name="no-model")
    client.log_text(bare.info.run_id, (ROOT / "tests" / "tiny.yaml").read_text(), "config.yaml")
    client.set_terminated(bare.info.run_id)
    (tmp_path / "audio").mkdir()
    cases = [
        (["evaluate", "--model", "models:/nope/1", "--data-dir", str(tiny_data)],
         "models:/nope/1: no registered model 'nope'"),
        (["promote", "--model", f"models:/{NAME}@nope", "--data-dir", str(tiny_data)],
         f"models:/{NAME}@nope: model '{NAME}' has no alias nope (versions: 1, 2"),
        (["evaluate", "--model", f"models:/{NAME}/99", "--data-dir", str(tiny_data)], "has no version 99"),
        (["evaluate", "--model", "runs:/x/model", "--data-dir", str(tiny_data)],
         "expected models:/NAME/VERSION or models:/NAME@ALIAS"),
        (["register", "--run-id", bare.info.run_id], f"run {bare.info.run_id} has no model"),
        (["register", "--run-id", "0" * 32], "not found"),
        (["promote", "--model", f"models:/{NAME}/1", "--data-dir", str(tmp_path / "audio")], "no truth to evaluate against"),
        (["evaluate", "--model", f"models:/{NAME}/1", "--fold", "2"], f"models:/{NAME}/1 trained on "),
        (["evaluate", "--model", f"models:/{NAME}/1", "--fold", "7"], "--fold 7: the folds of run"),
        (["promote", "--model", f"models:/{NAME}/1", "--data-dir", str(tiny_data), "--min-gain", "-1"],
         "argument --min-gain: expected a number >= 0"),
        (["register", "--run-id", "x", "--name", "a b"], "argument --name: expected letters"),
        (["promote", "--model", f"models:/{NAME}/1", "--data-dir", str(tiny_data), "--against", "latest"],
         "argument --against: 'latest' is not an alias the gate can move"),
        (["promote", "--model", f"models:/{NAME}/1", "--data-dir", str(tiny_data), "--against", "challenger"],
         "argument --against: 'challenger' is not an alias the gate can move"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) if "argument" in message else _no_raise() as exit_:
            code = registry.main(argv)
        code = exit_.value.code if exit_ is not None else code
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    code, out = run_cli(predict.main, ["--model", f"models:/{NAME}@nope"], capsys)
    assert code == 2 and "has no alias nope" in out
    files = subprocess.run([sys.executable, "-m", "rfcx_mlops.registry", "register", "--run-id", session.runs[1],
                            "--name", NAME],
                           cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": str(tmp_path / "mlruns")},
                           capture_output=True, text=True, timeout=120)
    assert files.returncode == 2 and files.stderr.startswith("error: the Model Registry needs a database-backed")
    assert len(files.stderr.strip().splitlines()) == 1 and not (tmp_path / "mlruns").exists()
    assert len(client.search_model_versions(f"name = '{NAME}'")) == versions
    assert client.get_registered_model(NAME).aliases == aliases
    registry_runs = client.search_runs([client.get_experiment_by_name(f"{NAME}-registry").experiment_id])
    assert len(registry_runs) == runs_before and {r.info.status for r in registry_runs} == {"FINISHED"}


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@needs_postgres
def test_register_and_promote_on_postgresql_behind_mlflow_server(pg_database, tiny_data, tmp_path):
    """The multi-worker set-up: an mlflow server whose backend store is PostgreSQL, the commands as its clients."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_server([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                           "--workers", "1", "--backend-store-uri", pg_database, "--artifacts-destination",
                           str(tmp_path / "artifacts")], f"{uri}/health", tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": "pg"}
    try:
        def command(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True,
                                  text=True, timeout=900)

        run_ids = []
        for seed in ("1", "2"):
            trained = command("rfcx_mlops.train", "--config", str(TINY), "--fold", "1", "--epochs", "1",
                              "--data-dir", str(tiny_data), "--seed", seed)
            assert trained.returncode == 0, trained.stderr[-3000:]
            run_ids.append(re.search(r"^run (\w+): fold 1", trained.stdout, re.M)[1])
        for run_id in run_ids:
            assert command("rfcx_mlops.registry", "register", "--run-id", run_id).returncode == 0
        codes = [command("rfcx_mlops.registry", "promote", "--model", f"models:/rfcx/{n}", "--data-dir",
                         str(tiny_data)) for n in (1, 2)]
        client = MlflowClient(uri)
        figures = {n: tracked.evaluations(tracked.model_id(client.get_model_version("rfcx", str(n))), client)
                   .set_index("dataset").loc["tiny/test", "lwlrap"] for n in (1, 2)}
        champion = 2 if figures[2] > figures[1] else 1
        assert [c.returncode for c in codes] == [0, 0 if champion == 2 else 3], codes[1].stderr[-2000:]
        aliases = {k: int(v) for k, v in client.get_registered_model("rfcx").aliases.items()}  # REST: strings
        assert aliases == {"champion": champion, "challenger": 2}
        again = command("rfcx_mlops.registry", "promote", "--model", f"models:/rfcx/{3 - champion}", "--data-dir",
                        str(tiny_data))
        assert again.returncode == 3 and "refused" in again.stdout
        assert int(client.get_registered_model("rfcx").aliases["champion"]) == champion
    finally:
        server.terminate()
        server.wait(30)
