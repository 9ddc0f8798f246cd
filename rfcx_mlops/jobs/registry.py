"""From a run to a model in use: registering a run's model, evaluating a version on labelled recordings, and the
promotion gate that moves an alias (``python -m rfcx_mlops.registry``).

- **Register.** A training run's logged model becomes a version of a registered model; a
  cross-validation run's folds become one version, a logged model that scores with their mean
  (``servable.log_ensemble``).  The version is tagged with its data set, config digest, commit,
  best validation figures and preset; its description is its model card (``card``).
- **Evaluate.** A version scores an evaluation set (``data.evaluation``) as ``predict`` would;
  recording-level LWLRAP, per-species AP and event precision/recall become metrics of the
  logged model tied to the set (``log_metric(model_id=, dataset=)``), logged in a run of the
  experiment ``<name>-registry``.  A model already evaluated on a set with the same digest is
  read back, not scored again.  The card is rewritten with every evaluation.
- **Promote.** The candidate and the alias' version are evaluated on the same set; the alias
  moves when the candidate's LWLRAP is higher by at least the margin.  ``challenger`` marks the
  candidate either way; each decision is a run of ``<name>-registry`` and a tag on the candidate.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import hashlib
import io
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import mlflow
import numpy as np
import pandas as pd
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from rfcx_mlops.config import Config
from rfcx_mlops.data import folder
from rfcx_mlops.data.evaluation import EvaluationSet, evaluation_set
from rfcx_mlops.infer import detect
from rfcx_mlops.infer.scorer import load_run, model_runs, model_uri, run_config, species_table, training_run
from rfcx_mlops.infer.servable import log_ensemble
from rfcx_mlops.jobs import predict as predicting
from rfcx_mlops.learn.metrics import lwlrap, species_ap
from rfcx_mlops.track import registry, runs
from rfcx_mlops.track.registry import (CHALLENGER, EVALUATION_METRIC, RegistryError, check_store, evaluations,
                                       experiment_name, source_run)

log = logging.getLogger("rfcx_mlops.registry")
ENSEMBLE_TAG = "ensemble_model_uri"  # a cross-validation run's folds as one logged model
PROMOTION_TAG = "promotion"  # on a version: the last decision about it


# --- register ---------------------------------------------------------------------------------------------------

def register(run_id: str, name: str, say: Callable[[str], None] = print) -> ModelVersion:
    """The version of ``name`` holding the run's model: registered now, or found registered before."""
    check_store(mlflow.get_tracking_uri())
    client = MlflowClient()
    run = training_run(run_id)
    cfg = run_config(run)
    model_id = servable_uri(run, cfg, client).removeprefix("models:/")
    for version in client.search_model_versions(f"name = '{name}'"):
        if registry.model_id(version) == model_id:
            say(f"run {run_id} is already {name} version {version.version} (models:/{name}/{version.version})")
            return version
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # else another command made it first
            raise
    source_run_id = client.get_logged_model(model_id).source_run_id
    version = client.create_model_version(name, f"models:/{model_id}", source_run_id, tags=_version_tags(run, cfg),
                                          model_id=model_id)
    first = min((v for v in client.search_model_versions(f"name = '{name}'") if registry.model_id(v) == model_id),
                key=lambda v: int(v.version))
    if first.version != version.version:  # another command registered the same model meanwhile: keep its version
        client.delete_model_version(name, version.version)
        say(f"run {run_id} is already {name} version {first.version} (models:/{name}/{first.version})")
        return first
    try:
        version = client.update_model_version(name, version.version, description=card(version))
        # The logged model's page links to its versions, as mlflow.register_model leaves it.
        linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(
            linked + [{"name": name, "version": version.version}])})
    except BaseException:
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_model_version(name, version.version)  # registered whole or not at all
        raise
    say(f"registered run {run_id} as {name} version {version.version}: models:/{name}/{version.version}")
    return version


def servable_uri(run: Run, cfg: Config, client: MlflowClient) -> str:
    """The run's logged model; for a cross-validation run the ensemble of its folds', logged the first time."""
    if run.data.tags.get("cv") != "true":
        return model_uri(run)
    if ENSEMBLE_TAG in run.data.tags:
        return run.data.tags[ENSEMBLE_TAG]
    fold_models = [model_uri(r).removeprefix("models:/") for r in model_runs(run)]
    with tempfile.TemporaryDirectory(prefix="rfcx-ensemble-") as tmp:
        uri = log_ensemble(run.info.run_id, fold_models, cfg, Path(tmp))
    client.set_tag(run.info.run_id, ENSEMBLE_TAG, uri)
    return uri


