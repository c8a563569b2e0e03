"""Evaluation metrics, human-readable reports, plots and small file helpers.

Everything downstream (the text report, the confusion-matrix plot, the JSON
written next to a run) is built from the single dict returned by
:func:`compute_metrics`, so there is one source of truth for the numbers.

Conventions
-----------
* ``labels`` are the task's label names in id order (6 coarse or 50 fine TREC
  labels, or a task's own); ``gold`` / ``pred`` are integer ids into that list.
* A label is *present* if it occurs in gold **or** in pred.  Macro and
  weighted averages are taken over present labels only (this is what
  scikit-learn does when ``labels=`` is set to the present labels, and what
  ``classification_report(y_true, y_pred)`` does by default).  E.g. on the
  fine-grained TREC test set 8 of the 50 labels never occur; they neither drag
  macro-F1 down with 0.0 scores nor are silently dropped from the per-class
  table -- ``per_class`` and ``confusion_matrix`` always list *every* label.
  A label that is predicted but never gold *is* present and scores F1 = 0.
* Per-class ``accuracy`` is ``correct / support`` (as the reference notebook
  printed it, numerically the same as recall); it is ``0.0`` when the label has
  no gold examples (support 0).  All undefined ratios (0/0) are reported as
  ``0.0`` (``zero_division=0``).
* The numbers are scikit-learn's (``confusion_matrix``,
  ``precision_recall_fscore_support``, ``accuracy_score``), computed with
  numpy: importing scikit-learn (with scipy and pandas) would add a second or
  more to every script's start-up.  ``tests/test_reports.py`` compares them.

Plots use matplotlib's Agg canvas directly (no pyplot, no global backend
switch), so they work headless and do not interfere with other code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .files import atomic_file, write_atomic

__all__ = [
    "compute_metrics",
    "format_report",
    "plot_confusion_matrix",
    "plot_training_curves",
    "write_json",
    "write_jsonl",
    "log_to_trackers",
]

# Above this many labels, plot_confusion_matrix drops absent labels by default.
_AUTO_DROP_ABSENT_ABOVE = 20
# The plot's label ticks are cut to this many characters; cells show counts up to this many labels.
_TICK_CHARS = 40
_COUNTS_UP_TO = 100


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------
def compute_metrics(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]) -> dict:
    """Classification metrics for one evaluation run.

    Args:
        gold: gold label ids (ints in ``range(len(labels))``).
        pred: predicted label ids, same length as ``gold``.  Callers must map
            unparseable generations to some id before calling (out-of-range
            ids raise ``ValueError``).
        labels: label names in id order.

    Returns a JSON-serialisable dict (plain Python ints/floats/lists) with:

    * ``accuracy`` -- fraction of items with ``pred == gold``.
    * ``macro_f1`` / ``macro_precision`` / ``macro_recall`` -- unweighted
      mean over **present** labels (those occurring in gold or pred; see the
      module docstring).  Labels absent from both are excluded.
    * ``weighted_f1`` / ``weighted_precision`` / ``weighted_recall`` -- mean
      weighted by gold support (absent labels have weight 0 anyway).
    * ``per_class`` -- ``{label name: {precision, recall, f1, support,
      accuracy}}`` for **every** label, in ``labels`` order.  ``accuracy`` is
      correct / support, ``0.0`` when support is 0; undefined precision /
      recall / F1 are ``0.0``.
    * ``confusion_matrix`` -- ``len(labels) x len(labels)`` list of lists of
      ints; rows = gold, columns = predicted, both in ``labels`` order.
    * ``labels`` -- the label order of ``per_class`` and the matrix.
    * ``present_labels`` -- the labels the macro/weighted averages were
      taken over (occur in gold or pred), in ``labels`` order.
    * ``n`` -- number of evaluated items.
    """
    labels, y_true, y_pred = _checked_ids(gold, pred, labels)
    k = len(labels)
    cm = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    prec, rec, f1, support = _per_label(cm)
    present = np.flatnonzero(cm.sum(0) + support).tolist()  # occur in gold or pred
    macro = [float(s[present].mean()) for s in (prec, rec, f1)]
    weighted = [float(np.average(s[present], weights=support[present])) for s in (prec, rec, f1)]

    per_class: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(labels):
        sup = int(support[i])
        per_class[name] = {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": sup,
            "accuracy": float(cm[i, i] / sup) if sup else 0.0,
        }

    return {
        "accuracy": float(np.trace(cm) / y_true.size),
        "macro_f1": macro[2],
        "weighted_f1": weighted[2],
        "macro_precision": macro[0],
        "macro_recall": macro[1],
        "weighted_precision": weighted[0],
        "weighted_recall": weighted[1],
        "per_class": per_class,
        "confusion_matrix": [[int(v) for v in row] for row in cm],
        "labels": labels,
        "present_labels": [labels[i] for i in present],
        "n": int(y_true.size),
    }


def _per_label(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, F1, support) of every label from the confusion matrix, each ratio 0.0 where it is 0/0:
    the numbers of scikit-learn's ``precision_recall_fscore_support(average=None, zero_division=0)``, F1 taken as
    it takes it, 2 tp / (support + predicted), which is 0/0 only where both are 0."""
    tp = np.diag(cm).astype(np.float64)
    predicted, support = cm.sum(0), cm.sum(1)
    return _ratio(tp, predicted), _ratio(tp, support), _ratio(2 * tp, support + predicted), support


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den != 0)


