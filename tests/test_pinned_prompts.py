"""The built-in TREC tasks render exactly the prompts and token ids they did before tasks became values.

`data/pinned_prompts.json` was written by the code of commit 626c395 (tasks as the strings "coarse" and "fine"):
for the tiny model's Mistral tokenizer and SmolLM2's, both templates and both tasks, it holds every prompt part,
the token ids of a question with and without its label, the shared instruction's ids and the candidate labels'
ids. Adapters trained before must see the same tokens: never regenerate the file to make this test pass.
"""
import json
from pathlib import Path

import pytest

from trec_accel.batching import Encoder
from trec_accel.model import load_tokenizer
from trec_accel.offline_models import OfflineModelError, resolve_model_path
from trec_accel.task import BUILTIN

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_prompts.json").read_text())


@pytest.fixture(scope="module")
def tokenizers():
    loaded = {}

    def get(model):
        if model not in loaded:
            try:
                loaded[model] = load_tokenizer(resolve_model_path(model))
            except OfflineModelError as e:
                pytest.skip(f"{model} is not available here: {e}")
        return loaded[model]
    return get


@pytest.mark.parametrize("case", PINNED["cases"], ids=lambda c: f"{c['model']}-{c['template']}-{c['task']}")
def test_builtin_prompts_and_token_ids_are_unchanged(case, tokenizers):
    enc = Encoder(tokenizers(case["model"]), BUILTIN[case["task"]], case["template"])
    assert enc.prefix_ids == case["prefix_ids"]
    assert enc.candidates == case["candidates"]
    for q, want in zip(PINNED["questions"], case["prompts"]):
        p = enc.prompt(q, 3)
        assert (p.text, p.prefix, p.question, p.answer, p.end) == \
            (want["text"], want["prefix"], want["question"], want["answer"], want["end"])
        labelled = enc.encode(q, 3)
        assert enc.encode(q).prompt_ids == want["prompt_ids"]
        assert labelled.prompt_ids + labelled.label_ids == want["labelled_ids"]
