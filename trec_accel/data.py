"""Loading a task's data (TREC's, or any with the task's labels) into plain ``Example`` lists.

Three kinds of source are accepted (see :func:`load_trec`):

1. a folder with the original Li & Roth files ``train_5500.label`` / ``TREC_10.label`` (the built-in TREC
   tasks), parsed byte-exactly like the Hugging Face ``CogComp/trec`` loader;
2. a folder with ``train``/``validation``/``test`` ``.jsonl``/``.csv``/``.parquet`` files,
   or a single such file (which becomes the train split);
3. a Hugging Face hub dataset id (anything that is not an existing local path).

Rows have a text column and a label column (``data.text_column``, ``data.label_column``); a label is a name of
the task's or an id into its labels. Every bad row is collected and reported in one :class:`DataError`; nothing
is dropped.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trec_accel.labels import COARSE_LABELS, FINE_LABELS, coarse_of
from trec_accel.task import COARSE, FINE, Task

LABEL_TRAIN_FILE = "train_5500.label"
LABEL_TEST_FILE = "TREC_10.label"
TABULAR_SUFFIXES: tuple[str, ...] = (".jsonl", ".csv", ".parquet")
SPLITS: tuple[str, ...] = ("train", "validation", "test")
MAX_REPORTED = 20


@dataclass(frozen=True)
class Example:
    text: str  # the question
    label: int  # id into the task's labels
    index: int  # 0-based row position in its split as loaded (before any shuffling)
    source: str  # "file:line" (1-based) / "file[row]" (parquet) / "hub:id[split][row]"


class DataError(ValueError):
    """A one-line, human-readable problem with the input data."""


class _Problems:
    """Collects "source: reason" lines so that all bad rows are reported at once."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, source: str, reason: str) -> None:
        self.items.append(f"{source}: {reason}")

    def raise_if_any(self) -> None:
        if not self.items:
            return
        n = len(self.items)
        shown = "; ".join(self.items[:MAX_REPORTED])
        more = f"; ... and {n - MAX_REPORTED} more" if n > MAX_REPORTED else ""
        raise DataError(f"{n} bad row{'s' if n != 1 else ''} in the data: {shown}{more}")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _not_utf8(err: UnicodeDecodeError) -> str:
    return f"not valid UTF-8 ({err.reason} at byte {err.start}): save the file as UTF-8"


@dataclass(frozen=True)
class Schema:
    """What a row must hold: the text column, and the label column with a name or id of `task`."""
    task: Task
    text: str = "text"
    label: str = "label"
    # 'coarse' or 'fine' for the built-in TREC tasks, whose data may give fine labels for coarse ones.
    trec: str | None = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "trec", {COARSE: "coarse", FINE: "fine"}.get(self.task))

    def label_column(self, columns: Iterable[str]) -> str | None:
        """The column that carries the label, or None if there is none. For the TREC tasks, when `label` is absent:
        CogComp/trec's columns, which hold ids."""
        cols = set(columns)
        if self.label in cols:
            return self.label
        fallbacks = (f"{self.trec}_label", "fine_label") if self.trec and self.label == "label" else ()
        return next((name for name in fallbacks if name in cols), None)

    def missing_label(self) -> str:
        hub = {"coarse": " (or HF-style 'coarse_label' or 'fine_label')", "fine": " (or HF-style 'fine_label')"}
        return f"missing column '{self.label}'" + (hub[self.trec] if self.trec and self.label == "label" else "")


# --------------------------------------------------------------------------- .label files


