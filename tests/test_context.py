"""Questions too long for the model's context are cut from their end to fit, and counted, never silently scored
past the model's positions (issue 12: a 20,000-character question was scored with 3,942 tokens of 2,048)."""
from __future__ import annotations

import json
import logging

import pytest

from conftest import ROOT
from trec_accel.batching import Encoder, PromptTokenError
from trec_accel.task import FINE

LONG = ("Why is the sky blue and what makes the sunset red " * 400)[:20_000] + " ?"


def test_long_questions_are_cut_from_the_end_to_fit(tokenizer, caplog):
    plain, fitted = Encoder(tokenizer, FINE, "notebook"), Encoder(tokenizer, FINE, "notebook", 2048)
    assert len(plain.encode(LONG).prompt_ids) > 2048
    short = fitted.encode("Who wrote Hamlet ?", 3)
    assert short == plain.encode("Who wrote Hamlet ?", 3) and not short.shortened
    cue = short.prompt_ids[-1:]  # " =": what asks for the label
    for label in (None, 3):
        enc = fitted.encode(LONG, label)
        assert enc.shortened
        room = 2048 - fitted.longest_label
        assert room - 8 < len(enc.prompt_ids) <= room  # the longest start that fits
        assert enc.prompt_ids[: len(fitted.prefix_ids)] == fitted.prefix_ids and enc.prompt_ids[-1:] == cue
        if label is not None:
            assert enc.label_ids == short.label_ids
    with caplog.at_level(logging.WARNING, logger="trec_accel"):
        assert fitted.count_shortened([short, fitted.encode(LONG)], "questions") == 1
    assert "1 of 2 questions are too long for the model's context (2048 positions, with the instruction and the " \
           "longest label): each was cut from its end to fit" in caplog.text


def test_a_context_without_room_for_any_question_is_refused(tokenizer):
    with pytest.raises(PromptTokenError, match=r"take \d+ tokens, more than the model's context of 200: use a model "
                                               r"with a longer context"):
        Encoder(tokenizer, FINE, "notebook", 200)


def test_evaluate_counts_the_questions_it_cut(tmp_path, capsys, caplog):
    """scripts/evaluate.py on a data file with a 20,000-character question: scored, counted, exit code 0."""
    from trec_accel import cli
    from trec_accel.config import load_config
    from trec_accel.evaluate import run

    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [{"text": "Who wrote Hamlet ?", "label": "HUM"},
                                                             {"text": LONG, "label": "DESC"}]))
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.path={data}", f"eval.split={data}",
                                                       "data.val_fraction=0.5", f"output_dir={tmp_path / 'eval'}"])
    with caplog.at_level(logging.WARNING, logger="trec_accel"):
        assert cli.main(lambda: run(cfg)) == 0
    assert "1 of 2 questions are too long for the model's context (2048 positions" in caplog.text
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["shortened"] == 1 and metrics["n"] == 2
