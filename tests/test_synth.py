"""The demo data set: RFCX layout and schema, weak train labels and complete test truth, determinism, labels
where the energy is, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.signal
import soundfile as sf

from rfcx_mlops.data import demo as demo_set  # the generator; its command line is rfcx_mlops.synth

SEED = 5
TRAIN, TEST = 7, 2
COLUMNS = ["recording_id", "species_id", "songtype_id", "t_min", "f_min", "t_max", "f_max"]
LABELS = ["recording_id"] + [f"s{k}" for k in range(24)]
CALLS = ["recording_id", "species_id", "t_min", "f_min", "t_max", "f_max"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # two worker processes here, one in test_same_seed_same_bytes_different_seed_different
    folder = tmp_path_factory.mktemp("synth") / "demo"
    return demo_set.build(folder, recordings=TRAIN, test_recordings=TEST, seed=SEED, workers=2)


@pytest.fixture(scope="module")
def layout() -> dict[str, demo_set.Planned]:
    """The demo fixture's plan, by recording id."""
    return {p.recording_id: p for p in demo_set.plan(TRAIN, TEST, SEED)}


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype={"recording_id": str})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["train_tp.csv", "train_fp.csv"])
def test_box_csv_schema(demo: Path, name: str) -> None:
    df = _read(demo / name)
    assert list(df.columns) == COLUMNS
    assert len(df) > 0
    assert df.recording_id.str.fullmatch(r"[0-9a-f]{9}").all()
    assert pd.api.types.is_integer_dtype(df.species_id) and pd.api.types.is_integer_dtype(df.songtype_id)
    for col in ("t_min", "t_max", "f_min", "f_max"):
        assert pd.api.types.is_float_dtype(df[col]), col
    assert df.species_id.between(0, 23).all()
    assert ((df.t_min >= 0) & (df.t_min < df.t_max) & (df.t_max <= 60)).all()
    assert ((df.f_min > 0) & (df.f_min < df.f_max) & (df.f_max <= 24000)).all()
    # every box is one of the species' real boxes
    for row in df.itertuples(index=False):
        boxes = {(b.songtype_id, b.f_min, b.f_max) for b in demo_set.SPECIES_FACTS[row.species_id].boxes}
        assert (row.songtype_id, row.f_min, row.f_max) in boxes


def test_recordings_are_rfcx_flac(demo: Path) -> None:
    tp, fp = _read(demo / "train_tp.csv"), _read(demo / "train_fp.csv")
    train = {p.stem for p in (demo / "train").glob("*.flac")}
    test = {p.stem for p in (demo / "test").glob("*.flac")}
    assert len(train) == TRAIN and len(test) == TEST and not train & test
    assert set(tp.recording_id) == train  # every train recording holds a labelled call
    assert tp.recording_id.value_counts().max() == 1  # by default only one
    assert set(fp.recording_id) <= train
    for path in sorted((demo / "train").glob("*.flac")) + sorted((demo / "test").glob("*.flac")):
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.frames) == (48000, 1, 60 * 48000), path.name
        assert (info.format, info.subtype) == ("FLAC", "PCM_16"), path.name
        pcm, _ = sf.read(str(path), dtype="int16")
        assert 0.8 * 32767 < np.abs(pcm.astype(np.int32)).max() < 0.95 * 32767  # peak-normalised, not clipped


def test_fp_species_call_nowhere_in_the_recording(demo: Path, layout: dict[str, demo_set.Planned]) -> None:
    tp, fp = _read(demo / "train_tp.csv"), _read(demo / "train_fp.csv")
    assert len(fp) >= TRAIN  # at least one per recording (fp_per_recording)
    for row in tp.itertuples(index=False):
        assert row.species_id in layout[row.recording_id].species
    for row in fp.itertuples(index=False):  # not only the labelled species: every species calling there
        assert row.species_id not in layout[row.recording_id].species


def test_test_labels_and_sample_submission(demo: Path) -> None:
    labels, sub = _read(demo / "test_labels.csv"), _read(demo / "sample_submission.csv")
    assert list(labels.columns) == LABELS and list(sub.columns) == LABELS
    assert set(labels.recording_id) == {p.stem for p in (demo / "test").glob("*.flac")}
    assert list(sub.recording_id) == list(labels.recording_id) == sorted(labels.recording_id)
    values = labels[LABELS[1:]].to_numpy()
    assert set(np.unique(values)) <= {0, 1}
    assert ((values.sum(axis=1) >= 1) & (values.sum(axis=1) <= 4)).all()  # 1-3 species, and maybe species 3
    assert (sub[LABELS[1:]].to_numpy() == 0.5).all()