def _version_tags(run: Run, cfg: Config) -> dict[str, str]:
    trained = model_runs(run)[0]  # a cross-validation run's folds share its data set
    inputs = trained.inputs.dataset_inputs if trained.inputs else []
    data = next((i.dataset for i in inputs if any(t.value == "training" for t in i.tags)), None)
    config_text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    tags = {"run_id": run.info.run_id, "preset": run.data.tags.get("preset", ""),
            "fold": run.data.tags.get("fold", ""), "git_commit": run.data.tags.get("git_commit", ""),
            "config_digest": hashlib.sha256(config_text.encode()).hexdigest()[:16]}
    if data is not None:
        tags |= {"dataset_name": data.name, "dataset_digest": data.digest}
    for key in ("best_val_lwlrap", "best_val_recording_lwlrap"):
        if key in run.data.metrics:
            tags[key] = f"{run.data.metrics[key]:.4f}"
    return tags


# --- evaluate ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Evaluation:
    version: ModelVersion
    figures: dict[str, float]  # lwlrap, ap_s<k>, event_precision, event_recall, recordings

    @property
    def lwlrap(self) -> float:
        return self.figures[EVALUATION_METRIC]


def evaluation_set_for(version: ModelVersion, data_dir: str, fold: int | None) -> EvaluationSet:
    """The evaluation set ``data_dir`` holds; with ``fold``, the validation recordings of that fold of the
    version's training run (its folds.csv), in the folder it trained on unless ``data_dir`` says otherwise."""
    run = model_runs(training_run(source_run(version)))[0]
    cfg = run_config(run)
    if fold is None:
        return evaluation_set(Path(data_dir), cfg.data.n_classes, cfg.data.sample_rate)
    assigned = _folds(run)
    if fold not in set(assigned["fold"]):
        raise RegistryError(f"--fold {fold}: the folds of run {run.info.run_id} are "
                            f"{', '.join(map(str, sorted(set(assigned['fold']))))}")
    only = set(assigned.loc[assigned["fold"] == fold, "recording_id"])
    return evaluation_set(Path(data_dir or run.data.tags.get("data_dir", "")), cfg.data.n_classes,
                          cfg.data.sample_rate, only, f"fold{fold}")


def _folds(run: Run) -> pd.DataFrame:
    """A training run's folds.csv: recording_id, fold."""
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/folds.csv")
    return pd.read_csv(io.StringIO(text), dtype={"recording_id": str})[["recording_id", "fold"]]


def check_unseen(version: ModelVersion, data: EvaluationSet) -> None:
    """A labelled folder's recordings the version's model trained on cannot evaluate it."""
    if not data.labelled:
        return
    fingerprint = folder.fingerprint(data.folder)
    for run in model_runs(training_run(source_run(version))):
        if run.data.tags.get("dataset_fingerprint") != fingerprint:
            continue
        assigned = _folds(run)
        trained = set(assigned.loc[assigned["fold"].astype(str) != run.data.tags.get("fold"), "recording_id"])
        seen = trained & set(data.ids)
        if seen:
            raise RegistryError(f"models:/{version.name}/{version.version} trained on {len(seen)} of the "
                                f"{len(data.ids)} recordings of {data.name} (run {run.info.run_id}'s folds.csv): "
                                "evaluate it on recordings it never trained on (--fold with its own fold, or "
                                "another folder)")


def evaluate(version: ModelVersion, data: EvaluationSet, say: Callable[[str], None] = print) -> Evaluation:
    """The version's figures on ``data``: read back where it was evaluated on the same set, else measured and
    logged to the active run as metrics of its model tied to the set; the model card rewritten."""
    recorded = evaluations(registry.model_id(version))
    same = recorded[recorded["digest"] == data.digest].drop(columns=["dataset", "digest"])
    whole = [EVALUATION_METRIC, "recordings"]  # logged together with the rest: an evaluation that finished
    if len(same) and set(whole) <= set(same) and same[whole].iloc[-1].notna().all():
        figures = {k: float(v) for k, v in same.iloc[-1].items() if pd.notna(v)}
        say(f"{_name(version)}: LWLRAP {figures[EVALUATION_METRIC]:.4f} on {data.name}@{data.digest[:8]} "
            "(recorded before)")
        return Evaluation(version, figures)
    figures = _measure(version, data)
    dataset = MetaDataset(LocalArtifactDatasetSource(str(data.folder.resolve())), name=data.name, digest=data.digest)
    mlflow.log_metrics(figures, model_id=registry.model_id(version), dataset=dataset)
    client = MlflowClient()
    client.update_model_version(version.name, version.version, description=card(version))
    events = "".join(f", event {k} {figures['event_' + k]:.4f}" for k in ("precision", "recall")
                     if f"event_{k}" in figures)
    say(f"{_name(version)}: LWLRAP {figures[EVALUATION_METRIC]:.4f} on {data.name}@{data.digest[:8]} "
        f"({len(data.ids)} recordings){events}")
    return Evaluation(version, figures)


