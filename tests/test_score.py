"""Scoring an archive (``python -m rfcx_mlops.score``): the walk, the output folder, both engines, kill -9 and resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from mlflow.tracking import MlflowClient

from conftest import free_port
from rfcx_mlops.data import archive
from rfcx_mlops.data.archive import ArchiveError, Out, Recording

BROKEN = {"site-0/empty.flac": "empty file (0 bytes)", "site-1/junk.wav": "not a readable audio file",
          "site-2/short.wav": "too short: 0.50 s of audio", "site-3/2026-03-02/cut.flac": "cannot decode frames"}
SITES, DAYS, PER_DAY = 4, 4, 20  # 320 good recordings, each folder's named 0000.flac...
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="the Spark engine needs Java (.ci/run installs it)")


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> Path:
    """A season: sites/days/NNNN.flac (2.5 s; one at 16 kHz, one a stereo WAV), four broken files, links inside
    the archive and out of it, a hidden file."""
    root = tmp_path_factory.mktemp("field") / "season"
    rng = np.random.default_rng(3)
    for s in range(SITES):
        for d in range(DAYS):
            folder = root / f"site-{s}" / f"2026-03-0{d + 1}"
            folder.mkdir(parents=True)
            for k in range(PER_DAY):
                t = np.arange(int(2.5 * 48000)) / 48000
                y = 0.05 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * rng.uniform(500, 8000) * t)
                sf.write(folder / f"{k:04d}.flac", y.astype(np.float32), 48000)
    sf.write(root / "site-0" / "2026-03-01" / "0000.flac", rng.standard_normal(40000) * 0.1, 16000)  # resampled
    sf.write(root / "site-1" / "2026-03-01" / "0000.WAV", rng.standard_normal((96000, 2)) * 0.1, 48000)
    (root / "site-0" / "empty.flac").write_bytes(b"")
    (root / "site-1" / "junk.wav").write_bytes(b"RIFF....WAVEjunk" * 20)
    sf.write(root / "site-2" / "short.wav", np.zeros(8000, np.float32), 16000)
    whole = (root / "site-3" / "2026-03-02" / "0000.flac").read_bytes()
    (root / "site-3" / "2026-03-02" / "cut.flac").write_bytes(whole[: len(whole) // 2])
    (root / "site-2" / "latest").symlink_to(root / "site-2" / "2026-03-04")  # inside, but met already: once
    (root / "site-2" / "2026-03-01" / "._0001.flac").write_bytes(b"\0" * 4096)  # macOS's copy on an SD card
    outside = root.parent / "elsewhere"
    outside.mkdir()
    sf.write(outside / "x.flac", np.zeros(48000, np.float32), 48000)
    (root / "site-3" / "x.flac").symlink_to(outside / "x.flac")
    (root / "site-3" / "loop").symlink_to(root / "site-3")
    return root


def good(field: Path) -> set[str]:
    return {r.recording_id for r in archive.walk(field)} - set(BROKEN)


# --- the walk and the output folder, without a model ----------------------------------------------------------------

def test_walk_names_recordings_by_their_path_and_stays_inside(field):
    ids = [r.recording_id for r in archive.walk(field)]
    assert ids == sorted(ids) and len(ids) == len(set(ids))
    assert "site-0/2026-03-01/0000.flac" in ids and "site-3/2026-03-01/0000.flac" in ids  # same name, two ids
    assert "site-1/2026-03-01/0000.WAV" in ids  # a recorder's upper-case suffix
    assert not any(w in i for i in ids for w in ("x.flac", "loop", "latest", "._"))  # outside, again, hidden: no
    assert len(ids) == SITES * DAYS * PER_DAY + 1 + len(BROKEN)
    assert archive.site("site-2/latest/0003.flac") == "site-2" and archive.site("top.flac") == "."


def test_out_refuses_what_is_not_its_job(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ArchiveError, match="not empty and holds no scoring job"):
        Out(tmp_path / "busy").check({"model": "a"})
    with Out(tmp_path / "out").opened({"model": "a", "hop": 1.0}):
        pass
    with pytest.raises(ArchiveError, match=r"another job's results \(its hop differ: 1.0 there, 2.0 now\)"):
        Out(tmp_path / "out").check({"model": "a", "hop": 2.0})
    (tmp_path / "file").write_text("")
    with pytest.raises(ArchiveError, match="is a file"):
        Out(tmp_path / "file").check()


def test_uncommitted_parts_go_and_changed_files_are_refused(tmp_path):
    rec = [Recording(f"s/{k}.flac", tmp_path / f"{k}.flac", 10, 1) for k in range(3)]
    empty = pd.DataFrame({"recording_id": pd.Series(dtype=str)})
    with Out(tmp_path / "out").opened({"model": "a"}) as out:
        manifest = pd.DataFrame({"recording_id": ["s/0.flac", "s/1.flac"], "size": [10, 10], "mtime_ns": [1, 1],
                                 "seconds": [1.0, np.nan], "status": ["scored", "failed"], "reason": ["", "bad"]})
        out.commit(0, empty, empty, manifest)
        empty.to_parquet(out.folder / "scores" / "part-00001.parquet")  # a chunk killed before its manifest
    with Out(tmp_path / "out").opened({"model": "a"}) as out:
        assert not (out.folder / "scores" / "part-00001.parquet").exists() and out.next_chunk() == 1
        assert [r.recording_id for r in out.pending(rec)] == ["s/2.flac"]
        fixed = Recording("s/1.flac", rec[1].path, 11, 2)  # a failed file that changed: tried again
        assert [r.recording_id for r in out.pending([rec[0], fixed])] == ["s/1.flac"]
        with pytest.raises(ArchiveError, match=r"1 recording\(s\) changed since .* scored them .*s/0.flac"):
            out.pending([Recording("s/0.flac", rec[0].path, 12, 1)])


def test_summary_counts_recordings_and_seconds_per_site():
    scores = pd.DataFrame({"recording_id": ["a/1", "a/2", "b/1"], "site": ["a", "a", "b"]})
    found = pd.DataFrame({"recording_id": ["a/1", "a/1", "a/2", "b/1"], "species_id": [3, 3, 3, 5],
                          "t_start": [0.0, 10.0, 5.0, 1.0], "t_end": [2.5, 15.0, 7.5, 2.0]})
    species = pd.DataFrame({"species_id": range(6), "name": [f"s{k}" for k in range(6)]})
    table = archive.summary(scores, found, species).set_index(["site", "species_id"])
    assert list(table.columns) == ["name", "recordings", "recordings_with_detection", "detected_seconds"]
    assert table.loc[(archive.ALL_SITES, 3)].tolist() == ["s3", 3, 2, 10.0]
    assert table.loc[("a", 3)].tolist() == ["s3", 2, 2, 10.0] and table.loc[("b", 5)].tolist() == ["s5", 1, 1, 1.0]
    assert table.loc[("b", 3), "recordings_with_detection"] == 0 and len(table) == 3 * 6


def test_a_chunk_without_a_scored_recording_reads_with_the_others(tmp_path):
    """Parts are typed alike whatever they hold: the scores folder reads as one table (pandas, Spark, DuckDB)."""
    from rfcx_mlops.infer import detect
    from rfcx_mlops.infer.archive import Outcome, Settings, tables

    settings = Settings(np.full(2, 0.5, np.float32), 1.0, 1.0, 8, pd.DataFrame(
        {"species_id": [0, 1], "name": ["a", "b"], "f_low": [0.0, 0.0], "f_high": [1e3, 1e3]}))
    rec = [Recording(f"s/{k}.flac", tmp_path / f"{k}.flac", 10, 1) for k in range(2)]
    line = detect.timeline(np.zeros(1), 2.0, np.array([[0.9, 0.1]], np.float32))
    failed = tables([Outcome(rec[0], reason="empty file (0 bytes)")], settings, 2)
    scored = tables([Outcome(rec[1], 2.0, np.array([0.9, 0.1], np.float32), line)], settings, 2)
    with Out(tmp_path / "out").opened({"model": "a"}) as out:
        out.commit(0, failed.scores, failed.detections, failed.manifest)
        out.commit(1, scored.scores, scored.detections, scored.manifest)
    both = pd.read_parquet(tmp_path / "out" / "scores")
    assert both["recording_id"].tolist() == ["s/1.flac"] and both["site"].tolist() == ["s"]
    assert pd.read_parquet(tmp_path / "out" / "detections")["species_id"].tolist() == [0]


# --- with the shared tiny run's model ---------------------------------------------------------------------------------

def test_batched_timelines_are_each_recordings_own(cv_run, monkeypatch, tmp_path):
    """The models fed batches across recordings (of 1, 7 or 64 windows) give each recording the scores and
    timeline it gets alone."""
    from rfcx_mlops.infer.scorer import load_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", cv_run.tracking_uri)
    mlflow.set_tracking_uri(cv_run.tracking_uri)
    _, scorer = load_run(cv_run.folds[0].info.run_id, tmp_path)
    rng = np.random.default_rng(0)
    ys = [rng.standard_normal(int(s * scorer.sample_rate)).astype(np.float32) * 0.1 for s in (2.5, 7.0, 1.0, 12.3)]
    alone = [scorer.timeline(y) for y in ys]
    for batch in (1, 7, 64):
        together = list(scorer.timelines(enumerate(ys), batch))
        assert [k for k, _, _ in together] == [0, 1, 2, 3]
        for (_, scores, line), (scores1, line1) in zip(together, alone):
            np.testing.assert_allclose(scores, scores1, atol=1e-5)
            np.testing.assert_array_equal(line.edges, line1.edges)
            np.testing.assert_allclose(line.scores, line1.scores, atol=1e-5)


def _score(cv_run, field: Path, out: Path, *extra: str, **popen) -> subprocess.Popen | subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rfcx_mlops.score", "--model", cv_run.folds[0].info.run_id, "--audio", str(field),
           "--out", str(out), "--threshold", "0.05", "--chunk", "16", *extra]
    env = {**os.environ, "MLFLOW_TRACKING_URI": cv_run.tracking_uri}
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=out.parent, **popen)
    return subprocess.run(cmd, env=env, cwd=out.parent, capture_output=True, text=True, timeout=1200)


def _descendants(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            found |= {int(child)} | _descendants(int(child))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def local_out(cv_run, field, tmp_path_factory) -> Path:
    """The archive scored by two workers, killed with SIGKILL after two chunks and run again."""
    out = tmp_path_factory.mktemp("local") / "out"
    proc = _score(cv_run, field, out, "--workers", "2", "--raven", stdout=subprocess.DEVNULL,
                  stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while len(list((out / "manifest").glob("part-*.parquet"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before two chunks"
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)  # at once: the job is frozen mid-chunk, then killed
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in workers), "workers outlived their killed job"
    committed = len(pd.read_parquet(out / "manifest"))
    assert 0 < committed < len(good(field))
    again = _score(cv_run, field, out, "--workers", "2", "--raven")
    assert again.returncode == 1, again.stderr[-3000:]  # finished, with failed files
    assert f"{committed} done before" in again.stdout, again.stdout
    return out


def test_a_killed_job_resumed_scores_each_recording_once(local_out, field, cv_run):
    scores = pd.read_parquet(local_out / "scores")
    assert scores["recording_id"].is_unique and set(scores["recording_id"]) == good(field)
    manifest = pd.read_parquet(local_out / "manifest")
    assert manifest["recording_id"].is_unique and len(manifest) == len(good(field)) + len(BROKEN)
    assert set(scores["site"]) == {f"site-{s}" for s in range(SITES)}
    wav = scores.set_index("recording_id").loc["site-1/2026-03-01/0000.WAV", "seconds"]
    assert wav == pytest.approx(2.0)
    failed = pd.read_csv(local_out / "failed.csv").set_index("recording_id")["reason"]
    assert set(failed.index) == set(BROKEN)
    for rid, reason in BROKEN.items():
        assert failed[rid].startswith(reason), (rid, failed[rid])
    detections = pd.read_parquet(local_out / "detections")
    assert len(detections) and set(detections["recording_id"]) <= good(field)
    tables = list((local_out / "raven").rglob("*.selections.txt"))
    assert len(tables) == len(good(field))
    assert (local_out / "raven" / "site-1" / "2026-03-01" / "0000.WAV.Table.1.selections.txt").is_file()

    summary = pd.read_csv(local_out / "summary.csv")
    everything = summary[summary["site"] == archive.ALL_SITES].set_index("species_id")
    per_recording = detections.groupby("species_id")["recording_id"].nunique()
    assert everything["recordings_with_detection"].reindex(per_recording.index).tolist() == per_recording.tolist()
    seconds = (detections["t_end"] - detections["t_start"]).groupby(detections["species_id"]).sum()
    np.testing.assert_allclose(everything["detected_seconds"].reindex(seconds.index), seconds, atol=1e-3)
    assert (summary[summary["site"] == archive.ALL_SITES]["recordings"] == len(good(field))).all()

    client = MlflowClient(cv_run.tracking_uri)
    experiment = client.get_experiment_by_name("rfcx-score")
    runs = client.search_runs([experiment.experiment_id], f"tags.out = '{local_out.resolve()}'",
                              order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["KILLED", "FINISHED"]
    assert "resumed by run" in runs[0].data.tags["failure_reason"]
    last = runs[1].data
    assert last.params["model"] == cv_run.folds[0].info.run_id and last.params["workers"] == "2"
    assert last.metrics["scored_total"] == len(good(field)) and last.metrics["failed_total"] == len(BROKEN)
    assert last.metrics["scored"] + last.metrics["failed"] < len(good(field)) + len(BROKEN)  # the rest: before
    assert last.metrics["audio_hours_per_hour"] > 0
    artifacts = {a.path for a in client.list_artifacts(runs[1].info.run_id)}
    assert {"failed.csv", "summary.csv", "job.json"} <= artifacts


def test_ctrl_c_stops_the_job_and_its_workers_at_once(cv_run, field, tmp_path):
    out = tmp_path / "out"
    # Ctrl-C as a terminal delivers it, even where whatever started the tests ignores SIGINT (nohup, `cmd &`)
    proc = _score(cv_run, field, out, "--workers", "2", "--chunk", "4", stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE, text=True,
                  preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 600
    while not list((out / "manifest").glob("part-*.parquet")):
        assert proc.poll() is None and time.monotonic() < deadline, "the job ended before its first chunk"
        time.sleep(0.01)
    workers = _descendants(proc.pid)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1].startswith("interrupted: the chunks committed"), \
        stderr[-2000:]
    assert "Traceback" not in stderr
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in workers)
    client = MlflowClient(cv_run.tracking_uri)
    experiment = client.get_experiment_by_name("rfcx-score").experiment_id
    (run,) = client.search_runs([experiment], f"tags.out = '{out.resolve()}'")
    assert run.info.status == "KILLED"
    assert len(pd.read_parquet(out / "scores")) > 0  # what was committed stays


def test_the_same_command_again_scores_nothing(local_out, field, cv_run):
    again = _score(cv_run, field, local_out, "--workers", "1", "--raven")
    assert again.returncode == 1 and "0 to score" in again.stdout, again.stderr[-2000:]
    assert len(pd.read_parquet(local_out / "scores")) == len(good(field))


@needs_java
def test_spark_writes_what_the_local_engine_writes(local_out, field, cv_run, tmp_path):
    out = tmp_path / "spark"
    proc = _score(cv_run, field, out, "--engine", "spark", "--master", "local[2]")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    local = pd.read_parquet(local_out / "scores").sort_values("recording_id").reset_index(drop=True)
    spark = pd.read_parquet(out / "scores").sort_values("recording_id").reset_index(drop=True)
    assert spark["recording_id"].tolist() == local["recording_id"].tolist()
    species = [c for c in local.columns if c.startswith("s") and c[1:].isdigit()]
    np.testing.assert_allclose(spark[species], local[species], atol=1e-5)
    np.testing.assert_allclose(spark["seconds"], local["seconds"])
    key = ["recording_id", "species_id", "t_start"]
    a = pd.read_parquet(local_out / "detections").sort_values(key).reset_index(drop=True)
    b = pd.read_parquet(out / "detections").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns="score"), b.drop(columns="score"))
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-5)
    pd.testing.assert_frame_equal(pd.read_csv(local_out / "failed.csv"), pd.read_csv(out / "failed.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(local_out / "summary.csv"), pd.read_csv(out / "summary.csv"))


# --- bad input: one line, exit 2, nothing written ---------------------------------------------------------------------

def _refused(proc: subprocess.CompletedProcess, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]


def test_bad_input_is_one_line_and_writes_nothing(cv_run, field, local_out, tmp_path):
    client = MlflowClient(cv_run.tracking_uri)
    experiment = client.get_experiment_by_name("rfcx-score")
    before = len(client.search_runs([experiment.experiment_id])) if experiment else 0
    (tmp_path / "silent").mkdir()
    (tmp_path / "silent" / "notes.txt").write_text("no audio")
    out = tmp_path / "new"
    _refused(_score(cv_run, tmp_path / "silent", out), "no .flac or .wav file under")
    _refused(_score(cv_run, tmp_path / "nowhere", out), "is not a folder")
    manifest = sorted((local_out / "manifest").iterdir())
    _refused(_score(cv_run, field, local_out, "--min-gap", "3", "--raven"), "holds another job's results",
             "its min_gap_seconds differ")
    assert sorted((local_out / "manifest").iterdir()) == manifest
    _refused(_score(cv_run, field, tmp_path / "silent"), "not empty and holds no scoring job")
    cmd = [sys.executable, "-m", "rfcx_mlops.score", "--model", "0123456789abcdef", "--audio", str(field), "--out",
           str(out)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": cv_run.tracking_uri}
    _refused(subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path), "run 0123456789abcdef not found")
    _refused(subprocess.run([*cmd[:4], "models:/nothing@champion", *cmd[5:]], env=env, capture_output=True, text=True,
                            cwd=tmp_path), "no registered model 'nothing'")
    _refused(_score(cv_run, field, out, "--engine", "spark", "--master", f"spark://127.0.0.1:{free_port()}"),
             "cannot be reached")
    _refused(_score(cv_run, field, out, "--workers", "0"), "--workers")
    _refused(_score(cv_run, field, out, "--master", "local[2]"), "only with --engine spark")
    assert not out.exists()
    experiment = client.get_experiment_by_name("rfcx-score")
    assert len(client.search_runs([experiment.experiment_id])) == before