def _checked_ids(gold: Sequence[int], pred: Sequence[int], labels: Sequence[str]):
    """(label names, gold ids, predicted ids) as arrays, or ValueError saying what is wrong with them."""
    labels = [str(x) for x in labels]
    n_labels = len(labels)
    if n_labels == 0:
        raise ValueError("labels must not be empty")
    if len(set(labels)) != n_labels:
        raise ValueError("label names must be unique")
    y_true = np.asarray(list(gold), dtype=np.int64).reshape(-1)
    y_pred = np.asarray(list(pred), dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"gold and pred differ in length: {y_true.size} vs {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("cannot compute metrics on an empty evaluation set")
    for name, arr in (("gold", y_true), ("pred", y_pred)):
        bad = arr[(arr < 0) | (arr >= n_labels)]
        if bad.size:
            raise ValueError(f"{name} contains ids outside range({n_labels}): {sorted(set(bad.tolist()))[:10]}")
    return labels, y_true, y_pred


def _present_indices(metrics: Mapping[str, Any]) -> list[int]:
    """Indices (into metrics['labels']) of labels occurring in gold or pred."""
    labels = list(metrics["labels"])
    if "present_labels" in metrics:
        wanted = set(metrics["present_labels"])
        return [i for i, name in enumerate(labels) if name in wanted]
    cm = np.asarray(metrics["confusion_matrix"])
    return [i for i in range(len(labels)) if cm[i, :].sum() or cm[:, i].sum()]


# --------------------------------------------------------------------------
# text report
# --------------------------------------------------------------------------
def _classification_table(metrics: Mapping[str, Any], idx: Sequence[int], digits: int) -> str:
    """sklearn ``classification_report``-formatted table from a metrics dict.

    Produces the same text as ``classification_report(gold, pred,
    labels=present, target_names=..., digits=digits, zero_division=0)``.
    """
    labels = list(metrics["labels"])
    per_class = metrics["per_class"]
    names = [labels[i] for i in idx]
    headers = ["precision", "recall", "f1-score", "support"]
    last_heading = "weighted avg"
    width = max([len(n) for n in names] + [len(last_heading), digits])

    head_fmt = "{:>{width}s} " + " {:>9}" * len(headers)
    out = head_fmt.format("", *headers, width=width) + "\n\n"
    row_fmt = "{:>{width}s} " + " {:>9.{digits}f}" * 3 + " {:>9}\n"
    total = 0
    for name in names:
        pc = per_class[name]
        total += int(pc["support"])
        out += row_fmt.format(
            name, pc["precision"], pc["recall"], pc["f1"], int(pc["support"]), width=width, digits=digits
        )
    out += "\n"
    acc_fmt = "{:>{width}s} " + " {:>9.{digits}}" * 2 + " {:>9.{digits}f}" + " {:>9}\n"
    out += acc_fmt.format("accuracy", "", "", metrics["accuracy"], total, width=width, digits=digits)

    def _avg(kind: str) -> tuple[float, float, float]:
        key = f"{kind}_precision"
        if key in metrics:  # normal case: straight from compute_metrics
            return metrics[f"{kind}_precision"], metrics[f"{kind}_recall"], metrics[f"{kind}_f1"]
        # Older/trimmed dicts: derive from per_class (same formula as sklearn).
        rows = [per_class[n] for n in names]
        if kind == "macro":
            w = np.ones(len(rows))
        else:
            w = np.array([r["support"] for r in rows], dtype=float)
        if w.sum() == 0:
            return 0.0, 0.0, 0.0
        return tuple(float(np.average([r[k] for r in rows], weights=w)) for k in ("precision", "recall", "f1"))

    out += row_fmt.format("macro avg", *_avg("macro"), total, width=width, digits=digits)
    out += row_fmt.format("weighted avg", *_avg("weighted"), total, width=width, digits=digits)
    return out


def _confusion_text(metrics: Mapping[str, Any], idx: Sequence[int]) -> str:
    """Confusion matrix as an aligned text table (rows = gold, cols = pred)."""
    labels = list(metrics["labels"])
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    names = [labels[i] for i in idx]
    sub = cm[np.ix_(idx, idx)] if idx else np.zeros((0, 0), dtype=np.int64)
    cell = max([len(n) for n in names] + [len(str(int(sub.max()))) if sub.size else 1])
    corner = "gold \\ pred"
    row_w = max([len(n) for n in names] + [len(corner)])
    lines = [f"{corner:<{row_w}} " + " ".join(f"{n:>{cell}}" for n in names)]
    for name, row in zip(names, sub):
        lines.append(f"{name:<{row_w}} " + " ".join(f"{int(v):>{cell}d}" for v in row))
    return "\n".join(lines)


def format_report(metrics: Mapping[str, Any], digits: int = 3, all_labels: bool = False) -> str:
    """Human-readable report, laid out as the reference notebook printed it.

    Sections: ``Accuracy: 0.xxx``; one ``Accuracy for label NAME: 0.xxx`` line
    per label with support > 0 (labels with no gold examples are skipped);
    ``Classification Report:`` (sklearn-style precision / recall / f1-score /
    support table over present labels, then accuracy / macro avg / weighted
    avg rows); ``Confusion Matrix:`` with label headers (rows = gold,
    columns = predicted).

    Built purely from a :func:`compute_metrics` dict (nothing is recomputed
    from raw predictions).  The table and matrix show only labels occurring in
    gold or pred -- the same set the averages are taken over -- unless
    ``all_labels=True``; omitted labels are named in a footnote.
    """
    labels = list(metrics["labels"])
    per_class = metrics["per_class"]
    idx = list(range(len(labels))) if all_labels else _present_indices(metrics)

    lines = [f"Accuracy: {metrics['accuracy']:.3f}"]
    for name in labels:
        pc = per_class[name]
        if int(pc["support"]) > 0:
            lines.append(f"Accuracy for label {name}: {pc['accuracy']:.3f}")
    lines.append("")
    lines.append("Classification Report:")
    lines.append(_classification_table(metrics, idx, digits).rstrip("\n"))
    lines.append("")
    lines.append("Confusion Matrix:")
    lines.append(_confusion_text(metrics, idx))
    omitted = [labels[i] for i in range(len(labels)) if i not in set(idx)]
    if omitted:
        lines.append("")
        lines.append(
            f"({len(omitted)} label(s) absent from both gold and predictions omitted: {', '.join(omitted)})"
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------
def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path, dpi: int = 100) -> None:
    with atomic_file(path, binary=True) as fh:
        fig.savefig(fh, format="png", dpi=dpi, bbox_inches="tight")


def plot_confusion_matrix(
    metrics: Mapping[str, Any],
    path,
    drop_absent: bool | None = None,
    title: str | None = None,
) -> None:
    """Write the confusion matrix of a :func:`compute_metrics` dict as a PNG.

    Rows = gold, columns = predicted; cells are annotated with counts (for
    more than 15 labels only non-zero cells, to stay legible, and none above
    100 labels).  The figure size grows with the number of labels so 50 fine
    labels stay readable, up to 40 inches; ticks longer than 40 characters are cut.

    ``drop_absent``: drop labels that occur in neither gold nor pred (all-zero
    row and column).  ``None`` (default) drops them automatically when there
    are more than 20 labels (i.e. the 50-label fine task) and keeps them for
    the 6-label coarse task.
    """
    labels = list(metrics["labels"])
    cm = np.asarray(metrics["confusion_matrix"], dtype=np.int64)
    if drop_absent is None:
        drop_absent = len(labels) > _AUTO_DROP_ABSENT_ABOVE
    idx = _present_indices(metrics) if drop_absent else list(range(len(labels)))
    if not idx:  # degenerate; keep everything rather than plot nothing
        idx = list(range(len(labels)))
    names = [labels[i] if len(labels[i]) <= _TICK_CHARS else labels[i][: _TICK_CHARS - 1] + "…" for i in idx]
    sub = cm[np.ix_(idx, idx)]
    k = len(names)

    # Several hundred labels: at most 40 inches (4,800 pixels at 120 dpi), ticks in small print, no cell counts.
    side = min(max(5.0, 0.32 * k + 2.5), 40.0)
    fig = _new_figure((side + 1.0, side))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(sub, interpolation="nearest", cmap="Blues", aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    tick_fs = 10 if k <= 15 else 7 if k <= _COUNTS_UP_TO else 4
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(names, rotation=90 if k > 8 else 45, ha="center" if k > 8 else "right", fontsize=tick_fs)
    ax.set_yticklabels(names, fontsize=tick_fs)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("Gold")
    if title is None:
        n, acc = metrics.get('n', int(sub.sum())), metrics.get('accuracy', float('nan'))
        title = f"Confusion matrix (n={n}, acc={acc:.3f})"
        if len(names) < len(labels):
            title += f"\n{len(labels) - len(names)} absent label(s) not shown"
    ax.set_title(title)

    vmax = sub.max() if sub.size else 0
    cell_fs = 10 if k <= 15 else 6
    for i in range(k if k <= _COUNTS_UP_TO else 0):
        for j in range(k):
            v = int(sub[i, j])
            if k > 15 and v == 0:
                continue
            ax.text(
                j, i, str(v), ha="center", va="center", fontsize=cell_fs,
                color="white" if vmax and v > vmax / 2 else "black",
            )
    _save_figure(fig, path, dpi=100 if k <= 15 else 120)


def _finite(v: Any) -> bool:
    if v is None or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, row in enumerate(history):
        if not isinstance(row, Mapping) or not _finite(row.get(key)):
            continue
        step = row.get("step")
        xs.append(float(step) if _finite(step) else float(i))
        ys.append(float(row[key]))
    return xs, ys


def plot_training_curves(history: Sequence[Mapping[str, Any]], path) -> None:
    """Write training curves as a PNG.

    ``history`` rows look like ``{"step": 10, "train/loss": 1.2, "train/lr":
    2e-4, "val/loss": 0.9, "val/accuracy": 0.93}``; any key may be missing or
    ``None``/NaN in any row (train and eval rows are usually logged
    separately).  Rows without a ``step`` use their index.  Panels: loss
    (``train/loss`` and ``val/loss``) and ``val/accuracy`` vs step, plus a
    learning-rate panel when ``train/lr`` is present.  Empty panels say
    "no data" instead of failing; an empty history still yields a PNG.
    """
    history = list(history or [])
    lr = _series(history, "train/lr")
    n_panels = 3 if lr[0] else 2
    fig = _new_figure((5.0 * n_panels, 4.0))
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]

    def _no_data(ax):
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")

    def _finish(ax, title, ylabel):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)

    ax = axes[0]
    plotted = False
    for key, style in (("train/loss", "-"), ("val/loss", "o-")):
        xs, ys = _series(history, key)
        if xs:
            ax.plot(xs, ys, style, label=key, markersize=4)
            plotted = True
    if plotted:
        ax.legend()
    else:
        _no_data(ax)
    _finish(ax, "Loss", "loss")

    ax = axes[1]
    xs, ys = _series(history, "val/accuracy")
    if xs:
        ax.plot(xs, ys, "o-", color="tab:green", label="val/accuracy", markersize=4)
        ax.legend()
    else:
        _no_data(ax)
    _finish(ax, "Validation accuracy", "accuracy")

    if n_panels == 3:
        ax = axes[2]
        ax.plot(lr[0], lr[1], "-", color="tab:purple", label="train/lr")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.legend()
        _finish(ax, "Learning rate", "lr")

    fig.tight_layout()
    _save_figure(fig, path)


