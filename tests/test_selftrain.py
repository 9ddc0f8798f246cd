"""Self-training: pseudo-labels that never override the rows, batches shared between the rows and the teacher's
labels, soft targets down to the loss, out-of-fold labelling, and rounds with their lineage in a real MLflow store."""

from __future__ import annotations

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from conftest import ROOT, make_data_dir
from rfcx_mlops import config, selftrain as cli_selftrain
from rfcx_mlops.config import PseudoConfig
from rfcx_mlops.data import folder, folds
from rfcx_mlops.errors import ConfigError
from rfcx_mlops.infer import detect
from rfcx_mlops.learn import pseudo
from rfcx_mlops.learn.batches import SpectrogramBatches, make_samples, occurrences, targets, window_labels
from rfcx_mlops.track import report

TINY = {"features.n_mels": 32, "features.frames": 64, "features.n_fft": 512, "features.hop_length": 256,
        "data.crop_seconds": 2.0, "train.batch_size": 8, "augment.max_shift_seconds": 0.5}
N = 24
TESTS = ROOT / "tests"


@pytest.fixture
def data(tmp_path):
    rows = [(f"rec{i}", i % 5, 1, 1.0 + i % 4, 500.0, 2.0 + i % 4, 4000.0) for i in range(6)]
    d = folder.load(make_data_dir(tmp_path, rows, seconds=12.0), N, 48000)
    fp = pd.DataFrame([("rec0", 7, 1, 6.0, 500.0, 7.0, 4000.0)], columns=folder.COLUMNS)
    return d, fp


def scored(ids, starts, present: dict[tuple[int, int], float]) -> np.ndarray:
    """Window scores: 0.3 everywhere but where ``present`` says (window, species) -> score."""
    scores = np.full((len(starts), N), 0.3, np.float32)
    for (w, s), value in present.items():
        scores[w, s] = value
    return scores


def test_the_rows_win_over_the_teacher(data):
    d, fp = data
    ids, starts = np.array(["rec0"] * 3), np.array([0.0, 5.5, 9.0])
    # rec0: a train_tp call of species 0 at 1-2 s (window 0) and a train_fp row of species 7 at 6-7 s (window 1)
    scores = scored(ids, starts, {(0, 0): 0.1, (0, 3): 0.95, (1, 7): 0.99, (1, 4): 0.9, (2, 5): 0.5})
    known = window_labels(ids, starts, d.tp, fp, 2.0, N).known
    table = pseudo.table(ids, starts, scores, np.full(N, 0.8, np.float32), known, PseudoConfig(threshold=0.8))
    # The teacher's 0.1 for the labelled species 0 and its 0.99 for the verified-absent 7 are left out; window 2
    # has no new present species.
    assert set(zip(table["start"], table["species_id"])) == {(0.0, 3), (5.5, 4)}
    assert (table["target"] == 1.0).all()
    # Even a table that says otherwise (edited, or from elsewhere) cannot override them.
    edited = pd.concat([table, pd.DataFrame({"recording_id": ["rec0", "rec0"], "start": [0.0, 5.5],
                                             "species_id": [0, 7], "score": [0.0, 1.0], "target": [0.0, 1.0]})])
    s = pseudo.samples(edited, d.tp, fp, 2.0, N)
    assert s.pseudo.all() and list(s.starts) == [0.0, 5.5]
    assert s.labels[0, 0] == 1.0 and s.labels[0, 3] == 1.0 and s.known[0, 0]
    assert s.labels[1, 7] == 0.0 and s.known[1, 7] and s.labels[1, 4] == 1.0


def test_soft_targets_negatives_and_per_species_thresholds(data, tmp_path):
    d, fp = data
    ids, starts = np.array(["rec3"] * 2), np.array([6.0, 8.0])
    scores = scored(ids, starts, {(0, 2): 0.85, (0, 11): 0.05, (1, 2): 0.6})
    known = window_labels(ids, starts, d.tp, fp, 2.0, N).known
    soft = pseudo.table(ids, starts, scores, np.full(N, 0.8, np.float32), known,
                        PseudoConfig(mode="soft", threshold=0.8, negatives=0.1))
    assert soft["species_id"].tolist() == [2, 11]
    np.testing.assert_allclose(soft["target"], [0.85, 0.0], rtol=1e-6)
    s = pseudo.samples(soft, d.tp, fp, 2.0, N)
    assert s.labels[0, 2] == pytest.approx(0.85) and s.known[0, 11] and not s.known[0, 5]
    path = tmp_path / "t.csv"
    path.write_text("species_id,threshold\n2,0.5\n")
    thresholds = detect.thresholds(PseudoConfig(threshold=0.8, thresholds_file=str(path)), N)
    per_species = pseudo.table(ids, starts, scores, thresholds, known, PseudoConfig())
    assert list(zip(per_species["start"], per_species["species_id"])) == [(6.0, 2), (8.0, 2)]


