"""The archive job on Apache Spark (``python -m rfcx_mlops.score --engine spark``).

The file list becomes a DataFrame of paths relative to ROOT; the executors score them through
``mlflow.pyfunc.spark_udf`` on the logged model (``infer.servable``), reading the audio themselves
from ROOT as a server does (``RFCX_SERVE_AUDIO_ROOT``), one TensorFlow thread a task.  Each Spark
job is one chunk: ``chunk`` recordings a core.  The driver turns the returned scores over time into
detections with the same code as the local engine and commits the chunk to the same folder.

On a cluster, ROOT must be the same path on every executor (a shared file system), and the
executors must reach the tracking store; Spark's own settings (spark-defaults.conf) apply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np

from rfcx_mlops.data.archive import Recording, chunks
from rfcx_mlops.errors import UserError
from rfcx_mlops.files import stderr_to_devnull
from rfcx_mlops.infer import detect
from rfcx_mlops.infer.archive import ONE_THREAD, Chunk, Outcome, Settings, tables, too_short
from rfcx_mlops.infer.servable import ARCHIVE_PARAM
from rfcx_mlops.track.registry import logged_folds

LOG_FILE = "spark.log"  # the JVM's and the executors' own output, unless --verbose
_LOG4J = "rootLogger.level = error\nrootLogger.appenderRef.stderr.ref = console\nappender.console.type = Console\n" \
         "appender.console.name = console\nappender.console.target = SYSTEM_ERR\n" \
         "appender.console.layout.type = PatternLayout\nappender.console.layout.pattern = %d %p %c: %m%n\n"


class SparkError(UserError):
    """Spark cannot run the job; the message says why."""


def check_model(model_uri: str, models: list[str]) -> None:
    """Refuse a model logged before the served model took the ``archive`` parameter (it carries its own code), and
    a cross-validation run's ensemble logged with other folds than ``models`` (the local engine's)."""
    signature = mlflow.models.get_model_info(model_uri).signature
    if signature is None or signature.params is None or ARCHIVE_PARAM not in [p.name for p in signature.params]:
        raise SparkError(f"{model_uri} was logged before the Spark engine existed (its model takes no "
                         f"{ARCHIVE_PARAM!r} parameter): score it with --engine local, or train it again")
    folds = logged_folds(model_uri.removeprefix("models:/"))
    if folds is not None and folds != models:
        raise SparkError(f"{model_uri} scores with the folds {', '.join(folds)}, the run's finished folds are now "
                         f"{', '.join(models)}: register the run again (python -m rfcx_mlops.registry register)")


def session(master: str, log: Path, verbose: bool):
    """A SparkSession on ``master``; its JVM and executors write to ``log`` unless ``verbose``."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors run this environment's Python
    os.environ.update(ONE_THREAD)  # a local master's executors inherit the driver's environment
    from pyspark.sql import SparkSession

    warnings.filterwarnings("ignore", message=".*does not yet fully support pandas", category=FutureWarning)
    warnings.filterwarnings("ignore", message="toPandas attempted Arrow optimization", category=UserWarning)
    if not verbose:  # spark_udf's advice on conda: the executors run this very environment
        logging.getLogger("mlflow.pyfunc").setLevel(logging.ERROR)
    builder = (SparkSession.builder.master(master).appName("rfcx-score")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.python.worker.reuse", "true"))
    for name, value in ONE_THREAD.items():
        builder = builder.config(f"spark.executorEnv.{name}", value)
    if master.startswith("local"):
        builder = builder.config("spark.ui.enabled", "false")
    if verbose:
        return builder.getOrCreate()
    log4j = log.with_name("log4j2.properties")
    log4j.write_text(_LOG4J)
    builder = builder.config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log4j}")
    with open(log, "a") as stream, _stderr_to(stream):
        try:
            return builder.getOrCreate()
        except Exception as exc:  # the JVM's reasons are many: the last one it gave
            raise SparkError(f"Spark did not start on {master} ({_last_line(exc, log)})") from None


def stop(spark, log: Path, out: Path) -> None:
    """Stop the session; its log goes to OUT/spark.log where the job got as far as OUT."""
    spark.stop()
    if log.is_file() and out.is_dir():
        shutil.copyfile(log, out / LOG_FILE)


@contextlib.contextmanager
def _stderr_to(log) -> Iterator[None]:
    """File descriptor 2 to ``log`` while the JVM starts: it and its Python workers keep it."""
    with stderr_to_devnull():
        os.dup2(log.fileno(), 2)
        yield


def score(spark, model_uri: str, request, settings: Settings, n_classes: int, todo: list[Recording],
          first: int) -> Iterator[tuple[int, Chunk]]:
    """The recordings ``todo`` scored on Spark, a chunk at a time (``request``: ``jobs.score.Request``)."""
    from pyspark.sql.functions import struct

    cores = spark.sparkContext.defaultParallelism
    columns = [f"s{k} float" for k in range(n_classes)] + ["seconds double", "timeline string", "error string"]
    udf = mlflow.pyfunc.spark_udf(spark, model_uri, result_type=", ".join(columns), env_manager="local",
                                  params={ARCHIVE_PARAM: True}, extra_env={
                                      "RFCX_SERVE_AUDIO_ROOT": str(request.audio.resolve()),
                                      "RFCX_SERVE_MAX_SECONDS": "1e12", "RFCX_SERVE_MAX_MB": "1e12",
                                      "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), **ONE_THREAD})
    try:
        for chunk_no, recordings in chunks(todo, request.chunk * cores, first):
            frame = spark.createDataFrame([(r.recording_id,) for r in recordings], "path string")
            result = (frame.repartition(min(cores, len(recordings)))
                      .select("path", udf(struct("path")).alias("r")).select("path", "r.*").toPandas())
            yield chunk_no, tables(_outcomes(recordings, result, settings), settings, n_classes)
    except Exception as exc:
        if type(exc).__module__.startswith(("pyspark", "py4j")):
            raise SparkError(f"the Spark job failed ({_last_line(exc)}); see {request.out / LOG_FILE}") from None
        raise


def _outcomes(recordings: list[Recording], result, settings: Settings) -> list[Outcome]:
    rows = result.set_index("path")
    scores = [c for c in result.columns if c.startswith("s") and c[1:].isdigit()]
    outcomes = []
    for rec in recordings:
        row = rows.loc[rec.recording_id]
        reason = row["error"] or too_short(float(row["seconds"]), settings)
        if reason:
            outcomes.append(Outcome(rec, reason=reason))
        else:
            outcomes.append(Outcome(rec, float(row["seconds"]), row[scores].to_numpy(np.float32),
                                    detect.from_json(row["timeline"])))
    return outcomes


def _last_line(exc: Exception, log: Path | None = None) -> str:
    """The last error line of ``exc``'s message, or of ``log``."""
    text = str(exc) + ("\n" + log.read_text(errors="replace") if log is not None and log.is_file() else "")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "Exception" in line]
    return (errors or lines or [type(exc).__name__])[-1][:300]
