"""After training: the cross-validation run, sliding-window prediction, the servable model, the runs report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.file_utils import local_file_uri_to_path
from sklearn.metrics import label_ranking_average_precision_score

from conftest import free_port, start_server, write_tone
from rfcx_mlops import predict, report
from rfcx_mlops.data import raven
from rfcx_mlops.infer import detect, scorer
from rfcx_mlops.track import report as runs_report


def sklearn_lwlrap(truth: np.ndarray, scores: np.ndarray) -> float:
    keep = truth.sum(axis=1) > 0
    return label_ranking_average_precision_score(truth[keep], scores[keep], sample_weight=truth[keep].sum(axis=1))


@pytest.fixture
def cv_tracking(cv_run, monkeypatch, tmp_path) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cv_run.tracking_uri)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(cv_run.tracking_uri)
    return MlflowClient()


def test_cv_run_summarises_its_folds(cv_run):
    client = MlflowClient(cv_run.tracking_uri)
    parent = cv_run.parent
    assert [r.data.tags["fold"] for r in cv_run.folds] == ["1", "2"]
    assert {r.info.status for r in [parent, *cv_run.folds]} == {"FINISHED"}
    best = [r.data.metrics["best_val_lwlrap"] for r in cv_run.folds]
    m = parent.data.metrics
    assert m["best_val_lwlrap"] == pytest.approx(np.mean(best)) and m["best_val_lwlrap_std"] == pytest.approx(np.std(best))
    assert (m["best_val_lwlrap_fold1"], m["best_val_lwlrap_fold2"]) == pytest.approx(best)
    assert parent.data.params["fold"] == "all" and parent.data.tags["mlflow.runName"] == "tiny-cv"

    oof = pd.read_csv(client.download_artifacts(parent.info.run_id, "oof_predictions.csv", str(cv_run.home)))
    folds_csv = pd.read_csv(client.download_artifacts(cv_run.folds[0].info.run_id, "folds.csv", str(cv_run.home)))
    assert len(oof) == len(folds_csv) and set(oof["fold"]) == {1, 2}  # every labelled call scored once, out of fold
    truth, scores = oof.filter(regex=r"^y\d+$").to_numpy(), oof.filter(regex=r"^s\d+$").to_numpy()
    assert m["oof_lwlrap"] == pytest.approx(sklearn_lwlrap(truth, scores), abs=1e-6)
    for fold, run in ((1, cv_run.folds[0]), (2, cv_run.folds[1])):
        rows = oof[oof["fold"] == fold]
        assert sklearn_lwlrap(rows.filter(regex=r"^y\d+$").to_numpy(), rows.filter(regex=r"^s\d+$").to_numpy()) == \
            pytest.approx(run.data.metrics["best_val_lwlrap"], abs=1e-4)

    ap = pd.read_csv(client.download_artifacts(parent.info.run_id, "species_ap.csv", str(cv_run.home)))
    assert list(ap.columns) == ["species_id", "average_precision", "fold1", "fold2"] and len(ap) == 24
    np.testing.assert_allclose(ap["average_precision"], ap[["fold1", "fold2"]].mean(axis=1))


def test_window_starts_cover_the_recording():
    np.testing.assert_allclose(scorer.window_starts(60.0, 10.0, 5.0), np.arange(0, 51, 5))
    np.testing.assert_allclose(scorer.window_starts(12.0, 5.0, 2.5), [0, 2.5, 5.0, 7.0])  # the last ends at 12 s
    np.testing.assert_allclose(scorer.window_starts(3.0, 5.0, 2.5), [0])  # shorter than a window: padded


def run_predict(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = predict.main(list(argv))
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cv_prediction_averages_the_folds_in_submission_order(cv_run, cv_tracking, tiny_data, capsys, tmp_path):
    code, out, _ = run_predict(capsys, "--run-id", cv_run.parent.info.run_id, "--out", "cv.csv")
    assert code == 0
    submission = pd.read_csv("cv.csv")
    template = pd.read_csv(tiny_data / "sample_submission.csv")
    assert list(submission.columns) == list(template.columns)
    assert submission["recording_id"].tolist() == template["recording_id"].tolist()
    labels = pd.read_csv(tiny_data / "test_labels.csv").set_index("recording_id").loc[submission["recording_id"]]
    expected = sklearn_lwlrap(labels.to_numpy(), submission.drop(columns="recording_id").to_numpy())
    assert f"test LWLRAP {expected:.4f}" in out
    parent = cv_tracking.get_run(cv_run.parent.info.run_id)
    assert parent.data.metrics["test_lwlrap"] == pytest.approx(expected)
    assert "cv.csv" in {a.path for a in cv_tracking.list_artifacts(parent.info.run_id)}

    folds = []
    for run in cv_run.folds:
        assert run_predict(capsys, "--run-id", run.info.run_id, "--out", f"{run.info.run_id}.csv")[0] == 0
        folds.append(pd.read_csv(f"{run.info.run_id}.csv").drop(columns="recording_id").to_numpy())
    np.testing.assert_allclose(submission.drop(columns="recording_id").to_numpy(), np.mean(folds, axis=0), atol=2e-6)

    gate = ["--run-id", cv_run.parent.info.run_id, "--out", "gated.csv", "--min-lwlrap"]
    assert run_predict(capsys, *gate, f"{expected - 0.001:.4f}")[0] == 0
    code, _, err = run_predict(capsys, *gate, f"{expected + 0.001:.4f}")
    assert code == 3 and err.strip().splitlines()[-1] == (f"error: test LWLRAP {expected:.4f} is below the gate --min-lwlrap "
                                         f"{float(f'{expected + 0.001:.4f}'):g}")


def test_detections_raven_tables_and_event_scores(cv_run, cv_tracking, tiny_data, capsys, tmp_path):
    fold = cv_run.folds[0].info.run_id
    assert run_predict(capsys, "--run-id", fold, "--out", "first.csv", "--hop", "1.25")[0] == 0
    # a tiny model's scores are low: a threshold that its top tenth of recording scores reach
    threshold = round(float(np.quantile(pd.read_csv("first.csv").drop(columns="recording_id"), 0.9)), 3)
    code, out, _ = run_predict(capsys, "--run-id", fold, "--out", "out/sub.csv", "--raven", "raven", "--hop", "1.25",
                               "--threshold", str(threshold), "--audacity", "audacity")
    assert code == 0
    found = pd.read_csv("out/detections.csv")
    assert list(found.columns) == detect.DETECTION_COLUMNS and len(found) > 0
    assert f"wrote out/detections.csv: {len(found)} detections" in out
    assert f"(threshold {threshold:g}, gaps under 1 s joined)" in out
    assert (found["t_start"] >= 0).all() and (found["t_end"] <= 60.0).all() and (found["t_end"] > found["t_start"]).all()
    assert (found["score"] >= threshold).all()
    species = pd.read_csv(MlflowClient().download_artifacts(fold, detect.SPECIES_FILE, str(tmp_path)))
    tp = pd.read_csv(tiny_data / "train_tp.csv")
    banded = found.merge(species, on="species_id", suffixes=("", "_species"))
    assert (banded["f_low"] == banded["f_low_species"]).all() and (banded["f_high"] == banded["f_high_species"]).all()
    for k, row in species.set_index("species_id").iterrows():
        calls = tp[tp["species_id"] == k]
        assert (row["f_low"], row["f_high"]) == ((calls["f_min"].min(), calls["f_max"].max()) if len(calls) else (84.0, 15056.0))
    # a species' detections never touch: nearer than the minimum gap, they are one
    for _, rows in found.sort_values("t_start").groupby(["recording_id", "species_id"]):
        assert (rows["t_start"].to_numpy()[1:] - rows["t_end"].to_numpy()[:-1] >= 1.0).all()

    # every recording has a table; read back, the boxes are the detections'
    ids = pd.read_csv(tiny_data / "sample_submission.csv")["recording_id"]
    assert sorted(p.name for p in Path("raven").iterdir()) == sorted(f"{rid}{raven.RAVEN_SUFFIX}" for rid in ids)
    for rid, rows in found.groupby("recording_id"):
        back = raven.read_raven(Path("raven") / f"{rid}{raven.RAVEN_SUFFIX}")
        np.testing.assert_allclose(back[["t_start", "t_end", "f_low", "f_high"]].to_numpy(),
                                   rows[["t_start", "t_end", "f_low", "f_high"]].to_numpy(), atol=1e-3)
        assert back["label"].tolist() == [f"s{k}" for k in rows["species_id"]]

    # the same boxes in Audacity's label tracks: a region label, then its band
    assert sorted(p.name for p in Path("audacity").iterdir()) == sorted(f"{rid}{raven.AUDACITY_SUFFIX}" for rid in ids)
    for rid, rows in found.groupby("recording_id"):
        lines = [line.split("\t") for line in (Path("audacity") / f"{rid}{raven.AUDACITY_SUFFIX}").read_text().splitlines()]
        assert [line[0] for line in lines[1::2]] == ["\\"] * len(rows)
        np.testing.assert_allclose([[float(a), float(b), float(lo), float(hi)] for (a, b, _), (_, lo, hi) in
                                    zip(lines[::2], lines[1::2])],
                                   rows[["t_start", "t_end", "f_low", "f_high"]].to_numpy(), atol=1e-3)
        assert [label for _, _, label in lines[::2]] == [f"s{k} {v:.2f}" for k, v in zip(rows["species_id"], rows["score"])]

    # and through import-raven into a data folder holding the same boxes as train_tp.csv rows
    from rfcx_mlops import dataset
    species_map = tmp_path / "species.csv"
    assert dataset.main(["import-raven", "raven", str(tiny_data / "test"), "imported", "--species-map", str(species_map)]) == 0
    imported = pd.read_csv("imported/train_tp.csv")
    np.testing.assert_allclose(imported[["species_id", "t_min", "t_max", "f_min", "f_max"]].to_numpy(),
                               found[["species_id", "t_start", "t_end", "f_low", "f_high"]].to_numpy(), atol=1e-3)
    assert imported["recording_id"].tolist() == found["recording_id"].tolist()
    assert len(list(Path("imported/train").iterdir())) == len(ids)

    # event precision and recall, counted here by hand from the demo data's test_calls.csv
    calls = pd.read_csv(tiny_data / "test_calls.csv")
    def overlaps(a, b):
        return ((a["recording_id"] == b["recording_id"]) & (a["species_id"] == b["species_id"])
                & (a["t_start"] < b["t_max"]) & (b["t_min"] < a["t_end"]))
    right = sum(any(overlaps(d, c) for _, c in calls.iterrows()) for _, d in found.iterrows())
    hit = sum(any(overlaps(d, c) for _, d in found.iterrows()) for _, c in calls.iterrows())
    events = pd.read_csv("out/event_scores.csv").set_index("species_id")
    assert events.loc["all", ["detections", "right", "calls", "found"]].tolist() == [len(found), right, len(calls), hit]
    assert f"events: precision {right / len(found):.4f} ({right} of {len(found)} detections on a true call), recall " \
           f"{hit / len(calls):.4f} ({hit} of {len(calls)} calls found)" in out
    run = cv_tracking.get_run(fold)
    assert run.data.metrics["event_recall"] == pytest.approx(hit / len(calls))
    logged = {a.path for a in cv_tracking.list_artifacts(fold)}
    assert {"detections.csv", "event_scores.csv", "raven", "audacity", "species.csv"} <= logged


def test_a_folder_of_audio_with_an_unreadable_file(cv_run, cv_tracking, capsys, tmp_path):
    folder = tmp_path / "field"
    folder.mkdir()
    write_tone(folder / "b_site.wav", seconds=7.0, freq=3000.0)
    write_tone(folder / "a_site.flac", seconds=1.0)  # shorter than a window
    (folder / "c_broken.flac").write_bytes(b"not audio at all")
    code, out, err = run_predict(capsys, "--run-id", cv_run.folds[0].info.run_id, "--data-dir", str(folder),
                                 "--out", "field.csv", "--hop", "0.5")
    assert code == 1
    submission = pd.read_csv("field.csv")
    assert submission["recording_id"].tolist() == ["a_site", "b_site"] and submission.shape == (2, 25)
    assert "1 recording(s) could not be scored" in err and "c_broken.flac: not a readable audio file" in err
    assert "test LWLRAP" not in out


def test_bad_input_is_one_line(cv_run, cv_tracking, capsys, tmp_path, tiny_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no audio here")
    ten = tmp_path / "ten"
    (ten / "test").mkdir(parents=True)
    write_tone(ten / "test" / "r1.flac", seconds=3.0)
    pd.DataFrame({"recording_id": ["r1"], **{f"s{i}": [0.5] for i in range(10)}}).to_csv(
        ten / "sample_submission.csv", index=False)
    unsafe = tmp_path / "unsafe"
    (unsafe / "test").mkdir(parents=True)
    write_tone(unsafe / "test" / "r1.flac", seconds=3.0)
    pd.DataFrame({"recording_id": ["r1", "../r1"], **{f"s{i}": [0.5, 0.5] for i in range(24)}}).to_csv(
        unsafe / "sample_submission.csv", index=False)
    thresholds = tmp_path / "t.csv"
    thresholds.write_text("species_id,threshold\n3,0.5\n3,0.6\n")
    bare = cv_tracking.create_run(cv_tracking.create_experiment("no-model"))
    cv_tracking.log_text(bare.info.run_id, yaml.safe_dump(yaml.safe_load(
        mlflow.artifacts.load_text(cv_run.folds[0].info.artifact_uri + "/config.yaml"))), "config.yaml")
    fold = cv_run.folds[0].info.run_id
    cases = [
        (["--run-id", "0123456789abcdef0123456789abcdef"], "run 0123456789abcdef0123456789abcdef not found"),
        (["--run-id", bare.info.run_id], f"run {bare.info.run_id} has no model: it is RUNNING"),
        (["--run-id", fold, "--data-dir", str(empty)], f"{empty}: no .flac or .wav files"),
        (["--run-id", fold, "--data-dir", str(tmp_path / "nowhere")], "nowhere: no such folder"),
        (["--run-id", fold, "--data-dir", str(ten)], "sample_submission.csv: 10 species columns, but the model scores 24"),
        (["--run-id", fold, "--data-dir", str(unsafe)],
         "sample_submission.csv line 3: recording_id '../r1' is not a plain file name"),
        (["--run-id", fold, "--data-dir", str(ten / "test"), "--min-lwlrap", "0.5"],
         f"--min-lwlrap: {ten / 'test'} has no test_labels.csv"),
        (["--run-id", fold, "--threshold", "1.5"], "argument --threshold: expected a number within [0, 1]; got '1.5'"),
        (["--run-id", fold, "--min-gap", "-1"], "argument --min-gap: expected seconds >= 0; got '-1'"),
        (["--run-id", fold, "--thresholds", "none.csv"], "--thresholds: none.csv is not a file"),
        (["--run-id", fold, "--audacity", str(thresholds)], f"--audacity: {thresholds} is a file, not a folder"),
        (["--run-id", fold, "--thresholds", str(thresholds)],
         f"{thresholds} line 3: species_id must be a new id within 0..23 and threshold within [0, 1]; got 3,0.6"),
    ]
    for argv, message in cases:
        code, _, err = run_predict(capsys, *argv, "--out", "x.csv")
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and message in errors[0], (argv, err[-2000:])
        assert "Traceback" not in err
    assert not Path("x.csv").exists()


def in_process_scores(run_id: str, recording: Path, folder: Path) -> np.ndarray:
    _, loaded = scorer.load_run(run_id, folder)
    return loaded.scores(loaded.read(recording))


def test_servable_model_in_a_fresh_process(cv_run, cv_tracking, tiny_data, tmp_path):
    run = cv_run.folds[0]
    recording = sorted((tiny_data / "test").iterdir())[0]
    script = f"""
