"""Scoring an archive of recordings with a trained model: ``python -m rfcx_mlops.score``.

The recordings under ROOT are scored a chunk at a time, by a pool of worker processes
(``infer.archive``) or as a Spark application (``jobs.spark``); each chunk is committed to the
output folder as it comes (``data.archive``), so that the same command again finishes what a
stopped job left.  Each run of the command is an MLflow run of the experiment ``rfcx-score``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import mlflow
from mlflow.tracking import MlflowClient
from tqdm import tqdm

from rfcx_mlops.config import Config
from rfcx_mlops.data import raven
from rfcx_mlops.data.archive import ALL_SITES, FAILED, FAILED_FILE, JOB_FILE, SUMMARY_FILE, Out, Recording, chunks, summary
from rfcx_mlops.errors import UserError
from rfcx_mlops.files import atomic_path
from rfcx_mlops.infer import archive, detect
from rfcx_mlops.infer.archive import Chunk, Settings
from rfcx_mlops.infer.scorer import (check_ensemble, model_files, model_runs, model_uri, run_config,
                                     species_table, training_run)
from rfcx_mlops.track import runs

EXPERIMENT = "rfcx-score"
RAVEN_DIR = "raven"


class ScoreError(UserError):
    """A scoring job that cannot go on; the message says why."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What to score, where to, and how (``python -m rfcx_mlops.score``'s flags)."""

    model: str  # as given: a run id or a models:/ URI
    run_id: str  # the run that logged the model
    recordings: list[Recording]  # the audio files under ``audio`` (``data.archive.find_audio``)
    audio: Path
    out: Path
    folds: list[str] | None = None  # a registered cross-validation version's fold models (``check_ensemble``)
    workers: int = 1
    chunk: int = 16  # recordings a chunk
    batch: int = 32  # windows a call of the models
    hop: float | None = None  # seconds between windows; None: half a window
    detect: dict = dataclasses.field(default_factory=dict)  # DetectConfig values that replace the run's
    min_seconds: float = 1.0
    raven: bool = False
    engine: str = "local"
    master: str = "local[*]"
    verbose: bool = False


@dataclasses.dataclass(frozen=True)
class Done:
    """What a run of the job did: recordings scored and failed now, and failed in all."""

    scored: int
    failed: int
    failed_total: int


@dataclasses.dataclass(frozen=True)
class _Plan:
    run: mlflow.entities.Run
    cfg: Config
    settings: Settings
    hop: float
    job: dict  # the job's identity: OUT/job.json
    weights: list[str]  # the local engine's: the models' Keras files
    spark: object = None  # the Spark engine's: its SparkSession
    served: str = ""  # the Spark engine's: the logged model the executors load


def plan(request: Request, folder: Path) -> _Plan:
    """Everything checked and ready: the model (downloaded into ``folder``, or a Spark session started), the
    settings, the job's identity; refused in one line before anything is written."""
    run = training_run(request.run_id)
    cfg = run_config(run)
    check_ensemble(run, request.folds)
    settings_cfg = dataclasses.replace(cfg.detect, **request.detect)
    thresholds = detect.thresholds(settings_cfg, cfg.data.n_classes)
    species = species_table(run, cfg, folder)
    settings = Settings(thresholds, settings_cfg.min_gap_seconds, request.min_seconds, request.batch,
                        species[["species_id", "name", "f_low", "f_high"]])
    hop = cfg.data.crop_seconds / 2 if request.hop is None else request.hop
    models = [model_uri(r) for r in model_runs(run)]
    job = {"model": models, "audio": str(request.audio.resolve()), "hop": hop,
           "thresholds": [round(float(t), 6) for t in thresholds], "min_gap_seconds": settings.min_gap,
           "min_seconds": request.min_seconds, "raven": request.raven}
    out = Out(request.out)
    out.check(job)
    if not out.pending(request.recordings):  # (a changed file is refused here)
        return _Plan(run, cfg, settings, hop, job, [])
    if request.engine == "local":
        return _Plan(run, cfg, settings, hop, job, [str(p) for p in model_files(run, folder).values()])
    from rfcx_mlops.jobs import spark  # pyspark: only where asked for
    from rfcx_mlops.jobs.registry import servable_uri

    served = servable_uri(run, cfg, MlflowClient())
    spark.check_model(served, [m.removeprefix("models:/") for m in models])
    return _Plan(run, cfg, settings, hop, job, [], spark.session(request.master, folder / spark.LOG_FILE,
                                                               request.verbose), served)


