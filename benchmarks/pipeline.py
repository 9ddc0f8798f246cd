"""Input pipeline throughput: the seed notebook's per-sample generator against ours, same files, same shape.

    python benchmarks/pipeline.py                       # the seed preset on its demo data (built once)
    python benchmarks/pipeline.py --samples 64 --repeats 5 --config experiments/seed.yaml

Both pipelines make augmented 128 x 1876 training images from the same windows (one per train_tp
row, the first --samples of them) with the same five augmentations drawn from the same
distributions:

- reference: the seed's generator, call for call (``librosa.load`` of the whole 60 s file, its
  transforms with ``librosa.effects.pitch_shift``, ``melspectrogram`` in float64, skimage's
  ``resize``), with an explicit Generator in place of numpy's global one.
- ours: ``SpectrogramBatches`` on the preset (pitch and volume in the spectrogram domain unless
  the preset says ``augment.domain: waveform``), measured in steady state: after one pass has
  decoded every window into the cache (that pass's cost is printed as "decode, cold").

Each is timed on one worker (BLAS and FFT held to one thread) and on every core (reference: a
process per core; ours: Keras' PyDataset workers, threads sharing one cache). Per-stage
milliseconds are timed stage by stage on the same samples; samples/s come from whole passes.
The last line is the per-core speedup, the median of each pipeline's own repeats.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep Keras' start-up chatter short

import colorednoise  # noqa: E402
import librosa  # noqa: E402
import numpy as np  # noqa: E402
from skimage.transform import resize  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from rfcx_mlops import config  # noqa: E402
from rfcx_mlops.learn import augment  # noqa: E402
from rfcx_mlops.learn.batches import SpectrogramBatches, make_samples, reuse_freed_memory  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The notebook ran librosa 0.8, whose pitch_shift resampled with resampy's kaiser_best; librosa 0.10
# made soxr_hq the default, which alone makes the seed's generator twice as fast.  Both are measured.
SEED_RESAMPLER = "kaiser_best"
TODAY_RESAMPLER = "soxr_hq"


# -- the seed's generator, faithfully (DESIGN: ../shared/seed, "DataGenerator.__data_generation") -------------


def _seed_noise(y: np.ndarray, rng: np.random.Generator, min_snr: float, max_snr: float) -> np.ndarray:
    snr = rng.uniform(min_snr, max_snr)
    a_noise = np.sqrt(y**2).max() / (10 ** (snr / 20))
    if rng.integers(2) == 0:  # OneOf: GaussianNoiseSNR / PinkNoiseSNR
        noise = rng.standard_normal(len(y))
    else:
        noise = colorednoise.powerlaw_psd_gaussian(1, len(y), random_state=rng)
    return (y + noise / np.sqrt(noise**2).max() * a_noise).astype(y.dtype)


def _seed_volume(y: np.ndarray, rng: np.random.Generator, db_limit: float) -> np.ndarray:
    db = rng.uniform(-db_limit, db_limit)
    sine = np.sin(np.arange(len(y)) / len(y) * np.pi * 2)
    return y * 10 ** (db * sine / 20)  # float64 from here on, as in the seed


def reference_sample(path: str, t_min: float, t_max: float, cfg: config.Config, rng: np.random.Generator,
                     times: dict[str, list[float]], res_type: str = SEED_RESAMPLER) -> np.ndarray:
    a, f = cfg.augment, cfg.features
    t0 = time.perf_counter()
    wav, sr = librosa.load(path, sr=None)
    length = int(cfg.data.crop_seconds * sr)
    beginning = max(0.0, np.round((t_min * sr + t_max * sr) / 2) - length / 2)
    ending = beginning + length
    if ending > len(wav):
        ending = len(wav)
        beginning = ending - length
    y = wav[int(beginning):int(ending)]
    t1 = time.perf_counter()
    y = _seed_noise(y, rng, a.min_snr, a.max_snr)
    t2 = time.perf_counter()
    y = librosa.effects.pitch_shift(y, sr=sr, n_steps=int(rng.integers(-a.max_semitones, a.max_semitones + 1)),
                                    res_type=res_type)
    t3 = time.perf_counter()
    limit = int(sr * a.max_shift_seconds)
    y = np.roll(y, rng.integers(-limit, limit))
    t4 = time.perf_counter()
    y = _seed_volume(y, rng, a.max_volume_db)
    t5 = time.perf_counter()
    mel = librosa.feature.melspectrogram(y=y, n_fft=f.n_fft, hop_length=f.hop_length, sr=sr, fmin=f.fmin,
                                         fmax=f.fmax, n_mels=f.n_mels, power=2)
    mel = librosa.amplitude_to_db(np.abs(mel))
    t6 = time.perf_counter()
    mel = mel - np.min(mel)
    mel = mel / np.max(mel)
    image = resize(mel, (f.n_mels, f.frames, 1))
    t7 = time.perf_counter()
    for name, (start, end) in {"decode (whole file)": (t0, t1), "noise": (t1, t2), "pitch shift": (t2, t3),
                               "time shift": (t3, t4), "volume": (t4, t5), "mel + dB": (t5, t6),
                               "scale + resize": (t6, t7)}.items():
        times[name].append(end - start)
    return image


def _reference_pass(rows, cfg: config.Config, seed, times: dict[str, list[float]] | None = None,
                    res_type: str = SEED_RESAMPLER) -> int:
    rng = np.random.default_rng(seed)
    times = defaultdict(list) if times is None else times
    with threadpool_limits(1):
        for path, t_min, t_max in rows:
            reference_sample(path, t_min, t_max, cfg, rng, times, res_type)
    return len(rows)


def _reference_worker(args) -> int:
    return _reference_pass(*args)


# -- ours, stage by stage (the same calls SpectrogramBatches.sample makes) -------------------------------------


def our_stage_times(batches: SpectrogramBatches, n: int, epoch: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = defaultdict(list)
    names = {"one_of": "noise", "pitch_shift": "pitch shift", "time_shift": "time shift", "volume": "volume"}
    for i in range(n):
        t0 = time.perf_counter()
        y = batches.window(i)
        times["window (cached 16-bit)"].append(time.perf_counter() - t0)
        spectral = augment.SpectralDraw()
        for stage, stage_rng in batches.transform.seeded(batches.rng(i, epoch)):
            t0 = time.perf_counter()
            y, _, stage_spectral = stage.draw(y, stage_rng)
            times[names[stage.name]].append(time.perf_counter() - t0)
            spectral += stage_spectral
        features = batches.features
        t0 = time.perf_counter()
        db = features.log_mel(y, spectral)
        t1 = time.perf_counter()
        features.from_log_mel(db)
        t2 = time.perf_counter()
        times["STFT, mel + dB" + (" (+ pitch, volume)" if batches.spectral else "")].append(t1 - t0)
        times["scale + resize"].append(t2 - t1)
    return times


def _our_pass(batches: SpectrogramBatches, workers: int, epoch: int) -> float:
    """Seconds for one epoch of batches through Keras' PyDataset machinery with ``workers`` threads."""
    from keras.src.trainers.data_adapters.py_dataset_adapter import PyDatasetAdapter

    batches.set_epoch(epoch)
    batches.workers = workers
    adapter = PyDatasetAdapter(batches, shuffle=False)
    start = time.perf_counter()
    for _ in adapter.get_numpy_iterator():
        pass
    return time.perf_counter() - start


