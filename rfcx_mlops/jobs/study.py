"""The Optuna study: its search space, its storage (``sqlite:///FILE`` for one worker,
``postgresql://...`` for many) and a worker's start-up.

Workers started together on a new PostgreSQL database all create Optuna's tables at
once, and concurrent CREATE TABLE statements collide inside PostgreSQL's own catalogue
(a unique violation on ``pg_type``) however the caller retries.  So a worker's whole
start-up (tables, version stamp, study, the preset's trial) runs under one PostgreSQL
advisory lock: the others wait a moment and find everything made.  The lock belongs to
the connection, so a worker killed while holding it releases it.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import optuna
import sqlalchemy
from sqlalchemy.pool import NullPool

from rfcx_mlops.config import Config, allowed_values, flatten, read_yaml, with_overrides
from rfcx_mlops.errors import ConfigError

SCHEMES = ("sqlite", "postgresql")
_STARTUP_LOCK_KEY = 0x7266_6378_7475_6E65  # any fixed key: every worker must take the same one
_CONNECT_TIMEOUT_S = 10


Value = bool | int | float | str  # a drawn value, as the config key holds it
Conditions = tuple[tuple[str, tuple[Value, ...]], ...]  # (key drawn before, the values that let this key be drawn)


@dataclass(frozen=True)
class Searched:
    """A config key of the search space, drawn only where every one of its conditions holds."""

    key: str
    when: Conditions = field(default=(), kw_only=True)

    def drawn_after(self, drawn: Mapping[str, Value]) -> bool:
        return all(other in drawn and drawn[other] in values for other, values in self.when)


@dataclass(frozen=True)
class Range(Searched):
    low: float
    high: float
    log: bool = False
    step: float | None = None
    above: str | None = None
    integer: bool = False

    def bounds(self) -> tuple[float, float]:
        return (math.ceil(self.low), int(self.high)) if self.integer else (self.low, self.high)

    def suggest(self, trial: optuna.Trial, drawn: Mapping[str, Value]) -> float:
        low = max(self.low, drawn[self.above]) if self.above else self.low
        if self.integer:
            return trial.suggest_int(self.key, math.ceil(low), int(self.high), log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.key, low, self.high, log=self.log, step=self.step)


@dataclass(frozen=True)
class Choice(Searched):
    choices: tuple[Value, ...]

    def suggest(self, trial: optuna.Trial, drawn: Mapping[str, Value]) -> Value:
        return trial.suggest_categorical(self.key, self.choices)


@dataclass(frozen=True)
class SearchSpace:
    ranges: tuple[Range | Choice, ...]  # the searched keys in file order: numeric ranges and lists of choices
    sampler_startup_trials: int = 4
    pruner_startup_trials: int = 3
    pruner_warmup_epochs: int = 6

    def suggest(self, trial: optuna.Trial) -> dict[str, Value]:
        """The trial's draw: only the keys whose conditions hold, the others keep the preset's values."""
        return self._draw(lambda r, drawn: r.suggest(trial, drawn))

    def first_trial(self, preset: Mapping[str, Value]) -> dict[str, Value]:
        """The preset's own values of the keys it draws (flattened config values): the study's first trial."""
        def own(r: Range | Choice, _) -> Value:
            if isinstance(r, Choice) and preset[r.key] not in r.choices:  # Optuna would fail the trial
                raise ConfigError(f"{r.key}: the preset's {preset[r.key]!r} is not among the choices "
                                  f"({', '.join(map(str, r.choices))}), so the preset cannot run as the first trial")
            return preset[r.key]
        return self._draw(own)

    def _draw(self, value: Callable[[Range | Choice, dict[str, Value]], Value]) -> dict[str, Value]:
        drawn: dict[str, Value] = {}
        for r in self.ranges:
            if r.drawn_after(drawn):
                drawn[r.key] = value(r, drawn)
        return drawn

    def check(self, cfg: Config) -> None:
        """Every extreme draw makes a valid config over ``cfg``: every combination of choices the space can draw,
        and with each, every range it draws at its low and its high.  A ``ConfigError`` names the first that
        does not."""
        combinations: list[dict[str, Value]] = [{}]
        for r in self.ranges:
            if isinstance(r, Choice):
                combinations = [{**drawn, r.key: _checked(cfg, drawn, r.key, v)} for drawn in combinations
                                for v in (r.choices if r.drawn_after(drawn) else ())] + \
                               [drawn for drawn in combinations if not r.drawn_after(drawn)]
        for drawn in combinations:
            for r in self.ranges:
                if isinstance(r, Range) and r.drawn_after(drawn):
                    for value in r.bounds():
                        _checked(cfg, drawn, r.key, value)


def _checked(cfg: Config, drawn: Mapping[str, Value], key: str, value: Value) -> Value:
    """``value`` for ``key``, where it makes a valid config over ``cfg`` with the values ``drawn`` before it."""
    try:
        with_overrides(cfg, {**drawn, key: value})
    except ConfigError as exc:
        context = "".join(f" with {k}: {v}" for k, v in drawn.items())
        raise ConfigError(f"{key}: {value!r}{context} makes an invalid config ({exc})") from None
    return value


def shown(value) -> str:
    """A drawn value as a line shows it: numbers to 6 significant digits, choices as they are."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def load_space(path: str | Path) -> SearchSpace:
    """The search space file; every inconsistency is a ``ConfigError`` naming the file and key."""
    path = Path(path)
    doc = read_yaml(path, "search space file")
    if not isinstance(doc, dict) or set(doc) - {"space", "sampler", "pruner"}:
        raise ConfigError(f"{path}: expected the sections space, sampler and pruner")
    space = doc.get("space")
    if not isinstance(space, dict) or not space:
        raise ConfigError(f"{path}: space: no ranges to search")
    ranges: list[Range | Choice] = []
    try:
        for key, spec in space.items():
            ranges.append(_choice(key, spec, ranges) if isinstance(spec, dict) and "choices" in spec
                          else _range(key, spec, ranges))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None

    def count(section: str, name: str, default: int) -> int:
        value = (doc.get(section) or {}).get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{path}: {section}.{name} must be an integer >= 0; got {value!r}")
        return value

    return SearchSpace(tuple(ranges), count("sampler", "startup_trials", 4), count("pruner", "startup_trials", 3),
                       count("pruner", "warmup_epochs", 6))