def run(request: Request, say: Callable[[str], None] = print) -> Done:
    """Score what the output folder does not hold yet; write, log and ``say`` the results."""
    with tempfile.TemporaryDirectory(prefix="rfcx-score-") as tmp:
        the = plan(request, Path(tmp))
        try:
            return _run(request, the, say)
        finally:
            if the.spark is not None:
                from rfcx_mlops.jobs import spark

                spark.stop(the.spark, Path(tmp) / spark.LOG_FILE, request.out)


def _run(request: Request, the: _Plan, say: Callable[[str], None]) -> Done:
    runs.use_default_experiment(EXPERIMENT)
    name = f"score-{request.audio.resolve().name}"
    with Out(request.out).opened(the.job) as out, runs.tracked_run(run_name=name) as mlrun:
        _close_killed_runs(mlrun.info, request.out)
        todo = out.pending(request.recordings)
        _log_start(request, the, len(todo))
        say(f"{len(request.recordings)} recordings under {request.audio}: {len(request.recordings) - len(todo)} "
            f"done before, {len(todo)} to score ({_how(request)})")
        engine = _spark if request.engine == "spark" else _local
        results = engine(request, the, todo, out.next_chunk()) if todo else iter(())
        scored, failed = _commit_all(results, out, the, request, len(todo))
        return _finish(out, the, request, scored, failed, say)


def _how(request: Request) -> str:
    if request.engine == "spark":
        return f"Spark, master {request.master}"
    return f"{request.workers} worker{'s' * (request.workers > 1)}"


def _commit_all(results: Iterator[tuple[int, Chunk]], out: Out, the: _Plan, request: Request,
                total: int) -> tuple[int, int]:
    """Commit each chunk as it comes, with a progress bar: recordings/s, audio hours an hour, time left."""
    scored = failed = 0
    audio_s, start = 0.0, time.perf_counter()
    names = dict(zip(the.settings.species["species_id"], the.settings.species["name"]))
    with tqdm(total=total, desc="scoring", unit="rec", file=sys.stderr, disable=total == 0) as bar:
        for chunk_no, chunk in results:
            if request.raven:
                _raven(out.folder / RAVEN_DIR, chunk, names)
            out.commit(chunk_no, chunk.scores, chunk.detections, chunk.manifest)
            scored, failed = scored + len(chunk.scores), failed + int((chunk.manifest["status"] == FAILED).sum())
            audio_s += float(chunk.scores["seconds"].sum())
            bar.set_postfix_str(f"{audio_s / (time.perf_counter() - start):.0f} audio h/h, {failed} failed")
            bar.update(len(chunk.manifest))
    seconds = max(time.perf_counter() - start, 1e-9)
    mlflow.log_metrics({"scored": scored, "failed": failed, "audio_hours": audio_s / 3600, "seconds": seconds,
                        "recordings_per_s": (scored + failed) / seconds, "audio_hours_per_hour": audio_s / seconds})
    return scored, failed


def _raven(folder: Path, chunk: Chunk, names: dict[int, str]) -> None:
    """A Raven Pro selection table for each scored recording of the chunk, in its folders, named by the whole
    file name (a recorder's 0001.wav and 0001.flac are two tables)."""
    for rid in chunk.scores["recording_id"]:
        path = folder / f"{rid}{raven.RAVEN_SUFFIX}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as partial:
            raven.write_raven(chunk.detections[chunk.detections["recording_id"] == rid], partial, names)