def _measure(version: ModelVersion, data: EvaluationSet) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="rfcx-evaluate-") as tmp:
        run, scorer = load_run(source_run(version), Path(tmp), registered=registry.ensemble_folds(version))
        species = species_table(model_runs(run)[0], scorer.cfg, Path(tmp))
        log.info("%s: scoring %d recordings of %s", _name(version), len(data.ids), data.name)
        scored = predicting.predict(scorer, data.ids, data.files)
    if scored.skipped:
        raise RegistryError(f"{data.folder}: {len(scored.skipped)} recording(s) could not be read "
                            f"({scored.skipped[0]}); an evaluation scores every one")
    scores = scored.submission.drop(columns="recording_id").to_numpy()
    if not data.truth.any():
        raise RegistryError(f"{data.folder}: none of the recordings of {data.name} has a species labelled")
    figures = {EVALUATION_METRIC: lwlrap(data.truth, scores), "recordings": float(len(data.ids))}
    figures |= {f"ap_s{c}": float(ap) for c, ap in species_ap(data.truth, scores).dropna().items()}
    if data.calls is not None:
        thresholds = detect.thresholds(scorer.cfg.detect, scorer.n_classes)
        found = pd.concat([detect.detections(rid, line, thresholds, scorer.cfg.detect.min_gap_seconds, species)
                           for rid, line in scored.timelines.items()], ignore_index=True)
        overall = detect.event_scores(found, data.calls, scorer.n_classes).set_index("species_id").loc["all"]
        figures |= {f"event_{k}": float(overall[k]) for k in ("precision", "recall") if np.isfinite(overall[k])}
    return figures


# --- promote ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Decision:
    promoted: bool  # the alias moved to the candidate
    held: bool  # the candidate held the alias already
    reason: str


def promote(candidate: ModelVersion, alias: str, data: EvaluationSet, min_gain: float,
            say: Callable[[str], None] = print) -> Decision:
    """Evaluate the candidate and ``alias``' version on ``data``; move ``alias`` to the candidate when it is
    better by at least ``min_gain``.  Recorded either way: a run of ``<name>-registry``, a tag on the candidate."""
    client = MlflowClient()
    name = candidate.name
    current = registry.alias_version(name, alias, client)
    for version in (candidate, current):
        if version is not None:
            check_unseen(version, data)
    with _registry_run(name, f"promote-{name}-v{candidate.version}") as run:
        ours = evaluate(candidate, data, say)
        theirs = None if current is None or current.version == candidate.version else evaluate(current, data, say)
        if current is None:
            decision = Decision(True, False, f"no @{alias} yet: version {candidate.version} becomes @{alias} "
                                      f"(LWLRAP {ours.lwlrap:.4f} on {data.name})")
        elif theirs is None:
            decision = Decision(False, True, f"version {candidate.version} is @{alias} already")
        else:
            gain = ours.lwlrap - theirs.lwlrap
            better = gain > 0 and gain >= min_gain
            verdict = (f"at least the margin {min_gain:g}" if better else "not better" if gain <= 0
                       else f"under the margin {min_gain:g}")
            decision = Decision(better, False, f"LWLRAP {ours.lwlrap:.4f} against {theirs.lwlrap:.4f} of version "
                                        f"{current.version} on {data.name}@{data.digest[:8]}: gain {gain:+.4f}, "
                                        f"{verdict}")
        now = registry.alias_version(name, alias, client)
        if (now and now.version) != (current and current.version):
            raise RegistryError(f"@{alias} moved to version {now and now.version} while this command compared "
                                f"against version {current and current.version}: run it again")
        client.set_registered_model_alias(name, CHALLENGER, candidate.version)
        if decision.promoted:
            client.set_registered_model_alias(name, alias, candidate.version)
        word = "promoted" if decision.promoted else "held" if decision.held else "refused"
        mlflow.set_tags({"promotion_of": name, "candidate_version": candidate.version, "alias": alias,
                         "against_version": "" if current is None else current.version, "decision": word,
                         "reason": decision.reason, "dataset": f"{data.name}@{data.digest}", "by": getpass.getuser()})
        mlflow.log_metrics({"candidate_lwlrap": ours.lwlrap, "min_gain": min_gain}
                           | ({} if theirs is None else {"against_lwlrap": theirs.lwlrap,
                                                         "gain": ours.lwlrap - theirs.lwlrap}))
        client.set_model_version_tag(name, candidate.version, PROMOTION_TAG,
                                     f"{word} ({run.info.run_id[:8]}): {decision.reason}")
    say(f"{word}: {decision.reason}")
    return decision


