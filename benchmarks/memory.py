"""What a training step costs in memory and time: peak resident memory and samples/s per preset and batch size.

    python benchmarks/memory.py                         # every case below, each in a process of its own
    python benchmarks/memory.py --only accumulation     # one group: quick, seed, accumulation or cpu-switches

Each case trains fold 1 of the demo data for a few steps in a new process, its caches full as after
a run's first epoch (every training window decoded, every validation image made), and the parent
reads the process's peak resident memory from the kernel (``wait4``; on a GPU the child adds
TensorFlow's peak device memory).  Beside each peak: ``learn.memory.estimate`` of the same config,
which the guard of ``python -m rfcx_mlops.train`` compares with the memory available, and their
ratio.  Cases: batch sizes, the same batch in micro-batches (``train.accumulate_steps``), and the
CPU's switches (mixed precision, XLA through ``jit_compile``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from rfcx_mlops import config
from rfcx_mlops.config import parse_sets
from rfcx_mlops.learn import memory

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    group: str
    preset: str
    batch: int
    accumulate: int = 1
    mixed_precision: bool = False
    jit: bool = False

    def overrides(self) -> dict[str, str]:
        return {"train.batch_size": str(self.batch), "train.accumulate_steps": str(self.accumulate),
                "train.mixed_precision": str(self.mixed_precision).lower()}

    def label(self) -> str:
        micro = self.batch // self.accumulate
        steps = f"{self.accumulate} x {micro}" if self.accumulate > 1 else str(self.batch)
        switches = [s for s, on in (("mixed precision", self.mixed_precision), ("jit_compile", self.jit)) if on]
        return f"{self.preset:6s} {steps:>7s}  {', '.join(switches) or 'float32':16s}"


CASES = [Case("quick", "quick", 16), Case("quick", "quick", 32), Case("quick", "quick", 64),
         Case("seed", "seed", 4), Case("seed", "seed", 8), Case("seed", "seed", 16), Case("seed", "seed", 32),
         Case("accumulation", "seed", 16, accumulate=4), Case("accumulation", "seed", 32, accumulate=4),
         Case("accumulation", "seed", 32, accumulate=8),
         Case("cpu-switches", "seed", 8, jit=True), Case("cpu-switches", "seed", 8, mixed_precision=True)]


def child(cfg: config.Config, steps: int, warmup: int, jit: bool) -> dict:
    """Train ``warmup + steps`` steps of ``cfg`` with full caches; what the parent cannot see from outside."""
    import resource

    import keras
    import tensorflow as tf

    from rfcx_mlops.jobs.fit import fold_batches, prepare
    from rfcx_mlops.learn.model import build, for_training, precision_and_devices

    batches = fold_batches(cfg, 1, prepare(cfg))
    for i in range(len(batches.train.samples)):
        batches.train.window(i)
    for k in range(len(batches.val)):
        batches.val[k]
    keras.utils.set_random_seed(cfg.seed)
    with precision_and_devices(cfg):
        model = for_training(build(cfg, batches.train.steps), cfg)
    model.jit_compile = jit
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    ends: list[float] = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.perf_counter()))
    model.fit(batches.train, epochs=1, shuffle=False, callbacks=[timer], verbose=0)
    timed = ends[warmup * cfg.train.accumulate_steps - 1:]
    micro = memory.micro_batch(cfg)
    gpus = tf.config.list_physical_devices("GPU")
    return {"train_windows": len(batches.train.samples), "val_windows": len(batches.val.samples),
            "before_bytes": before, "samples_per_s": micro * (len(timed) - 1) / (timed[-1] - timed[0]),
            "gpu_peak_bytes": tf.config.experimental.get_memory_info("GPU:0")["peak"] if gpus else None}


def measure(case: Case, args: argparse.Namespace) -> tuple[dict | None, float]:
    """The case's child's figures (None where it ran past ``--timeout``) and its peak resident memory in bytes."""
    command = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--warmup", str(args.warmup),
               *(["--jit"] if case.jit else []), str(ROOT / "experiments" / f"{case.preset}.yaml"),
               *[f"--set={k}={v}" for k, v in case.overrides().items()]]
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        timed_out = threading.Event()
        timer = threading.Timer(args.timeout, lambda: (timed_out.set(), proc.kill()))
        timer.start()
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak, which Popen.wait would not give
        timer.cancel()
        peak = usage.ru_maxrss * 1024.0
        if status and not timed_out.is_set():
            log.seek(0)
            raise SystemExit(f"{case.label()}: the child failed:\n{log.read()[-3000:]}")
    return (json.loads(out.strip().splitlines()[-1]) if status == 0 else None), peak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=list(dict.fromkeys(c.group for c in CASES)), help="one group of cases")
    p.add_argument("--steps", type=int, default=2, help="timed steps a case (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first: tracing (default 1)")
    p.add_argument("--timeout", type=float, default=600,
                   help="seconds a case may take (default 600: mixed precision on a CPU takes longer)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("config", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        cfg = config.load(args.config, {**parse_sets(args.set), "train.steps_per_epoch": args.warmup + args.steps})
        print(json.dumps(child(cfg, args.steps, args.warmup, args.jit)))
        return 0

    print(f"fold 1 of the demo data, caches full; {os.cpu_count()} cores; peak resident memory (GB) against "
          "learn.memory.estimate (on a GPU: TensorFlow's peak device memory against the GPU's estimate)\n")
    print(f"{'preset':6s} {'batch':>7s}  {'':16s} {'peak':>6s} {'estimate':>9s} {'est/peak':>9s} {'samples/s':>10s}"
          f" {'before steps':>13s} {'GPU peak':>9s} {'GPU est':>8s}")
    for case in [c for c in CASES if args.only in (None, c.group)]:
        figures, peak = measure(case, args)
        if figures is None:
            print(f"{case.label()} {peak / memory.GB:6.2f}  did not finish {args.steps + args.warmup} steps in "
                  f"{args.timeout:.0f} s", flush=True)
            continue
        cfg = config.load(ROOT / "experiments" / f"{case.preset}.yaml", case.overrides())
        windows = figures["train_windows"], figures["val_windows"]
        est = memory.estimate(cfg, *windows).total
        gpu = "        -         -"
        if figures["gpu_peak_bytes"] is not None:
            gpu = (f"{figures['gpu_peak_bytes'] / memory.GB:9.2f} "
                   f"{memory.estimate(cfg, *windows, replicas=1).total / memory.GB:8.2f}")
        print(f"{case.label()} {peak / memory.GB:6.2f} {est / memory.GB:9.2f} {est / peak:9.2f} "
              f"{figures['samples_per_s']:10.2f} {figures['before_bytes'] / memory.GB:13.2f} {gpu}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