def _range(key: str, spec, before: list[Range | Choice]) -> Range:
    """The range of config key ``key`` that ``spec`` gives, checked against the keys ``before`` it."""
    default = flatten(Config()).get(key)
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        raise ConfigError(f"{key}: not a numeric config key")
    if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or \
            set(spec) - {"low", "high", "log", "step", "above", "when"}:
        raise ConfigError(f"{key}: expected {{low, high}} and optionally log, step, above, when; got {spec!r}")
    when = _when(key, spec.get("when"), before)
    try:
        r = Range(key, float(spec["low"]), float(spec["high"]), bool(spec.get("log", False)),
                  None if spec.get("step") is None else float(spec["step"]), spec.get("above"),
                  isinstance(default, int), when=when)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: low, high and step must be numbers; got {spec!r}") from None
    if not r.low < r.high:
        raise ConfigError(f"{key}: empty or inverted range: low {r.low:g} must be below high {r.high:g}")
    if r.log and r.low <= 0:
        raise ConfigError(f"{key}: a log range needs low > 0; got {r.low:g}")
    if r.step is not None and not 0 < r.step <= r.high - r.low:
        raise ConfigError(f"{key}: step must be within (0, high - low]; got {r.step:g}")
    if r.above is not None:
        ref = next((x for x in before if x.key == r.above), None)
        if not isinstance(ref, Range):
            raise ConfigError(f"{key}: above: {r.above} must be a range listed before it")
        if ref.high >= r.high:
            raise ConfigError(f"{key}: high {r.high:g} must exceed the high of {r.above} ({ref.high:g})")
        if ref.when != r.when:  # the value it stays above must be drawn whenever it is
            raise ConfigError(f"{key}: above: {r.above} must have the same when as {key}")
    return r


def _choice(key: str, spec: dict, before: list[Range | Choice]) -> Choice:
    """The choices of config key ``key`` that ``spec`` gives, each of the key's type; checked against ``before``."""
    flat = flatten(Config())
    if key not in flat:
        raise ConfigError(f"{key}: not a config key")
    if set(spec) - {"choices", "when"}:
        raise ConfigError(f"{key}: expected {{choices}} and optionally when; got {spec!r}")
    choices = spec["choices"]
    if not isinstance(choices, list) or not choices:
        raise ConfigError(f"{key}: choices must be a non-empty list; got {choices!r}")
    kind = type(flat[key])
    # Strict types: Optuna stores the value as it is, and it is what the best trial reports.
    if kind is float:
        choices = [float(c) if type(c) is int else c for c in choices]
    wrong = [c for c in choices if type(c) is not kind]
    if wrong:
        raise ConfigError(f"{key}: choices must be of type {kind.__name__}, as the config key; got {wrong[0]!r}")
    if len(set(choices)) < len(choices):
        raise ConfigError(f"{key}: choices must be distinct; got {spec['choices']!r}")
    # A value no config takes (a typo) is named here, with its file; combinations that the config refuses depend
    # on the preset, and are checked when tuning starts (``SearchSpace.check``).
    unknown = [c for c in choices if c not in (allowed_values(key) or choices)]
    if unknown:
        raise ConfigError(f"{key}: {unknown[0]!r} is not one of {', '.join(allowed_values(key))}")
    return Choice(key, tuple(choices), when=_when(key, spec.get("when"), before))


def _when(key: str, when, before: list[Range | Choice]) -> Conditions:
    """``when: {KEY: value or [values]}``: each KEY a choices key listed before ``key``, each value one of its
    choices."""
    if when is None:
        return ()
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{key}: when must map keys listed before it to a value or a list of values; got {when!r}")
    conditions = []
    for other, values in when.items():
        ref = next((x for x in before if x.key == other), None)
        if ref is None:
            raise ConfigError(f"{key}: when: {other} is not a key listed before it")
        if not isinstance(ref, Choice):
            raise ConfigError(f"{key}: when: {other} is a range; a condition needs a key with choices")
        values = tuple(values) if isinstance(values, list) else (values,)
        if not values or any(v not in ref.choices for v in values):
            raise ConfigError(f"{key}: when: {other}: {when[other]!r} is not among its choices "
                              f"({', '.join(map(str, ref.choices))})")
        conditions.append((other, values))
    return tuple(conditions)


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


def open_study(url: str, name: str, *, heartbeat: int, first_trial: dict[str, Value],
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
                              f"{existing[name].direction.name.lower()}; LWLRAP is maximized: pick another "
                              "--study-name")
        n_existing = existing[name].n_trials if name in existing else 0
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    sampler=sampler_for(n_existing), pruner=pruner, load_if_exists=True)
        study.enqueue_trial(first_trial, user_attrs={"preset": True}, skip_if_exists=True)
    return study
