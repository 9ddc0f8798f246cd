"""The MLflow Model Registry as this project uses it: which stores have one, what a model URI names, the
registered versions as a table.

A version of a registered model (``models:/rfcx/3``, or by alias ``models:/rfcx@champion``) points at a
logged model: a training run's, or for a cross-validation run the ensemble of its folds'
(``jobs.registry``).  Scoring with a version is scoring with the run that logged its model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient

from rfcx_mlops.config import CHAMPION, DEFAULT_MODEL
from rfcx_mlops.errors import UserError
from rfcx_mlops.track.report import missing_store

CHALLENGER = "challenger"  # the latest version put to the promotion gate, promoted or not
EVALUATION_METRIC = "lwlrap"  # recording-level LWLRAP on an evaluation set: what the gate compares
FOLDS_FILE = "folds.txt"  # in a cross-validation version's model: its folds' model ids, one a line
_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))")


class RegistryError(UserError):
    """A model name, version, alias or store the registry cannot use; the message names it."""


@dataclass(frozen=True)
class ModelRef:
    """What ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` names."""

    name: str
    version: str | None
    alias: str | None


def parse(uri: str) -> ModelRef:
    """A registered model's URI, or one line saying what is expected."""
    match = _URI.fullmatch(uri)
    if not match:
        raise RegistryError(f"--model {uri}: expected models:/NAME/VERSION or models:/NAME@ALIAS "
                            f"(e.g. models:/{DEFAULT_MODEL}@{CHAMPION})")
    return ModelRef(match["name"], match["version"], match["alias"])


def has_registry(uri: str) -> bool:
    """A store with a database behind it (SQLite, PostgreSQL, or a tracking server with one) has a Model Registry."""
    return "://" in uri and not uri.startswith("file:")


def check_store(uri: str) -> None:
    """A store with a registry, and one that exists: reading a missing SQLite file would create it, empty."""
    if not has_registry(uri):
        raise RegistryError(f"the Model Registry needs a database-backed MLflow store, and {uri} is a folder of "
                            "files: set MLFLOW_TRACKING_URI=sqlite:///mlflow.db (one machine), or to an mlflow "
                            "server whose backend store is PostgreSQL (several)")
    problem = missing_store(uri)
    if problem:
        raise RegistryError(f"{problem}; run this where the runs were made, or set MLFLOW_TRACKING_URI to their "
                            "store")


def resolve(uri: str, client: MlflowClient | None = None) -> ModelVersion:
    """The registered version ``uri`` names, or one line saying which part of it is unknown."""
    client = client or MlflowClient()
    ref = parse(uri)
    check_store(mlflow.get_tracking_uri())
    try:
        model = client.get_registered_model(ref.name)
    except mlflow.exceptions.MlflowException:
        names = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise RegistryError(f"{uri}: no registered model {ref.name!r} in {mlflow.get_tracking_uri()} "
                            f"(registered: {names})") from None
    try:
        found = alias_version(ref.name, ref.alias, client) if ref.alias else client.get_model_version(ref.name,
                                                                                                    ref.version)
    except mlflow.exceptions.MlflowException:
        found = None
    if found is None:
        aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "no aliases"
        versions = sorted((str(v.version) for v in client.search_model_versions(f"name = '{ref.name}'")), key=int)
        missing = f"alias {ref.alias}" if ref.alias else f"version {ref.version}"
        raise RegistryError(f"{uri}: model {ref.name!r} has no {missing} (versions: {', '.join(versions) or 'none'}; "
                            f"{aliases})")
    return found


def alias_version(name: str, alias: str, client: MlflowClient | None = None) -> ModelVersion | None:
    """The version of ``name`` that holds ``alias``, or None."""
    client = client or MlflowClient()
    version = client.get_registered_model(name).aliases.get(alias)
    return None if version is None else client.get_model_version(name, str(version))


def model_id(version: ModelVersion) -> str:
    """The logged model a version holds: registered from its ``models:/<model id>`` (the database stores keep
    that as the version's source, not as its ``model_id``)."""
    return version.model_id or version.source.removeprefix("models:/")


def source_run(version: ModelVersion) -> str:
    """The run that logged the version's model: a training run, or a cross-validation run for its folds' ensemble."""
    if not version.run_id:
        raise RegistryError(f"models:/{version.name}/{version.version}: no run of this store logged its model")
    return version.run_id


def ensemble_folds(version: ModelVersion) -> list[str] | None:
    """The fold models a cross-validation version scores with, as it was registered; None for a training run's."""
    return logged_folds(model_id(version))


def logged_folds(model_id: str) -> list[str] | None:
    """The fold models a logged ensemble model (``servable.log_ensemble``) scores with; None for another model."""
    model = MlflowClient().get_logged_model(model_id)
    try:
        return mlflow.artifacts.load_text(f"{model.artifact_location}/artifacts/{FOLDS_FILE}").split()
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def evaluations(model_id: str, client: MlflowClient | None = None) -> pd.DataFrame:
    """Every evaluation recorded for a logged model: one row per data set (name, digest), one column per metric."""
    client = client or MlflowClient()
    metrics = [m for m in client.get_logged_model(model_id).metrics or [] if m.dataset_digest]
    if not metrics:
        return pd.DataFrame(columns=["dataset", "digest"])
    rows = pd.DataFrame([{"dataset": m.dataset_name, "digest": m.dataset_digest, "key": m.key, "value": m.value,
                          "timestamp": m.timestamp} for m in metrics])
    latest = rows.sort_values("timestamp").drop_duplicates(["dataset", "digest", "key"], keep="last")
    return latest.pivot(index=["dataset", "digest"], columns="key", values="value").reset_index()


VERSION_COLUMNS = ["name", "version", "aliases", "run_id", "preset", "created", "evaluations"]


def versions_table(client: MlflowClient | None = None) -> pd.DataFrame:
    """Every version of every registered model, newest first, with its aliases and its LWLRAP per evaluation set."""
    client = client or MlflowClient()
    rows = []
    for found in client.search_model_versions(order_by=["creation_timestamp DESC"]):
        version = client.get_model_version(found.name, found.version)  # a search leaves the aliases out
        try:
            figures = evaluations(model_id(version), client)
        except mlflow.exceptions.MlflowException:  # registered from elsewhere, or its model deleted
            figures = pd.DataFrame()
        rows.append({
            "name": version.name,
            "version": int(version.version),
            "aliases": ", ".join(f"@{a}" for a in sorted(version.aliases)),
            "run_id": (version.run_id or "")[:8],
            "preset": version.tags.get("preset", ""),
            "created": pd.Timestamp(version.creation_timestamp, unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M"),
            "evaluations": "; ".join(f"{r[EVALUATION_METRIC]:.4f} on {r['dataset']}@{r['digest'][:8]}"
                                     for _, r in figures.iterrows() if EVALUATION_METRIC in r
                                     and pd.notna(r[EVALUATION_METRIC])),
        })
    return pd.DataFrame(rows, columns=VERSION_COLUMNS)


def experiment_name(model_name: str) -> str:
    """Where the evaluations and promotion decisions of ``model_name`` are logged."""
    return f"{model_name}-registry"


PROMOTIONS_COLUMNS = ["when", "candidate", "against", "data", "candidate_lwlrap", "against_lwlrap", "gain",
                      "min_gain", "decision", "by"]


def promotions(name: str, client: MlflowClient | None = None) -> pd.DataFrame:
    """Every promotion decision about ``name``, oldest first (the runs of ``experiment_name(name)``)."""
    client = client or MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name(name))
    found = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], f"tags.promotion_of = '{name}'", order_by=["attributes.start_time ASC"])
    rows = []
    for run in found:
        tags, metrics = run.data.tags, run.data.metrics
        data, _, digest = tags["dataset"].rpartition("@")
        rows.append({"when": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M:%S"),
                     "candidate": tags["candidate_version"], "against": tags["against_version"],
                     "data": f"{data}@{digest[:8]}", **{k: metrics.get(k) for k in PROMOTIONS_COLUMNS[4:8]},
                     "decision": tags["decision"], "by": tags.get("by", "")})
    return pd.DataFrame(rows, columns=PROMOTIONS_COLUMNS)


def promotions_text(name: str) -> str:
    table = promotions(name)
    if table.empty:
        return f"no promotion decisions about {name!r} yet"
    shown = table.assign(**{k: table[k].map(lambda v: "" if pd.isna(v) else f"{v:.4f}")
                            for k in PROMOTIONS_COLUMNS[4:8]})
    return f"promotions of {name}:\n" + shown.to_string(index=False)
