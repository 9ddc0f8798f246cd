"""Scores over time, detections, Raven selection tables and event-level precision and recall."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rfcx_mlops.config import DetectConfig
from rfcx_mlops.data import raven
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.infer import detect


def test_a_stretch_scores_what_every_window_around_it_agrees_on():
    starts = np.array([0.0, 2.5, 5.0])
    scores = np.array([[0.9, 0.2], [0.8, 0.7], [0.1, 0.6]], np.float32)
    line = detect.timeline(starts, 5.0, scores)
    np.testing.assert_allclose(line.edges, [0.0, 2.5, 5.0, 7.5, 10.0])
    np.testing.assert_allclose(line.scores[:, 0], [0.9, 0.8, 0.1, 0.1])
    np.testing.assert_allclose(line.scores[:, 1], [0.2, 0.2, 0.6, 0.6])
    found = detect.events(line, np.array([0.5, 0.5]), min_gap=0.0)
    assert found.values.tolist() == [[0, 0.0, 5.0, pytest.approx(0.9)], [1, 5.0, 10.0, pytest.approx(0.6)]]


def test_windows_further_apart_than_a_crop_leave_unscored_gaps():
    line = detect.timeline(np.array([0.0, 10.0]), 5.0, np.array([[0.9], [0.9]], np.float32))
    np.testing.assert_allclose(line.edges, [0.0, 5.0, 10.0, 15.0])
    np.testing.assert_allclose(line.scores[:, 0], [0.9, 0.0, 0.9])


@pytest.mark.parametrize("min_gap, expected", [(1.0, [(0.0, 1.0), (2.0, 3.0)]), (1.0001, [(0.0, 3.0)])])
def test_events_join_across_short_gaps(min_gap, expected):
    line = detect.Timeline(np.array([0.0, 1.0, 2.0, 3.0]), np.array([[0.7], [0.2], [0.9]], np.float32))
    found = detect.events(line, np.array([0.5]), min_gap=min_gap)
    assert list(zip(found["t_start"], found["t_end"])) == expected
    assert found["score"].max() == pytest.approx(0.9)


def test_per_species_thresholds():
    line = detect.Timeline(np.array([0.0, 1.0]), np.array([[0.4, 0.4]], np.float32))
    assert detect.events(line, np.array([0.3, 0.5]), 0.0)["species_id"].tolist() == [0]


def test_species_bands_come_from_the_labelled_calls():
    tp = pd.DataFrame({"species_id": [1, 1, 3], "f_min": [500.0, 400.0, 2000.0], "f_max": [900.0, 1000.0, 3000.0]})
    table = detect.species_table(tp, 4, 50.0, 15000.0, {1: "frog"})
    assert table.values.tolist() == [[0, "s0", 50.0, 15000.0], [1, "frog", 400.0, 1000.0], [2, "s2", 50.0, 15000.0],
                                     [3, "s3", 2000.0, 3000.0]]


def test_event_precision_and_recall_by_hand():
    found = pd.DataFrame({"recording_id": ["a", "a", "a", "b"], "species_id": [0, 0, 1, 0],
                          "t_start": [0.0, 20.0, 0.0, 5.0], "t_end": [5.0, 25.0, 5.0, 10.0]})
    calls = pd.DataFrame({"recording_id": ["a", "a", "a", "b"], "species_id": [0, 0, 1, 1],
                          "t_min": [1.0, 3.0, 30.0, 6.0], "t_max": [2.0, 4.0, 31.0, 7.0]})
    # a/0: the first detection holds both calls, the second none; a/1 misses its call; b's detection is of
    # the wrong species (b's call is species 1)
    table = detect.event_scores(found, calls, 2).set_index("species_id")
    assert table.loc[0, ["detections", "right", "calls", "found"]].tolist() == [3, 1, 2, 2]
    assert table.loc[1, ["detections", "right", "calls", "found"]].tolist() == [1, 0, 2, 0]
    assert table.loc["all", "precision"] == pytest.approx(1 / 4) and table.loc["all", "recall"] == pytest.approx(2 / 4)
    assert table.loc[0, "recall"] == 1.0 and table.loc[1, "precision"] == 0.0


def test_a_written_selection_table_reads_back_into_the_same_boxes(tmp_path):
    rows = pd.DataFrame({"recording_id": "rec", "species_id": [3, 12], "t_start": [1.25, 40.0],
                         "t_end": [3.75, 42.5], "f_low": [562.5, 2531.25], "f_high": [3281.25, 10687.5],
                         "score": [0.91, 0.55]})
    path = raven.write_raven(rows, tmp_path / f"rec{raven.RAVEN_SUFFIX}", {3: "Eleutherodactylus"})
    header = path.read_text().splitlines()[0].split("\t")
    assert header == raven.RAVEN_COLUMNS
    back = raven.read_raven(path)
    assert back["label"].tolist() == ["Eleutherodactylus", "s12"]
    np.testing.assert_allclose(back[["t_start", "t_end", "f_low", "f_high"]], rows[["t_start", "t_end", "f_low", "f_high"]])


def test_an_audacity_label_track_holds_each_detection_and_its_band(tmp_path):
    rows = pd.DataFrame({"recording_id": "rec", "species_id": [3, 12], "t_start": [1.25, 40.0], "t_end": [3.75, 42.5],
                         "f_low": [562.5, 2531.25], "f_high": [3281.25, 10687.5], "score": [0.914, 0.55]})
    path = raven.write_audacity(rows, tmp_path / f"rec{raven.AUDACITY_SUFFIX}", {3: "Eleutherodactylus"})
    assert path.read_text() == ("1.250000\t3.750000\tEleutherodactylus 0.91\n\\\t562.500\t3281.250\n"
                                "40.000000\t42.500000\ts12 0.55\n\\\t2531.250\t10687.500\n")
    assert raven.write_audacity(rows.iloc[:0], tmp_path / "none.txt").read_text() == ""


def _table(tmp_path, text):
    path = tmp_path / "t.txt"
    path.write_text(text.replace("|", "\t"))
    return path


HEAD = "Selection|View|Channel|Begin Time (s)|End Time (s)|Low Freq (Hz)|High Freq (Hz)|Species\n"


def test_one_row_per_selection_where_raven_lists_each_view(tmp_path):
    path = _table(tmp_path, HEAD + "1|Waveform 1|1|1.0|2.0|500|900|a\n1|Spectrogram 1|1|1.0|2.0|500|900|a\n"
                                   "2|Spectrogram 1|1|5.0|6.0|500|900|b\n")
    assert raven.read_raven(path)["selection"].tolist() == ["1", "2"]


@pytest.mark.parametrize("text, message", [
    ("Selection|Begin Time (s)|End Time (s)|Species\n1|1|2|a\n", "no column 'Low Freq (Hz)', 'High Freq (Hz)'"),
    (HEAD + "1|Spectrogram 1|1|1.0|2.0|500|900|a\n1|Spectrogram 1|1|3.0|4.0|500|900|a\n",
     "selection 1 appears twice in one view (lines 2, 3)"),
    (HEAD + "1|Spectrogram 1|1|1.0|x|500|900|a\n", "line 2: End Time (s) is not a number"),
    (HEAD + "1|Spectrogram 1|1|2.0|1.0|500|900|a\n", "line 2: the box must have 0 <= begin < end time"),
])
def test_bad_selection_tables_are_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(raven.RavenError, match=None) as caught:
        raven.read_raven(_table(tmp_path, text))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert str(tmp_path / "t.txt") in str(caught.value)


def test_the_label_column_is_a_choice(tmp_path):
    path = _table(tmp_path, HEAD.replace("Species", "Annotation") + "1|Spectrogram 1|1|1.0|2.0|500|900| frog \n")
    assert raven.read_raven(path, "Annotation")["label"].tolist() == ["frog"]
    with pytest.raises(raven.RavenError, match="no column 'Species'"):
        raven.read_raven(path)


def test_a_thresholds_file_sets_the_species_it_lists(tmp_path):
    path = tmp_path / "thresholds.csv"
    path.write_text("species_id,threshold\n3,0.8\n0,0.1\n")
    got = detect.thresholds(DetectConfig(threshold=0.4, thresholds_file=str(path)), 5)
    np.testing.assert_allclose(got, [0.1, 0.4, 0.4, 0.8, 0.4])
    np.testing.assert_allclose(detect.thresholds(DetectConfig(), 2), [0.5, 0.5])


@pytest.mark.parametrize("text, message", [
    ("species,threshold\n1,0.5\n", "the header must be species_id,threshold"),
    ("species_id,threshold\n1,high\n", "line 2: species_id must be an integer and threshold a number"),
    ("species_id,threshold\n1,0.5\n1,0.6\n", "line 3: species_id must be a new id within 0..4"),
    ("species_id,threshold\n7,0.5\n", "line 2: species_id must be a new id"),
    ("species_id,threshold\n1,1.5\n", "threshold within [0, 1]; got 1,1.5"),
])
def test_bad_thresholds_files_are_refused_in_one_line(tmp_path, text, message):
    path = tmp_path / "thresholds.csv"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        detect.thresholds(DetectConfig(thresholds_file=str(path)), 5)
    assert message in str(caught.value) and str(path) in str(caught.value)
    with pytest.raises(ConfigError, match="is not a file"):
        detect.thresholds(DetectConfig(thresholds_file=str(tmp_path / "none.csv")), 5)
