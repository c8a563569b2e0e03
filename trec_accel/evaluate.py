"""Evaluation of the base model (zero-shot) or a trained adapter on one split: `scripts/evaluate.py`. The scoring
itself is `scoring.evaluate_examples`."""
from __future__ import annotations

import logging
import time
from pathlib import Path

from .batching import Encoder
from .config import check_output_dir
from .data import Schema, load_data, load_trec
from .memory import INFERENCE_MEMORY_SETTINGS, out_of_memory
from .model import check_adapter, context_length, load_for_inference
from .reports import format_report, plot_confusion_matrix, write_json, write_jsonl
from .runtime import show_logs, start
from .scoring import EvalError, evaluate_examples
from .task import Task, load_task

log = logging.getLogger("trec_accel")


def select_split(cfg, task: Task, splits: dict) -> tuple[str, list]:
    """The examples named by eval.split: a split of data.path, or a data file of its own."""
    name = cfg.eval.split
    if name in splits:
        examples = splits[name]
    elif Path(name).exists():
        loaded = load_trec(name, Schema(task, cfg.data.text_column, cfg.data.label_column))
        examples = loaded.get("test") or loaded.get("train") or []
    else:
        raise EvalError(f"unknown split '{name}': {cfg.data.path} has {', '.join(sorted(splits))} "
                        "(or give a path to a data file)")
    if not examples:
        raise EvalError(f"split '{name}' is empty")
    return name, examples[: cfg.eval.max_examples or None]


def run(cfg) -> dict:
    """Evaluate the base model (zero-shot) or cfg.adapter on eval.split; write the reports to output_dir."""
    t0 = time.perf_counter()
    if cfg.adapter:  # before the data: a wrong adapter is the clearer error
        check_adapter(cfg.adapter, cfg)
    check_output_dir(cfg.output_dir)  # else an unwritable folder shows only after the evaluation
    task = load_task(cfg.data.task)
    split, examples = select_split(cfg, task, load_data(cfg.data, task))
    t1 = time.perf_counter()
    runtime = start(cfg)
    show_logs(runtime)
    t2 = time.perf_counter()
    model, tokenizer = load_for_inference(cfg, runtime, cfg.adapter)
    encoder = Encoder(tokenizer, task, cfg.data.template, context_length(model))
    t3 = time.perf_counter()
    with runtime.accelerator.autocast(), out_of_memory("evaluation", INFERENCE_MEMORY_SETTINGS):
        metrics, rows = evaluate_examples(model, encoder, examples, runtime.accelerator, cfg.eval,
                                          cfg.eval.method)
    metrics.update(model=cfg.model.name, adapter=cfg.adapter or None, task=task.name, split=split,
                   method=cfg.eval.method)
    t4 = time.perf_counter()
    if runtime.is_main:
        write_reports(metrics, rows, Path(cfg.output_dir), cfg.eval.method)
        # Where the time went (Transformers, and peft where needed, are imported on first use: in the model's
        # phase); the rest of the process's wall time is Python's start and the package's imports (torch).
        log.info("start-up: data %.2f s, accelerator %.2f s, model %.2f s; scoring %.2f s; reports %.2f s",
                 t1 - t0, t2 - t1, t3 - t2, t4 - t3, time.perf_counter() - t4)
    # Every process ends together and takes its process group down: one that exits while the others still hold
    # theirs can abort in the backend's threads ("terminate called without an active exception", seen with gloo).
    runtime.accelerator.wait_for_everyone()
    runtime.accelerator.end_training()
    return metrics


def write_reports(metrics: dict, rows: list[dict], out: Path, method: str) -> None:
    """metrics.json, predictions.jsonl and confusion_matrix.png in `out`, and the report on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(metrics, out / "metrics.json")
    write_jsonl(rows, out / "predictions.jsonl")
    plot_confusion_matrix(metrics, out / "confusion_matrix.png")
    print(format_report(metrics))
    if method == "generate":
        print(f"Answers that were not a valid label: {metrics['invalid']} of {metrics['n']}")
    print(f"Reports written to {out}/")