def _parse_label_file(path: Path, task: Task, problems: _Problems) -> list[Example]:
    if task not in (COARSE, FINE):
        raise DataError(f"{path}: TREC's .label files hold the built-in coarse and fine labels, not the "
                        f"{task.name} task's; give .jsonl/.csv/.parquet files")
    examples: list[Example] = []
    with open(path, "rb") as f:
        # Iterating a binary file splits on b"\n" only, exactly like the HF loader does.
        for lineno, row in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            try:
                decoded = row.replace(b"\xf0", b" ").strip().decode()
            except UnicodeDecodeError as err:
                problems.add(source, _not_utf8(err))
                continue
            if not decoded:
                problems.add(source, "empty line")
                continue
            fine, sep, text = decoded.partition(" ")
            if not sep or ":" not in fine:
                problems.add(source, f"malformed line, expected 'COARSE:fine question text': {_short(decoded)}")
                continue
            if fine not in FINE_LABELS:
                problems.add(source, f"unknown label {_short(fine)}")
                continue
            if not text.strip():
                problems.add(source, "empty text")
                continue
            label = task.label_id(fine if task == FINE else coarse_of(fine))
            examples.append(Example(text=text, label=label, index=lineno - 1, source=source))
    if not examples and not problems.items:
        raise DataError(f"{path} holds no questions")
    return examples


# --------------------------------------------------------------------------- tabular rows


def _label_id(value: Any, column: str, schema: Schema) -> int | str:
    """Label id of one cell, or a reason string when the value is not usable. A text naming a label is that label;
    an integer (or a text of one) is an id."""
    task = schema.task
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"missing value in column '{column}'"
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped:
            return f"empty value in column '{column}'"
        if column == schema.label and task.label_id(stripped) is not None:
            return task.label_id(stripped)
        if stripped.lstrip("-").isdigit():
            value = int(stripped)
        elif column != schema.label:
            return f"column '{column}' must hold int ids, got {_short(value)}"
        elif schema.trec == "coarse" and stripped in FINE_LABELS:
            return COARSE_LABELS.index(coarse_of(stripped))
        else:
            return f"unknown {task.name} label {_short(value)}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        return f"label must be a label name or an int id, got {_short(value)}"
    value = int(value)
    if column == "fine_label" and schema.trec == "coarse":
        if not 0 <= value < len(FINE_LABELS):
            return f"unknown fine label id {value} (expected 0..{len(FINE_LABELS) - 1})"
        return COARSE_LABELS.index(coarse_of(FINE_LABELS[value]))
    if not 0 <= value < len(task.labels):
        return f"unknown {task.name} label id {value} (expected 0..{len(task.labels) - 1})"
    return value


Row = tuple[str, Mapping[str, Any] | str]  # (source, row dict or the reason it could not be read)


def _rows_to_examples(rows: Iterable[Row], schema: Schema, problems: _Problems) -> list[Example]:
    """Turn (source, row) pairs into Examples, recording every bad row."""
    examples: list[Example] = []
    for index, (source, row) in enumerate(rows):
        if isinstance(row, str):
            problems.add(source, row)
            continue
        if schema.text not in row:
            problems.add(source, f"missing column '{schema.text}'")
            continue
        column = schema.label_column(row)
        if column is None:
            problems.add(source, schema.missing_label())
            continue
        text = row[schema.text]
        if not isinstance(text, str):
            problems.add(source, "empty text" if text is None else f"text must be a string, got {_short(text)}")
            continue
        if not text.strip():
            problems.add(source, "empty text")
            continue
        label = _label_id(row[column], column, schema)
        if isinstance(label, str):
            problems.add(source, label)
            continue
        examples.append(Example(text=text, label=label, index=index, source=source))
    return examples


def _check_header(where: str, columns: list[str], schema: Schema) -> None:
    missing = []
    if schema.text not in columns:
        missing.append(f"missing column '{schema.text}'")
    if schema.label_column(columns) is None:
        missing.append(schema.missing_label())
    if missing:
        raise DataError(f"{where}: {' and '.join(missing)}; found columns {columns} (set data.text_column and "
                        "data.label_column to the names used)")


