"""An experiment's runs read back as a table: one row per run, what ``python -m rfcx_mlops.report`` prints."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

from rfcx_mlops.errors import UserError

COLUMNS = ["run_id", "run_name", "status", "preset", "fold", "teacher", "best_val_lwlrap", "best_val_recording_lwlrap",
           "test_lwlrap", "best_epoch", "epochs", "wall_time_s", "artifacts_mb", "started"]


def _tree_bytes(repo, path: str | None = None) -> int:
    return sum(_tree_bytes(repo, f.path) if f.is_dir else (f.file_size or 0) for f in repo.list_artifacts(path))


def artifact_bytes(client: MlflowClient, run: mlflow.entities.Run) -> int:
    """What a run keeps in the artifact store: its own artifacts and those of the models it logged."""
    total = _tree_bytes(get_artifact_repository(run.info.artifact_uri))
    for model in client.search_logged_models([run.info.experiment_id],
                                             filter_string=f"source_run_id = '{run.info.run_id}'"):
        total += _tree_bytes(get_artifact_repository(model.artifact_location))
    return total


def runs_table(experiment: str) -> pd.DataFrame:
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise UserError(f"no experiment {experiment!r} in {mlflow.get_tracking_uri()} (there: {names})")
    rows = []
    for run in client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"], max_results=50000):
        info, data = run.info, run.data
        end = info.end_time or (pd.Timestamp.now(tz="UTC").value // 1_000_000 if info.status == "RUNNING" else None)
        rows.append({
            "run_id": info.run_id,
            "run_name": info.run_name,
            "status": info.status,
            "preset": data.tags.get("preset", ""),
            "fold": data.tags.get("fold", ""),
            "teacher": data.tags.get("teacher_run_id", "")[:8],  # a self-training round's: teacher -> student
            "best_val_lwlrap": data.metrics.get("best_val_lwlrap"),
            "best_val_recording_lwlrap": data.metrics.get("best_val_recording_lwlrap"),
            "test_lwlrap": data.metrics.get("test_lwlrap"),
            "best_epoch": data.metrics.get("best_epoch"),
            "epochs": data.tags.get("checkpoint_epoch", ""),
            "wall_time_s": None if end is None else round((end - info.start_time) / 1000, 1),
            "artifacts_mb": round(artifact_bytes(client, run) / 1e6, 1),
            "started": pd.Timestamp(info.start_time, unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M"),
        })
    return pd.DataFrame(rows, columns=COLUMNS).astype({"best_epoch": "Int64"})


def render(table: pd.DataFrame) -> str:
    """Fixed-width text, short run ids, minutes:seconds wall times."""
    shown = table.assign(
        run_id=table["run_id"].str[:8],
        **{key: table[key].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
           for key in ("best_val_lwlrap", "best_val_recording_lwlrap", "test_lwlrap")},
        best_epoch=table["best_epoch"].map(lambda v: "" if pd.isna(v) else str(v)),
        wall_time_s=table["wall_time_s"].map(lambda s: "" if pd.isna(s) else f"{int(s) // 60}:{int(s) % 60:02d}"),
    ).rename(columns={"wall_time_s": "wall_time"})
    return shown.to_string(index=False)


def missing_store(uri: str) -> str | None:
    """Why ``uri`` names no existing local store (reading one would create it, empty), or None."""
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if not path.is_file():
            return f"no MLflow store here: {path.resolve()} does not exist"
    elif "://" not in uri or uri.startswith("file:"):
        path = Path(uri.removeprefix("file://"))
        if not path.is_dir():
            return f"no MLflow store here: {path.resolve()} does not exist"
    return None
