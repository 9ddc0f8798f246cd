"""How hard is the demo data set? LWLRAP of chance and of a band-energy rule that ignores call shape.

    python benchmarks/demo_difficulty.py                      # builds the default demo set in a temp folder
    python benchmarks/demo_difficulty.py --data-dir data/demo/n480-seed0-v3  # data.demo.cached's set

Samples are the training pipeline's: one 10 s window centred on each train_tp row (clipped to the
recording); its labels are the species whose TP boxes overlap the window in time. Every rule
works on the log-mel power minus each mel bin's median over the clip (its steady background):

- chance: uniform random scores (mean over several seeds)
- band mean: per species, that excess averaged over its frequency box and the whole window
  (best of the species' boxes)
- band peak: the box's excess smoothed over 0.5 s, at its highest moment
- band contrast: like band peak, minus the excess just above and below the box (favours the box
  that fits the sound's extent)
- band profile + logreg: a logistic regression on the per-bin peak and mean excess (what any
  frequency-only model could learn), scored out of fold (5 folds grouped by recording)
- test: the rules on whole test recordings (60 s) against test_labels.csv

All of these know only where sound energy sits in frequency; the species differ by call pattern.
For reference (default set, seed 27, demo data of GENERATOR_VERSION 1): a small 4-block CNN
trained from scratch on 5 s log-mel crops (64 mels, random time shifts) of 4/5 of the recordings
scored LWLRAP 0.90-0.92 on the 57 held-out windows from epoch 5 on (the short calls of species 0,
13 and 14 are the hardest), against 0.31-0.47 for the rules and 0.64 for the band profile; with
960 recordings it reached 0.97-0.99.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import librosa
import numpy as np
import pandas as pd
import soundfile as sf
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # rfcx_mlops.learn.metrics loads Keras: keep its start-up chatter short

from rfcx_mlops.data import demo  # noqa: E402
from rfcx_mlops.learn.metrics import lwlrap  # noqa: E402

WINDOW_S = 10.0
N_MELS, N_FFT, HOP, FMIN, FMAX = 128, 2048, 512, 84.0, 15056.0
SMOOTH_S = 0.5


def _log_mel(y: np.ndarray, sr: int) -> np.ndarray:
    mel = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=N_FFT, hop_length=HOP, n_mels=N_MELS, fmin=FMIN, fmax=FMAX)
    return np.log(mel + 1e-10)


def _species_bins() -> list[list[np.ndarray]]:
    """Per species, per box: the mel bins whose centre frequency lies inside the box."""
    centres = librosa.mel_frequencies(n_mels=N_MELS + 2, fmin=FMIN, fmax=FMAX)[1:-1]
    out = []
    for facts in demo.SPECIES_FACTS:
        boxes = []
        for box in facts.boxes:
            idx = np.flatnonzero((centres >= box.f_min) & (centres <= box.f_max))
            boxes.append(idx if idx.size else np.array([int(np.argmin(np.abs(centres - box.f_min)))]))
        out.append(boxes)
    return out


def _smooth(x: np.ndarray, sr: int) -> np.ndarray:
    """Moving average over SMOOTH_S along the last axis."""
    frames = max(1, int(round(SMOOTH_S * sr / HOP)))
    kernel = np.ones(frames) / frames
    return np.apply_along_axis(np.convolve, -1, x, kernel, mode="same")


def excess(log_mel: np.ndarray) -> np.ndarray:
    """Log-mel power over each bin's median in the clip (its steady background)."""
    return log_mel - np.median(log_mel, axis=1, keepdims=True)


def band_scores(ex: np.ndarray, bins: list[list[np.ndarray]], sr: int) -> dict[str, np.ndarray]:
    """Rule scores of one clip (excess log-mel) for every species: band mean, band peak, band contrast."""
    smooth = _smooth(ex, sr)
    scores = {name: np.full(len(bins), -np.inf) for name in ("band mean", "band peak", "band contrast")}
    for k, boxes in enumerate(bins):
        for idx in boxes:
            flank = np.setdiff1d(np.arange(max(0, idx[0] - idx.size), min(N_MELS, idx[-1] + 1 + idx.size)), idx)
            inside = smooth[idx].mean(axis=0)
            contrast = inside - (smooth[flank].mean(axis=0) if flank.size else 0.0)
            for name, value in (("band mean", ex[idx].mean()), ("band peak", inside.max()),
                                ("band contrast", contrast.max())):
                scores[name][k] = max(scores[name][k], float(value))
    return scores


