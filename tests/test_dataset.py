"""The data folder reader: each kind of bad input gets one line naming the file (and line), or is handled."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from conftest import make_data_dir, write_tone
from rfcx_mlops import dataset
from rfcx_mlops.data import folder as data_folder
from rfcx_mlops.data.audio import AudioError, probe, read_window


def scan(path):
    return data_folder.scan(path, n_classes=24, sample_rate=48000)


def test_good_folder_has_no_problems(tmp_path, good_rows):
    data, problems = scan(make_data_dir(tmp_path, good_rows))
    assert problems == []
    assert len(data.tp) == 3 and set(data.recordings) == {"rec0", "rec1"}
    assert data.recordings["rec0"].duration == pytest.approx(12.0)


@pytest.mark.parametrize(
    "row, expected",
    [
        (("rec2", "x", 1, 1.0, 500.0, 2.0, 900.0), "train_tp.csv line 5: species_id is 'x', not a number"),
        (("rec2", "", 1, 1.0, 500.0, 2.0, 900.0), "train_tp.csv line 5: species_id is '', not a number"),
        (("rec2", 24, 1, 1.0, 500.0, 2.0, 900.0), "train_tp.csv line 5: species_id 24 outside 0..23"),
        (("rec2", -1, 1, 1.0, 500.0, 2.0, 900.0), "train_tp.csv line 5: species_id -1 outside 0..23"),
        (("rec2", 2, 1, 3.0, 500.0, 3.0, 900.0), "train_tp.csv line 5: t_min 3.0 is not below t_max 3.0"),
        (("rec2", 2, 1, 3.0, 900.0, 4.0, 500.0), "train_tp.csv line 5: f_min 900.0 is not below f_max 500.0"),
        (("rec2", 2, 1, 3.0, 500.0, 4.0, 30000.0), "train_tp.csv line 5: f_max 30000.0 Hz is above the Nyquist"),
        (("rec2", 2, 1, 10.0, 500.0, 13.5, 900.0), "train_tp.csv line 5: t_max 13.5 s is beyond the end of rec2"),
    ],
)
def test_bad_rows_are_named_by_line(tmp_path, good_rows, row, expected):
    _, problems = scan(make_data_dir(tmp_path, [*good_rows, row]))
    assert len(problems) == 1
    assert problems[0].startswith(expected)


@pytest.mark.parametrize("recording_id", ["../secret", "/etc/passwd", "sub/rec2", "..", ".", "sub\\rec2"])
def test_recording_ids_must_be_plain_file_names(tmp_path, good_rows, recording_id):
    folder = make_data_dir(tmp_path, good_rows)
    (tmp_path / "secret.flac").write_bytes((folder / "train" / "rec0.flac").read_bytes())
    with open(folder / "train_tp.csv", "a") as f:
        f.write(f"{recording_id},2,1,1.0,500.0,2.0,900.0\n")
    _, problems = scan(folder)
    assert problems == [f"train_tp.csv line 5: recording_id {recording_id!r} is not a plain file name "
                        "(no folders, '..' or absolute paths)"]


HEADER = "recording_id,species_id,songtype_id,t_min,f_min,t_max,f_max\n"


def test_header_only_csvs_hold_no_rows(tmp_path, good_rows):
    folder = make_data_dir(tmp_path, good_rows)
    (folder / "train_fp.csv").write_text(HEADER)  # a data set without verified absences
    data, problems = scan(folder)
    assert problems == [] and len(data.tp) == 3 and data.fp.empty
    assert data.fp.dtypes.to_dict() == data.tp.dtypes.to_dict()
    assert "train_fp.csv: 0 verified absences in 0 recordings" in data_folder.summary(data)
    (folder / "train_tp.csv").write_text(HEADER)
    data, problems = scan(folder)
    assert problems == [] and data.tp.empty
    with pytest.raises(data_folder.DataError, match=r"train_tp.csv: holds no labelled calls$"):
        data_folder.load(folder, 24, 48000)


def test_bad_rows_of_train_fp_are_named_by_line(tmp_path, good_rows):
    folder = make_data_dir(tmp_path, good_rows)
    (folder / "train_fp.csv").write_text(HEADER + "rec0,3,1,5.0,500,4.0,900\n../rec1,3,1,1,500,2,900\n"
                                         "rec1,x,1,1,500,2,900\n")
    _, problems = scan(folder)
    assert problems == ["train_fp.csv line 2: t_min 5.0 is not below t_max 4.0",
                        "train_fp.csv line 3: recording_id '../rec1' is not a plain file name (no folders, '..' or "
                        "absolute paths)",
                        "train_fp.csv line 4: species_id is 'x', not a number"]


def test_a_box_labelled_present_and_verified_absent_is_a_problem(tmp_path, good_rows):
    """good_rows label species 3 in rec0 at 1.0-2.5 s, 500-2000 Hz: a train_fp row of species 3 overlapping that box
    contradicts it; one that misses it in time or in frequency, or is of another species, does not."""
    folder = make_data_dir(tmp_path, good_rows)
    (folder / "train_fp.csv").write_text(HEADER + "rec0,3,1,2.0,1500,3.0,2500\n"  # overlaps: a contradiction
                                         "rec0,3,1,3.0,500,4.0,2000\n"  # after the call
                                         "rec0,3,1,1.0,2500,2.5,4000\n"  # above its band
                                         "rec0,4,1,1.0,500,2.5,2000\n")  # another species
    data, problems = scan(folder)
    assert problems == ["train_fp.csv line 2: species 3 at 2-3 s in rec0 overlaps train_tp.csv line 2, a labelled "
                        "call of that species: one sound labelled present and verified absent"]
    assert data.fp["line"].tolist() == [3, 4, 5]  # the contradiction is left out; the others stay
    with pytest.raises(data_folder.DataError, match="train_fp.csv line 2: species 3"):
        data_folder.load(folder, n_classes=24, sample_rate=48000)


@pytest.mark.parametrize("content, expected", [
    ("", ": not a readable CSV (No columns to parse from file)"),
    (HEADER + "rec0,3,1,1,500,2,900,extra\n", ": not a readable CSV (Error tokenizing data. C error: "
                                              "Expected 7 fields in line 2, saw 8)"),
    (b"\xff\xfe\x00junk", ": not a readable CSV ("),
])
def test_unreadable_csv_is_one_line(tmp_path, good_rows, content, expected):
    folder = make_data_dir(tmp_path, good_rows)
    path = folder / "train_fp.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    _, problems = scan(folder)
    assert len(problems) == 1 and problems[0].startswith(f"{path}{expected}") and "\n" not in problems[0]


def test_problems_are_listed_in_line_order(tmp_path, good_rows):
    rows = [*good_rows, ("rec2", 1, 1, 5.0, 500.0, 2.0, 900.0), ("rec2", 99, 1, 1.0, 500.0, 2.0, 900.0)]
    _, problems = scan(make_data_dir(tmp_path, rows))
    assert [p.split(":")[0] for p in problems] == ["train_tp.csv line 5", "train_tp.csv line 6"]


def test_missing_column(tmp_path, good_rows):
    folder = make_data_dir(tmp_path, good_rows)
    csv = folder / "train_tp.csv"
    csv.write_text(csv.read_text().replace(",f_max", ",fmax"))
    _, problems = scan(folder)
    assert problems == ["train_tp.csv: missing column(s) f_max"]


def test_missing_tp_file_and_folder(tmp_path):
    with pytest.raises(data_folder.DataError, match="data folder not found"):
        scan(tmp_path / "nowhere")
    _, problems = scan(tmp_path)
    assert problems == [f"{tmp_path / 'train_tp.csv'}: missing (the labelled calls are read from it)"]


def test_missing_audio_file(tmp_path, good_rows):
    folder = make_data_dir(tmp_path, good_rows)
    (folder / "train" / "rec1.flac").unlink()
    _, problems = scan(folder)
    assert problems == [f"{folder / 'train' / 'rec1.flac'}: missing (no .flac or .wav)"]


def _replace_audio(folder, content: bytes):
    (folder / "train" / "rec1.flac").write_bytes(content)
    return scan(folder)[1]


def test_empty_file(tmp_path, good_rows):
    problems = _replace_audio(make_data_dir(tmp_path, good_rows), b"")
    assert len(problems) == 1 and problems[0].endswith("rec1.flac: empty file (0 bytes)")


def test_non_audio_bytes(tmp_path, good_rows):
    problems = _replace_audio(make_data_dir(tmp_path, good_rows), b"<html>not audio</html>" * 50)
    assert len(problems) == 1 and problems[0].endswith("rec1.flac: not a readable audio file (Format not recognised.)")


def test_truncated_flac(tmp_path, good_rows):
    folder = make_data_dir(tmp_path, good_rows)
    content = (folder / "train" / "rec1.flac").read_bytes()
    problems = _replace_audio(folder, content[: len(content) // 2])
    assert len(problems) == 1 and "rec1.flac" in problems[0]
    assert "truncated" in problems[0] or "cannot decode" in problems[0]


def test_zero_frame_file(tmp_path, good_rows):
    folder = make_data_dir(tmp_path, good_rows)
    (folder / "train" / "rec1.flac").unlink()
    sf.write(folder / "train" / "rec1.wav", np.zeros(0), 48000, subtype="PCM_16")  # a header, no frames
    problems = scan(folder)[1]
    assert len(problems) == 1 and problems[0].endswith("rec1.wav: holds no audio frames")
    sf.write(folder / "train" / "rec1.wav", np.zeros(0), 48000, subtype="PCM_16", format="FLAC")
    problems = scan(folder)[1]
    assert len(problems) == 1 and "rec1.wav" in problems[0]


def test_wav_8bit_and_stereo_are_read_as_mono_float(tmp_path):
    u8 = write_tone(tmp_path / "u8.wav", 2.0, subtype="PCM_U8")
    stereo = write_tone(tmp_path / "st.wav", 2.0, channels=2)
    for path in (u8, stereo):
        y = read_window(probe(path), 0.5, 1.0, 48000)
        assert y.dtype == np.float32 and y.shape == (48000,)
        assert 0.25 < np.abs(y).max() < 0.35  # the tone's level survives the mix and the 8-bit codec
    assert sf.info(stereo).channels == 2  # the file read above is stereo (AudioInfo no longer records channels)


def test_other_sample_rate_is_resampled_with_one_warning(tmp_path, caplog):
    path = write_tone(tmp_path / "low.flac", 3.0, sr=16000, freq=440.0)
    info = probe(path)
    with caplog.at_level(logging.WARNING):
        y = read_window(info, 1.0, 1.0, 48000)
        read_window(info, 0.5, 1.0, 48000)
    assert y.shape == (48000,)
    assert sum("16000 Hz, resampled to 48000 Hz" in r.message for r in caplog.records) == 1
    spectrum = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    assert np.argmax(spectrum) * 48000 / len(y) == pytest.approx(440.0, abs=2.0)


def test_short_recording_is_zero_padded(tmp_path):
    info = probe(write_tone(tmp_path / "short.flac", 2.0))
    y = read_window(info, 0.0, 5.0, 48000)
    assert y.shape == (5 * 48000,)
    assert np.abs(y[: 2 * 48000]).max() > 0.2 and not y[2 * 48000 :].any()


def test_window_reads_the_right_frames(tmp_path):
    sr = 8000
    ramp = (np.arange(4 * sr) / (4 * sr) - 0.5).astype(np.float32)
    sf.write(tmp_path / "ramp.wav", ramp, sr, subtype="FLOAT")
    y = read_window(probe(tmp_path / "ramp.wav"), 1.5, 1.0, sr)
    np.testing.assert_array_equal(y, ramp[int(1.5 * sr) : int(2.5 * sr)])


def test_probe_names_the_file(tmp_path):
    with pytest.raises(AudioError, match=r"nothing\.flac: file not found"):
        probe(tmp_path / "nothing.flac")


def test_load_raises_one_line_counting_problems(tmp_path, good_rows):
    folder = make_data_dir(tmp_path, [*good_rows, ("rec2", 99, 1, 1.0, 500.0, 2.0, 900.0),
                                      ("rec2", 1, 1, 5.0, 500.0, 2.0, 900.0)])
    with pytest.raises(data_folder.DataError) as err:
        data_folder.load(folder, 24, 48000)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("train_tp.csv line 5: species_id 99 outside 0..23 (and 1 more;")
    assert "run: python -m rfcx_mlops.dataset check" in message


def test_check_cli(tmp_path, good_rows):
    folder = make_data_dir(tmp_path, good_rows)
    ok = subprocess.run([sys.executable, "-m", "rfcx_mlops.dataset", "check", str(folder)], capture_output=True,
                        text=True)
    assert ok.returncode == 0, ok.stderr
    assert "3 calls in 2 recordings, 3 species" in ok.stdout and "no problems found" in ok.stdout
    assert "train audio: 2 recordings, 2 at 48000 Hz, 12.0-12.0 s" in ok.stdout
    (folder / "train" / "rec0.flac").write_bytes(b"junk" * 100)
    bad = subprocess.run([sys.executable, "-m", "rfcx_mlops.dataset", "check", str(folder)], capture_output=True,
                         text=True)
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr
    assert "1 problem(s):" in bad.stderr and "rec0.flac: not a readable audio file" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "rfcx_mlops.dataset", "check", str(tmp_path / "nowhere")],
                             capture_output=True, text=True)
    assert missing.returncode == 2  # a user error, not a folder with problems
    assert missing.stderr.splitlines() == [f"error: {tmp_path / 'nowhere'}: data folder not found"]


def test_check_on_real_metadata_without_audio(tmp_path, shared_rfcx):
    for name in ("train_tp.csv", "train_fp.csv", "sample_submission.csv"):
        shutil.copy(shared_rfcx / name, tmp_path / name)
    data, problems = scan(tmp_path)
    assert problems == [f"{tmp_path / 'train'}: folder missing; the CSVs reference 4727 recordings in it"]
    text = data_folder.summary(data)
    assert "train_tp.csv: 1216 calls in 1132 recordings, 24 species" in text
    assert "call duration: min 0.27 s, median 1.86 s, max 7.92 s" in text
    assert "recordings holding 2 or more species: 27" in text
    assert "train_fp.csv: 7781 verified absences in 3958 recordings" in text


def test_real_recordings(shared_rfcx):
    tp = probe(shared_rfcx / "audio" / "f97ababc1.flac")
    assert (tp.sample_rate, tp.frames, sf.info(tp.path).channels) == (48000, 60 * 48000, 1)
    low = probe(shared_rfcx / "audio" / "0a6a36fb6.flac")
    assert low.sample_rate == 16000 and low.duration == pytest.approx(60.0)
    assert read_window(low, 10.0, 10.0, 48000).shape == (480000,)


def test_a_run_without_data_dir_builds_the_demo_once_and_reuses_it(tmp_path, caplog):
    from rfcx_mlops import config
    from rfcx_mlops.jobs import fit

    cfg = config.load(None, {"data.demo_dir": str(tmp_path / "demo"), "data.demo_recordings": 4})
    with caplog.at_level(logging.INFO, logger="rfcx_mlops.demo"):
        data = fit.prepare(cfg)
        built = (data.data_dir / "train_tp.csv").stat().st_mtime_ns
        again = fit.prepare(cfg)
    assert data.demo and again.demo and again.data_dir == data.data_dir
    assert data.data_dir.name.startswith("n4-seed0-v") and len(data.recordings) >= 1 and not data.tp.empty
    assert (again.data_dir / "train_tp.csv").stat().st_mtime_ns == built
    assert [r.message for r in caplog.records] == [
        f"no data_dir given: building the demo data set (4 recordings) in {data.data_dir}",
        f"using the cached demo data set in {data.data_dir}"]
    assert [p.name for p in (tmp_path / "demo").iterdir()] == [data.data_dir.name]  # no partial folder left


# -- import-raven ------------------------------------------------------------------------------------------------

RAVEN_HEAD = "Selection\tView\tChannel\tBegin Time (s)\tEnd Time (s)\tLow Freq (Hz)\tHigh Freq (Hz)\tSpecies\n"


def raven_folder(root, tables: dict[str, str], seconds: float = 10.0):
    """Selection tables named as Raven names them, and a tone recording for each."""
    (root / "tables").mkdir(parents=True)
    (root / "audio").mkdir()
    for stem, rows in tables.items():
        (root / "tables" / f"{stem}.Table.1.selections.txt").write_text(RAVEN_HEAD + rows.replace("|", "\t"))
        write_tone(root / "audio" / f"{stem}.wav", seconds=seconds)
    return root / "tables", root / "audio"


def test_import_raven_makes_a_folder_to_train_on(tmp_path, capsys):
    tables, audio = raven_folder(tmp_path, {
        "site1": "1|Spectrogram 1|1|1.0|2.5|500|900|frog\n2|Spectrogram 1|1|4.0|5.0|2000|4000|bird\n"
                 "3|Spectrogram 1|1|6.0|7.0|100|8000|noise\n",
        "site2": "1|Waveform 1|1|0.5|1.5|500|900|frog\n1|Spectrogram 1|1|0.5|1.5|500|900|frog\n",
    })
    out = tmp_path / "data"
    assert dataset.main(["import-raven", str(tables), str(audio), str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "species.csv").read_text() == "species_id,name\n0,bird\n1,frog\n"
    tp = (out / "train_tp.csv").read_text().splitlines()
    assert tp == ["recording_id,species_id,songtype_id,t_min,f_min,t_max,f_max", "site1,1,1,1.0,500.0,2.5,900.0",
                  "site1,0,1,4.0,2000.0,5.0,4000.0", "site2,1,1,0.5,500.0,1.5,900.0"]
    fp = (out / "train_fp.csv").read_text().splitlines()[1:]  # the noise box holds neither species
    assert fp == ["site1,0,1,6.0,100.0,7.0,8000.0", "site1,1,1,6.0,100.0,7.0,8000.0"]
    assert (out / "train" / "site1.wav").resolve() == (audio / "site1.wav").resolve()
    data, problems = data_folder.scan(out, 2, 48000)
    assert problems == [] and len(data.tp) == 3 and len(data.fp) == 2
    assert data_folder.species_names(out) == {0: "bird", 1: "frog"}


@pytest.mark.parametrize("tables, extra, message", [
    ({"a": "1|Spectrogram 1|1|1.0|2.0|500|900|frog\n1|Spectrogram 1|1|3.0|4.0|500|900|frog\n"}, [],
     "a.Table.1.selections.txt: selection 1 appears twice in one view (lines 2, 3)"),
    ({"a": "1|Spectrogram 1|1|8.0|12.5|500|900|frog\n"}, [],
     "a.Table.1.selections.txt line 2: ends at 12.5 s, past the end of a.wav (10.00 s)"),
    ({"a": "1|Spectrogram 1|1|1.0|2.0|500|900|toad\n"}, ["--species-map", "MAP"],
     "a.Table.1.selections.txt line 2: species 'toad' is not in"),
    ({"a": "1|Spectrogram 1|1|1.0|2.0|500|900|frog\n"}, ["--label-column", "Annotation"],
     "a.Table.1.selections.txt: no column 'Annotation'"),
])
def test_import_raven_refuses_bad_tables_in_one_line(tmp_path, capsys, tables, extra, message):
    folder, audio = raven_folder(tmp_path, tables)
    species_map = tmp_path / "map.csv"
    species_map.write_text("species_id,name\n0,frog\n")
    argv = ["import-raven", str(folder), str(audio), str(tmp_path / "out"), *[species_map if a == "MAP" else a for a in extra]]
    assert dataset.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()


def test_import_raven_needs_the_audio_and_a_new_folder(tmp_path, capsys):
    folder, audio = raven_folder(tmp_path, {"a": "1|Spectrogram 1|1|1.0|2.0|500|900|frog\n"})
    (audio / "a.wav").unlink()
    assert dataset.main(["import-raven", str(folder), str(audio), str(tmp_path / "out")]) == 2
    assert f"no audio file a.flac or a.wav in {audio}" in capsys.readouterr().err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert dataset.main(["import-raven", str(folder), str(audio), str(tmp_path / "full")]) == 2
    assert "full: not empty; give a new folder" in capsys.readouterr().err
