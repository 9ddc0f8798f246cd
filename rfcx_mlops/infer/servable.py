"""The servable MLflow model (``mlflow models serve -m runs:/<run id>/model``): ``scorer.Scorer`` as a pyfunc model.

A training run's model holds its weights; a cross-validation run's (``log_ensemble``) names its
folds' models, which it loads from the tracking store where it is served, so that no weights
are stored twice.

What a server accepts is the operator's choice, made where it starts, in its environment:

    RFCX_SERVE_AUDIO_ROOT   a folder: rows may name audio files in it by ``path``
                            (relative to it, or absolute inside it).  Unset: audio samples only.
    RFCX_SERVE_MAX_SECONDS  the longest recording scored, by path or as samples (default 600)
    RFCX_SERVE_MAX_MB       the largest file read by path, in MB (default 100)

A request outside these limits gets HTTP 400 (403 for a path outside the root) with
one line saying why, and the server goes on serving.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import yaml
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, PERMISSION_DENIED

from rfcx_mlops.config import Config, from_dict, to_yaml
from rfcx_mlops.data import audio
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.infer import detect
from rfcx_mlops.infer.scorer import MODEL_DIR, WEIGHTS_FILE, Scorer, download_weights, load_models
from rfcx_mlops.track.registry import FOLDS_FILE


ARCHIVE_PARAM = "archive"  # per-row errors, lengths and timelines: see ``SpeciesScorer.predict``


def _refuse(message: str, code=INVALID_PARAMETER_VALUE) -> MlflowException:
    return MlflowException(message, error_code=code)  # the scoring server answers 400 (403 for PERMISSION_DENIED)


@dataclass(frozen=True)
class Limits:
    """What a served model reads: see the module's docstring."""

    audio_root: Path | None = None
    max_seconds: float = 600.0
    max_mb: float = 100.0

    @classmethod
    def from_environment(cls) -> Limits:
        def number(name: str, default: float) -> float:
            text = os.environ.get(name, "")
            try:
                value = float(text) if text else default
            except ValueError:
                value = -1.0
            if not value > 0:
                raise ConfigError(f"{name}={text!r}: expected a number > 0")
            return value

        root = os.environ.get("RFCX_SERVE_AUDIO_ROOT", "")
        if root and not Path(root).is_dir():
            raise ConfigError(f"RFCX_SERVE_AUDIO_ROOT={root}: no such folder")
        return cls(Path(root).resolve() if root else None, number("RFCX_SERVE_MAX_SECONDS", cls.max_seconds),
                   number("RFCX_SERVE_MAX_MB", cls.max_mb))

    def file(self, path: str) -> audio.AudioInfo:
        """The audio file a request names, once it passes every limit."""
        if self.audio_root is None:
            raise _refuse("this server reads no files: send audio samples and their sample_rate "
                          "(reading files is enabled where the server starts, with RFCX_SERVE_AUDIO_ROOT)",
                          PERMISSION_DENIED)
        resolved = (self.audio_root / path).resolve()
        if not resolved.is_relative_to(self.audio_root):
            raise _refuse(f"path {path!r} is outside the folder this server reads ({self.audio_root})",
                          PERMISSION_DENIED)
        if not resolved.is_file():
            raise _refuse(f"path {path!r}: no such file under {self.audio_root}")
        size_mb = resolved.stat().st_size / 1e6
        if size_mb > self.max_mb:
            raise _refuse(f"path {path!r}: {size_mb:.1f} MB is over this server's limit of {self.max_mb:g} MB")
        try:
            info = audio.probe(resolved)
        except audio.AudioError as exc:
            raise _refuse(f"path {path!r}: {str(exc).removeprefix(f'{resolved}: ')}") from None
        self.duration(info.duration, f"path {path!r}")
        return info

    def duration(self, seconds: float, what: str) -> None:
        if seconds > self.max_seconds:
            raise _refuse(f"{what}: {seconds:.1f} s of audio is over this server's limit of {self.max_seconds:g} s")


