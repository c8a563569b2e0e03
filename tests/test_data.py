"""Tests for trec_accel.labels and trec_accel.data.

Real-data tests need TREC_DATA_DIR (a folder with train_5500.label and TREC_10.label);
everything else uses small synthetic files under tmp_path.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from trec_accel.data import DataError, Example, load_splits, load_trec, split_train_validation
from trec_accel.labels import COARSE_LABELS, FINE_LABELS, coarse_of
from trec_accel.task import BUILTIN, COARSE, FINE

TREC_DATA_DIR = os.environ.get("TREC_DATA_DIR")
needs_real_data = pytest.mark.skipif(not TREC_DATA_DIR, reason="TREC_DATA_DIR is not set")


# --------------------------------------------------------------------------- labels


def test_label_tables() -> None:
    assert COARSE_LABELS == ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")
    assert len(FINE_LABELS) == 50 and len(set(FINE_LABELS)) == 50
    assert FINE_LABELS[0] == "ABBR:abb"
    assert FINE_LABELS.index("HUM:desc") == 31
    assert FINE_LABELS.index("LOC:city") == 32
    assert FINE_LABELS[-1] == "NUM:weight"
    assert tuple(BUILTIN) == ("coarse", "fine")
    assert COARSE.labels is COARSE_LABELS and FINE.labels is FINE_LABELS
    assert COARSE.label_id("HUM") == 3 and FINE.label_id("HUM:desc") == 31 and COARSE.label_id("HUM:ind") is None
    assert {coarse_of(f) for f in FINE_LABELS} == set(COARSE_LABELS)
    assert coarse_of("HUM:ind") == "HUM"


def test_label_errors() -> None:
    with pytest.raises(ValueError, match="HUM:nope"):
        coarse_of("HUM:nope")


# --------------------------------------------------------------------------- real data


def _simple_parse(path: Path) -> list[tuple[str, str]]:
    """Independent reading of a .label file: (fine label, text) per line."""
    rows = []
    for line in path.read_bytes().decode("latin-1").split("\n"):
        if line:
            fine, text = line.split(" ", 1)
            rows.append((fine, text.replace("\xf0", " ")))
    return rows


@pytest.fixture(scope="module")
def real_dir() -> Path:
    assert TREC_DATA_DIR
    return Path(TREC_DATA_DIR)


@pytest.fixture(scope="module")
def real_fine(real_dir: Path) -> dict[str, list[Example]]:
    return load_trec(str(real_dir), FINE)


@pytest.fixture(scope="module")
def real_coarse(real_dir: Path) -> dict[str, list[Example]]:
    return load_trec(str(real_dir), COARSE)


@needs_real_data
def test_real_sizes(real_fine: dict[str, list[Example]]) -> None:
    assert set(real_fine) == {"train", "test"}
    assert len(real_fine["train"]) == 5452
    assert len(real_fine["test"]) == 500
    for split in real_fine.values():
        assert [ex.index for ex in split] == list(range(len(split)))


@needs_real_data
def test_real_coarse_counts(real_coarse: dict[str, list[Example]]) -> None:
    def counts(split: str) -> dict[str, int]:
        return dict(Counter(COARSE_LABELS[ex.label] for ex in real_coarse[split]))

    assert counts("train") == {"ABBR": 86, "ENTY": 1250, "DESC": 1162, "HUM": 1223, "LOC": 835, "NUM": 896}
    assert counts("test") == {"ABBR": 9, "ENTY": 94, "DESC": 138, "HUM": 65, "LOC": 81, "NUM": 113}


@needs_real_data
def test_real_fine_counts(real_dir: Path, real_fine: dict[str, list[Example]]) -> None:
    for split, name in (("train", "train_5500.label"), ("test", "TREC_10.label")):
        expected = Counter(fine for fine, _ in _simple_parse(real_dir / name))
        assert Counter(FINE_LABELS[ex.label] for ex in real_fine[split]) == expected
    assert {FINE_LABELS[ex.label] for ex in real_fine["train"]} == set(FINE_LABELS)
    absent = set(FINE_LABELS) - {FINE_LABELS[ex.label] for ex in real_fine["test"]}
    assert absent == {
        "ENTY:cremat", "ENTY:letter", "ENTY:religion", "ENTY:symbol",
        "ENTY:word", "NUM:code", "NUM:ord", "NUM:volsize",
    }  # fmt: skip


@needs_real_data
def test_real_coarse_matches_fine(real_fine: dict[str, list[Example]], real_coarse: dict[str, list[Example]]) -> None:
    for split in ("train", "test"):
        for fine_ex, coarse_ex in zip(real_fine[split], real_coarse[split], strict=True):
            assert coarse_ex.text == fine_ex.text
            assert COARSE_LABELS[coarse_ex.label] == coarse_of(FINE_LABELS[fine_ex.label])


@needs_real_data
def test_real_line_66_non_ascii_byte(real_dir: Path, real_fine: dict[str, list[Example]]) -> None:
    ex = real_fine["train"][65]
    assert "sister city" in ex.text
    assert ex.source == f"{real_dir / 'train_5500.label'}:66"
    assert all(ex.text.isascii() for ex in real_fine["train"])


@needs_real_data
def test_real_first_and_last_rows(real_dir: Path, real_fine: dict[str, list[Example]]) -> None:
    for split, name in (("train", "train_5500.label"), ("test", "TREC_10.label")):
        expected = _simple_parse(real_dir / name)
        for position in (0, -1):
            fine, text = expected[position]
            ex = real_fine[split][position]
            assert (ex.text, FINE_LABELS[ex.label]) == (text, fine)
    first = real_fine["train"][0]
    assert first.text == "How did serfdom develop in and then leave Russia ?"
    assert first.label == FINE_LABELS.index("DESC:manner") == 26
    assert first.source.endswith("train_5500.label:1")


@needs_real_data
def test_real_duplicates_kept(real_fine: dict[str, list[Example]]) -> None:
    texts = [ex.text for ex in real_fine["train"]]
    assert len(texts) - len(set(texts)) == 71


@needs_real_data
def test_real_split(real_dir: Path) -> None:
    splits = load_splits(str(real_dir), COARSE)
    assert list(splits) == ["train", "validation", "test"]
    train, val = splits["train"], splits["validation"]
    assert (len(train), len(val), len(splits["test"])) == (4907, 545, 500)
    train_idx, val_idx = {ex.index for ex in train}, {ex.index for ex in val}
    assert not train_idx & val_idx
    assert train_idx | val_idx == set(range(5452))

    again = load_splits(str(real_dir), COARSE, val_fraction=0.1, split_seed=42)
    assert again["validation"] == val and again["train"] == train
    other = load_splits(str(real_dir), COARSE, split_seed=7)
    assert len(other["validation"]) == 545
    assert [ex.index for ex in other["validation"]] != [ex.index for ex in val]


# --------------------------------------------------------------------------- synthetic: helpers

ROWS = [
    {"text": "Who wrote Hamlet ?", "label": "HUM:ind"},
    {"text": "What is the capital of France ?", "label": "LOC:city"},
    {"text": "How many legs does a spider have ?", "label": "NUM:count"},
    {"text": "What does NASA stand for ?", "label": "ABBR:exp"},
]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def labels(examples: list[Example], task: str) -> list[str]:
    return [BUILTIN[task].labels[ex.label] for ex in examples]


# --------------------------------------------------------------------------- synthetic: formats


@pytest.mark.parametrize("writer", [write_jsonl, write_csv], ids=["jsonl", "csv"])
def test_tabular_label_names(tmp_path: Path, writer) -> None:
    path = writer(tmp_path / f"questions.{'jsonl' if writer is write_jsonl else 'csv'}", ROWS)
    fine = load_trec(str(path), FINE)
    assert list(fine) == ["train"]
    assert [ex.text for ex in fine["train"]] == [row["text"] for row in ROWS]
    assert labels(fine["train"], "fine") == [row["label"] for row in ROWS]
    assert [ex.index for ex in fine["train"]] == [0, 1, 2, 3]
    assert fine["train"][0].source == f"{path}:{1 if writer is write_jsonl else 2}"
    # fine label names map to their coarse label for the coarse task
    coarse = load_trec(str(path), COARSE)
    assert labels(coarse["train"], "coarse") == ["HUM", "LOC", "NUM", "ABBR"]


@pytest.mark.parametrize("writer", [write_jsonl, write_csv], ids=["jsonl", "csv"])
def test_tabular_int_ids_and_coarse_names(tmp_path: Path, writer) -> None:
    ext = "jsonl" if writer is write_jsonl else "csv"
    rows = [{"text": "Who wrote Hamlet ?", "label": 3}, {"text": "What is a cat ?", "label": "DESC"}]
    path = writer(tmp_path / f"train.{ext}", rows)
    assert labels(load_trec(str(path), COARSE)["train"], "coarse") == ["HUM", "DESC"]
    ids = writer(tmp_path / f"ids.{ext}", [{"text": "Who wrote Hamlet ?", "label": 29}])
    assert labels(load_trec(str(ids), FINE)["train"], "fine") == ["HUM:ind"]
    # a coarse name is not a fine label (the int id 3 is valid for both tasks)
    with pytest.raises(DataError, match=r"1 bad row .*train\.\w+:\d: unknown fine label 'DESC'$"):
        load_trec(str(path), FINE)


@pytest.mark.parametrize("writer", [write_jsonl, write_csv], ids=["jsonl", "csv"])
def test_tabular_hf_style_columns(tmp_path: Path, writer) -> None:
    ext = "jsonl" if writer is write_jsonl else "csv"
    rows = [
        {"text": "Who wrote Hamlet ?", "coarse_label": 3, "fine_label": 29},
        {"text": "What is the capital of France ?", "coarse_label": 4, "fine_label": 32},
    ]
    path = writer(tmp_path / f"train.{ext}", rows)
    assert labels(load_trec(str(path), COARSE)["train"], "coarse") == ["HUM", "LOC"]
    assert labels(load_trec(str(path), FINE)["train"], "fine") == ["HUM:ind", "LOC:city"]
    # only fine ids: the coarse task derives its labels from them
    fine_only = writer(tmp_path / f"fine_only.{ext}", [{k: r[k] for k in ("text", "fine_label")} for r in rows])
    assert labels(load_trec(str(fine_only), COARSE)["train"], "coarse") == ["HUM", "LOC"]
    # only coarse ids cannot serve the fine task
    coarse_only = writer(tmp_path / f"coarse_only.{ext}", [{k: r[k] for k in ("text", "coarse_label")} for r in rows])
    with pytest.raises(DataError, match="missing column 'label'"):
        load_trec(str(coarse_only), FINE)


def test_parquet(tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    loaded = load_trec(str(path), COARSE)["train"]
    assert labels(loaded, "coarse") == ["HUM", "LOC", "NUM", "ABBR"]
    assert loaded[1].source == f"{path}[1]"

    hf = tmp_path / "hf.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "Who wrote Hamlet ?", "coarse_label": 3, "fine_label": 29}]), hf)
    assert labels(load_trec(str(hf), FINE)["train"], "fine") == ["HUM:ind"]

    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "", "label": "HUM"}, {"text": "ok ?", "label": "XYZ"}]), bad)
    with pytest.raises(DataError) as err:
        load_trec(str(bad), COARSE)
    assert f"{bad}[0]: empty text" in str(err.value)
    assert f"{bad}[1]: unknown coarse label 'XYZ'" in str(err.value)


def test_folder_with_splits(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS * 5)
    write_csv(tmp_path / "test.csv", ROWS[:2])
    raw = load_trec(str(tmp_path), COARSE)
    assert {k: len(v) for k, v in raw.items()} == {"train": 20, "test": 2}
    splits = load_splits(str(tmp_path), COARSE, val_fraction=0.25, split_seed=0)
    assert {k: len(v) for k, v in splits.items()} == {"train": 15, "validation": 5, "test": 2}

    # an explicit validation file is used as is instead of splitting train
    write_jsonl(tmp_path / "validation.jsonl", ROWS[:3])
    splits = load_splits(str(tmp_path), COARSE)
    assert {k: len(v) for k, v in splits.items()} == {"train": 20, "validation": 3, "test": 2}
    assert [ex.index for ex in splits["train"]] == list(range(20))


def test_folder_with_label_files(tmp_path: Path) -> None:
    (tmp_path / "train_5500.label").write_bytes(
        b"HUM:ind Who wrote Hamlet ?\nLOC:city Which sister\xf0city is it ?\nNUM:count How many ?\n"
    )
    (tmp_path / "TREC_10.label").write_bytes(b"DESC:def What is e-coli ?\n")
    raw = load_trec(str(tmp_path), FINE)
    assert [ex.text for ex in raw["train"]] == ["Who wrote Hamlet ?", "Which sister city is it ?", "How many ?"]
    assert labels(raw["train"], "fine") == ["HUM:ind", "LOC:city", "NUM:count"]
    assert labels(raw["test"], "fine") == ["DESC:def"]
    assert raw["train"][2].source == f"{tmp_path / 'train_5500.label'}:3"
    assert labels(load_trec(str(tmp_path), COARSE)["train"], "coarse") == ["HUM", "LOC", "NUM"]


# --------------------------------------------------------------------------- synthetic: errors


def test_all_bad_rows_reported_once(tmp_path: Path) -> None:
    path = tmp_path / "train.jsonl"
    lines = [
        json.dumps({"text": "Who wrote Hamlet ?", "label": "HUM:ind"}),  # 1 ok
        json.dumps({"text": "", "label": "HUM"}),  # 2 empty text
        json.dumps({"text": "What ?", "label": "FOO:bar"}),  # 3 unknown label
        "{not json",  # 4
        json.dumps({"label": "HUM"}),  # 5 missing text
        json.dumps({"text": "Why ?", "label": 6}),  # 6 id out of range for coarse
        json.dumps({"text": "   ", "label": "DESC"}),  # 7 blank text
        json.dumps({"text": "When ?"}),  # 8 no label
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_trec(str(path), COARSE)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("7 bad rows")
    for line, reason in [
        (2, "empty text"),
        (3, "unknown coarse label 'FOO:bar'"),
        (4, "invalid JSON"),
        (5, "missing column 'text'"),
        (6, "unknown coarse label id 6"),
        (7, "empty text"),
        (8, "missing column 'label'"),
    ]:
        assert f"{path}:{line}: {reason}" in message
    assert f"{path}:1:" not in message


def test_error_list_is_capped(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "", "label": "HUM"}] * 25)
    with pytest.raises(DataError) as err:
        load_trec(str(path), COARSE)
    message = str(err.value)
    assert message.startswith("25 bad rows")
    assert f"{path}:20: empty text" in message and f"{path}:21:" not in message
    assert "and 5 more" in message


def test_csv_errors(tmp_path: Path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('text,label\nWho ?,HUM\n,HUM\n"multi\nline ?",NOPE\nextra,HUM,x\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_trec(str(path), COARSE)
    message = str(err.value)
    assert f"{path}:3: empty text" in message
    assert f"{path}:4: unknown coarse label 'NOPE'" in message
    assert f"{path}:6: expected 2 fields, got 3" in message

    no_label = tmp_path / "no_label.csv"
    no_label.write_text("text,category\nWho ?,HUM\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no_label\.csv: missing column 'label'"):
        load_trec(str(no_label), COARSE)
    no_text = tmp_path / "no_text.csv"
    no_text.write_text("question,label\nWho ?,HUM\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no_text\.csv: missing column 'text'"):
        load_trec(str(no_text), COARSE)


def test_malformed_label_file(tmp_path: Path) -> None:
    path = tmp_path / "train_5500.label"
    path.write_bytes(
        b"HUM:ind Who wrote Hamlet ?\n"
        b"HUMind Who is he ?\n"  # 2: no colon in label
        b"LOC:city\n"  # 3: no space, no text
        b"FOO:bar What ?\n"  # 4: unknown label
        b"\n"  # 5: empty line
        b"NUM:count How many ?\n"
    )
    with pytest.raises(DataError) as err:
        load_trec(str(tmp_path), COARSE)
    message = str(err.value)
    assert message.startswith("4 bad rows")
    assert f"{path}:2: malformed line" in message
    assert f"{path}:3: malformed line" in message
    assert f"{path}:4: unknown label 'FOO:bar'" in message
    assert f"{path}:5: empty line" in message


def test_bad_rows_in_several_files_reported_together(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "", "label": "HUM"}, *ROWS])
    write_jsonl(tmp_path / "test.jsonl", [*ROWS, {"text": "Who ?", "label": "???"}])
    with pytest.raises(DataError) as err:
        load_trec(str(tmp_path), FINE)
    assert f"{tmp_path / 'train.jsonl'}:1: empty text" in str(err.value)
    assert f"{tmp_path / 'test.jsonl'}:5: unknown fine label '???'" in str(err.value)


def test_missing_and_empty_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist.*train_5500.label"):
        load_trec(str(tmp_path / "nowhere"), COARSE)
    with pytest.raises(DataError, match="does not exist"):
        load_trec("data/missing.jsonl", COARSE)
    with pytest.raises(DataError, match=r"no data found; expected train_5500\.label.*train\.jsonl"):
        load_trec(str(tmp_path), COARSE)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="no data found"):
        load_trec(str(tmp_path), COARSE)
    (tmp_path / "TREC_10.label").write_bytes(b"DESC:def What is e-coli ?\n")  # test file alone is not enough
    with pytest.raises(DataError, match="no data found"):
        load_trec(str(tmp_path), COARSE)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="holds no rows"):
        load_trec(str(empty), COARSE)


def test_hub_failure_is_clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The env vars are read when datasets is imported; patch the flags too in case it already is.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(DataError) as err:
        load_trec("CogComp/trec", COARSE)
    message = str(err.value)
    assert "could not load dataset 'CogComp/trec' from the hub (offline?)" in message
    assert "data.path=" in message
    assert "\n" not in message


def test_hub_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    datasets = pytest.importorskip("datasets")
    fake = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(
                [
                    {"text": "Who wrote Hamlet ?", "coarse_label": 3, "fine_label": 29},
                    {"text": "What is a cat ?", "coarse_label": 2, "fine_label": 24},
                ]
            ),
            "test": datasets.Dataset.from_list([{"text": "", "coarse_label": 3, "fine_label": 29}]),
        }
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda name: fake)
    with pytest.raises(DataError, match=r"hub:some/trec\[test\]\[0\]: empty text"):
        load_trec("some/trec", FINE)
    fake["test"] = fake["train"]
    raw = load_trec("some/trec", FINE)
    assert labels(raw["train"], "fine") == ["HUM:ind", "DESC:def"]
    assert raw["train"][1].source == "hub:some/trec[train][1]"


# --------------------------------------------------------------------------- split


def _examples(n: int) -> list[Example]:
    return [Example(text=f"q{i} ?", label=i % 6, index=i, source=f"f:{i + 1}") for i in range(n)]


def test_split_reference_permutation() -> None:
    np = pytest.importorskip("numpy")
    examples = _examples(100)
    train, val = split_train_validation(examples, 0.2, seed=3)
    perm = np.random.default_rng(3).permutation(100)
    assert [ex.index for ex in val] == list(perm[:20])
    assert [ex.index for ex in train] == list(perm[20:])
    assert split_train_validation(examples, 0.2, seed=3) == (train, val)
    assert split_train_validation(examples, 0.2, seed=4)[1] != val


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_bad_fraction(fraction: float) -> None:
    with pytest.raises(DataError, match="val_fraction"):
        split_train_validation(_examples(10), fraction, seed=0)


def test_split_empty_side() -> None:
    with pytest.raises(DataError, match="empty validation"):
        split_train_validation(_examples(5), 0.1, seed=0)
    with pytest.raises(DataError, match="empty validation"):
        split_train_validation([], 0.5, seed=0)


def test_load_splits_bad_fraction(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match="val_fraction"):
        load_splits(str(path), COARSE, val_fraction=1.0)


def test_invalid_utf8_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A jsonl or csv file with bytes that are not UTF-8: every such line is named, like the .label reader does,
    and the other rows are still checked; the script ends with one `error:` line and exit code 2."""
    from trec_accel import cli

    jsonl = tmp_path / "train.jsonl"
    jsonl.write_bytes(b'{"text": "Who wrote Hamlet ?", "label": "HUM"}\n'
                      b'{"text": "Where is \xffLima ?", "label": "LOC"}\n'
                      b'{"text": "", "label": "LOC"}\n')
    csv_file = tmp_path / "more.csv"
    csv_file.write_bytes(b"text,label\nWho wrote Hamlet ?,HUM\n\"Where is\nLima \xfe?\",LOC\n")
    for path, line, others in ((jsonl, 2, [f"{jsonl}:3: empty text"]), (csv_file, 4, [])):
        with pytest.raises(DataError) as err:
            load_trec(str(path), COARSE)
        message = str(err.value)
        assert f"{path}:{line}: not valid UTF-8 (invalid start byte at byte " in message
        assert "save the file as UTF-8" in message and "\n" not in message
        for other in others:
            assert other in message
    capsys.readouterr()
    assert cli.main(lambda: load_trec(str(jsonl), COARSE)) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: 2 bad rows in the data: {jsonl}:2: not valid UTF-8 (invalid start byte at byte 19): "
        f"save the file as UTF-8; {jsonl}:3: empty text"]
