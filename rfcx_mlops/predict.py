"""Score recordings with a trained run: ``python -m rfcx_mlops.predict --run-id ID``.

Each recording is scored by ``serve.Scorer`` (sliding windows, the maximum over them)
with the run's model, or the mean of a cross-validation run's fold models.  The result
is ``recording_id,s0..s23`` in sample_submission.csv order, written and logged to the run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from rfcx_mlops import audio, cli, dataset
from rfcx_mlops.config import UserError

log = logging.getLogger("rfcx_mlops.predict")
LABELS_FILE = "test_labels.csv"  # the demo data's test truth


class PredictError(UserError):
    """A run, folder or file prediction cannot use; the message names it."""


def recordings(data_dir: Path, n_classes: int | None) -> tuple[list[str], dict[str, Path]]:
    """Recording ids in submission order and their files: DIR/test/ with DIR/sample_submission.csv, or DIR's own files.

    ``n_classes``: the species columns sample_submission.csv must have (None: not checked yet).
    """
    folder = data_dir / "test" if (data_dir / "test").is_dir() else data_dir
    if not folder.is_dir():
        raise PredictError(f"{data_dir}: no such folder")
    files = {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in audio.AUDIO_SUFFIXES}
    if not files:
        raise PredictError(f"{folder}: no .flac or .wav files")
    template = data_dir / dataset.SUBMISSION_FILE
    if not template.is_file():
        return sorted(files), files
    header = pd.read_csv(template, nrows=0).columns
    species = [c for c in header if c != "recording_id"]
    if n_classes is not None and species != [f"s{i}" for i in range(n_classes)]:
        raise PredictError(f"{template}: {len(species)} species columns, but the model scores {n_classes} "
                           f"(expected recording_id,s0..s{n_classes - 1})")
    ids = pd.read_csv(template, usecols=["recording_id"], dtype=str, keep_default_na=False)["recording_id"]
    return [dataset.check_recording_id(rid, f"{template} line {line}") for line, rid in enumerate(ids, 2)], files


def predict(scorer, ids: list[str], files: dict[str, Path]) -> tuple[pd.DataFrame, list[str]]:
    """The submission table and the recordings that could not be scored (missing or unreadable)."""
    rows, skipped = {}, []
    for rid in tqdm(ids, desc="recordings", unit="rec", file=sys.stderr):
        try:
            if rid not in files:
                raise audio.AudioError(f"{rid}: no .flac or .wav file")
            rows[rid] = scorer.scores(scorer.read(files[rid]))
        except audio.AudioError as exc:
            log.warning("skipped %s", exc)
            skipped.append(str(exc))
    table = pd.DataFrame.from_dict(rows, orient="index", columns=[f"s{i}" for i in range(scorer.n_classes)])
    return table.rename_axis("recording_id").reset_index(), skipped


def test_lwlrap(submission: pd.DataFrame, labels_file: Path) -> float | None:
    """LWLRAP against known test labels (the demo data's test_labels.csv), over the scored recordings."""
    from rfcx_mlops.metrics import lwlrap  # scikit-learn: only where there is something to score

    if not labels_file.is_file():
        return None
    truth = pd.read_csv(labels_file).set_index("recording_id").loc[submission["recording_id"]]
    return lwlrap(truth.to_numpy(np.float32), submission.drop(columns="recording_id").to_numpy())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = cli.Parser(prog="python -m rfcx_mlops.predict",
                   description="Score recordings with a trained run; write a submission CSV.")
    p.add_argument("--run-id", required=True, help="a training run, or a cross-validation run (its folds averaged)")
    p.add_argument("--data-dir", default="",
                   help="folder with test/ and sample_submission.csv, or a folder of audio files "
                        "(default: the folder the run trained on)")
    p.add_argument("--out", default="submission.csv", help="output CSV (default submission.csv)")
    p.add_argument("--hop", type=lambda s: cli.positive_seconds(s) if s else None, default=None,
                   help="seconds between windows (default: half a window)")
    p.add_argument("--min-lwlrap", type=float, default=None, metavar="X",
                   help=f"exit 1 when the test LWLRAP (the demo data's {LABELS_FILE}) is below X: a gate")
    cli.add_verbose(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    if args.data_dir:
        recordings(Path(args.data_dir), n_classes=None)  # a bad folder is refused before the models load
    serve = cli.import_quietly("rfcx_mlops.serve", args.verbose)
    from mlflow.tracking import MlflowClient  # loaded with the models above

    with tempfile.TemporaryDirectory(prefix="rfcx-predict-") as tmp:
        mlrun, scorer = serve.load_run(args.run_id, Path(tmp), args.hop)
        data_dir = Path(args.data_dir or mlrun.data.tags.get("data_dir", ""))
        if not str(data_dir) or str(data_dir) == ".":
            raise PredictError(f"run {args.run_id} records no data_dir; pass --data-dir")
        ids, files = recordings(data_dir, scorer.n_classes)
        if args.min_lwlrap is not None and not (data_dir / LABELS_FILE).is_file():
            raise PredictError(f"--min-lwlrap: {data_dir} has no {LABELS_FILE} to score against")
        log.info("scoring %d recordings in %s: %.1f s windows every %.2f s", len(ids), data_dir, scorer.crop,
                 scorer.hop)
        submission, skipped = predict(scorer, ids, files)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(f".{out.name}.partial")
    submission.to_csv(tmp_out, index=False, float_format="%.6g")
    tmp_out.replace(out)
    client = MlflowClient()
    client.log_artifact(args.run_id, str(out))
    print(f"wrote {out}: {len(submission)} recordings, {scorer.n_classes} species (logged to run {args.run_id})")
    score = test_lwlrap(submission, data_dir / LABELS_FILE)
    if score is not None:
        client.log_metric(args.run_id, "test_lwlrap", score)
        print(f"test LWLRAP {score:.4f} ({LABELS_FILE}, {len(submission)} recordings)")
    if skipped:
        print(f"error: {len(skipped)} recording(s) could not be scored and have no row:", file=sys.stderr)
        for line in skipped:
            print(f"  {line}", file=sys.stderr)
        return 1
    if args.min_lwlrap is not None and score < args.min_lwlrap:
        print(f"error: test LWLRAP {score:.4f} is below the gate --min-lwlrap {args.min_lwlrap:g}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cli.setup(args.verbose)
    try:
        return run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