def _gains(folder: Path, rows: pd.DataFrame) -> list[float]:
    """Per call row: band power (dB) inside its time span over the median of the same band within 5 s of it (the
    background's level drifts over the minute, and calls are placed at a level over the local background)."""
    gains = []
    for row in rows.itertuples(index=False):
        audio, sr = sf.read(str(folder / f"{row.recording_id}.flac"), dtype="float32")
        freqs, times, spec = scipy.signal.stft(audio, sr, nperseg=2048, noverlap=1024)
        band = (np.abs(spec[(freqs >= row.f_min) & (freqs <= row.f_max)]) ** 2).mean(axis=0)
        inside = (times >= row.t_min) & (times <= row.t_max)
        near = ~inside & (times >= row.t_min - 5.0) & (times <= row.t_max + 5.0)
        gains.append(10 * np.log10(band[inside].mean() / np.median(band[near])))
    return gains


def test_energy_sits_in_the_labelled_box(demo: Path) -> None:
    """Band power inside each TP box's and each test call's time span beats the same band elsewhere."""
    for split, rows in (("train", "train_tp.csv"), ("test", "test_calls.csv")):
        gains = _gains(demo / split, _read(demo / rows))
        assert min(gains) > 0.0
        assert np.median(gains) > 5.0


def test_unlabelled_calls_are_in_the_audio(tmp_path: Path) -> None:
    """A train recording holds more calls than train_tp.csv names, and each stands out of the background near it."""
    for split in ("train", "test"):
        (tmp_path / split).mkdir()
    job = next(j for j in demo_set._jobs(tmp_path, 3, 1, SEED, demo_set.Difficulty()) if len(j.calls) >= 4)
    tp, fp, calls = demo_set._make_recording(job)
    assert len(tp) == 1 and tp[0] in calls and len(calls) == len(job.calls)
    assert [c[1] for c in calls] == [k for k, _ in job.calls] and {c[1] for c in calls} == set(job.species)
    unlabelled = pd.DataFrame([c for c in calls if c not in tp], columns=COLUMNS)
    gains = _gains(tmp_path / "train", unlabelled)
    assert min(gains) > 0.0 and np.median(gains) > 3.0
    assert not {r[1] for r in fp} & set(job.species)


def test_train_calls_hold_every_train_call(demo: Path, layout: dict[str, demo_set.Planned]) -> None:
    """train_calls.csv: every call placed in the train recordings (the plan's), the labelled ones among them, and
    no species of a train_fp row calling in its recording."""
    calls, tp, fp = (_read(demo / name) for name in ("train_calls.csv", "train_tp.csv", "train_fp.csv"))
    train = {rid: p for rid, p in layout.items() if p.split == "train"}
    assert set(calls["recording_id"]) == set(train)
    for rid, rows in calls.groupby("recording_id"):
        assert sorted(rows["species_id"]) == sorted(k for k, _ in train[rid].calls)
    key = ["recording_id", "species_id", "t_min", "f_min", "t_max", "f_max"]
    labelled = tp[key].merge(calls[key], how="left", indicator=True)
    assert (labelled["_merge"] == "both").all() and len(calls) > len(tp)  # most calls are not labelled
    calling = set(zip(calls["recording_id"], calls["species_id"]))
    assert not calling & set(zip(fp["recording_id"], fp["species_id"]))


def test_same_seed_same_bytes_different_seed_different(demo: Path, tmp_path: Path) -> None:
    again = demo_set.build(tmp_path / "again", recordings=TRAIN, test_recordings=TEST, seed=SEED, workers=1)
    assert _files(again) == _files(demo)  # also independent of the number of worker processes
    # a previous demo build is rebuilt in place
    demo_set.build(again, recordings=TRAIN, test_recordings=TEST, seed=SEED + 1)
    other = _files(again)
    assert json.loads(other[demo_set.MARKER])["seed"] == SEED + 1
    assert json.loads(other[demo_set.MARKER])["version"] == demo_set.GENERATOR_VERSION == 3
    for name in ("train_tp.csv", "train_fp.csv", "train_calls.csv", "test_labels.csv", "test_calls.csv"):
        assert other[name] != _files(demo)[name]
    assert not set(_files(demo)) & {k for k in other if k.endswith(".flac")}  # new recording ids


