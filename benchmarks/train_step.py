"""Does the input pipeline keep the model fed?  Training samples/s with the real pipeline against the model alone.

    python benchmarks/train_step.py                                   # seed preset, batch 32, images from the workers
    python benchmarks/train_step.py --set features.backend=tensorflow # images made in the model's first layer
    python benchmarks/train_step.py --set train.mixed_precision=true --set train.distribute=true   # on GPUs

- model only: ``train_on_batch`` of the image model on one batch of ready images, again and again: the ceiling.
- pipeline: ``fit`` of the configured model on the preset's training batches (PyDataset workers on every
  core, cache warm): images from the workers (``features.backend: numpy``), or augmented waveforms that
  the model's ``MelFrontEnd`` turns into images (``features.backend: tensorflow``: on the GPU when there is one).

Both skip their first steps (tracing, cache filling) and print samples/s; the last line is their
ratio (1.0: the pipeline costs the model nothing).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter short

import keras  # noqa: E402

from rfcx_mlops import config  # noqa: E402
from rfcx_mlops.config import parse_sets  # noqa: E402
from rfcx_mlops.jobs.fit import prepare  # noqa: E402
from rfcx_mlops.learn.batches import make_batches, make_samples, reuse_freed_memory  # noqa: E402
from rfcx_mlops.learn.model import build, for_training, precision_and_devices  # noqa: E402
from rfcx_mlops.track import runs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "experiments" / "seed.yaml"))
    p.add_argument("--data-dir", default="", help="an RFCX-layout folder (default: the preset's demo data)")
    p.add_argument("--steps", type=int, default=4, help="timed steps each (default 4; more on a GPU)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = p.parse_args(argv)

    overrides = {**({"data.data_dir": args.data_dir} if args.data_dir else {}), **parse_sets(args.set),
                 "train.steps_per_epoch": args.warmup + args.steps}
    cfg = config.load(args.config, overrides)
    data = prepare(cfg)
    samples = make_samples(data.tp, data.recordings, cfg.data.crop_seconds, cfg.data.n_classes)
    workers = cfg.train.workers or os.cpu_count() or 1
    batch = cfg.train.batch_size
    print(f"{cfg.name} preset, batch {batch}, {cfg.features.n_mels} x {cfg.features.frames} images, "
          f"features.backend {cfg.features.backend}, mixed precision {cfg.train.mixed_precision}, "
          f"distribute {cfg.train.distribute}; {runs.device()}; {workers} data workers")

    keras.utils.set_random_seed(cfg.seed)
    images_cfg = dataclasses.replace(cfg, features=dataclasses.replace(cfg.features, backend="numpy"))
    with precision_and_devices(cfg):  # each trained as fit trains it (the training wrapper where there is one)
        images_model = for_training(build(images_cfg, len(samples) // batch), images_cfg)
        model = (for_training(build(cfg, len(samples) // batch), cfg) if cfg.features.backend != "numpy"
                 else images_model)
    reuse_freed_memory()  # as training does
    batches = make_batches(samples, data.recordings, cfg, training=True, workers=workers)
    x, y = make_batches(samples, data.recordings, images_cfg, training=True)[0]

    start = time.perf_counter()
    for _ in range(args.warmup):
        images_model.train_on_batch(x, y)
    model_only = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        images_model.train_on_batch(x, y)
        model_only.append(batch / (time.perf_counter() - t0))
    print(f"  model only: {statistics.median(model_only):.1f} samples/s "
          f"(warm-up {time.perf_counter() - start:.0f} s)", file=sys.stderr)

    for i in range(len(samples)):  # a training run fills the cache in its first epoch
        batches.window(i)
    times = StepTimes()
    t0 = time.perf_counter()
    model.fit(batches, epochs=1, shuffle=False, callbacks=[times], verbose=0)
    ends = [t0, *times.ends][args.warmup:]
    pipeline = [batch / (b - a) for a, b in zip(ends, ends[1:])]

    ceiling, fed = statistics.median(model_only), statistics.median(pipeline)
    print(f"\nsamples/s (median of {args.steps} steps)")
    print(f"  model only (ready tensors)   {ceiling:8.2f}")
    print(f"  with the input pipeline      {fed:8.2f}")
    print(f"ratio: {fed / ceiling:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
