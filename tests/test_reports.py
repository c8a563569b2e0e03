"""Tests for trec_accel.reports (metrics, text report, plots, JSON helpers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support

from trec_accel.reports import (
    compute_metrics,
    format_report,
    plot_confusion_matrix,
    plot_training_curves,
    write_json,
    write_jsonl,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------
# Hand-worked example: labels A=0, B=1, C=2, 8 items.
#
#   gold: A A A A B B B C      supports: A=4, B=3, C=1
#   pred: A A A B B C C C
#
# Confusion matrix (rows = gold, cols = pred):
#          A  B  C
#     A  [ 3, 1, 0 ]
#     B  [ 0, 1, 2 ]
#     C  [ 0, 0, 1 ]
#
# accuracy = (3 + 1 + 1) / 8 = 5/8 = 0.625
#
# precision = diag / column sum:  A 3/3 = 1,   B 1/2,   C 1/3
# recall    = diag / row sum:     A 3/4,       B 1/3,   C 1/1 = 1
# f1 = 2PR/(P+R):
#   A: 2*1*(3/4) / (1 + 3/4)       = (3/2)/(7/4) = 6/7
#   B: 2*(1/2)*(1/3) / (1/2 + 1/3) = (1/3)/(5/6) = 2/5
#   C: 2*(1/3)*1 / (1/3 + 1)       = (2/3)/(4/3) = 1/2
# per-class accuracy = correct/support = A 3/4, B 1/3, C 1/1
#
# macro f1    = (6/7 + 2/5 + 1/2) / 3 = (60 + 28 + 35)/70 / 3 = 123/210 = 41/70
# weighted f1 = (4*6/7 + 3*2/5 + 1*1/2) / 8 = (240 + 84 + 35)/70 / 8 = 359/560
# macro precision    = (1 + 1/2 + 1/3) / 3 = 11/18
# macro recall       = (3/4 + 1/3 + 1) / 3 = (9 + 4 + 12)/12 / 3 = 25/36
# weighted precision = (4*1 + 3*1/2 + 1*1/3) / 8 = (35/6)/8 = 35/48
# weighted recall    = (4*3/4 + 3*1/3 + 1*1) / 8 = 5/8 (= accuracy)
# --------------------------------------------------------------------------
LABELS3 = ["A", "B", "C"]
GOLD = [0, 0, 0, 0, 1, 1, 1, 2]
PRED = [0, 0, 0, 1, 1, 2, 2, 2]
CM3 = [[3, 1, 0], [0, 1, 2], [0, 0, 1]]
PER_CLASS3 = {
    "A": {"precision": 1.0, "recall": 3 / 4, "f1": 6 / 7, "support": 4, "accuracy": 3 / 4},
    "B": {"precision": 1 / 2, "recall": 1 / 3, "f1": 2 / 5, "support": 3, "accuracy": 1 / 3},
    "C": {"precision": 1 / 3, "recall": 1.0, "f1": 1 / 2, "support": 1, "accuracy": 1.0},
}


def _check_per_class(actual, expected):
    for name, exp in expected.items():
        got = actual[name]
        assert set(got) == {"precision", "recall", "f1", "support", "accuracy"}
        assert got["support"] == exp["support"]
        assert isinstance(got["support"], int)
        for k in ("precision", "recall", "f1", "accuracy"):
            assert got[k] == pytest.approx(exp[k]), (name, k)


def test_hand_worked_example():
    m = compute_metrics(GOLD, PRED, LABELS3)
    assert m["n"] == 8
    assert m["labels"] == LABELS3
    assert m["present_labels"] == LABELS3
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["macro_f1"] == pytest.approx(41 / 70)
    assert m["weighted_f1"] == pytest.approx(359 / 560)
    assert m["macro_precision"] == pytest.approx(11 / 18)
    assert m["macro_recall"] == pytest.approx(25 / 36)
    assert m["weighted_precision"] == pytest.approx(35 / 48)
    assert m["weighted_recall"] == pytest.approx(5 / 8)
    assert m["confusion_matrix"] == CM3
    assert list(m["per_class"]) == LABELS3
    _check_per_class(m["per_class"], PER_CLASS3)


def test_json_serialisable_plain_types():
    # numpy inputs must still produce plain python types
    m = compute_metrics(np.array(GOLD), np.array(PRED), LABELS3)
    assert json.loads(json.dumps(m)) == m
    assert all(type(v) is int for row in m["confusion_matrix"] for v in row)
    assert type(m["accuracy"]) is float


def test_label_absent_from_gold_and_pred():
    # Same data, plus a 4th label D that never occurs anywhere.
    labels = LABELS3 + ["D"]
    m = compute_metrics(GOLD, PRED, labels)
    # D is excluded from the averages: macro f1 is still 41/70
    # (NOT (6/7 + 2/5 + 1/2 + 0)/4 = 123/280).
    assert m["macro_f1"] == pytest.approx(41 / 70)
    assert m["weighted_f1"] == pytest.approx(359 / 560)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["present_labels"] == LABELS3
    # ...but per_class and the matrix still list every label.
    assert m["labels"] == labels
    assert list(m["per_class"]) == labels
    assert m["per_class"]["D"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0, "accuracy": 0.0}
    _check_per_class(m["per_class"], PER_CLASS3)
    assert m["confusion_matrix"] == [r + [0] for r in CM3] + [[0, 0, 0, 0]]


def test_label_only_predicted_counts_in_macro():
    # gold: A A B ; pred: A D B ; labels A B C D. C absent, D predicted-only.
    # A: P=1/1, R=1/2, F1=2/3 ; B: 1,1,1 ; D: P=0/1=0, R=0/0->0, F1=0
    # macro f1 over present {A,B,D} = (2/3 + 1 + 0)/3 = 5/9
    # weighted f1 = (2*2/3 + 1*1 + 0*0)/3 = (7/3)/3 = 7/9
    m = compute_metrics([0, 0, 1], [0, 3, 1], ["A", "B", "C", "D"])
    assert m["present_labels"] == ["A", "B", "D"]
    assert m["macro_f1"] == pytest.approx(5 / 9)
    assert m["weighted_f1"] == pytest.approx(7 / 9)
    assert m["per_class"]["D"]["support"] == 0
    assert m["per_class"]["D"]["accuracy"] == 0.0
    assert m["confusion_matrix"][0] == [1, 0, 0, 1]


@pytest.mark.parametrize("seed", range(20))
def test_metrics_are_sklearns(seed):
    """compute_metrics gives scikit-learn's numbers, exactly, on random data where labels 0-6 are gold, 0-4 and 7-8
    predicted (5-6 only gold, 7-8 only predicted) and 9 never occurs."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    gold = rng.integers(0, 7, n)
    pred = np.where(rng.random(n) < 0.5, gold, rng.choice([0, 1, 2, 3, 4, 7, 8], n))
    labels = [f"L{i}" for i in range(10)]
    m = compute_metrics(gold, pred, labels)
    present = sorted(set(gold.tolist()) | set(pred.tolist()))
    assert m["present_labels"] == [labels[i] for i in present]
    assert m["accuracy"] == accuracy_score(gold, pred)
    assert m["confusion_matrix"] == confusion_matrix(gold, pred, labels=range(10)).tolist()
    per_label = precision_recall_fscore_support(gold, pred, labels=range(10), average=None, zero_division=0)
    for key, values in zip(("precision", "recall", "f1", "support"), per_label):
        assert [m["per_class"][name][key] for name in labels] == values.tolist(), key
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(gold, pred, labels=present, average=average, zero_division=0)
        assert (m[f"{average}_precision"], m[f"{average}_recall"], m[f"{average}_f1"]) == (p, r, f), average