def test_plan_balances_the_labelled_species_and_follows_the_seed() -> None:
    layout = demo_set.plan(96, 20, seed=1)
    train = [p for p in layout if p.split == "train"]
    test = [p for p in layout if p.split == "test"]
    ids = [p.recording_id for p in layout]
    assert len(set(ids)) == len(ids) == 116 and len(train) == 96
    labelled = np.bincount([k for p in train for k, lab in p.calls if lab], minlength=24)
    assert (labelled == 4).all()  # 96 labelled calls, 4 per species
    assert all(1 <= len(p.species) <= 4 and len(set(p.species)) == len(p.species) for p in test)
    assert all(not lab for p in test for _, lab in p.calls)
    assert demo_set.plan(96, 20, seed=1) == layout
    assert demo_set.plan(96, 20, seed=2) != layout


def test_train_recordings_hold_2_to_4_species_and_one_labelled_call() -> None:
    train = [p for p in demo_set.plan(96, 1, seed=3) if p.split == "train"]
    for p in train:
        assert 2 <= len(p.species) <= 4 and p.species == tuple(sorted(set(p.species)))
        assert {k for k, _ in p.calls} == set(p.species)  # every species present calls
        assert len(p.species) <= len(p.calls) <= 8
        assert [lab for _, lab in p.calls].count(True) == 1
    assert {len(p.species) for p in train} == {2, 3, 4}
    n_calls = [len(p.calls) for p in train]
    assert 3.5 < np.mean(n_calls) < 6 and max(n_calls) > 5
    labelled_species = [next(k for k, lab in p.calls if lab) for p in train]
    # the labelled species' further calls go unlabelled too
    assert any(k == first for p, first in zip(train, labelled_species) for k, lab in p.calls if not lab)


def test_labelled_fraction_labels_more_calls_and_changes_nothing_else() -> None:
    base = demo_set.plan(48, 10, seed=4)
    for fraction in (0.5, 1.0):
        more = demo_set.plan(48, 10, seed=4, difficulty=demo_set.Difficulty(labelled_fraction=fraction))
        for a, b in zip(base, more, strict=True):
            assert (a.split, a.recording_id, a.species) == (b.split, b.recording_id, b.species)
            assert [k for k, _ in a.calls] == [k for k, _ in b.calls]
            if b.split == "train":
                assert b.calls[0] == a.calls[0] == (a.calls[0][0], True)  # the balanced species stays labelled
                expected = len(b.calls) if fraction == 1.0 else max(1, round(fraction * len(b.calls)))
                assert sum(lab for _, lab in b.calls) == expected
    assert demo_set.plan(48, 10, seed=4, difficulty=demo_set.Difficulty(labelled_fraction=0.0)) == base
    with pytest.raises(ValueError, match="labelled_fraction"):
        demo_set.Difficulty(labelled_fraction=1.5)


def test_labelled_fraction_one_labels_every_call_of_the_same_audio(tmp_path: Path) -> None:
    sizes = dict(recordings=2, test_recordings=1, seed=SEED, workers=1)
    one = _files(demo_set.build(tmp_path / "one", **sizes))
    every = _files(demo_set.build(tmp_path / "all", **sizes, difficulty=demo_set.Difficulty(labelled_fraction=1.0)))
    assert {k: v for k, v in one.items() if k != "train_tp.csv" and k != demo_set.MARKER} == {
        k: v for k, v in every.items() if k != "train_tp.csv" and k != demo_set.MARKER
    }
    planned = demo_set.plan(2, 1, SEED)
    tp_one, tp_all = _read(tmp_path / "one" / "train_tp.csv"), _read(tmp_path / "all" / "train_tp.csv")
    assert len(tp_one) == 2 and len(tp_all) == sum(len(p.calls) for p in planned if p.split == "train") > 2
    assert set(map(tuple, tp_one.to_numpy().tolist())) < set(map(tuple, tp_all.to_numpy().tolist()))
    assert json.loads(every[demo_set.MARKER])["difficulty"]["labelled_fraction"] == 1.0


def test_test_labels_agree_with_test_calls(demo: Path, layout: dict[str, demo_set.Planned]) -> None:
    calls, labels = _read(demo / "test_calls.csv"), _read(demo / "test_labels.csv")
    assert list(calls.columns) == CALLS
    rows = list(calls.itertuples(index=False))
    assert rows == sorted(rows, key=lambda r: (r.recording_id, r.t_min, r.species_id))
    assert ((calls.t_min >= 0) & (calls.t_min < calls.t_max) & (calls.t_max <= 60)).all()
    for row in calls.itertuples(index=False):
        assert (row.f_min, row.f_max) in {(b.f_min, b.f_max) for b in demo_set.SPECIES_FACTS[row.species_id].boxes}
    from_calls = calls.groupby("recording_id").species_id.apply(set).to_dict()
    from_labels = {r[0]: {k for k in range(24) if r[k + 1] == 1} for r in labels.itertuples(index=False)}
    assert from_calls == from_labels == {rid: set(p.species) for rid, p in layout.items() if p.split == "test"}
    assert len(calls) == sum(len(p.calls) for p in layout.values() if p.split == "test")


