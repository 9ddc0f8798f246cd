"""Comparing runs: `mlflow server` over a real store, its REST API, and the compare page in headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request

import numpy as np
import pytest
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from conftest import free_port, start_server


@pytest.fixture(scope="module")
def server(cv_run):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                         "--workers", "1", "--backend-store-uri", cv_run.tracking_uri], f"{url}/health", cv_run.home)
    yield url
    proc.terminate()
    proc.wait(30)


def rest(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    address = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=30).read())


def test_rest_api_serves_runs_params_and_metric_histories(server, cv_run):
    experiment = rest(server, "experiments/get-by-name", experiment_name="cv")["experiment"]
    runs = rest(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]]})["runs"]
    by_name = {r["info"]["run_name"]: r for r in runs}
    assert set(by_name) == {"tiny-cv", "tiny-fold1", "tiny-fold2"}
    fold1 = by_name["tiny-fold1"]
    params = {p["key"]: p["value"] for p in fold1["data"]["params"]}
    assert params["train.epochs"] == "1" and params["run.name"] == "tiny" and params["folds.n_splits"] == "2"
    history = rest(server, "metrics/get-history", run_id=fold1["info"]["run_id"], metric_key="val_lwlrap")["metrics"]
    local = MlflowClient(cv_run.tracking_uri).get_metric_history(fold1["info"]["run_id"], "val_lwlrap")
    assert [(m["step"], m["value"]) for m in history] == [(m.step, m.value) for m in local] and history
    cv_metrics = {m["key"]: m["value"] for m in by_name["tiny-cv"]["data"]["metrics"]}
    assert cv_metrics["best_val_lwlrap"] == pytest.approx(cv_run.parent.data.metrics["best_val_lwlrap"])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Chromium is not installed (.ci/run installs it)")
def test_compare_page_renders_in_headless_chromium(server, cv_run, tmp_path):
    ids = [r.info.run_id for r in cv_run.folds]
    page = (f"{server}/#/compare-runs?runs={urllib.parse.quote(json.dumps(ids))}"
            f"&experiments={urllib.parse.quote(json.dumps([cv_run.experiment_id]))}")
    shot = tmp_path / "compare.png"
    chromium = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1000", "--virtual-time-budget=20000"]
    dom = subprocess.run([*chromium, "--dump-dom", page], check=True, capture_output=True, text=True, timeout=180)
    assert "Comparing 2 Runs" in dom.stdout and "tiny-fold1" in dom.stdout and "tiny-fold2" in dom.stdout
    subprocess.run([*chromium, f"--screenshot={shot}", page], check=True, capture_output=True, timeout=180)
    image = imread(shot)
    assert image.shape[:2] == (1000, 1400)
    # A rendered page has text, tables and charts; a blank or error page is one or two colours.
    assert len(np.unique(image.reshape(-1, image.shape[-1])[:, :3], axis=0)) > 50
    print(f"screenshot: {shot}")