def test_soft_targets_reach_the_loss_as_computed_by_hand(data):
    """A soft pseudo-label goes through the batches' targets into the model's own loss unchanged, for a sigmoid
    and for a softmax model, with and without mixup."""
    from rfcx_mlops.learn.model import build

    d, fp = data
    table = pd.DataFrame({"recording_id": ["rec3", "rec4"], "start": [7.0, 8.0], "species_id": [2, 6],
                          "score": [0.7, 0.9], "target": [0.7, 0.9]})
    for activation, mixup_p in (("sigmoid", 0.0), ("softmax", 0.0), ("sigmoid", 1.0)):
        cfg = config.load(None, {**TINY, "model.activation": activation, "augment.mixup_p": mixup_p,
                                 "model.dense_units": 8})
        samples = make_samples(d.tp, d.recordings, 2.0, N) + pseudo.samples(table, d.tp, fp, 2.0, N)
        batches = SpectrogramBatches(samples, d.recordings, cfg, training=True)
        x, y = batches[0]
        idx = [i for i, _ in batches._batch(0)]
        if not mixup_p:  # each row is its sample's targets: 0.7 and 0.9 where the teacher said so
            np.testing.assert_allclose(y, targets(samples.labels[idx], samples.known[idx], cfg.model))
            rows = {int(i): k for k, i in enumerate(idx)}
            assert y[rows[6], 2] == pytest.approx(0.7) and y[rows[7], 6] == pytest.approx(0.9)
        p = np.random.default_rng(0).uniform(0.05, 0.95, y.shape).astype(np.float32)
        if activation == "softmax":
            p /= p.sum(axis=1, keepdims=True)
            by_hand = np.mean(-(y * np.log(p)).sum(axis=1))
        else:
            by_hand = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
        model = build(cfg, len(batches))
        assert float(model.loss(keras.ops.convert_to_tensor(y), keras.ops.convert_to_tensor(p))) == \
            pytest.approx(by_hand, rel=1e-4)


