"""Shared fixtures: small RFCX-format folders written on the fly, and the real metadata where ../shared has it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from rfcx_mlops.data import demo, folder

ROOT = Path(__file__).resolve().parents[1]
POSTGRES = os.environ.get("RFCX_TEST_POSTGRES", "")
needs_postgres = pytest.mark.skipif(not POSTGRES, reason="RFCX_TEST_POSTGRES is not set (.ci/run starts a server)")
SHARED_RFCX = ROOT.parent / "shared" / "rfcx"
COLUMNS = list(folder.COLUMNS)


@pytest.fixture(scope="session", autouse=True)
def scratch_tmpdir(tmp_path_factory):
    """Temporary files of the processes the tests start go under pytest's folder, which pytest removes:
    a killed worker's checkpoints or MLflow's copy of a loaded model must not pile up in /tmp."""
    # This process keeps the folder it has: multiprocessing removes its own temporary folder there at
    # exit, after pytest has removed its folder.
    tempfile.gettempdir()
    patch = pytest.MonkeyPatch()
    patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
    yield
    patch.undo()


@pytest.fixture
def shared_rfcx() -> Path:
    if not (SHARED_RFCX / "train_tp.csv").is_file():
        pytest.skip("../shared/rfcx is not here (a user's clone has no ../shared)")
    return SHARED_RFCX


def write_tone(path: Path, seconds: float = 12.0, sr: int = 48000, channels: int = 1, subtype: str = "PCM_16",
               freq: float = 1000.0) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    y = 0.3 * np.sin(2 * np.pi * freq * t)
    data = np.stack([y] * channels, axis=1) if channels > 1 else y
    sf.write(path, data, sr, subtype=subtype)
    return path


def make_data_dir(root: Path, rows: list[tuple], seconds: float = 12.0) -> Path:
    """A data folder with train_tp.csv holding ``rows`` and a tone recording for each recording_id."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(root / "train_tp.csv", index=False)
    for rid in {r[0] for r in rows}:
        write_tone(root / "train" / f"{rid}.flac", seconds)
    return root


@pytest.fixture
def good_rows() -> list[tuple]:
    return [
        ("rec0", 3, 1, 1.0, 500.0, 2.5, 2000.0),
        ("rec1", 5, 1, 4.0, 3000.0, 5.0, 6000.0),
        ("rec1", 7, 1, 8.0, 800.0, 9.0, 1500.0),
    ]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """48 demo recordings: what tests/tiny.yaml trains on."""
    return demo.build(tmp_path_factory.mktemp("demo") / "tiny", recordings=48, seed=0)


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A fresh MLflow store in tmp_path (also the working folder), experiment ``tests``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # checkpoints' artifact store and any stray output stay in tmp_path
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID: registered here, so that it is removed after the
    # test and later subprocesses do not inherit it.
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", "")
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tests")
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@dataclass(frozen=True)
class CVRun:
    """A finished cross-validation run of the real `mlflow run . -P fold=all` on tests/tiny.yaml."""

    home: Path  # where it ran: mlflow.db and mlartifacts/
    tracking_uri: str
    experiment_id: str
    parent: Run
    folds: list[Run]  # fold 1, fold 2


@pytest.fixture(scope="session")
def cv_run(tiny_data, tmp_path_factory) -> CVRun:
    home = tmp_path_factory.mktemp("cv_run")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri,
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    cmd = ["mlflow", "run", str(ROOT), "--env-manager", "local", "--experiment-name", "cv", "-P", "fold=all",
           "-P", f"config={ROOT / 'tests' / 'tiny.yaml'}", "-P", f"data_dir={tiny_data}", "-P", "epochs=1"]
    proc = subprocess.run(cmd, cwd=home, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("cv").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [r for r in runs if r.data.tags.get("cv") == "true"]
    folds = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                   key=lambda r: r.data.tags["fold"])
    return CVRun(home, uri, experiment, parent, folds)


@pytest.fixture
def pg_database() -> str:
    """A fresh database on the PostgreSQL server of RFCX_TEST_POSTGRES, dropped afterwards."""
    import sqlalchemy

    name = f"test_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield POSTGRES.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
    admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cmd: list[str], url: str, cwd: Path, env: dict | None = None, seconds: float = 300) -> subprocess.Popen:
    """Start a server process (its output to cwd/server.log) and wait until ``url`` answers."""
    log = open(cwd / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{cmd[:4]} did not answer at {url}: "
                                   f"{(cwd / 'server.log').read_text()[-3000:]}") from None
            time.sleep(0.5)