def band_profile(ex: np.ndarray, sr: int) -> np.ndarray:
    """Frequency-only features of a clip: per mel bin, the peak and the mean of the smoothed excess."""
    smooth = _smooth(ex, sr)
    return np.concatenate([smooth.max(axis=1), smooth.mean(axis=1)])


def window_samples(data_dir: Path) -> tuple[list[tuple[str, float]], np.ndarray, np.ndarray]:
    """(recording_id, window start), the label matrix and the TP row's species of one 10 s window per train_tp row."""
    tp = pd.read_csv(data_dir / "train_tp.csv")
    windows, labels = [], []
    for row in tp.itertuples(index=False):
        duration = sf.info(str(data_dir / "train" / f"{row.recording_id}.flac")).duration
        start = float(np.clip(0.5 * (row.t_min + row.t_max) - WINDOW_S / 2, 0.0, max(0.0, duration - WINDOW_S)))
        same = tp[tp.recording_id == row.recording_id]
        inside = same[(same.t_min < start + WINDOW_S) & (same.t_max > start)]
        y = np.zeros(demo.N_SPECIES)
        y[inside.species_id.to_numpy()] = 1
        windows.append((row.recording_id, start))
        labels.append(y)
    return windows, np.array(labels), tp.species_id.to_numpy()


def learned_profile(features: np.ndarray, species: np.ndarray, groups: list[str]) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic regression on the band profiles (5 folds by recording)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = GroupKFold(n_splits=min(5, len(set(groups))))
    proba = cross_val_predict(model, features, species, groups=groups, cv=cv, method="predict_proba")
    scores = np.zeros((len(species), demo.N_SPECIES))
    scores[:, np.unique(species)] = proba
    return scores


def evaluate(data_dir: Path, chance_seeds: int = 10) -> dict[str, float]:
    """LWLRAP of chance, the band rules and a learned band profile on windows and on test recordings."""
    sr = demo.SAMPLE_RATE
    bins = _species_bins()
    windows, y_win, species = window_samples(data_dir)
    rules: dict[str, list[np.ndarray]] = {}
    profiles = []
    for rid, start in windows:
        with sf.SoundFile(str(data_dir / "train" / f"{rid}.flac")) as fh:
            fh.seek(int(round(start * fh.samplerate)))
            ex = excess(_log_mel(fh.read(int(WINDOW_S * fh.samplerate), dtype="float32"), fh.samplerate))
        for name, value in band_scores(ex, bins, sr).items():
            rules.setdefault(name, []).append(value)
        profiles.append(band_profile(ex, sr))
    rng = np.random.default_rng(0)
    results: dict[str, float] = {
        "chance": float(np.mean([lwlrap(y_win, rng.random(y_win.shape)) for _ in range(chance_seeds)]))
    }
    results.update({name: lwlrap(y_win, np.array(values)) for name, values in rules.items()})
    results["band profile + logreg (5-fold CV)"] = lwlrap(
        y_win, learned_profile(np.array(profiles), species, [rid for rid, _ in windows])
    )
    labels = pd.read_csv(data_dir / "test_labels.csv")
    y_test = labels[[f"s{k}" for k in range(demo.N_SPECIES)]].to_numpy()
    test_rules: dict[str, list[np.ndarray]] = {}
    for rid in labels.recording_id:
        audio, file_sr = sf.read(str(data_dir / "test" / f"{rid}.flac"), dtype="float32")
        for name, value in band_scores(excess(_log_mel(audio, file_sr)), bins, sr).items():
            test_rules.setdefault(name, []).append(value)
    results["test: chance"] = float(np.mean([lwlrap(y_test, rng.random(y_test.shape)) for _ in range(chance_seeds)]))
    results.update({f"test: {name}": lwlrap(y_test, np.array(values)) for name, values in test_rules.items()})
    return {"windows": len(windows), "test recordings": len(y_test), **results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="an existing demo (or RFCX-format) folder; default: build one")
    parser.add_argument("--recordings", type=int, default=240, help="train recordings when building (default 240)")
    parser.add_argument("--seed", type=int, default=27, help="seed when building (default 27)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rfcx-demo-") as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            started = time.perf_counter()
            data_dir = demo.build(Path(tmp) / "demo", recordings=args.recordings, seed=args.seed)
            print(f"built the demo set ({args.recordings} train recordings, seed {args.seed}) "
                  f"in {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        results = evaluate(data_dir)
    print(f"LWLRAP on {data_dir}")
    for name, value in results.items():
        print(f"  {name:<34} {value:>7.3f}" if isinstance(value, float) else f"  {name:<34} {value:>7d}")
    print(f"(scored in {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
