"""How fast is an archive scored?  Audio hours scored an hour by ``python -m rfcx_mlops.score`` with one worker and
with a worker a core, against ``predict``'s one-process path on the same recordings.

    python benchmarks/score.py                       # the quick and the seed preset, the demo data's recordings
    python benchmarks/score.py --presets quick --recordings 48

Each preset's model is its ResNet50 as built, untrained (a model's speed does not depend on its
weights), logged to a throw-away MLflow store as a training run logs it.  A score job is timed as a
user waits for it ("in all") and once started: the start-up (TensorFlow and the model loaded in
each worker) is the time the job takes for one recording alone.  predict's path is
``jobs.predict.predict``: one process, TensorFlow on every core, one recording at a time, the model
already loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter short
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402

from rfcx_mlops import config  # noqa: E402
from rfcx_mlops.data import archive  # noqa: E402
from rfcx_mlops.infer.scorer import load_run  # noqa: E402
from rfcx_mlops.infer.servable import log_servable  # noqa: E402
from rfcx_mlops.jobs import predict, score  # noqa: E402
from rfcx_mlops.learn.model import build  # noqa: E402
from rfcx_mlops.track import runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "n480-seed0-v3" / "train"


def logged_model(preset: str, folder: Path) -> str:
    """A run holding the preset's untrained model, as a training run logs it: its id."""
    cfg = config.load(ROOT / "experiments" / f"{preset}.yaml")
    folder.mkdir(parents=True)
    with mlflow.start_run(run_name=f"bench-{preset}") as run:
        runs.log_config(cfg)
        log_servable(build(cfg, 1), cfg, folder)
    return run.info.run_id


def hours(recordings: list[archive.Recording]) -> float:
    import soundfile as sf

    return sum(sf.info(str(r.path)).duration for r in recordings) / 3600


def steady(recordings: list[archive.Recording], score_them) -> tuple[float, float, float]:
    """``score_them(recordings)``'s audio hours an hour, in all and once started, and its start-up seconds: the
    time ``score_them`` takes for the first recording alone."""
    times = []
    for part in (recordings[:1], recordings):
        start = time.perf_counter()
        score_them(part)
        times.append(time.perf_counter() - start)
    audio = hours(recordings)
    return audio / (times[1] / 3600), (audio - hours(recordings[:1])) / ((times[1] - times[0]) / 3600), times[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--audio", default=str(DEMO), help="the recordings (default: the demo data's training set)")
    p.add_argument("--presets", nargs="+", default=["quick", "seed"])
    p.add_argument("--recordings", type=int, default=0,
                   help="recordings scored for each preset (default 384 for quick, 64 for the others)")
    p.add_argument("--batch", type=int, default=32, help="windows a call of the model in score (default 32)")
    args = p.parse_args(argv)
    found = archive.find_audio(Path(args.audio))
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="rfcx-bench-score-") as tmp:
        tmp = Path(tmp)
        mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
        mlflow.set_experiment("bench")
        print(f"{runs.device()}; audio h/h: hours of audio scored an hour once started (start-up apart)")
        for preset in args.presets:
            n = args.recordings or (384 if preset == "quick" else 64)
            recordings = found[:n]
            run_id = logged_model(preset, tmp / preset)
            _, scorer = load_run(run_id, tmp / f"{preset}-predict")
            print(f"\n{preset} preset, {n} recordings ({hours(recordings):.2f} h of audio)     audio h/h: in all  "
                  "once started")
            _, base, _ = steady(recordings, lambda part: predict.predict(
                scorer, [r.recording_id for r in part], {r.recording_id: r.path for r in part}))
            print(f"  predict (one process, the model loaded)          {base:8.0f}")
            one = None
            for workers in sorted({1, cores}):
                outs = iter(range(2))
                whole, rate, start_up = steady(recordings, lambda part: score.run(score.Request(
                    run_id, run_id, part, Path(args.audio), tmp / f"{preset}-{workers}-{next(outs)}", workers=workers,
                    batch=args.batch), say=lambda _: None))
                one = one or rate
                print(f"  score, {workers} worker{'s' * (workers > 1)} (start-up {start_up:4.1f} s)     {whole:8.0f} {rate:8.0f}"
                      f"   {rate / base:.2f}x predict, {rate / one:.2f}x one worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