def _table(title: str, times: dict[str, list[float]]) -> None:
    print(f"\n{title}: ms per sample (median)")
    total = 0.0
    for name, values in times.items():
        ms = 1e3 * statistics.median(values)
        total += ms
        print(f"  {name:<32} {ms:8.1f}")
    print(f"  {'sum':<32} {total:8.1f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "experiments" / "seed.yaml"))
    p.add_argument("--data-dir", default="", help="an RFCX-layout folder (default: the preset's demo data)")
    p.add_argument("--samples", type=int, default=64, help="windows per pass (default 64)")
    p.add_argument("--repeats", type=int, default=3, help="passes per measurement (default 3)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="all cores (default: os.cpu_count())")
    args = p.parse_args(argv)
    try:
        import resampy  # noqa: F401
    except ImportError:
        print("error: the notebook's resampler needs resampy: pip install -e '.[bench]'", file=sys.stderr)
        return 2

    from rfcx_mlops.jobs.fit import prepare  # MLflow and the rest of training: not in the reference's processes

    overrides = {"data.data_dir": args.data_dir} if args.data_dir else {}
    cfg = config.load(args.config, overrides)
    data = prepare(cfg)
    tp = data.tp.iloc[: args.samples]
    rows = [(str(data.recordings[r.recording_id].path), r.t_min, r.t_max) for r in tp.itertuples()]
    batch = cfg.train.batch_size
    steps = max(16 * args.workers, -(-4 * len(rows) // batch))  # whole batches, many per worker, as in an epoch
    cfg = config.load(args.config, {**overrides, "train.steps_per_epoch": steps})
    print(f"{cfg.name} preset, {len(rows)} windows of {cfg.data.crop_seconds:g} s from {data.data_dir}; "
          f"{cfg.features.n_mels} x {cfg.features.frames} images; augment.domain={cfg.augment.domain}; "
          f"{os.cpu_count()} cores")

    # Reference: one worker (the seed's resampler, then today's) and a process per core, in turns, so that a
    # machine whose speed drifts slows every measurement alike.
    _reference_pass(rows[:1], cfg, 0)  # resampy compiles its kernel on first use
    rates: dict[str, list[float]] = defaultdict(list)
    ref_times: dict[str, list[float]] = defaultdict(list)
    chunks = [rows[k :: args.workers] for k in range(args.workers)]
    ref_all = []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pool.map(_reference_worker, [(c[:1], cfg, 0) for c in chunks])  # each process compiles resampy's kernel
        for r in range(args.repeats):
            for res_type in (SEED_RESAMPLER, TODAY_RESAMPLER):
                start = time.perf_counter()
                _reference_pass(rows, cfg, [cfg.seed, r], ref_times if res_type == SEED_RESAMPLER else None,
                                res_type)
                rates[res_type].append(len(rows) / (time.perf_counter() - start))
            start = time.perf_counter()
            done = sum(pool.map(_reference_worker, [(c, cfg, [cfg.seed, r, k]) for k, c in enumerate(chunks)]))
            ref_all.append(done / (time.perf_counter() - start))
            print(f"  reference pass {r + 1}/{args.repeats}: {rates[SEED_RESAMPLER][-1]:.2f}, "
                  f"{rates[TODAY_RESAMPLER][-1]:.2f} ({TODAY_RESAMPLER}), {ref_all[-1]:.2f} ({args.workers} workers) "
                  "samples/s", file=sys.stderr)

    # Ours: samples = the same windows; the first pass fills the cache.
    samples = make_samples(tp, data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)
    reuse_freed_memory()  # as training does
    batches = SpectrogramBatches(samples, data.recordings, cfg, training=True, workers=1)
    n_per_pass = steps * batch
    with threadpool_limits(1):
        start = time.perf_counter()
        for i in range(len(samples)):
            batches.waveform(i)
        cold = (time.perf_counter() - start) / len(samples)
        _our_pass(batches, 1, 0)  # fills the cache
        ours_one, ours_all = [], []
        for r in range(max(args.repeats, 5)):
            ours_one.append(n_per_pass / _our_pass(batches, 1, 1 + 2 * r))
            ours_all.append(n_per_pass / _our_pass(batches, args.workers, 2 + 2 * r))
        our_times = our_stage_times(batches, len(samples), epoch=200)
    our_times = {"decode, cold (first pass only)": [cold], **our_times}

    _table(f"reference (the seed's generator, pitch shift resampled with {SEED_RESAMPLER})", ref_times)
    _table(f"ours ({cfg.name} preset)", our_times)
    one, ref_one = statistics.median(ours_one), statistics.median(rates[SEED_RESAMPLER])
    today = statistics.median(rates[TODAY_RESAMPLER])
    print(f"\nsamples/s (median of passes)        1 worker   {args.workers:>2} workers   scaling")
    print(f"  reference ({SEED_RESAMPLER:<11})       {ref_one:9.2f}   {statistics.median(ref_all):10.2f}   "
          f"{statistics.median(ref_all) / ref_one:6.2f}x")
    print(f"  reference ({TODAY_RESAMPLER:<11})       {today:9.2f}")
    print(f"  ours                              {one:9.2f}   {statistics.median(ours_all):10.2f}   "
          f"{statistics.median(ours_all) / one:6.2f}x")
    print(f"  ours / reference ({TODAY_RESAMPLER}): {one / today:.1f}x per core")
    print(f"speedup: {one / ref_one:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
