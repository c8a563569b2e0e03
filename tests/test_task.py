"""Tasks of one's own: task files and their errors, data with the task's labels, labels of any tokenization in
prompts, scoring and generation, and a custom task trained, evaluated and predicted from its adapter alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from trec_accel import cli
from trec_accel.batching import Encoder
from trec_accel.config import ConfigError, load_config
from trec_accel.data import DataError, Schema, load_splits, load_trec
from trec_accel.model import ModelLoadError, check_adapter
from trec_accel.scoring import match_label
from trec_accel.task import BUILTIN, COARSE, FINE, TaskError, load_task

# Six labels: several words, two that begin with the same word, one with non-ASCII letters.
LABELS = ["billing", "refund request", "account access", "account deletion", "Störung der Station", "app bug"]
TASK_YAML = """\
name: support
labels:
  - billing
  - name: refund request
    description: the customer wants money back
  - account access
  - account deletion
  - name: Störung der Station
    description: a station is broken
  - app bug
"""
TEXTS = {
    "billing": ["Why was I charged twice this month?", "My invoice shows a fee I do not know."],
    "refund request": ["I want my money back for the ride.", "Please refund the broken trip."],
    "account access": ["I cannot log in anymore.", "The verification code never arrives."],
    "account deletion": ["Delete my account please.", "Remove all my personal data."],
    "Störung der Station": ["Die Station nimmt das Rad nicht an.", "The dock at Main Street is dead."],
    "app bug": ["The app crashes when I open the map.", "The app shows the wrong balance."],
}


def write_task(folder: Path, text: str = TASK_YAML) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.yaml").write_text(text, encoding="utf-8")
    return folder / "task.yaml"


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- the task file


def test_task_file_labels_descriptions_and_written_instruction(tmp_path):
    task = load_task(str(write_task(tmp_path)))
    assert (task.name, task.labels) == ("support", tuple(LABELS))
    assert task.descriptions == (None, "the customer wants money back", None, None, "a station is broken", None)
    assert task.label_id("account deletion") == 3 and task.label_id("account") is None
    assert task.instruction == (
        "Classify the text into one of the following labels: 'billing', 'refund request' (the customer wants money "
        "back), 'account access', 'account deletion', 'Störung der Station' (a station is broken), 'app bug'.\n"
        "Answer with the label only.")
    # Its mapping is a task file of its own (what adapters record), and the config holds it once loaded.
    assert load_task(task.to_dict()) == task
    assert load_config(None, [f"data.task={write_task(tmp_path)}"]).data.task == task.to_dict()
    # The name defaults to the file's; an instruction given is used as is.
    other = tmp_path / "tickets.yaml"
    other.write_text("labels: [yes please, no thanks]\ninstruction: Is the customer happy?\n")
    assert load_task(str(other)) == load_task({"name": "tickets", "labels": ["yes please", "no thanks"],
                                               "instruction": "Is the customer happy?"})


def test_builtin_tasks_round_trip_and_keep_their_names():
    assert load_task("coarse") is COARSE and load_task("fine") is FINE and set(BUILTIN) == {"coarse", "fine"}
    assert load_task(COARSE.to_dict()) == COARSE and COARSE.spec() == "coarse"
    with pytest.raises(TaskError, match="the name 'fine' is the built-in TREC task's"):
        load_task({"name": "fine", "labels": ["a", "b"]})


@pytest.mark.parametrize("body, message", [
    ("labels: [billing, app bug, ' billing ']", "label 'billing' is given twice (labels 1 and 3)"),
    ("labels: [billing, '', app bug]", "label 2 is empty"),
    ("labels: [billing, {name: '  '}]", "label 2 is empty"),
    ("labels: [billing]", "a task needs at least 2 labels, got 1"),
    ("labels: []", "a task needs at least 2 labels, got 0"),
    ("labels: [billing, \"app\\nbug\"]", "label 2 ('app\\nbug') contains a line break"),
    ("labels: [a, b]\ncolour: red", "unknown key 'colour' (a task has name, instruction, labels)"),
    ("labels: [a, {name: b, note: c}]", "label 2 must be a name or a mapping with 'name'"),
    ("labels: a, b", "'labels' must be a list of label names"),
    ("labels: [a, b]\ninstruction: ''", "'instruction' must be a non-empty text"),
    ("- a\n- b", "expected a mapping with 'labels'"),
    ("labels: [a, b", "not valid YAML"),
])
def test_task_file_errors_name_the_file(tmp_path, body, message):
    path = write_task(tmp_path, body)
    with pytest.raises(TaskError) as err:
        load_task(str(path))
    assert str(err.value).startswith(f"task file {path}: ") and message in str(err.value)
    assert "\n" not in str(err.value)
    # A config naming it stops with the same line.
    with pytest.raises(ConfigError, match=f"task file {path}: "):
        load_config(None, [f"data.task={path}"])


def test_a_missing_task_file_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(lambda: load_config(None, ["data.task=tasks/support.yaml"])) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: data.task: 'tasks/support.yaml' is neither a built-in task (coarse, fine) nor a task file (no file "
        f"{tmp_path}/tasks/support.yaml; relative paths start at the working directory {tmp_path})"]


# --------------------------------------------------------------------------- data of a task


def test_labels_as_names_or_ids_and_own_columns(tmp_path):
    task = load_task(str(write_task(tmp_path)))
    write_rows(tmp_path / "train.jsonl", [{"message": t, "intent": label} for label, ts in TEXTS.items() for t in ts])
    (tmp_path / "test.csv").write_text("message,intent\nI was charged twice,0\nDie App stürzt ab,5\n"
                                       "Mein Konto ist gesperrt,account access\n", encoding="utf-8")
    splits = load_splits(str(tmp_path), Schema(task, "message", "intent"), val_fraction=0.25)
    assert {k: len(v) for k, v in splits.items()} == {"train": 9, "validation": 3, "test": 3}
    assert [task.labels[e.label] for e in splits["test"]] == ["billing", "app bug", "account access"]
    everything = splits["train"] + splits["validation"]
    assert sorted((e.text, task.labels[e.label]) for e in everything) == \
        sorted((t, label) for label, ts in TEXTS.items() for t in ts)
    # A label whose name is a number is that label; other numbers are ids.
    stars = load_task({"labels": ["1", "2", "5"]})
    rows = write_rows(tmp_path / "stars.jsonl", [{"text": "ok", "label": "5"}, {"text": "bad", "label": 1}])
    assert [e.label for e in load_trec(str(rows), stars)["train"]] == [2, 1]


def test_labels_not_in_the_task_and_missing_columns_name_file_and_line(tmp_path, capsys):
    task = load_task(str(write_task(tmp_path)))
    path = write_rows(tmp_path / "train.jsonl", [
        {"text": "Why was I charged twice?", "label": "billing"},
        {"text": "Refund please", "label": "refund"},          # not a label of the task
        {"text": "Where is my bike?", "label": 6},               # ids are 0..5
        {"text": " ", "label": "app bug"},
        {"message": "no text column", "label": "app bug"},
    ])
    with pytest.raises(DataError) as err:
        load_trec(str(path), task)
    assert str(err.value) == (
        f"4 bad rows in the data: {path}:2: unknown support label 'refund'; {path}:3: unknown support label id 6 "
        f"(expected 0..5); {path}:4: empty text; {path}:5: missing column 'text'")
    assert cli.main(lambda: load_trec(str(path), task)) == 2
    assert capsys.readouterr().err == f"error: {err.value}\n"
    csv = tmp_path / "train.csv"
    csv.write_text("text,category\nhello,billing\n")
    with pytest.raises(DataError, match=r"train\.csv: missing column 'label'; found columns \['text', 'category'\] "
                                        r"\(set data.text_column and data.label_column"):
        load_trec(str(csv), task)
    with pytest.raises(DataError, match="TREC's .label files hold the built-in coarse and fine labels"):
        (tmp_path / "train_5500.label").write_text("HUM:ind Who wrote Hamlet ?\n")
        load_trec(str(tmp_path), task)


# --------------------------------------------------------------------------- labels of any tokenization


@pytest.mark.parametrize("template", ["notebook", "chat"])
def test_training_targets_are_the_scored_candidates(tokenizer, tmp_path, template):
    task = load_task(str(write_task(tmp_path)))
    enc = Encoder(tokenizer, task, template)
    assert enc.candidates[2][0] == enc.candidates[3][0]  # "account access" and "account deletion"
    assert len(enc.trie.tokens) < sum(len(c) - 1 for c in enc.candidates)  # ... share that node in the trie
    for k, name in enumerate(LABELS):
        assert tokenizer.decode(enc.candidates[k], skip_special_tokens=True).strip() == name
        for text in ("Why was I charged twice?", "Die Station ist kaputt!", "a"):
            e = enc.encode(text, k)
            assert e.label_ids == enc.candidates[k]
            assert e.prompt_ids + e.label_ids == tokenizer(enc.prompt(text, k).text)["input_ids"]
    assert enc.longest_label == max(len(c) for c in enc.candidates)


def test_generated_answers_take_the_longest_label_found_first():
    labels = ["access", "account access", "account", "refund request", "request", "Störung der Station"]
    assert match_label(" account access", labels) == 1
    assert match_label("account", labels) == 2
    assert match_label("Label: refund request.", labels) == 3
    assert match_label("request", labels) == 4
    assert match_label("Störung der Station\n", labels) == 5
    assert match_label("no idea", labels) == -1


def test_confusion_matrix_of_hundreds_of_long_labels(tmp_path):
    from PIL import Image

    from trec_accel.reports import compute_metrics, format_report, plot_confusion_matrix
    labels = [f"Kategorie {i:03d} – eine ziemlich lange Beschreibung der Klasse" for i in range(300)]
    metrics = compute_metrics(list(range(300)), [(i * 7) % 300 for i in range(300)], labels)
    plot_confusion_matrix(metrics, tmp_path / "cm.png")
    assert max(Image.open(tmp_path / "cm.png").size) <= 40 * 120 + 200
    assert f"Accuracy for label {labels[0]}: 1.000" in format_report(metrics)


# --------------------------------------------------------------------------- a custom task end to end


def run_script(script: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_custom_task_trains_evaluates_and_predicts_from_its_adapter_alone(tmp_path):
    data = tmp_path / "support"
    task = load_task(str(write_task(data)))
    rows = [{"text": f"{t} ({i})", "label": label} for i in range(3) for label, ts in TEXTS.items() for t in ts]
    write_rows(data / "train.jsonl", rows)
    write_rows(data / "test.jsonl", [{"text": t, "label": label} for label, ts in TEXTS.items() for t in ts])
    run = tmp_path / "run"
    common = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"data.path={data}"]
    ok(run_script("train.py", *common, f"data.task={data / 'task.yaml'}", f"output_dir={run}", "train.max_steps=3",
                  "train.save_every=0", "train.log_every=3"))
    adapter = run / "adapter"
    assert json.loads((adapter / "trec_accel.json").read_text(encoding="utf-8"))["task"] == task.to_dict()

    out = tmp_path / "eval"
    r = ok(run_script("evaluate.py", *common, f"data.task={data / 'task.yaml'}", f"adapter={adapter}",
                      f"output_dir={out}", "eval.max_examples=0"))
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert (metrics["task"], metrics["labels"], metrics["n"]) == ("support", LABELS, 12)
    assert sum(map(sum, metrics["confusion_matrix"])) == 12 and (out / "confusion_matrix.png").stat().st_size > 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [p["gold"] for p in predictions] == [label for label, ts in TEXTS.items() for _ in ts]
    assert all(set(p["scores"]) == set(LABELS) and p["pred"] in LABELS for p in predictions)
    assert "Accuracy for label Störung der Station: " in r.stdout

    # From another folder, without the task file or a config: the adapter holds the task.
    (data / "task.yaml").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = ok(run_script("predict.py", f"adapter={adapter}", "--json", "Die Station ist kaputt", "Refund me!",
                      cwd=elsewhere))
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["question"] for row in rows] == ["Die Station ist kaputt", "Refund me!"]
    assert all(row["label"] in LABELS and list(row["scores"]) == LABELS for row in rows)
    scored = {p["text"]: p["scores"] for p in predictions}
    r = ok(run_script("predict.py", f"adapter={adapter}", "--json", TEXTS["billing"][0], cwd=elsewhere))
    assert json.loads(r.stdout)["scores"] == pytest.approx(scored[TEXTS["billing"][0]], abs=1e-3)  # as evaluated

    # Without a config, evaluation takes the adapter's; a config with another task is refused.
    ok(run_script("evaluate.py", f"adapter={adapter}", f"output_dir={tmp_path / 'own'}", cwd=elsewhere))
    assert json.loads((tmp_path / "own" / "metrics.json").read_text())["labels"] == LABELS
    with pytest.raises(ModelLoadError) as err:
        check_adapter(str(adapter), load_config(ROOT / "configs" / "tiny.yaml"))
    assert str(err.value) == (
        f"adapter {adapter} was trained for the support task, not coarse: set data.task to the task in "
        f"{adapter / 'trec_accel.json'}, or leave out --config to use the adapter's own")
