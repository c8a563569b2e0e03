"""The classification task, one value: its labels in id order, what each means, and the prompt's instruction.

A task is built once from the config's `data.task` and handed to data loading, prompts, batching, scoring,
reports, prediction and the adapter's metadata. `data.task` is a built-in TREC task (`coarse`, `fine`), a task
file (YAML, its path relative to the working directory, like `data.path`), or the same mapping inline:

    name: pedalo_support            # optional: default the file's name
    instruction: Classify ...       # optional: default written from the labels (`default_instruction`)
    labels:                         # at least 2, in id order
      - name: billing               # a label with its one-line description
        description: charges, invoices, payment methods, prices
      - account access              # a label alone

`Task.to_dict` writes this mapping (the instruction included), which is what adapters record.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .labels import COARSE_DESCRIPTIONS, COARSE_INSTRUCTION, COARSE_LABELS, FINE_INSTRUCTION, FINE_LABELS

KEYS = ("name", "instruction", "labels")
LABEL_KEYS = ("name", "description")


class TaskError(ValueError):
    """A task that cannot be used: its one-line message names the file (or `data.task`) and what is wrong."""


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...]                 # position = label id
    descriptions: tuple[str | None, ...]    # one per label, None where the task gives none
    instruction: str                        # what the prompt asks, before the text to classify
    _ids: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_ids", {name: i for i, name in enumerate(self.labels)})

    def label_id(self, name: str) -> int | None:
        """The id of a label name, None when the task has no such label."""
        return self._ids.get(name)

    def to_dict(self) -> dict:
        """The task as a task file holds it, instruction included."""
        labels = [name if d is None else {"name": name, "description": d}
                  for name, d in zip(self.labels, self.descriptions)]
        return {"name": self.name, "instruction": self.instruction, "labels": labels}

    def spec(self) -> str | dict:
        """What `data.task` holds once resolved: a built-in's name, else the whole task (a config that needs no
        task file)."""
        return self.name if BUILTIN.get(self.name) == self else self.to_dict()


COARSE = Task("coarse", COARSE_LABELS, COARSE_DESCRIPTIONS, COARSE_INSTRUCTION)
FINE = Task("fine", FINE_LABELS, (None,) * len(FINE_LABELS), FINE_INSTRUCTION)
BUILTIN = {t.name: t for t in (COARSE, FINE)}


def default_instruction(labels, descriptions) -> str:
    """The instruction of a task file that gives none: its labels, each with its description where there is one."""
    items = [f"'{name}'" + (f" ({d})" if d else "") for name, d in zip(labels, descriptions)]
    return "Classify the text into one of the following labels: " + ", ".join(items) + ".\nAnswer with the label only."


def load_task(spec: str | Mapping, where: str = "data.task") -> Task:
    """The task that `spec` names: a built-in's name, a task file's path, or the task's mapping (read from
    `where`, the name errors give)."""
    if isinstance(spec, Mapping):
        return from_dict(spec, where, "custom")
    if not isinstance(spec, str) or not spec.strip():
        raise TaskError(f"{where}: expected a built-in task ({', '.join(BUILTIN)}), a task file or a mapping, "
                        f"got {spec!r}")
    if spec in BUILTIN:
        return BUILTIN[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise TaskError(f"{where}: '{spec}' is neither a built-in task ({', '.join(BUILTIN)}) nor a task file "
                        f"(no file {path.absolute()}; relative paths start at the working directory {os.getcwd()})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise TaskError(f"task file {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return from_dict(data, f"task file {path}", path.stem)


def from_dict(data: Any, where: str, default_name: str) -> Task:
    """A task from its mapping, checked: every problem is a TaskError naming `where`."""
    if not isinstance(data, Mapping):
        raise TaskError(f"{where}: expected a mapping with 'labels' (and optionally 'name', 'instruction'), "
                        f"got {type(data).__name__}")
    unknown = [str(k) for k in data if k not in KEYS]
    if unknown:
        raise TaskError(f"{where}: unknown key '{unknown[0]}' (a task has {', '.join(KEYS)})")
    name = _one_line(data.get("name", default_name), "'name'", where)
    labels, descriptions = _labels(data.get("labels"), where)
    instruction = data.get("instruction")
    if instruction is None:
        instruction = default_instruction(labels, descriptions)
    elif not isinstance(instruction, str) or not instruction.strip():
        raise TaskError(f"{where}: 'instruction' must be a non-empty text, got {instruction!r}")
    task = Task(name, labels, descriptions, instruction)
    if name in BUILTIN and task != BUILTIN[name]:
        raise TaskError(f"{where}: the name '{name}' is the built-in TREC task's; give the task another name")
    return task


def _one_line(value: Any, what: str, where: str) -> str:
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise TaskError(f"{where}: {what} must be a text, got {value!r}")
    text = str(value).strip()
    if not text:
        raise TaskError(f"{where}: {what} is empty")
    if "\n" in text or "\r" in text:
        raise TaskError(f"{where}: {what} ({text!r}) contains a line break")
    return text


def _labels(items: Any, where: str) -> tuple[tuple[str, ...], tuple[str | None, ...]]:
    """(names, descriptions) of a task's `labels` list: each item a name, or a mapping with a name and optionally
    a description."""
    if not isinstance(items, list):
        raise TaskError(f"{where}: 'labels' must be a list of label names (or of 'name:' / 'description:' "
                        f"entries), got {items!r}")
    names, descriptions, first = [], [], {}
    for i, item in enumerate(items, start=1):
        description = None
        if isinstance(item, Mapping):
            unknown = [str(k) for k in item if k not in LABEL_KEYS]
            if unknown or "name" not in item:
                raise TaskError(f"{where}: label {i} must be a name or a mapping with 'name' (and optionally "
                                f"'description'), got {dict(item)!r}")
            item, description = item["name"], item.get("description")
            if description is not None:
                description = _one_line(description, f"the description of label {i}", where)
        name = _one_line(item, f"label {i}", where)
        if name in first:
            raise TaskError(f"{where}: label '{name}' is given twice (labels {first[name]} and {i})")
        first[name] = i
        names.append(name)
        descriptions.append(description)
    if len(names) < 2:
        raise TaskError(f"{where}: a task needs at least 2 labels, got {len(names)}")
    return tuple(names), tuple(descriptions)