def test_each_batch_shares_the_rows_and_the_pseudo_labels(data):
    d, fp = data
    table = pd.DataFrame({"recording_id": [f"rec{i % 6}" for i in range(20)], "start": [float(i // 6) for i in range(20)],
                          "species_id": 3, "score": 0.9, "target": 1.0})
    samples = make_samples(d.tp, d.recordings, 2.0, N) + pseudo.samples(table, d.tp, fp, 2.0, N)
    originals = int((~samples.pseudo).sum())
    for share, own in ((0.5, 4), (0.25, 2), (0.99, 7)):  # at least one window of each kind
        cfg = config.load(None, {**TINY, "pseudo.share": share})
        batches = SpectrogramBatches(samples, d.recordings, cfg, training=True)
        assert len(batches) == int(np.ceil(originals / 8))  # a student's epoch costs what its teacher's did
        for epoch in range(3):
            batches.set_epoch(epoch)
            for b in range(len(batches)):
                picked = np.array([i for i, _ in batches._batch(b)])
                assert len(picked) == 8 and (~samples.pseudo[picked]).sum() == own
    again = SpectrogramBatches(samples, d.recordings, cfg, training=True)
    np.testing.assert_array_equal(again.order, SpectrogramBatches(samples, d.recordings, cfg, training=True).order)


def test_repeats_count_earlier_occurrences():
    order = np.array([3, 1, 3, 0, 1, 3])
    assert occurrences(order).tolist() == [0, 0, 1, 0, 1, 2]
    passes = np.concatenate([np.random.default_rng(k).permutation(7) for k in range(3)])
    assert occurrences(passes).tolist() == [p // 7 for p in range(21)]  # whole passes: the pass number


def test_agreement_is_the_jaccard_index_of_present_labels():
    a = pd.DataFrame({"recording_id": ["r", "r", "r"], "start": [0.0, 1.0, 2.0], "species_id": [1, 1, 2],
                      "score": 0.9, "target": [1.0, 1.0, 0.0]})
    b = a.assign(target=[1.0, 0.0, 1.0])
    assert pseudo.agreement(a, b) == pytest.approx(1 / 3)
    assert pseudo.agreement(a, a) == 1.0


@pytest.mark.parametrize("override, says", [
    ({"pseudo.mode": "fuzzy"}, "pseudo.mode must be one of hard, soft"),
    ({"pseudo.threshold": "1.5"}, "pseudo.threshold must be within [0, 1]"),
    ({"pseudo.negatives": "0.9"}, "pseudo.negatives (0.9) must be below pseudo.threshold"),
    ({"pseudo.share": "0"}, "pseudo.share must be within (0, 1)"),
    ({"pseudo.share": "1"}, "pseudo.share must be within (0, 1)"),
    ({"pseudo.rounds": "0"}, "pseudo.rounds must be > 0"),
    ({"pseudo.patience": "0"}, "pseudo.patience must be > 0"),
    ({"pseudo.hop_seconds": "-1"}, "pseudo.hop_seconds must be >= 0"),
    ({"pseudo.per_call": "-1"}, "pseudo.per_call must be >= 0"),
    ({"pseudo.from_teacher": "maybe"}, "pseudo.from_teacher must be true or false"),
])
def test_bad_options_are_refused_in_one_line(override, says):
    with pytest.raises(ConfigError) as err:
        config.load(None, override)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_bad_thresholds_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"pseudo\.thresholds_file: .* is not a file"):
        config.check_files(config.load(None, {"pseudo.thresholds_file": str(tmp_path / "none.csv")}))
    bad = tmp_path / "bad.csv"
    bad.write_text("species_id,threshold\n30,0.5\n")
    with pytest.raises(ConfigError, match="bad.csv line 2: species_id must be a new id within 0..23"):
        detect.thresholds(PseudoConfig(thresholds_file=str(bad)), N)


def run_cli(capsys, *argv):
    code = cli_selftrain.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_command_line_errors_are_one_line(tracking, capsys, tmp_path):
    """Each before any data is read or model trained (no demo data is built in the working folder)."""
    with mlflow.start_run() as plain:
        pass
    bad = tmp_path / "bad.csv"
    bad.write_text("species_id,threshold\n30,0.5\n")
    for argv, says in [
        (["--teacher", "0" * 32, "--config", str(TESTS / "tiny.yaml")], "--teacher 000"),
        (["--resume", plain.info.run_id], "not a self-training run"),
        (["--resume", "0" * 32], "--resume 000"),
        (["--resume", plain.info.run_id, "--set", "pseudo.mode=soft"], "drop pseudo.mode"),
        (["--fold", "5", "--config", str(TESTS / "tiny.yaml")], "--fold 5"),
        (["--rounds", "x", "--config", str(TESTS / "tiny.yaml")], "--rounds x: pseudo.rounds must be an integer"),
        (["--config", str(TESTS / "tiny.yaml"), "--batch-size", "1"], "needs train.batch_size >= 2"),
        (["--config", str(TESTS / "tiny.yaml"), "--set", f"pseudo.thresholds_file={bad}"],
         "bad.csv line 2: species_id must be a new id"),
    ]:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and err.startswith("error: ") and says in err and err.count("\n") == 1, (argv, err)
    assert not (tmp_path / "data").exists()


def test_a_cross_validation_teacher_labels_out_of_fold(cv_run, tiny_data, monkeypatch, tmp_path):
    """No recording is labelled by a model that trained on it: each is labelled by the fold run that validated
    on it (its folds.csv says so), and the labels are that model's scores."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cv_run.tracking_uri)
    mlflow.set_tracking_uri(cv_run.tracking_uri)
    client = MlflowClient(cv_run.tracking_uri)
    cfg = config.load(TESTS / "tiny.yaml", {"data.data_dir": str(tiny_data), "train.epochs": 1})
    data = folder.load(tiny_data, N, 48000)
    assigned = folds.assign_folds(data.tp, cfg.folds.n_splits, cfg.seed)
    from rfcx_mlops.jobs import selftrain

    fold_of = dict(zip(data.tp["recording_id"], assigned.astype(int)))
    recordings = sorted(fold_of)
    plan = selftrain.labellers(client.get_run(cv_run.parent.info.run_id), fold_of, recordings)
    assert set(plan.values()) == {r.info.run_id for r in cv_run.folds}
    for run in cv_run.folds:
        split = pd.read_csv(client.download_artifacts(run.info.run_id, "folds.csv", str(tmp_path)))
        validated = set(split.loc[split["fold"] == int(run.data.tags["fold"]), "recording_id"])
        mine = {rid for rid, labeller in plan.items() if labeller == run.info.run_id}
        assert mine and mine <= validated
    single = cv_run.folds[0]
    assert set(selftrain.labellers(single, fold_of, recordings).values()) == {single.info.run_id}
    # A fold run teaches only its own fold's students: the other fold's validation recordings were its training.
    selftrain._check_teacher(cfg, 1, single.info.run_id)
    with pytest.raises(ConfigError, match="validated on fold 1, not on fold 2"):
        selftrain._check_teacher(cfg, 2, single.info.run_id)
    # Round 0 of a cross-validation teacher is scored as its run of the students' fold, as they are.
    assert selftrain._fold_run(client.get_run(cv_run.parent.info.run_id), 2).info.run_id == cv_run.folds[1].info.run_id


def test_rounds_their_lineage_and_a_resumed_self_training(tracking, tiny_data, capsys, tmp_path):
    """Teacher and one student, then resumed to a second student: each round trained once, each student tagged
    with its teacher's run and model and given its pseudo-labels as a dataset input, the parent's per-round
    figures right (pseudo-label precision recomputed here against train_calls.csv)."""
    tiny = str(TESTS / "tiny.yaml")
    thresholds = tmp_path / "thresholds.csv"  # pseudo-labels whatever one epoch taught: species 3 everywhere
    thresholds.write_text("species_id,threshold\n3,0.0\n")
    common = ["--config", tiny, "--data-dir", str(tiny_data), "--epochs", "1", "--set", "pseudo.threshold=1.0",
              "--set", f"pseudo.thresholds_file={thresholds}", "--set", "pseudo.patience=2"]
    code, out, err = run_cli(capsys, *common, "--rounds", "1")
    assert code == 0, err
    client = MlflowClient()
    parent = client.search_runs([mlflow.get_experiment_by_name("tests").experiment_id],
                                "tags.selftrain = 'true'")[0]
    assert f"self-training run {parent.info.run_id}: 1 student round(s)" in out
    code, out, err = run_cli(capsys, "--resume", parent.info.run_id, "--rounds", "2")
    assert code == 0, err
    assert "round 0 (run" in out and "finished before" in out and "round 2 (run" in out

    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_round = {}
    for run in children:
        assert run.data.tags["selftrain_round"] not in by_round, "a round trained twice"
        by_round[run.data.tags["selftrain_round"]] = run
    assert sorted(by_round) == ["0", "1", "2"] and {r.info.status for r in children} == {"FINISHED"}
    for number in (1, 2):
        student, teacher = by_round[str(number)], by_round[str(number - 1)]
        assert student.data.tags["teacher_run_id"] == teacher.info.run_id
        assert f"models:/{student.data.tags['teacher_model_id']}" == teacher.data.tags["model_uri"]
        inputs = [i for i in student.inputs.dataset_inputs if i.tags[0].value == "pseudo-labels"]
        assert len(inputs) == 1 and teacher.data.tags["model_uri"] in inputs[0].dataset.source
        table = pd.read_csv(client.download_artifacts(student.info.run_id, "pseudo_labels.csv", str(tmp_path)),
                            dtype={"recording_id": str})
        assert len(table) and set(table["recording_id"]) <= set(
            pd.read_csv(tiny_data / "train_tp.csv", dtype={"recording_id": str})["recording_id"])
        history = {m.step: m.value for m in client.get_metric_history(parent.info.run_id, "pseudo_precision")}
        assert history[number] == pytest.approx(precision_by_brute_force(table, tiny_data, 2.0))
    table = report.runs_table("tests").set_index("run_id")  # teacher -> student, row by row
    assert table.loc[by_round["2"].info.run_id, "teacher"] == by_round["1"].info.run_id[:8]
    assert table.loc[by_round["0"].info.run_id, "teacher"] == ""
    final = client.get_run(parent.info.run_id)
    for key in ("best_val_lwlrap", "test_lwlrap"):
        assert [m.step for m in client.get_metric_history(parent.info.run_id, key)] == [0, 1, 2]
    assert final.data.tags["best_run_id"] in {r.info.run_id for r in children}


def precision_by_brute_force(table: pd.DataFrame, data_dir, crop: float) -> float:
    calls = pd.read_csv(data_dir / "train_calls.csv", dtype={"recording_id": str})
    present = table[table["target"] > 0]
    right = 0
    for rid, start, species in zip(present["recording_id"], present["start"], present["species_id"]):
        mine = calls[(calls["recording_id"] == rid) & (calls["species_id"] == species)]
        right += bool(((mine["t_max"] > start) & (mine["t_min"] < start + crop)).any())
    return right / len(present)


def test_an_interrupted_round_goes_on_from_its_checkpoint(tracking, tmp_path):
    """Resuming finds the round's interrupted run where it has a checkpoint; without one the round starts anew."""
    from rfcx_mlops.jobs import selftrain
    from rfcx_mlops.track.checkpoints import CHECKPOINT_DIR

    with mlflow.start_run() as parent:
        with mlflow.start_run(nested=True, tags={"selftrain_round": "1"}) as early:
            pass
        mlflow.MlflowClient().set_terminated(early.info.run_id, "KILLED")
        assert selftrain._unfinished(parent.info.run_id, 1) is None
        with mlflow.start_run(nested=True, tags={"selftrain_round": "1"}) as later:
            (tmp_path / "last.keras").write_bytes(b"weights")
            mlflow.log_artifact(str(tmp_path / "last.keras"), CHECKPOINT_DIR)
        mlflow.MlflowClient().set_terminated(later.info.run_id, "KILLED")
        assert selftrain._unfinished(parent.info.run_id, 1) == later.info.run_id
        assert selftrain._unfinished(parent.info.run_id, 2) is None


def test_rounds_stop_when_the_monitored_metric_stalls():
    from rfcx_mlops.jobs.selftrain import Round, _stalled

    rounds = [Round(k, str(k), best) for k, best in enumerate([0.80, 0.85, 0.84, 0.83])]
    assert not _stalled(rounds[:2], patience=1)
    assert _stalled(rounds[:3], patience=1) and not _stalled(rounds[:3], patience=2)
    assert _stalled(rounds, patience=2)


def test_pseudo_label_precision_and_recall_against_every_call(tmp_path):
    """Recall counts every unlabelled call of the labelled recordings, also in one where the teacher found
    nothing; a call the rows label is not counted."""
    from rfcx_mlops.data.folder import Dataset
    from rfcx_mlops.jobs.selftrain import quality

    tp = pd.DataFrame([("a", 1, 1, 1.0, 500.0, 2.0, 4000.0)], columns=folder.COLUMNS)
    pd.DataFrame({"recording_id": ["a", "a", "a", "b", "b"], "species_id": [1, 2, 3, 2, 4],
                  "t_min": [1.0, 5.0, 9.0, 1.0, 6.0], "t_max": [2.0, 6.0, 10.0, 2.0, 7.0],
                  "f_min": 500.0, "f_max": 4000.0}).to_csv(tmp_path / "train_calls.csv", index=False)
    data = Dataset(tmp_path, tp, pd.DataFrame(columns=folder.COLUMNS), {}, {})
    labels = pd.DataFrame({"recording_id": ["a", "a", "a"], "start": [4.0, 8.0, 0.0], "species_id": [2, 2, 5],
                           "score": [0.96, 0.85, 0.9], "target": 1.0})
    table = quality(labels, ["a", "b"], data, 2.0, N).set_index("species_id")
    # right: (a, 4-6 s, 2); wrong: (a, 8-10 s, 2) and (a, 0-2 s, 5).  Calls: a/2, a/3, b/2, b/4 (a/1 is labelled).
    assert table.loc["all", "precision"] == pytest.approx(1 / 3) and table.loc["all", "recall"] == pytest.approx(1 / 4)
    assert table.loc["score 0.95-1", "precision"] == 1.0 and table.loc["score 0.8-0.9", "precision"] == 0.0


def test_each_species_keeps_its_most_confident_labels_in_proportion_to_its_calls():
    labels = pd.DataFrame({"recording_id": ["r"] * 6, "start": [0.0, 0.0, 2.5, 5.0, 7.5, 7.5],
                           "species_id": [1, 2, 1, 1, 1, 3], "score": [0.9, 0.05, 0.99, 0.95, 0.97, 0.02],
                           "target": [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]})
    kept = pseudo.balanced(labels, pd.Series({1: 1}), per_call=2.0)  # species 1: one labelled call, two labels
    assert list(zip(kept["start"], kept["species_id"])) == [(2.5, 1), (7.5, 1), (7.5, 3)]  # 0 s and 5 s lost it
    pd.testing.assert_frame_equal(pseudo.balanced(labels, pd.Series({1: 1}), per_call=0.0), labels)
    assert pseudo.balanced(labels, pd.Series(dtype=int), per_call=2.0).empty  # a species nobody labelled: none
