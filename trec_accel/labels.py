"""TREC question-classification label sets, in Hugging Face ``CogComp/trec`` id order."""

from __future__ import annotations

COARSE_LABELS: tuple[str, ...] = ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")

FINE_LABELS: tuple[str, ...] = (
    "ABBR:abb", "ABBR:exp",
    "ENTY:animal", "ENTY:body", "ENTY:color", "ENTY:cremat", "ENTY:currency", "ENTY:dismed",
    "ENTY:event", "ENTY:food", "ENTY:instru", "ENTY:lang", "ENTY:letter", "ENTY:other",
    "ENTY:plant", "ENTY:product", "ENTY:religion", "ENTY:sport", "ENTY:substance",
    "ENTY:symbol", "ENTY:techmeth", "ENTY:termeq", "ENTY:veh", "ENTY:word",
    "DESC:def", "DESC:desc", "DESC:manner", "DESC:reason",
    "HUM:gr", "HUM:ind", "HUM:title", "HUM:desc",
    "LOC:city", "LOC:country", "LOC:mount", "LOC:other", "LOC:state",
    "NUM:code", "NUM:count", "NUM:date", "NUM:dist", "NUM:money", "NUM:ord", "NUM:other",
    "NUM:period", "NUM:perc", "NUM:speed", "NUM:temp", "NUM:volsize", "NUM:weight",
)  # fmt: skip

TASKS: tuple[str, ...] = ("coarse", "fine")


def label_names(task: str) -> tuple[str, ...]:
    """Label names of ``task`` ("coarse" or "fine"); position = label id."""
    if task == "coarse":
        return COARSE_LABELS
    if task == "fine":
        return FINE_LABELS
    raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


def coarse_of(fine: str) -> str:
    """Coarse label of a fine label name: ``"HUM:ind" -> "HUM"``."""
    if fine not in FINE_LABELS:
        raise ValueError(f"unknown fine label {fine!r}")
    return fine.split(":", 1)[0]
