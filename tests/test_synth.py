"""The demo data set: RFCX layout and schema, determinism, labels where the energy is, the CLI."""

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

from rfcx_mlops import synth

SEED = 5
TRAIN, TEST = 7, 2
COLUMNS = ["recording_id", "species_id", "songtype_id", "t_min", "f_min", "t_max", "f_max"]
LABELS = ["recording_id"] + [f"s{k}" for k in range(24)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.build(tmp_path_factory.mktemp("synth") / "demo", recordings=TRAIN, test_recordings=TEST, seed=SEED)


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
        boxes = {(b.songtype_id, b.f_min, b.f_max) for b in synth.SPECIES_FACTS[row.species_id].boxes}
        assert (row.songtype_id, row.f_min, row.f_max) in boxes


def test_recordings_are_rfcx_flac(demo: Path) -> None:
    tp, fp = _read(demo / "train_tp.csv"), _read(demo / "train_fp.csv")
    train = {p.stem for p in (demo / "train").glob("*.flac")}
    test = {p.stem for p in (demo / "test").glob("*.flac")}
    assert len(train) == TRAIN and len(test) == TEST and not train & test
    assert set(tp.recording_id) == train  # every train recording holds a labelled call
    assert set(fp.recording_id) <= train
    for path in sorted((demo / "train").glob("*.flac")) + sorted((demo / "test").glob("*.flac")):
        info = sf.info(str(path))
        assert (info.samplerate, info.channels, info.frames) == (48000, 1, 60 * 48000), path.name
        assert (info.format, info.subtype) == ("FLAC", "PCM_16"), path.name
        pcm, _ = sf.read(str(path), dtype="int16")
        assert 0.8 * 32767 < np.abs(pcm.astype(np.int32)).max() < 0.95 * 32767  # peak-normalised, not clipped


def test_fp_species_are_absent_from_the_recording(demo: Path) -> None:
    tp, fp = _read(demo / "train_tp.csv"), _read(demo / "train_fp.csv")
    present = tp.groupby("recording_id").species_id.apply(set)
    for row in fp.itertuples(index=False):
        assert row.species_id not in present[row.recording_id]


def test_test_labels_and_sample_submission(demo: Path) -> None:
    labels, sub = _read(demo / "test_labels.csv"), _read(demo / "sample_submission.csv")
    assert list(labels.columns) == LABELS and list(sub.columns) == LABELS
    assert set(labels.recording_id) == {p.stem for p in (demo / "test").glob("*.flac")}
    assert list(sub.recording_id) == list(labels.recording_id) == sorted(labels.recording_id)
    values = labels[LABELS[1:]].to_numpy()
    assert set(np.unique(values)) <= {0, 1}
    assert ((values.sum(axis=1) >= 1) & (values.sum(axis=1) <= 3)).all()
    assert (sub[LABELS[1:]].to_numpy() == 0.5).all()


def test_energy_sits_in_the_labelled_box(demo: Path) -> None:
    """Band power inside each TP box's time span beats the same band elsewhere in the recording."""
    gains = []
    for row in _read(demo / "train_tp.csv").itertuples(index=False):
        audio, sr = sf.read(str(demo / "train" / f"{row.recording_id}.flac"), dtype="float32")
        freqs, times, spec = scipy.signal.stft(audio, sr, nperseg=2048, noverlap=1024)
        band = (np.abs(spec[(freqs >= row.f_min) & (freqs <= row.f_max)]) ** 2).mean(axis=0)
        inside = (times >= row.t_min) & (times <= row.t_max)
        gains.append(10 * np.log10(band[inside].mean() / np.median(band[~inside])))
    assert min(gains) > 0.0
    assert np.median(gains) > 5.0


def test_same_seed_same_bytes_different_seed_different(demo: Path, tmp_path: Path) -> None:
    again = synth.build(tmp_path / "again", recordings=TRAIN, test_recordings=TEST, seed=SEED, workers=1)
    assert _files(again) == _files(demo)  # also independent of the number of worker processes
    # a previous demo build is rebuilt in place
    synth.build(again, recordings=TRAIN, test_recordings=TEST, seed=SEED + 1)
    other = _files(again)
    assert json.loads(other[synth.MARKER])["seed"] == SEED + 1
    for name in ("train_tp.csv", "train_fp.csv", "test_labels.csv"):
        assert other[name] != _files(demo)[name]
    assert not set(_files(demo)) & {k for k in other if k.endswith(".flac")}  # new recording ids


def test_plan_balances_species_and_is_independent_of_the_seed_for_patterns() -> None:
    layout = synth.plan(96, 20, seed=1)
    train = [species for split, _, species in layout if split == "train"]
    test = [species for split, _, species in layout if split == "test"]
    ids = [rid for _, rid, _ in layout]
    assert len(set(ids)) == len(ids) == 116
    assert sum(len(s) > 1 for s in train) == round(0.03 * 96)
    counts = np.bincount([k for s in train for k in s], minlength=24)
    assert counts.min() >= 4 and counts.max() <= 6
    assert all(1 <= len(s) <= 3 and len(set(s)) == len(s) for s in test)
    assert synth.plan(96, 20, seed=1) == layout
    assert synth.plan(96, 20, seed=2) != layout


def test_species_tables_cover_24_species() -> None:
    assert [f.species_id for f in synth.SPECIES_FACTS] == list(range(24))
    assert len(synth.SPECIES_PATTERNS) == 24
    for facts in synth.SPECIES_FACTS:
        assert 1 <= len(facts.boxes) <= 4 and facts.rows == sum(b.rows for b in facts.boxes)
        assert 0 < facts.dur_min <= facts.dur_median <= facts.dur_max < 8
        assert all(93.75 <= b.f_min < b.f_max <= 13687.5 for b in facts.boxes)


def test_species_table_matches_the_real_train_tp(shared_rfcx: Path) -> None:
    real = pd.read_csv(shared_rfcx / "train_tp.csv")
    real["duration"] = real.t_max - real.t_min
    assert len(real) == sum(f.rows for f in synth.SPECIES_FACTS) == 1216
    for facts in synth.SPECIES_FACTS:
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
        synth.build(tmp_path / "a", recordings=0)
    with pytest.raises(ValueError, match="test_recordings"):
        synth.build(tmp_path / "a", recordings=3, test_recordings=0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a demo build"):
        synth.build(tmp_path / "b", recordings=1)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rfcx_mlops.synth", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--recordings", "0"], ["--recordings", "many"], ["--test-recordings", "-1"]])
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
    proc = _cli(str(tmp_path / "new"), "--recordings", "1", "--seed", "3")
    assert proc.returncode == 0, proc.stderr
    assert "1 train + 1 test recordings" in proc.stdout
    assert len(list((tmp_path / "new" / "train").glob("*.flac"))) == 1


def test_dataset_check_passes_the_demo_and_counts_it(demo: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "rfcx_mlops.dataset", "check", str(demo)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    tp = _read(demo / "train_tp.csv")
    assert f"train_tp.csv: {len(tp)} calls in {tp['recording_id'].nunique()} recordings" in proc.stdout
    assert f"train audio: {TRAIN} recordings, {TRAIN} at 48000 Hz, 60.0-60.0 s" in proc.stdout
    assert f"test audio: {TEST} recordings, {TEST} at 48000 Hz" in proc.stdout
    assert proc.stdout.rstrip().endswith("no problems found")