def test_species_3_calls_in_most_test_recordings() -> None:
    test = [p for p in demo_set.plan(24, 40, seed=6) if p.split == "test"]
    share = np.mean([[k in p.species for k in range(24)] for p in test], axis=0)
    assert share[3] == 0.75  # round(0.75 x 40) recordings
    assert np.delete(share, 3).max() <= 0.25
    flat = demo_set.plan(24, 40, seed=6, difficulty=demo_set.Difficulty(common_species=None))[24:]
    assert np.mean([3 in p.species for p in flat]) < 0.3


def test_species_tables_cover_24_species() -> None:
    assert [f.species_id for f in demo_set.SPECIES_FACTS] == list(range(24))
    assert len(demo_set.SPECIES_PATTERNS) == 24
    for facts in demo_set.SPECIES_FACTS:
        assert 1 <= len(facts.boxes) <= 4 and facts.rows == sum(b.rows for b in facts.boxes)
        assert 0 < facts.dur_min <= facts.dur_median <= facts.dur_max < 8
        assert all(93.75 <= b.f_min < b.f_max <= 13687.5 for b in facts.boxes)


def test_species_table_matches_the_real_train_tp(shared_rfcx: Path) -> None:
    real = pd.read_csv(shared_rfcx / "train_tp.csv")
    real["duration"] = real.t_max - real.t_min
    assert len(real) == sum(f.rows for f in demo_set.SPECIES_FACTS) == 1216
    for facts in demo_set.SPECIES_FACTS:
        rows = real[real.species_id == facts.species_id]
        assert len(rows) == facts.rows
        boxes = rows.groupby(["songtype_id", "f_min", "f_max"]).size()
        assert {(st, lo, hi, n) for (st, lo, hi), n in boxes.items()} == {
            (b.songtype_id, b.f_min, b.f_max, b.rows) for b in facts.boxes
        }
        measured = (rows.duration.min(), rows.duration.median(), rows.duration.max())
        assert np.allclose(measured, (facts.dur_min, facts.dur_median, facts.dur_max), atol=1e-3)


def test_build_rejects_bad_sizes_and_foreign_folders(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="recordings"):
        demo_set.build(tmp_path / "a", recordings=0)
    with pytest.raises(ValueError, match="test_recordings"):
        demo_set.build(tmp_path / "a", recordings=3, test_recordings=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo build"):
        demo_set.build(tmp_path / "b", recordings=1)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rfcx_mlops.synth", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--recordings", "0"], ["--recordings", "many"], ["--test-recordings", "-1"],
                                  ["--labelled-fraction", "1.5"], ["--labelled-fraction", "half"]])
def test_cli_bad_size_is_one_line(tmp_path: Path, args: list[str]) -> None:
    proc = _cli(str(tmp_path / "out"), *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_foreign_folder_and_builds(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x.csv").write_text("a\n")
    proc = _cli(str(tmp_path / "taken"), "--recordings", "1")
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "not a demo build" in proc.stderr
    proc = _cli(str(tmp_path / "new"), "--recordings", "1", "--seed", "3", "--labelled-fraction", "1")
    assert proc.returncode == 0, proc.stderr
    assert "1 train + 1 test recordings" in proc.stdout
    assert len(list((tmp_path / "new" / "train").glob("*.flac"))) == 1
    calls = len(demo_set.plan(1, 1, 3)[0].calls)
    assert len(_read(tmp_path / "new" / "train_tp.csv")) == calls > 1 and f"{calls} train_tp rows" in proc.stdout


def test_dataset_check_passes_the_demo_and_counts_it(demo: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rfcx_mlops.dataset", "check", str(demo)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    tp = _read(demo / "train_tp.csv")
    assert f"train_tp.csv: {len(tp)} calls in {tp['recording_id'].nunique()} recordings" in proc.stdout
    assert f"train audio: {TRAIN} recordings, {TRAIN} at 48000 Hz, 60.0-60.0 s" in proc.stdout
    assert f"test audio: {TEST} recordings, {TEST} at 48000 Hz" in proc.stdout
    assert proc.stdout.rstrip().endswith("no problems found")