# --------------------------------------------------------------------------
# file helpers
# --------------------------------------------------------------------------
def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.bool_):
        return bool(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def write_json(obj: Any, path) -> None:
    """Atomically write ``obj`` as indented JSON (temp file + ``os.replace``).

    numpy scalars/arrays and ``Path`` objects are converted; parent
    directories are created.
    """
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def write_jsonl(rows: Iterable[Any], path) -> None:
    """Atomically write ``rows`` as JSON Lines (one compact object per line)."""
    text = "".join(json.dumps(r, ensure_ascii=False, default=_json_default) + "\n" for r in rows)
    write_atomic(path, text)


def log_to_trackers(accelerator, metrics: dict, png: Path, step: int, prefix: str = "val") -> None:
    """W&B's extras beside the scalars every tracker gets: a per-class table and the confusion-matrix image."""
    if not accelerator.is_main_process or not any(t.name == "wandb" for t in accelerator.trackers):
        return
    import wandb
    run = accelerator.get_tracker("wandb", unwrap=True)
    table = wandb.Table(columns=["label", "precision", "recall", "f1", "support", "accuracy"],
                        data=[[k, v["precision"], v["recall"], v["f1"], v["support"], v["accuracy"]]
                              for k, v in metrics["per_class"].items()])
    run.log({f"{prefix}/per_class": table, f"{prefix}/confusion_matrix": wandb.Image(str(png))}, step=step)