def _finish(out: Out, the: _Plan, request: Request, scored: int, failed: int, say: Callable[[str], None]) -> Done:
    """failed.csv and summary.csv of everything the folder holds, logged to the run."""
    manifest = out.manifest()
    here = manifest["recording_id"].isin([r.recording_id for r in request.recordings])  # not those removed since
    failures = manifest[(manifest["status"] == FAILED) & here][["recording_id", "size", "mtime_ns", "reason"]]
    scores = out.scores()
    table = summary(scores, out.detections(detect.DETECTION_COLUMNS), the.settings.species[["species_id", "name"]])
    for name, frame in ((FAILED_FILE, failures), (SUMMARY_FILE, table)):
        with atomic_path(out.folder / name) as partial:
            frame.to_csv(partial, index=False)
        mlflow.log_artifact(str(out.folder / name))
    mlflow.log_artifact(str(out.folder / JOB_FILE))
    mlflow.log_metrics({"recordings_total": len(manifest), "scored_total": len(scores),
                        "failed_total": len(failures)})
    everything = table[table["site"] == ALL_SITES]
    detected = everything[everything["recordings_with_detection"] > 0]
    say(f"scored {scored} recordings now ({len(scores)} in all, {scores['seconds'].sum() / 3600:.2f} h of audio); "
        f"{len(detected)} species detected; results in {out.folder} (scores/, detections/, {SUMMARY_FILE})")
    if len(failures):
        say(f"{len(failures)} recording(s) could not be scored ({failed} now): see {out.folder / FAILED_FILE}")
    return Done(scored, failed, len(failures))


def _log_start(request: Request, the: _Plan, todo: int) -> None:
    mlflow.log_params({"model": request.model, "model_run_id": request.run_id, "audio": str(request.audio.resolve()),
                       "out": str(request.out.resolve()), "engine": request.engine, "workers": request.workers,
                       "chunk": request.chunk, "batch": request.batch, "hop": the.hop,
                       "threshold": the.settings.thresholds.tolist() if len(set(the.settings.thresholds)) > 1
                       else float(the.settings.thresholds[0]), "min_gap_seconds": the.settings.min_gap,
                       "min_seconds": request.min_seconds, "preset": the.cfg.name,
                       **({"master": request.master} if request.engine == "spark" else {})})
    mlflow.set_tags({"out": str(request.out.resolve()), "model_uri": ", ".join(the.job["model"]),
                     "git_commit": runs.git_commit()})
    mlflow.log_metric("to_score", todo)


def _close_killed_runs(info, out: Path) -> None:
    """A job killed outright (kill -9, a lost machine) left its run RUNNING: the run resuming it ends it."""
    client = MlflowClient()
    for old in client.search_runs([info.experiment_id], f"tags.out = '{out.resolve()}' and "
                                  "attributes.status = 'RUNNING'"):
        if old.info.run_id != info.run_id:
            client.set_tag(old.info.run_id, "failure_reason", f"stopped without ending; resumed by run {info.run_id}")
            client.set_terminated(old.info.run_id, "KILLED")


def _local(request: Request, the: _Plan, todo: list[Recording], first: int) -> Iterator[tuple[int, Chunk]]:
    """The chunks scored by ``request.workers`` processes, each with its own models: in the order they finish."""
    os.environ.update(archive.ONE_THREAD)  # read by each worker's numpy and TensorFlow as they load
    context = multiprocessing.get_context("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                          else "spawn")  # not fork: the job may have loaded TensorFlow
    pool = concurrent.futures.ProcessPoolExecutor(
        request.workers, mp_context=context, initializer=archive.start_worker,
        initargs=(os.getpid(), the.weights, the.cfg, request.hop, the.settings, request.verbose))
    size = min(request.chunk, -(-len(todo) // request.workers))  # a short list shared by every worker
    waiting = iter(chunks(todo, size, first))
    running: dict[concurrent.futures.Future, int] = {}
    try:
        def submit() -> None:
            chunk_no, recordings = next(waiting, (None, None))
            if recordings:
                running[pool.submit(archive.score_chunk, recordings)] = chunk_no

        for _ in range(2 * request.workers):  # one a worker, one waiting: no worker idles between chunks
            submit()
        while running:
            finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                chunk_no = running.pop(future)
                try:
                    result = future.result()
                except concurrent.futures.process.BrokenProcessPool as exc:
                    raise ScoreError(f"a worker process ended ({exc}; out of memory? try fewer --workers); the "
                                     "chunks committed so far are kept: run the command again") from None
                yield chunk_no, result
                submit()
    finally:
        _stop(pool)


def _stop(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """Drop the chunks not started and end the workers now: a chunk in flight is scored again next time."""
    processes = list((pool._processes or {}).values())  # ProcessPoolExecutor.terminate_workers from 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()


def _spark(request: Request, the: _Plan, todo: list[Recording], first: int) -> Iterator[tuple[int, Chunk]]:
    from rfcx_mlops.jobs import spark

    yield from spark.score(the.spark, the.served, request, the.settings, the.cfg.data.n_classes, todo, first)
