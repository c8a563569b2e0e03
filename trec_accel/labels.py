"""The TREC question-classification label sets, in Hugging Face ``CogComp/trec`` id order, and their instructions:
the data of the two built-in tasks (`task.COARSE`, `task.FINE`)."""

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

COARSE_DESCRIPTIONS: tuple[str, ...] = (
    "abbreviation",
    "entity (animals, colors, events, food, products, sports, terms, ...)",
    "description or abstract concept (definitions, reasons, manners)",
    "human being (a person, a group or organization, a title)",
    "location (cities, countries, mountains, states, other places)",
    "numeric value (counts, dates, distances, money, periods, sizes, ...)",
)

# The coarse instruction describes its 6 labels, the fine one lists all 50.
COARSE_INSTRUCTION = (
    "Classify the question into one of the following categories by the kind of answer it expects:\n"
    + "\n".join(f"{name}: {d}" for name, d in zip(COARSE_LABELS, COARSE_DESCRIPTIONS))
    + "\nAnswer with the category label only.")

FINE_INSTRUCTION = (
    "Classify the question into one of the following fine-grained categories, written COARSE:fine, "
    "by the kind of answer it expects:\n" + ", ".join(FINE_LABELS) + "\nAnswer with the category label only.")


def coarse_of(fine: str) -> str:
    """Coarse label of a fine label name: ``"HUM:ind" -> "HUM"``."""
    if fine not in FINE_LABELS:
        raise ValueError(f"unknown fine label {fine!r}")
    return fine.split(":", 1)[0]