import json, mlflow, numpy as np, pandas as pd, soundfile as sf
model = mlflow.pyfunc.load_model("runs:/{run.info.run_id}/model")
y, sr = sf.read("{recording}", dtype="float32")
by_path = model.predict(pd.DataFrame({{"path": ["{recording.name}"]}}))
by_audio = model.predict(pd.DataFrame({{"audio": [y.astype(float).tolist()], "sample_rate": [sr]}}))
print(json.dumps({{"path": by_path.to_numpy().tolist(), "audio": by_audio.to_numpy().tolist(),
                  "columns": list(by_path.columns), "inputs": model.metadata.get_input_schema().input_names()}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": cv_run.tracking_uri, "RFCX_SERVE_AUDIO_ROOT": str(recording.parent)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["columns"] == [f"s{i}" for i in range(24)]
    assert result["inputs"] == ["path", "audio", "sample_rate"]
    assert run.data.tags["model_uri"].startswith("models:/m-")
    np.testing.assert_allclose(result["path"], result["audio"], atol=1e-6)
    np.testing.assert_allclose(result["path"][0], in_process_scores(run.info.run_id, recording, tmp_path), atol=2e-6)


def test_a_served_model_reads_no_files_unless_told(cv_run, cv_tracking, tiny_data, monkeypatch):
    monkeypatch.delenv("RFCX_SERVE_AUDIO_ROOT", raising=False)
    model = mlflow.pyfunc.load_model(f"runs:/{cv_run.folds[0].info.run_id}/model")
    recording = sorted((tiny_data / "test").iterdir())[0]
    with pytest.raises(mlflow.exceptions.MlflowException, match="this server reads no files") as err:
        model.predict(pd.DataFrame({"path": [str(recording)]}))
    assert err.value.get_http_status_code() == 403


def post(port: int, records: list[dict]) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                     data=json.dumps({"dataframe_records": records}).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_mlflow_models_serve_answers_and_refuses(cv_run, cv_tracking, tiny_data, tmp_path):
    """A real `mlflow models serve`: files only under the operator's folder and within its limits; every
    refusal a 4xx with one line, after which the server goes on answering."""
    root = tmp_path / "audio"
    root.mkdir()
    recording = shutil.copy(sorted((tiny_data / "test").iterdir())[1], root / "site.flac")
    write_tone(root / "long.flac", seconds=70.0)
    sf.write(root / "big.wav", np.zeros(48000 * 60), 48000, subtype="FLOAT")  # 11.5 MB; a 60 s FLAC is at most 5.8
    (tmp_path / "secret.flac").write_bytes(Path(recording).read_bytes())
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": cv_run.tracking_uri, "RFCX_SERVE_AUDIO_ROOT": str(root),
           "RFCX_SERVE_MAX_SECONDS": "65", "RFCX_SERVE_MAX_MB": "8",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    server = start_server(["mlflow", "models", "serve", "-m", f"runs:/{cv_run.folds[0].info.run_id}/model",
                           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                          f"http://127.0.0.1:{port}/ping", tmp_path, env)
    try:
        answers = {
            "ok": post(port, [{"path": "site.flac"}]),
            "absolute inside": post(port, [{"path": str(root / "site.flac")}]),
            "dotdot": post(port, [{"path": "../secret.flac"}]),
            "device": post(port, [{"path": "/dev/zero"}]),
            "missing": post(port, [{"path": "nothing.flac"}]),
            "too long": post(port, [{"path": "long.flac"}]),
            "too big": post(port, [{"path": "big.wav"}]),
            "samples too long": post(port, [{"audio": [0.0] * 7000, "sample_rate": 100}]),
            "no rate": post(port, [{"audio": [0.0] * 100}]),
            "again": post(port, [{"path": "site.flac"}]),
        }
    finally:
        server.terminate()
        server.wait(30)
    refusals = {
        "dotdot": (403, "path '../secret.flac' is outside the folder this server reads"),
        "device": (403, "path '/dev/zero' is outside the folder this server reads"),
        "missing": (400, "path 'nothing.flac': no such file under"),
        "too long": (400, "path 'long.flac': 70.0 s of audio is over this server's limit of 65 s"),
        "too big": (400, "path 'big.wav': 11.5 MB is over this server's limit of 8 MB"),
        "samples too long": (400, "audio: 70.0 s of audio is over this server's limit of 65 s"),
        "no rate": (400, "a row with audio needs its sample_rate"),
    }
    for name, (status, message) in refusals.items():
        code, body = answers[name]
        assert code == status and message in body["message"], (name, code, body)
        assert "Traceback" not in body["message"]
    expected = in_process_scores(cv_run.folds[0].info.run_id, Path(recording), tmp_path)
    for name in ("ok", "absolute inside", "again"):
        code, body = answers[name]
        assert code == 200, (name, body)
        (row,) = body["predictions"]
        assert sorted(row, key=lambda k: int(k[1:])) == [f"s{i}" for i in range(24)]
        np.testing.assert_allclose([row[f"s{i}"] for i in range(24)], expected, atol=2e-6)


def test_report_lists_every_run(cv_run, cv_tracking, capsys):
    assert report.main(["--experiment", "cv", "--out", "runs.csv"]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv("runs.csv")
    assert list(table.columns) == runs_report.COLUMNS and len(table) == 3
    assert sorted(table["fold"].astype(str)) == ["1", "2", "all"]
    by_fold = table.set_index(table["fold"].astype(str))
    assert by_fold.loc["all", "best_val_lwlrap"] == pytest.approx(cv_run.parent.data.metrics["best_val_lwlrap"])
    assert (by_fold.loc[["1", "2"], "epochs"] == 1).all() and (table["wall_time_s"] > 0).all()
    for line in ("tiny-cv", "tiny-fold1", "tiny-fold2", "3 runs; written to runs.csv"):
        assert line in out
    by_run = table.set_index("run_id")
    for run in cv_run.folds:  # the run's own artifacts and its logged model's, as they lie on disk
        model = cv_tracking.get_logged_model(run.data.tags["model_uri"].removeprefix("models:/"))
        folders = [Path(local_file_uri_to_path(uri)) for uri in (run.info.artifact_uri, model.artifact_location)]
        on_disk = sum(f.stat().st_size for folder in folders for f in folder.rglob("*") if f.is_file())
        assert by_run.loc[run.info.run_id, "artifacts_mb"] == pytest.approx(on_disk / 1e6, abs=0.05)
        assert not (folders[0] / "checkpoints").exists()
    assert report.main(["--experiment", "nope"]) == 2
    assert "error: no experiment 'nope'" in capsys.readouterr().err