@contextlib.contextmanager
def _registry_run(name: str, run_name: str) -> Iterator[mlflow.ActiveRun]:
    """A run of the experiment ``<name>-registry``, made where missing (two commands at once: one makes it).
    Under ``mlflow run``, whose own run is in another experiment, that run is tagged with this one."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(experiment_name(name))
    if experiment is None:
        try:
            experiment_id = client.create_experiment(experiment_name(name))
        except mlflow.exceptions.MlflowException:
            experiment_id = client.get_experiment_by_name(experiment_name(name)).experiment_id
    elif experiment.lifecycle_stage == "deleted":
        raise RegistryError(f"experiment {experiment_name(name)} is deleted: restore it (mlflow experiments restore "
                            f"--experiment-id {experiment.experiment_id}) or remove it for good (mlflow gc)")
    else:
        experiment_id = experiment.experiment_id
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    with runs.tracked_run(experiment_id=experiment_id, run_name=run_name, tags={"registered_model": name}) as run:
        if launcher:
            client.set_tag(launcher, "registry_run_id", run.info.run_id)
        yield run


def evaluate_in_run(version: ModelVersion, data: EvaluationSet, say: Callable[[str], None] = print) -> Evaluation:
    """``evaluate`` in a run of ``<name>-registry`` of its own."""
    check_unseen(version, data)
    with _registry_run(version.name, f"evaluate-{version.name}-v{version.version}"):
        return evaluate(version, data, say)


def _name(version: ModelVersion) -> str:
    return f"{version.name} version {version.version}"


# --- the model card ---------------------------------------------------------------------------------------------

def card(version: ModelVersion) -> str:
    """The version's model card in Markdown: what it detects, what it learnt from, how, how well, its limits."""
    run = training_run(source_run(version))
    trained = model_runs(run)
    cfg = run_config(run)
    with tempfile.TemporaryDirectory(prefix="rfcx-card-") as tmp:
        species = species_table(trained[0], cfg, Path(tmp))
    lines = [f"# {version.name} version {version.version}", ""]
    lines += _what_it_is(run, trained, cfg)
    lines += _species_section(species, cfg)
    lines += _data_section(version, trained)
    lines += _recipe_section(run, trained, cfg)
    lines += _evaluation_section(version)
    lines += _limits(run, trained, cfg)
    return "\n".join(lines) + "\n"


def _what_it_is(run: Run, trained: list[Run], cfg: Config) -> list[str]:
    kind = (f"the mean of the {len(trained)} fold models of cross-validation run `{run.info.run_id}`"
            if run.data.tags.get("cv") == "true"
            else f"the best epoch of run `{run.info.run_id}` (fold {run.data.tags.get('fold', '?')})")
    return [f"Scores {cfg.data.n_classes} species in field recordings: {cfg.data.crop_seconds:g} s windows every "
            f"{cfg.data.crop_seconds / 2:g} s, a species' score its maximum over the windows. The model is {kind}, "
            f"preset `{cfg.name}`, code `{run.data.tags.get('git_commit', 'unknown')}`.", ""]


def _species_section(species: pd.DataFrame, cfg: Config) -> list[str]:
    try:
        thresholds = detect.thresholds(cfg.detect, cfg.data.n_classes)
        source = (f"per species from `{cfg.detect.thresholds_file}`, else {cfg.detect.threshold:g}"
                  if cfg.detect.thresholds_file else f"{cfg.detect.threshold:g} for every species")
    except Exception as exc:  # a thresholds file of the training machine may not be here
        thresholds = np.full(cfg.data.n_classes, np.nan)
        source = f"from `{cfg.detect.thresholds_file}`, not readable here ({exc})"
    lines = ["## Species and thresholds", "",
             f"A detection is where a species' score over time reaches its threshold ({source}); detections "
             f"closer than {cfg.detect.min_gap_seconds:g} s are one.", "",
             "| species | name | band (Hz) | threshold |", "|---|---|---|---|"]
    for row in species.itertuples():
        value = thresholds[row.species_id] if row.species_id < len(thresholds) else np.nan
        lines.append(f"| {row.species_id} | {row.name} | {row.f_low:.0f}-{row.f_high:.0f} | "
                     f"{'' if np.isnan(value) else f'{value:g}'} |")
    return lines + [""]


