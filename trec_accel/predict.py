"""Classify questions with a trained adapter (or the zero-shot base model) by constrained label scoring.

    scripts/predict.py [--config CONFIG] adapter=DIR [key=value ...] [--json] [--file F] [questions ...]

Questions come from the command line, from a text file (one per line), or from stdin when neither is
given. The adapter's own `config.yaml` (the training config saved next to it) supplies the base model,
the task and the prompt template, so `--config` is optional; `--config` and `key=value` overrides still
win where given (an explicit `model.name=...`, `data.task=...` or `data.template=...` override is
checked against the adapter's recorded base model and task like `scripts/evaluate.py` does).

Every question gets the best-scoring valid label (`score_prompts`, one process). Output: one line per
question, `LABEL<TAB>score<TAB>question`, or with `--json` one object per line with the question, label,
score and every label's score.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence, TextIO

from .batching import Encoder
from .config import Config, ConfigError, load_config, reference_markdown
from .model import adapter_config, context_length, load_for_inference
from .runtime import start
from .scoring import EvalError, best_and_scores, score_prompts, shared_prefix, uses_shared_prefix
from .task import load_task

# `key=value` overrides are dotted identifiers followed by '='; anything else is a question.
_OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")
# Keys that the adapter's config decides unless overridden on the command line.
ADAPTER_KEYS = ("model.name", "data.task", "data.template")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="predict.py", description="Classify texts with a trained adapter (constrained scoring).",
        epilog="Overrides are dotted config keys (adapter=DIR, eval.batch_size=8, ...); other arguments are "
               "questions. Arguments after '--' are always questions.")
    p.add_argument("--config", help="YAML run config; default: the adapter's own config.yaml")
    p.add_argument("--help-config", action="store_true", help="print every config key with its default and exit")
    p.add_argument("--json", action="store_true", help="one JSON object per question (question, label, score, scores)")
    p.add_argument("--file", help="text file with one question per line ('-' = stdin)")
    p.add_argument("args", nargs="*", metavar="key=value | question")
    return p


def split_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(argv without the questions after '--', those questions)."""
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def parse(argv: Sequence[str] | None):
    """(argparse namespace, config, overrides, questions given as arguments)."""
    head, tail = split_args(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_intermixed_args(head)  # options may come between questions
    if args.help_config:
        print(reference_markdown())
        sys.exit(0)
    overrides = [a for a in args.args if _OVERRIDE.match(a)]
    questions = [a for a in args.args if not _OVERRIDE.match(a)] + tail
    return args, resolve_config(args.config, overrides), overrides, questions


def resolve_config(config: str | None, overrides: Sequence[str]) -> Config:
    """--config (or the adapter's config.yaml) with the overrides; model/task/template from the adapter."""
    own = adapter_config(overrides)
    if config is None:
        return load_config(own, overrides)
    cfg = load_config(config, overrides)
    if own is not None:
        trained = load_config(own)
        given = {o.partition("=")[0] for o in overrides}
        for key in ADAPTER_KEYS:
            if key not in given:
                section, name = key.split(".")
                setattr(getattr(cfg, section), name, getattr(getattr(trained, section), name))
    return cfg


def read_questions(questions: Sequence[str], file: str | None, stdin: TextIO) -> list[str]:
    """The questions, from arguments, a file or stdin; an empty one is an error naming its 1-based number."""
    if questions and file:
        raise ConfigError("give questions either as arguments or with --file, not both")
    if questions:
        qs = list(questions)
    else:
        if file and file != "-":
            path = Path(file)
            if not path.is_file():
                raise ConfigError(f"question file not found: {path}")
            text = path.read_text(encoding="utf-8")
        else:
            text = stdin.read()
        qs = text.splitlines()
        while qs and not qs[-1].strip():  # trailing blank lines are not questions
            qs.pop()
    if not qs:
        raise EvalError("no questions given (as arguments, with --file, or on stdin)")
    for i, q in enumerate(qs, start=1):
        if not q.strip():
            raise EvalError(f"question {i} is empty")
    return [q.strip() for q in qs]


def predict(model, encoder, questions: Sequence[str], batch_size: int, normalize: str = "sum") -> list[dict]:
    """One row per question: question, label, score (of the label), scores (every label's)."""
    encs = encoder.encode_all(questions)
    encoder.count_shortened(encs, "questions")
    prefix = shared_prefix(model, encoder) if uses_shared_prefix(encoder, encs) else None
    rows = []
    for i in range(0, len(questions), max(1, batch_size)):
        chunk = questions[i : i + batch_size]
        prompts = [e.prompt_ids for e in encs[i : i + batch_size]]
        scores = score_prompts(model, encoder, prompts, prefix, normalize)
        for q, (k, sc) in zip(chunk, best_and_scores(scores)):
            rows.append({"question": q, "label": encoder.labels[k], "score": sc[k],
                         "scores": dict(zip(encoder.labels, sc))})
    return rows


def format_rows(rows: Sequence[dict], as_json: bool) -> str:
    if as_json:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return "".join(f"{r['label']}\t{r['score']:.4f}\t{r['question']}\n" for r in rows)


def main(argv: Sequence[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> list[dict]:
    """The script's body: parse, read the questions, load the model once, score, print."""
    args, cfg, _, given = parse(argv)
    questions = read_questions(given, args.file, stdin or sys.stdin)
    runtime = start(cfg)
    if not runtime.is_main:
        return []  # prediction runs on one process
    model, tokenizer = load_for_inference(cfg, runtime, cfg.adapter)
    encoder = Encoder(tokenizer, load_task(cfg.data.task), cfg.data.template, context_length(model))
    with runtime.accelerator.autocast():
        rows = predict(model, encoder, questions, cfg.eval.batch_size, cfg.eval.normalize)
    out = stdout or sys.stdout
    out.write(format_rows(rows, args.json))
    out.flush()
    return rows
