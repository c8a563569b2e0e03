"""scripts/evaluate.py end to end on the tiny model (CPU, gloo for several processes).

* The result does not depend on the number of processes: 1, 2 and 3 processes give the same
  predictions.jsonl (index order, preds, scores within 1e-4) and metrics.json, with 10 and 11 questions,
  zero-shot and with a 5-step adapter; every question appears exactly once.
* metrics.json has the documented keys and agrees with numbers recomputed from predictions.jsonl; the
  confusion-matrix plot, the printed report and the log line of the phases' seconds exist.
* eval.method=generate runs and counts the invalid answers.
* Bad input ends with a one-line `error:` and exit code 2.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, launch, needs_trec
from conftest import toy_data as _toy_fixture

CONFIG = str(ROOT / "configs" / "tiny.yaml")
LABELS = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def evaluate(data: Path, out: Path, *extra: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return launch("evaluate.py", ["--config", CONFIG, f"data.path={data}", "eval.split=test", f"output_dir={out}",
                                  *extra], nproc)


def read_predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def one_error_line(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit 2 and exactly one stderr line, `error: ...`, containing every needle."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """The conftest toy data (11 test questions), made once for the module."""
    return _toy_fixture.__wrapped__(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def adapter(toy, tmp_path_factory) -> Path:
    """A coarse adapter from a 5-step run of scripts/train.py."""
    out = tmp_path_factory.mktemp("train")
    ok(launch("train.py", ["--config", CONFIG, f"data.path={toy}", f"output_dir={out}", "train.max_steps=5",
                           "train.save_every=0", "train.log_every=5"]))
    assert (out / "adapter" / "adapter_config.json").is_file()
    return out / "adapter"


def assert_same_results(outs: list[Path], n: int) -> None:
    ref = read_predictions(outs[0])
    assert [r["index"] for r in ref] == list(range(n)), "a question was dropped, duplicated or reordered"
    ref_metrics = json.loads((outs[0] / "metrics.json").read_text())
    assert ref_metrics["n"] == n
    for out in outs[1:]:
        rows = read_predictions(out)
        assert [r["index"] for r in rows] == list(range(n)), out
        for a, b in zip(ref, rows):
            assert (a["text"], a["gold"], a["pred"]) == (b["text"], b["gold"], b["pred"]), (out, a, b)
            # Each question is scored in the same batch whatever the number of processes: the same numbers.
            assert a["scores"] == b["scores"], (out, a, b)
        assert json.loads((out / "metrics.json").read_text()) == ref_metrics, out


@pytest.mark.parametrize("n", [10, 11])
def test_zero_shot_independent_of_process_count(toy, tmp_path, n):
    outs = []
    for nproc in (1, 2, 3):
        out = tmp_path / f"p{nproc}"
        ok(evaluate(toy, out, f"eval.max_examples={n if n < 11 else 0}", nproc=nproc))
        outs.append(out)
    assert_same_results(outs, n)


def test_adapter_independent_of_process_count(toy, adapter, tmp_path):
    outs = []
    for nproc in (1, 2, 3):
        out = tmp_path / f"p{nproc}"
        ok(evaluate(toy, out, f"adapter={adapter}", "eval.batch_size=4", nproc=nproc))
        outs.append(out)
    assert_same_results(outs, 11)
    assert json.loads((outs[0] / "metrics.json").read_text())["adapter"] == str(adapter)


def test_metrics_and_reports(toy, tmp_path):
    out = tmp_path / "eval"
    r = ok(evaluate(toy, out))
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy", "macro_f1", "weighted_f1", "per_class", "confusion_matrix", "labels", "n", "model",
                "adapter", "task", "split"):
        assert key in metrics, key
    assert metrics["labels"] == LABELS
    assert (metrics["n"], metrics["model"], metrics["adapter"], metrics["task"], metrics["split"]) == \
        (11, "tiny-random-mistral", None, "coarse", "test")
    assert (out / "confusion_matrix.png").stat().st_size > 0
    assert "Accuracy" in r.stdout and "Confusion Matrix" in r.stdout
    # One log line says where the time after the imports went.
    assert re.search(r"INFO start-up: data [\d.]+ s, accelerator [\d.]+ s, model [\d.]+ s; scoring [\d.]+ s; "
                     r"reports [\d.]+ s$", r.stderr, re.M), r.stderr

    rows = read_predictions(out)
    gold = [r_["gold"] for r_ in rows]
    pred = [r_["pred"] for r_ in rows]
    assert all(p in LABELS for p in pred)
    for r_ in rows:  # the prediction is the best-scoring label
        assert r_["pred"] == max(r_["scores"], key=r_["scores"].get)
    assert metrics["accuracy"] == pytest.approx(sum(g == p for g, p in zip(gold, pred)) / len(rows))
    cm = [[sum(1 for g, p in zip(gold, pred) if g == a and p == b) for b in LABELS] for a in LABELS]
    assert metrics["confusion_matrix"] == cm
    f1s, supports = [], []
    for i, name in enumerate(LABELS):
        pc = metrics["per_class"][name]
        assert set(pc) == {"precision", "recall", "f1", "support", "accuracy"}
        tp, support, predicted = cm[i][i], sum(cm[i]), sum(row[i] for row in cm)
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        assert pc["support"] == support
        assert pc["precision"] == pytest.approx(precision)
        assert pc["recall"] == pytest.approx(recall)
        assert pc["accuracy"] == pytest.approx(recall)
        assert pc["f1"] == pytest.approx(f1)
        if support or predicted:  # averages run over labels present in gold or pred
            f1s.append(f1)
            supports.append(support)
    assert metrics["macro_f1"] == pytest.approx(sum(f1s) / len(f1s))
    assert metrics["weighted_f1"] == pytest.approx(sum(f * s for f, s in zip(f1s, supports)) / sum(supports))


def test_generate_method(toy, tmp_path):
    out = tmp_path / "gen"
    r = ok(evaluate(toy, out, "eval.method=generate", "eval.max_new_tokens=3", "eval.max_examples=5"))
    metrics = json.loads((out / "metrics.json").read_text())
    rows = read_predictions(out)
    assert [r_["index"] for r_ in rows] == list(range(5))
    assert all(r_["pred"] in LABELS + ["<invalid>"] for r_ in rows)
    assert all("generated" in r_ for r_ in rows)
    invalid = sum(r_["pred"] == "<invalid>" for r_ in rows)
    assert metrics["invalid"] == invalid and metrics["method"] == "generate"
    assert f"Answers that were not a valid label: {invalid} of 5" in r.stdout
    assert metrics["accuracy"] == pytest.approx(sum(r_["gold"] == r_["pred"] for r_ in rows) / 5)


# --------------------------------------------------------------------------- bad input


def test_missing_adapter_folder(toy, tmp_path):
    one_error_line(evaluate(toy, tmp_path / "o", f"adapter={tmp_path / 'nowhere'}"), "adapter folder not found")


def _copy_adapter(adapter: Path, dest: Path, **meta) -> Path:
    import shutil
    shutil.copytree(adapter, dest)
    m = json.loads((dest / "trec_accel.json").read_text())
    m.update(meta)
    (dest / "trec_accel.json").write_text(json.dumps(m))
    return dest


def test_adapter_of_another_base_model(toy, adapter, tmp_path):
    other = _copy_adapter(adapter, tmp_path / "other", model="smollm2-135m-instruct")
    one_error_line(evaluate(toy, tmp_path / "o", f"adapter={other}"), "smollm2-135m-instruct", "tiny-random-mistral")


def test_adapter_of_another_task(toy, adapter, tmp_path):
    # trained for coarse, evaluated for fine: the adapter check runs before the (coarse-labelled) data loads
    one_error_line(evaluate(toy, tmp_path / "o", f"adapter={adapter}", "data.task=fine"), "coarse task, not fine")
    fine = _copy_adapter(adapter, tmp_path / "fine", task="fine")
    one_error_line(evaluate(toy, tmp_path / "o2", f"adapter={fine}"), "fine task, not coarse")


def test_empty_split(toy, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(toy, data)
    (data / "test.jsonl").write_text("")
    one_error_line(evaluate(data, tmp_path / "o"), "test.jsonl", "no rows")


def test_unknown_split(toy, tmp_path):
    one_error_line(evaluate(toy, tmp_path / "o", "eval.split=dev"), "unknown split 'dev'")
    assert not (tmp_path / "o" / "metrics.json").exists()


@needs_trec
def test_real_trec_fine_test_split(tmp_path):
    """The original TREC_10.label test file, fine task: 50 labels, first 5 questions, on 2 processes."""
    out = tmp_path / "real"
    ok(evaluate(Path(os.environ["TREC_DATA_DIR"]), out, "data.task=fine", "eval.max_examples=5", nproc=2))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 5 and len(metrics["labels"]) == 50 and metrics["task"] == "fine"
    assert [r["index"] for r in read_predictions(out)] == list(range(5))