def _read_text(path: Path, problems: _Problems, encoding: str = "utf-8", newline: str | None = None) -> io.StringIO:
    """The file as text. Each line that is not valid UTF-8 is recorded as a problem under its file:line (as the
    .label reader does) and read with U+FFFD in place of its bad bytes, so that the other rows are still checked."""
    data = path.read_bytes()
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        for lineno, line in enumerate(data.split(b"\n"), start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                problems.add(f"{path}:{lineno}", _not_utf8(err))
        text = data.decode(encoding, errors="replace")
    return io.StringIO(text, newline=newline)


def _jsonl_rows(path: Path, problems: _Problems) -> Iterator[Row]:
    with _read_text(path, problems) as f:
        for lineno, line in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            if not line.strip():
                yield source, "blank line"
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                yield source, f"invalid JSON ({err.msg})"
                continue
            if not isinstance(obj, dict):
                yield source, f"expected a JSON object, got {type(obj).__name__}"
                continue
            yield source, obj


def _csv_rows(path: Path, schema: Schema, problems: _Problems) -> Iterator[Row]:
    with _read_text(path, problems, "utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        columns = next(reader, [])
        if not columns:
            raise DataError(f"{path}: empty CSV file, expected a header with '{schema.text}' and '{schema.label}' "
                            "columns")
        _check_header(str(path), columns, schema)
        # Report the line where a record starts (quoted fields may span several lines).
        start = reader.line_num + 1
        for fields in reader:
            source = f"{path}:{start}"
            start = reader.line_num + 1
            if not fields:
                yield source, "blank line"
            elif len(fields) != len(columns):
                yield source, f"expected {len(columns)} fields, got {len(fields)}"
            else:
                yield source, dict(zip(columns, fields))


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        from datasets import Dataset

        ds = Dataset.from_parquet(str(path))
        return list(ds.column_names), ds.to_list()
    table = pq.read_table(path)
    return list(table.column_names), table.to_pylist()


def _parquet_rows(path: Path, schema: Schema) -> Iterator[Row]:
    try:
        columns, rows = _read_parquet(path)
    except Exception as err:  # corrupt file, unsupported schema, ...
        raise DataError(f"{path}: could not read parquet file ({type(err).__name__}: {err})") from None
    _check_header(str(path), columns, schema)
    for i, row in enumerate(rows):
        yield f"{path}[{i}]", row


def _load_tabular(path: Path, schema: Schema, problems: _Problems) -> list[Example]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows: Iterable[Row] = _jsonl_rows(path, problems)
    elif suffix == ".csv":
        rows = _csv_rows(path, schema, problems)
    elif suffix == ".parquet":
        rows = _parquet_rows(path, schema)
    else:
        raise DataError(f"{path}: unsupported file type, expected one of {', '.join(TABULAR_SUFFIXES)}")

    examples = _rows_to_examples(rows, schema, problems)
    if not examples and not problems.items:
        raise DataError(f"{path} holds no rows")
    return examples


# --------------------------------------------------------------------------- sources


def _find_split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{suffix}" for suffix in TABULAR_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder}: several files for the {split} split ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def _load_folder(folder: Path, schema: Schema, problems: _Problems) -> dict[str, list[Example]]:
    if (folder / LABEL_TRAIN_FILE).is_file():
        splits = {"train": _parse_label_file(folder / LABEL_TRAIN_FILE, schema.task, problems)}
        if (folder / LABEL_TEST_FILE).is_file():
            splits["test"] = _parse_label_file(folder / LABEL_TEST_FILE, schema.task, problems)
        return splits
    files = {split: _find_split_file(folder, split) for split in SPLITS}
    train_file = files["train"]
    if train_file is None:
        expected = ", ".join(f"train{s}" for s in TABULAR_SUFFIXES)
        raise DataError(f"{folder}: no data found; expected {LABEL_TRAIN_FILE} (+ {LABEL_TEST_FILE}) "
                        f"or one of {expected}")
    return {split: _load_tabular(file, schema, problems) for split, file in files.items() if file is not None}


def _load_local(path: Path, schema: Schema, problems: _Problems) -> dict[str, list[Example]]:
    if path.is_dir():
        return _load_folder(path, schema, problems)
    if path.suffix == ".label":
        return {"train": _parse_label_file(path, schema.task, problems)}
    return {"train": _load_tabular(path, schema, problems)}


def _looks_local(path: str) -> bool:
    """True for strings that can only mean a file-system path, never a hub id like 'CogComp/trec'."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or "\\" in path
        or path.count("/") > 1
        or Path(path).suffix in (*TABULAR_SUFFIXES, ".label")
    )


def _load_hub(name: str, schema: Schema, problems: _Problems) -> dict[str, list[Example]]:
    try:
        import datasets

        dataset_dict = datasets.load_dataset(name)
    except Exception as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise DataError(
            f"'{name}' is not a local path and could not load dataset '{name}' from the hub (offline?) "
            f"[{reason}]; pass data.path=/local/folder holding {LABEL_TRAIN_FILE} or train.jsonl"
        ) from None
    splits: dict[str, list[Example]] = {}
    for split in SPLITS:
        if split not in dataset_dict:
            continue
        ds = dataset_dict[split]
        where = f"hub:{name}[{split}]"
        _check_header(where, list(ds.column_names), schema)
        rows = ((f"{where}[{i}]", row) for i, row in enumerate(ds))
        splits[split] = _rows_to_examples(rows, schema, problems)
    if "train" not in splits:
        raise DataError(f"hub dataset '{name}' has no 'train' split (found {list(dataset_dict)})")
    return splits


def load_trec(path: str, schema: Schema | Task) -> dict[str, list[Example]]:
    """Load the raw splits ("train" and, where present, "validation"/"test") found at ``path``; a Task for `schema`
    means the default columns.

    Raises DataError listing every bad row ("file:line: reason") if any row is unusable.
    """
    schema = schema if isinstance(schema, Schema) else Schema(schema)
    raw = os.fspath(path)
    local = Path(raw).expanduser()
    problems = _Problems()
    if local.exists():
        splits = _load_local(local, schema, problems)
    elif _looks_local(raw):
        raise DataError(
            f"data path '{raw}' does not exist; expected a folder with {LABEL_TRAIN_FILE} "
            f"or train.jsonl/.csv/.parquet, or a single .jsonl/.csv/.parquet file"
        )
    else:
        splits = _load_hub(raw, schema, problems)
    problems.raise_if_any()
    return splits


def split_train_validation(
    train: list[Example], val_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministically split off a validation set; returns (train, validation).

    Uses the same permutation as HF ``Dataset.shuffle(seed=seed)``; examples keep their
    original ``index``.
    """
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be strictly between 0 and 1, got {val_fraction!r}")
    n_val = int(len(train) * val_fraction)
    if n_val == 0 or n_val == len(train):
        raise DataError(
            f"val_fraction={val_fraction} of {len(train)} training rows leaves an empty "
            f"{'validation' if n_val == 0 else 'train'} split"
        )
    perm = np.random.default_rng(seed).permutation(len(train))
    return [train[i] for i in perm[n_val:]], [train[i] for i in perm[:n_val]]


def load_splits(
    path: str, schema: Schema | Task, val_fraction: float = 0.1, split_seed: int = 42
) -> dict[str, list[Example]]:
    """Return {"train", "validation"[, "test"]}; validation is split off train unless the source has one."""
    raw = load_trec(path, schema)
    if "validation" in raw:
        train, validation = raw["train"], raw["validation"]
    else:
        train, validation = split_train_validation(raw["train"], val_fraction, split_seed)
    splits = {"train": train, "validation": validation}
    if "test" in raw:
        splits["test"] = raw["test"]
    return splits


def load_data(data, task: Task) -> dict[str, list[Example]]:
    """The splits that the config's `data` section names, for `task`."""
    return load_splits(data.path, Schema(task, data.text_column, data.label_column), data.val_fraction,
                       data.split_seed)


__all__ = [
    "DataError",
    "Example",
    "Schema",
    "load_data",
    "load_splits",
    "load_trec",
    "split_train_validation",
]
