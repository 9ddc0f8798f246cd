"""A model logged by the code before the package took its layers (commit 7cf4c23) still loads, scores and serves.

The old code is taken from git history, trains one tiny epoch into a store of the test's own, and the
current code then scores the demo test folder with that run (``predict``); the logged pyfunc model,
which carries its own copy of the code it was logged with, answers a request in a fresh process with
the same scores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
BEFORE_LAYERS = "7cf4c23942216535cbb4e9198a6e91589ca396c8"


def _old_code(dst: Path) -> Path:
    """The package and tests/tiny.yaml as they were at BEFORE_LAYERS, or a skip where history is missing."""
    have = subprocess.run(["git", "cat-file", "-e", f"{BEFORE_LAYERS}^{{commit}}"], cwd=ROOT, capture_output=True)
    if have.returncode != 0:
        pytest.skip(f"commit {BEFORE_LAYERS[:7]} is not in this clone's history")
    archive = subprocess.run(["git", "archive", BEFORE_LAYERS, "rfcx_mlops", "tests/tiny.yaml"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    dst.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True)
    return dst


def test_a_model_logged_before_the_layers_still_scores_and_serves(tiny_data, tmp_path):
    old = _old_code(tmp_path / "old")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "MLFLOW_EXPERIMENT_ID": ""}
    trained = subprocess.run(
        [sys.executable, "-m", "rfcx_mlops.train", "--config", str(old / "tests" / "tiny.yaml"), "--fold", "1",
         "--data-dir", str(tiny_data), "--epochs", "1"],
        cwd=tmp_path, env={**env, "PYTHONPATH": str(old)}, capture_output=True, text=True, timeout=900)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_id = trained.stdout.split("run ", 1)[1].split(":", 1)[0]

    scored = subprocess.run([sys.executable, "-m", "rfcx_mlops.predict", "--run-id", run_id, "--out", "sub.csv"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert scored.returncode == 0, scored.stderr[-3000:]
    submission = pd.read_csv(tmp_path / "sub.csv").set_index("recording_id")
    tests = sorted((tiny_data / "test").glob("*.flac"))
    assert list(submission.index) == sorted(p.stem for p in tests)
    assert np.isfinite(submission.to_numpy()).all()

    y, rate = sf.read(tests[0], dtype="float32")
    request = pd.DataFrame({"audio": [y.tolist()], "sample_rate": [rate]}).to_json(orient="split")
    served = subprocess.run(
        [sys.executable, "-c", "import sys, mlflow, pandas as pd; "
         "model = mlflow.pyfunc.load_model(sys.argv[1]); "
         "print(model.predict(pd.read_json(sys.stdin, orient='split')).to_json(orient='records'))",
         f"runs:/{run_id}/model"],
        cwd=tmp_path, env=env, input=request, capture_output=True, text=True, timeout=600)
    assert served.returncode == 0, served.stderr[-3000:]
    (answer,) = json.loads(served.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose([answer[c] for c in submission.columns], submission.loc[tests[0].stem], atol=1e-4)
