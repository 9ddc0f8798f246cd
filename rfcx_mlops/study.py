"""The Optuna study's storage and a worker's start-up: ``sqlite:///FILE`` (one worker) or ``postgresql://...`` (many).

Workers started together on a new PostgreSQL database all create Optuna's tables at
once, and concurrent CREATE TABLE statements collide inside PostgreSQL's own catalogue
(a unique violation on ``pg_type``) however the caller retries.  So a worker's whole
start-up (tables, version stamp, study, the preset's trial) runs under one PostgreSQL
advisory lock: the others wait a moment and find everything made.  The lock belongs to
the connection, so a worker killed while holding it releases it.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

import optuna
import sqlalchemy
from sqlalchemy.pool import NullPool

from rfcx_mlops.config import ConfigError

SCHEMES = ("sqlite", "postgresql")
_STARTUP_LOCK_KEY = 0x7266_6378_7475_6E65  # any fixed key: every worker must take the same one
_CONNECT_TIMEOUT_S = 10


def redact(url: str) -> str:
    """The storage URL without its password (it lands in tags and logs)."""
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url.split("://")[0] + "://..."


def scheme(url: str) -> str:
    """``postgresql`` for ``postgresql+psycopg://...``; a ``ConfigError`` for anything but SQLite or PostgreSQL."""
    found = url.split("://", 1)[0].split("+", 1)[0] if "://" in url else ""
    if found not in SCHEMES:
        raise ConfigError(f"--storage {redact(url)}: unknown scheme {found or url!r}; use "
                          "sqlite:///FILE (one worker) or postgresql://USER:PASSWORD@HOST/DB (many)")
    return found


def _connect_args(url: str) -> dict:
    return {"connect_args": {"connect_timeout": _CONNECT_TIMEOUT_S}} if scheme(url) == "postgresql" else {}


@contextmanager
def _database_errors(url: str) -> Iterator[None]:
    """A database that cannot be opened is the user's to fix: one line, password hidden."""
    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"--storage {redact(url)}: cannot open the database ({reason})") from None


@contextmanager
def startup_lock(url: str) -> Iterator[None]:
    """PostgreSQL: hold the start-up advisory lock for the body.  SQLite serves one worker: nothing to hold."""
    if scheme(url) != "postgresql":
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT", **_connect_args(url))
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _STARTUP_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _STARTUP_LOCK_KEY})
    finally:
        engine.dispose()


def open_storage(url: str, heartbeat: int,
                 stale_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None
                 ) -> optuna.storages.RDBStorage:
    """The storage, its tables created where missing.  Call it inside ``startup_lock`` where workers may race."""
    def connect() -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, engine_kwargs=_connect_args(url), heartbeat_interval=heartbeat,
                                              grace_period=3 * heartbeat, heartbeat_stale_trial_callback=stale_trial)

    with _database_errors(url):
        try:
            return connect()
        except sqlalchemy.exc.IntegrityError:
            if scheme(url) == "postgresql":
                raise
            # Two processes on one SQLite file (one worker is the supported use): the loser finds the tables made.
            return connect()


def open_study(url: str, name: str, *, heartbeat: int, first_trial: dict[str, float],
               sampler_for: Callable[[int], optuna.samplers.BaseSampler], pruner: optuna.pruners.BasePruner,
               stale_trial: Callable[[optuna.Study, optuna.trial.FrozenTrial], None] | None = None) -> optuna.Study:
    """Create or load the maximizing study ``name``, with ``first_trial`` queued once (the preset's own values).

    ``sampler_for(n)`` makes the sampler from the number of trials the study already holds.
    A study of that name that minimizes is a ``ConfigError``; nothing is written then.
    """
    with _database_errors(url), startup_lock(url):
        storage = open_storage(url, heartbeat, stale_trial)
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
        if name in existing and existing[name].direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ConfigError(f"study {name!r} in {redact(url)} exists with direction "
                              f"{existing[name].direction.name.lower()}; val_lwlrap is maximized: pick another "
                              "--study-name")
        n_existing = existing[name].n_trials if name in existing else 0
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=sampler_for(n_existing), pruner=pruner, load_if_exists=True)
        study.enqueue_trial(first_trial, user_attrs={"preset": True}, skip_if_exists=True)
    return study