@pytest.mark.parametrize(
    "gold,pred,labels",
    [
        ([0, 1], [0], ["A", "B"]),  # length mismatch
        ([], [], ["A"]),  # empty
        ([0, 2], [0, 1], ["A", "B"]),  # gold id out of range
        ([0, 1], [0, -1], ["A", "B"]),  # pred id out of range
    ],
)
def test_invalid_inputs(gold, pred, labels):
    with pytest.raises(ValueError):
        compute_metrics(gold, pred, labels)


def test_format_report_lines():
    labels = LABELS3 + ["D"]
    m = compute_metrics(GOLD, PRED, labels)
    text = format_report(m)
    lines = text.splitlines()
    assert lines[0] == "Accuracy: 0.625"
    assert "Accuracy for label A: 0.750" in lines
    assert "Accuracy for label B: 0.333" in lines
    assert "Accuracy for label C: 1.000" in lines
    assert not any(l.startswith("Accuracy for label D") for l in lines)  # support 0 skipped
    assert "Classification Report:" in lines
    assert "Confusion Matrix:" in lines
    # table rows
    assert any(l.split() == ["A", "1.000", "0.750", "0.857", "4"] for l in lines)
    assert any(l.split() == ["accuracy", "0.625", "8"] for l in lines)
    assert any(l.split() == ["macro", "avg", "0.611", "0.694", "0.586", "8"] for l in lines)
    assert any(l.split() == ["weighted", "avg", "0.729", "0.625", "0.641", "8"] for l in lines)
    # confusion matrix with headers (D omitted, and said so)
    i = lines.index("Confusion Matrix:")
    assert lines[i + 1].split() == ["gold", "\\", "pred", "A", "B", "C"]
    assert lines[i + 2].split() == ["A", "3", "1", "0"]
    assert lines[i + 3].split() == ["B", "0", "1", "2"]
    assert lines[i + 4].split() == ["C", "0", "0", "1"]
    assert "D" in lines[-1] and "omitted" in lines[-1]

    full = format_report(m, all_labels=True)
    i = full.splitlines().index("Confusion Matrix:")
    assert full.splitlines()[i + 1].split()[-1] == "D"


