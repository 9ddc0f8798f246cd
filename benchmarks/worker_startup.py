"""Tuning workers starting at the same instant on a new PostgreSQL database: how many fail?

    python benchmarks/worker_startup.py postgresql://USER@HOST:PORT/postgres [--workers 4] [--rounds 20]

Each round creates a fresh database, starts ``--workers`` processes that each import the
study code and wait, releases them together, and has each run a tuning worker's real
start-up (``rfcx_mlops.jobs.study.open_study``: Optuna's tables, the study, the preset's trial).
A worker fails when it exits non-zero; a round also fails when the study does not hold its
first trial exactly once.  Prints each round and the count of failures; exits 1 if any.
The URL's user must be allowed to create and drop databases.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import uuid

STUDY = "startup"
FIRST_TRIAL = {"x": 0.5}


def worker(url: str) -> int:
    import optuna

    from rfcx_mlops.errors import ConfigError
    from rfcx_mlops.jobs.study import open_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("ready", flush=True)
    sys.stdin.readline()  # the starting gun
    try:
        open_study(url, STUDY, heartbeat=60, first_trial=FIRST_TRIAL,
                   sampler_for=lambda n: optuna.samplers.RandomSampler(seed=n), pruner=optuna.pruners.NopPruner())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def one_round(admin_url: str, n_workers: int) -> list[str]:
    """The failures of one round (empty: every worker started and the study is whole)."""
    import optuna
    import sqlalchemy

    name = f"startup_{uuid.uuid4().hex[:10]}"
    url = admin_url.rsplit("/", 1)[0] + "/" + name
    admin = sqlalchemy.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", url], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(n_workers)]
        for p in procs:
            if p.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a worker did not start: {p.communicate()[1][-2000:]}")
        for p in procs:
            p.stdin.write("go\n")
        for p in procs:
            p.stdin.flush()
        errors = []
        for p in procs:
            _, err = p.communicate(timeout=120)
            if p.returncode != 0:
                errors.append((err.strip().splitlines() or [f"exit code {p.returncode}"])[-1])
        if not errors:
            trials = optuna.load_study(study_name=STUDY, storage=url).trials
            if [t.system_attrs.get("fixed_params") for t in trials] != [FIRST_TRIAL]:
                errors.append(f"the study holds {len(trials)} trials; expected the first trial once")
        return errors
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
        admin.dispose()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="a PostgreSQL server's URL, to a database the user can connect to")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.url)
    failed = 0
    started = time.perf_counter()
    for r in range(1, args.rounds + 1):
        errors = one_round(args.url, args.workers)
        failed += len(errors)
        print(f"round {r}: {args.workers} workers, {len(errors)} failed" + "".join(f"\n  {e}" for e in errors),
              flush=True)
    print(f"failed: {failed} in {args.rounds} rounds of {args.workers} workers "
          f"({time.perf_counter() - started:.0f} s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