def _data_section(version: ModelVersion, trained: list[Run]) -> list[str]:
    demo = " (the synthetic demo data)" if trained[0].data.tags.get("demo_data") == "True" else ""
    lines = ["## Training data", "",
             f"Data set `{version.tags.get('dataset_name', '?')}`, digest `{version.tags.get('dataset_digest', '?')}`"
             f"{demo}, in `{trained[0].data.tags.get('data_dir', '?')}`:", ""]
    for run in trained:
        assigned, fold = _folds(run), run.data.tags.get("fold", "")
        train = assigned[assigned["fold"].astype(str) != fold]
        held_out = assigned[assigned["fold"].astype(str) == fold]
        lines.append(f"- fold {fold}: trained on {train['recording_id'].nunique()} recordings ({len(train)} labelled "
                     f"calls), validated on {held_out['recording_id'].nunique()}")
    return lines + [""]


def _recipe_section(run: Run, trained: list[Run], cfg: Config) -> list[str]:
    epochs = ", ".join(r.data.tags.get("best_epoch", "?") for r in trained)
    return ["## Recipe", "",
            f"- ResNet50, {cfg.model.activation} output, loss {cfg.model.loss}, head {cfg.model.head}, "
            f"initial weights {cfg.model.weights}",
            f"- mel spectrograms {cfg.features.n_mels} x {cfg.features.frames}, {cfg.features.fmin:g}-"
            f"{cfg.features.fmax:g} Hz, {cfg.data.sample_rate} Hz audio",
            f"- {cfg.train.epochs} epoch{'s' if cfg.train.epochs != 1 else ''} of batch {cfg.train.batch_size}"
            + (f" (in {cfg.train.accumulate_steps} micro-batches)" if cfg.train.accumulate_steps > 1 else "")
            + f", learning rate {cfg.train.learning_rate:g}; "
            f"best epoch {epochs} by `{cfg.train.monitor}`"
            + "".join(f"; {k} {run.data.metrics[k]:.4f}" for k in ("best_val_lwlrap", "best_val_recording_lwlrap")
                      if k in run.data.metrics),
            f"- trained on {trained[0].data.tags.get('device', 'an unknown device')}", ""]


def _evaluation_section(version: ModelVersion) -> list[str]:
    figures = evaluations(registry.model_id(version))
    lines = ["## Evaluation", ""]
    if figures.empty or EVALUATION_METRIC not in figures:
        return lines + [f"Not evaluated yet: `python -m rfcx_mlops.registry evaluate --model "
                        f"models:/{version.name}/{version.version} --data-dir DIR`.", ""]
    lines += ["Recording-level LWLRAP over the recordings of each set; events: a detection is right where it "
              "overlaps a labelled call of its species (on a weakly labelled folder, precision is a lower bound).",
              "", "| data set | digest | recordings | LWLRAP | event precision | event recall |", "|---|---|---|---|---|---|"]
    for row in figures.to_dict("records"):
        cell = {k: "" if pd.isna(row.get(k)) else f"{row[k]:.4f}" for k in
                (EVALUATION_METRIC, "event_precision", "event_recall")}
        lines.append(f"| {row['dataset']} | `{row['digest']}` | {row.get('recordings', 0):.0f} | "
                     f"{cell[EVALUATION_METRIC]} | {cell['event_precision']} | {cell['event_recall']} |")
    return lines + [""]


def _limits(run: Run, trained: list[Run], cfg: Config) -> list[str]:
    limits = []
    if trained[0].data.tags.get("demo_data") == "True":
        limits.append("Trained on the synthetic demo data: a test of the pipeline, not a model of real recordings.")
    if trained[0].data.tags.get("device", "").startswith("CPU"):
        limits.append(f"Trained at a CPU budget ({cfg.train.epochs} epoch{'s' if cfg.train.epochs != 1 else ''} of "
                      f"preset `{cfg.name}`), far short of "
                      "the competition's GPU training.")
    limits.append("Validation truth is weak: a training recording's rows name some of its calls, so "
                  "`val_lwlrap` scores windows centred on labelled calls and reads higher than a whole-recording "
                  "score; compare versions by their evaluations above.")
    if cfg.model.activation == "softmax":
        limits.append("A softmax output shares one unit of score among the species of a window: scores of "
                      "species calling together are lower than each alone, and thresholds are relative.")
    return ["## Known limits", ""] + [f"- {line}" for line in limits] + [""]