class SpeciesScorer(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: rows of ``audio`` (samples) with ``sample_rate``, or of ``path`` where allowed -> s0..s23."""

    def load_context(self, context):
        self.limits = Limits.from_environment()
        cfg = from_dict(yaml.safe_load(Path(context.artifacts["config"]).read_text()))
        if "folds" in context.artifacts:
            with tempfile.TemporaryDirectory(prefix="rfcx-ensemble-") as tmp:
                models = load_models(download_weights(f"models:/{model_id}", Path(tmp) / model_id)
                                     for model_id in Path(context.artifacts["folds"]).read_text().split())
        else:
            models = load_models([Path(context.artifacts["keras_model"])])
        self.scorer = Scorer(models, cfg)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Each row's species scores.  With ``params={"archive": True}`` (``jobs.score`` on Spark) each row also
        gets ``seconds`` and its scores over time as ``timeline`` (``detect.to_json``), and a row that cannot
        be scored gets its reason in ``error`` instead of failing the request."""
        archive = bool((params or {}).get(ARCHIVE_PARAM))
        columns = [f"s{i}" for i in range(self.scorer.n_classes)]
        rows = []
        for row in model_input.to_dict("records"):
            if not archive:
                rows.append(dict(zip(columns, self.scorer.scores(self._audio(row)[0]))))
                continue
            try:  # one odd file must not fail the others
                y, seconds = self._audio(row)
                scores, line = self.scorer.timeline(y)
            except Exception as exc:  # noqa: BLE001
                rows.append({"seconds": np.nan, "timeline": "", "error": self._reason(exc, row.get("path"))})
                continue
            rows.append({**dict(zip(columns, scores)), "seconds": seconds, "timeline": detect.to_json(line),
                         "error": ""})
        return pd.DataFrame(rows, columns=columns + (["seconds", "timeline", "error"] if archive else []))

    def _reason(self, exc: Exception, path) -> str:
        """Why a row was not scored, without the file's name (the row names it), as the local engine says it."""
        if isinstance(exc, MlflowException):
            text = exc.message
        elif isinstance(exc, audio.AudioError):
            text = str(exc)
        else:
            return f"{type(exc).__name__}: {exc}"
        if self.limits.audio_root is None or not isinstance(path, str):
            return text
        return text.removeprefix(f"path {path!r}: ").removeprefix(f"{(self.limits.audio_root / path).resolve()}: ")

    def _audio(self, row: dict) -> tuple[np.ndarray, float]:
        """A row's recording at the model's rate, and its length in seconds."""
        rate_out = self.scorer.sample_rate
        path, samples = row.get("path"), row.get("audio")
        if isinstance(path, str) and path:
            info = self.limits.file(path)
            return audio.read_window(info, 0.0, info.duration, rate_out), info.duration
        if samples is None or (np.isscalar(samples) and pd.isna(samples)):
            raise _refuse("each row needs audio samples and their sample_rate (or a path, where the server "
                          "reads files)")
        rate = int(row.get("sample_rate") or 0)
        if not 0 < rate <= 384_000:
            raise _refuse(f"a row with audio needs its sample_rate (1..384000 Hz); got {rate}")
        self.limits.duration(len(samples) / rate, "audio")
        y = np.asarray(samples, dtype=np.float32)
        return (audio.resample(y, rate, rate_out) if rate != rate_out else y), len(samples) / rate


def log_servable(model: keras.Model, cfg: Config, folder: Path) -> str:
    """Log ``model`` (uncompiled: ``model.weights_only``) with its config as the active run's pyfunc model; its URI.

    MLflow 3 stores it as a logged model linked to the run: ``runs:/<run id>/model``,
    or the ``models:/<model id>`` URI the run's ``model_uri`` tag holds.
    """
    weights = folder / WEIGHTS_FILE
    model.save(weights)
    uri = _log(cfg, folder, int(model.output_shape[-1]), {"keras_model": str(weights)},
               mlflow.active_run().info.run_id)
    mlflow.set_tag("model_uri", uri)
    return uri


def log_ensemble(run_id: str, model_ids: list[str], cfg: Config, folder: Path) -> str:
    """Log, to the finished run ``run_id``, the pyfunc model scoring with the mean of the logged models
    ``model_ids`` (a cross-validation run's folds); its ``models:/<model id>`` URI."""
    (folder / FOLDS_FILE).write_text("\n".join(model_ids) + "\n")
    experiment_id = mlflow.tracking.MlflowClient().get_run(run_id).info.experiment_id  # not the active one
    model = mlflow.initialize_logged_model(MODEL_DIR, source_run_id=run_id, experiment_id=experiment_id)
    return _log(cfg, folder, cfg.data.n_classes, {"folds": str(folder / FOLDS_FILE)}, run_id, model.model_id)


def _log(cfg: Config, folder: Path, n: int, artifacts: dict[str, str], run_id: str, model_id: str | None = None) -> str:
    from mlflow.models import Model, ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    (folder / "servable.yaml").write_text(to_yaml(cfg))
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.string, "path", required=False),
                       ColSpec(Array(DataType.double), "audio", required=False),
                       ColSpec(DataType.long, "sample_rate", required=False)]),
        outputs=Schema([ColSpec(DataType.float, f"s{i}") for i in range(n)]),
        params=ParamSchema([ParamSpec(ARCHIVE_PARAM, DataType.boolean, False)]),
    )
    example = pd.DataFrame({"audio": [[0.0] * 1600], "sample_rate": [16000]})
    info = Model.log(artifact_path=None, flavor=mlflow.pyfunc, run_id=run_id, name=MODEL_DIR,
                     python_model=str(Path(__file__).with_name("servable_model.py")), signature=signature,
                     input_example=example, artifacts={**artifacts, "config": str(folder / "servable.yaml")},
                     code_paths=[str(Path(__file__).parents[1])], pip_requirements=_requirements(),
                     model_id=model_id, flavor_name="pyfunc.ModelFromCode")
    return info.model_uri


# What this module and the modules it imports need, which is all a served model runs.
SERVING_PACKAGES = ("tensorflow", "keras", "numpy", "pandas", "scipy", "librosa", "soundfile", "soxr", "pyyaml",
                    "mlflow")


def _requirements() -> list[str]:
    """The pins of the packages serving needs: a model served elsewhere gets the versions it was trained with."""
    from importlib.metadata import requires

    pins = [r for r in requires("rfcx_mlops") or [] if "extra ==" not in r]
    return [r for r in pins if r.split("==")[0].lower() in SERVING_PACKAGES]