def test_format_report_table_matches_sklearn():
    labels = LABELS3 + ["D"]
    m = compute_metrics(GOLD, PRED, labels)
    for digits in (2, 3):
        expected = classification_report(
            GOLD, PRED, labels=[0, 1, 2], target_names=LABELS3, digits=digits, zero_division=0
        )
        text = format_report(m, digits=digits)
        assert expected.rstrip("\n") in text


def _fine_example(seed=0):
    rng = np.random.default_rng(seed)
    labels = [f"C{i:02d}:fine{i}" for i in range(50)]
    used = np.arange(42)  # 8 labels never occur, as in the TREC fine test set
    gold = rng.choice(used, size=500)
    pred = np.where(rng.random(500) < 0.8, gold, rng.choice(used, size=500))
    return gold, pred, labels


def test_fine_50_labels_report():
    gold, pred, labels = _fine_example()
    m = compute_metrics(gold, pred, labels)
    assert len(m["per_class"]) == 50
    assert len(m["confusion_matrix"]) == 50 and all(len(r) == 50 for r in m["confusion_matrix"])
    assert len(m["present_labels"]) == 42
    assert sum(map(sum, m["confusion_matrix"])) == 500
    text = format_report(m)
    assert "8 label(s) absent" in text


def _assert_png(path):
    assert path.exists()
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == PNG_MAGIC


def test_plot_confusion_matrix_6_labels(tmp_path):
    labels = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 6, size=200)
    pred = np.where(rng.random(200) < 0.9, gold, rng.integers(0, 6, size=200))
    m = compute_metrics(gold, pred, labels)
    out = tmp_path / "sub" / "cm6.png"
    plot_confusion_matrix(m, out)
    _assert_png(out)
    assert [p.name for p in out.parent.iterdir()] == ["cm6.png"]  # no temp files left


@pytest.mark.parametrize("drop_absent", [None, False, True])
def test_plot_confusion_matrix_50_labels(tmp_path, drop_absent):
    gold, pred, labels = _fine_example()
    m = compute_metrics(gold, pred, labels)
    out = tmp_path / f"cm50_{drop_absent}.png"
    plot_confusion_matrix(m, out, drop_absent=drop_absent)
    _assert_png(out)


def test_plot_confusion_matrix_from_json_roundtrip(tmp_path):
    m = compute_metrics(GOLD, PRED, LABELS3)
    write_json(m, tmp_path / "m.json")
    m2 = json.loads((tmp_path / "m.json").read_text())
    plot_confusion_matrix(m2, tmp_path / "cm.png")
    _assert_png(tmp_path / "cm.png")
    assert format_report(m2) == format_report(m)


FULL_HISTORY = [
    {"step": 10, "train/loss": 1.2, "train/lr": 2e-4},
    {"step": 20, "train/loss": 0.9, "train/lr": 1.8e-4},
    {"step": 20, "val/loss": 0.8, "val/accuracy": 0.91},
    {"step": 30, "train/loss": 0.7, "train/lr": 1.5e-4, "val/loss": 0.6, "val/accuracy": 0.93},
]


@pytest.mark.parametrize(
    "history",
    [
        FULL_HISTORY,
        [{"step": 1, "train/loss": 2.0}, {"step": 2, "train/loss": 1.5}],  # train only, no lr
        [{"step": 5, "val/accuracy": 0.5}],  # val only, single point
        [{"train/loss": 1.0}, {"train/loss": None}, {"train/loss": float("nan"), "val/loss": 0.5}],  # no steps
        [{"step": 1}, {"other": 3}],  # nothing plottable
        [],  # empty
    ],
    ids=["full", "train-only", "val-only", "no-steps", "no-metrics", "empty"],
)
def test_plot_training_curves(tmp_path, history):
    out = tmp_path / "curves.png"
    plot_training_curves(history, out)
    _assert_png(out)


def test_write_json_and_jsonl(tmp_path):
    obj = {"a": np.int64(3), "b": np.float32(0.5), "c": np.arange(3), "s": "é"}
    p = tmp_path / "d" / "x.json"
    write_json(obj, p)
    assert json.loads(p.read_text(encoding="utf-8")) == {"a": 3, "b": 0.5, "c": [0, 1, 2], "s": "é"}
    write_json({"v": 2}, p)  # overwrite
    assert json.loads(p.read_text()) == {"v": 2}

    rows = [{"i": i, "pred": "HUM"} for i in range(3)]
    q = tmp_path / "rows.jsonl"
    write_jsonl(rows, q)
    assert [json.loads(l) for l in q.read_text().splitlines()] == rows
    write_jsonl([], q)
    assert q.read_text() == ""
    # no temp files left behind
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d", "rows.jsonl"]
    assert [x.name for x in (tmp_path / "d").iterdir()] == ["x.json"]

    with pytest.raises(TypeError):
        write_json({"bad": object()}, tmp_path / "bad.json")
    assert not (tmp_path / "bad.json").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d", "rows.jsonl"]
