"""Shared fixtures: small RFCX-format folders written on the fly, and the real metadata where ../shared has it."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from rfcx_mlops import synth

SHARED_RFCX = Path(__file__).resolve().parents[2] / "shared" / "rfcx"
COLUMNS = ["recording_id", "species_id", "songtype_id", "t_min", "f_min", "t_max", "f_max"]


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
    return synth.build(tmp_path_factory.mktemp("demo") / "tiny", recordings=48, seed=0)


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A fresh MLflow store in tmp_path (also the working folder), experiment ``tests``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # checkpoints' artifact store and any stray output stay in tmp_path
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("tests")
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
