"""scripts/predict.py: questions from arguments, a file or stdin; text or --json output; clean errors.

The model-free parts (argument splitting, question reading, config resolution) run in-process; the end
to end runs use the tiny model with a 3-step adapter.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from conftest import toy_data as _toy_fixture

CONFIG = str(ROOT / "configs" / "tiny.yaml")
LABELS = ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
SCRIPT = str(ROOT / "scripts" / "predict.py")


def run_script(script: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=ROOT, env=env,
                          input=stdin if stdin is not None else "", capture_output=True, text=True, timeout=300)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def one_error_line(r, *needles):
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    assert r.stdout == ""


def parse_text(stdout: str) -> list[tuple[str, float, str]]:
    rows = []
    for line in stdout.splitlines():
        label, score, question = line.split("\t")
        rows.append((label, float(score), question))
    return rows


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    toy = _toy_fixture.__wrapped__(tmp_path_factory.mktemp("toy"))
    out = tmp_path_factory.mktemp("train")
    ok(run_script("train.py", "--config", CONFIG, f"data.path={toy}", f"output_dir={out}", "train.max_steps=3",
                  "train.save_every=0", "train.log_every=3"))
    return out / "adapter"


QUESTIONS = ["Who wrote Hamlet ?", "Where is Lima ?", "How tall is K2 ?"]


# --------------------------------------------------------------------------- end to end


def test_arguments_text_output(adapter):
    # no --config: model, task and template come from the adapter's own config.yaml
    r = ok(run_script("predict.py", f"adapter={adapter}", *QUESTIONS))
    rows = parse_text(r.stdout)
    assert [q for _, _, q in rows] == QUESTIONS
    assert all(label in LABELS and score < 0 for label, score, _ in rows)


def test_json_matches_text_and_evaluate_scoring(adapter):
    text = parse_text(ok(run_script("predict.py", "--config", CONFIG, f"adapter={adapter}", *QUESTIONS)).stdout)
    rows = [json.loads(line) for line in
            ok(run_script("predict.py", f"adapter={adapter}", "--json", *QUESTIONS)).stdout.splitlines()]
    assert [r["question"] for r in rows] == QUESTIONS
    for r, (label, score, _) in zip(rows, text):
        assert set(r) == {"question", "label", "score", "scores"}
        assert list(r["scores"]) == LABELS
        assert r["label"] == max(r["scores"], key=r["scores"].get) == label
        assert r["score"] == r["scores"][r["label"]]
        assert r["score"] == pytest.approx(score, abs=1e-4)


def test_file_and_stdin(adapter, tmp_path):
    f = tmp_path / "questions.txt"
    f.write_text("\n".join(QUESTIONS) + "\n")
    from_file = parse_text(ok(run_script("predict.py", f"adapter={adapter}", "--file", str(f))).stdout)
    stdin = "\n".join(QUESTIONS) + "\n"
    from_stdin = parse_text(ok(run_script("predict.py", f"adapter={adapter}", stdin=stdin)).stdout)
    assert [q for _, _, q in from_file] == QUESTIONS
    assert from_file == from_stdin


def test_empty_question(adapter):
    one_error_line(run_script("predict.py", f"adapter={adapter}", "Who wrote Hamlet ?", "  "), "question 2 is empty")
    one_error_line(run_script("predict.py", f"adapter={adapter}", stdin="Who wrote Hamlet ?\n\nWhere is Lima ?\n"),
                   "question 2 is empty")


def test_missing_adapter(tmp_path):
    one_error_line(run_script("predict.py", f"adapter={tmp_path / 'nowhere'}", "Who wrote Hamlet ?"),
                   "adapter folder not found")


@pytest.mark.parametrize("config, error", [("{}", "names no peft_type: not an adapter saved by peft"),
                                           ('{"peft_type": "LORA",', "is not a JSON object"),
                                           ("[]", "is not a JSON object")])
def test_damaged_adapter_config(adapter, tmp_path, config, error):
    """peft's own errors for these are a bare KeyError ('peft_type') or a JSON traceback."""
    from trec_accel.config import load_config
    from trec_accel.model import ModelLoadError, check_adapter
    broken = tmp_path / "adapter"
    broken.mkdir()
    (broken / "adapter_config.json").write_text(config)
    with pytest.raises(ModelLoadError, match=error):
        check_adapter(str(broken), load_config(CONFIG))


def test_adapter_task_mismatch(adapter):
    one_error_line(run_script("predict.py", f"adapter={adapter}", "data.task=fine", "Who wrote Hamlet ?"),
                   "coarse task, not fine")


def test_adapter_weights_that_fit_no_layer(adapter, tmp_path):
    # peft would only warn and run the untrained model; an export that lost its names must stop here.
    import shutil

    from safetensors.torch import load_file, save_file
    broken = tmp_path / "adapter"
    shutil.copytree(adapter, broken)
    weights = load_file(str(broken / "adapter_model.safetensors"))
    save_file({k.replace("self_attn", "_fsdp_wrapped_module.self_attn"): v for k, v in weights.items()},
              str(broken / "adapter_model.safetensors"))
    one_error_line(run_script("predict.py", f"adapter={broken}", "Who wrote Hamlet ?"), "match no layer of the model")


def test_adapters_are_portable_and_old_ones_still_load(adapter, tmp_path, caplog):
    """The adapter names a base another machine can load (for the tiny model, built by trec-accel: its name, not
    this machine's cache path), trec_accel.json records how to rebuild it, and adapters written before these
    fields existed still load and score alike."""
    import logging
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trec_accel.config import load_config
    from trec_accel.model import ModelLoadError, check_adapter
    from trec_accel.offline_models import BUILD_VERSION, resolve_model_path
    from trec_accel.predict import main

    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "tiny-random-mistral"
    meta = json.loads((adapter / "trec_accel.json").read_text())
    assert (meta["base_model"], meta["offline_model"]) == (base, {"name": base, "build_version": BUILD_VERSION})
    assert not [p.name for p in adapter.iterdir() if p.is_file() and str(Path.home()) in p.read_text(errors="replace")]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(resolve_model_path(base)), str(adapter))

    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    config = json.loads((old / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/someone/.cache/trec_accel/tiny-random-mistral-v1"
    (old / "adapter_config.json").write_text(json.dumps(config))
    # What adapters recorded before tasks were recorded whole: the built-in task's name and its labels.
    (old / "trec_accel.json").write_text(json.dumps({"model": meta["model"], "task": "coarse", "template": "notebook",
                                                     "labels": LABELS}))
    rows = {}
    for name, folder in (("new", adapter), ("old", old)):
        out = io.StringIO()
        main([f"adapter={folder}", "--json", *QUESTIONS], stdout=out)
        rows[name] = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows["old"] == rows["new"] and len(rows["new"]) == len(QUESTIONS)

    # An adapter of another build of its offline base is loaded, with a warning.
    meta["offline_model"]["build_version"] = "v0"
    (old / "trec_accel.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="trec_accel.model"):
        check_adapter(str(old), load_config(CONFIG))
    assert any("build v0 of tiny-random-mistral, this is build " + BUILD_VERSION in r.getMessage()
               for r in caplog.records)

    # The offline SmolLM2 and its hub original are one base to the adapter check; another model is not.
    (old / "trec_accel.json").write_text(json.dumps({**meta, "model": "smollm2-135m-instruct"}))
    check_adapter(str(old), load_config(None, ["model.name=HuggingFaceTB/SmolLM2-135M-Instruct"]))
    with pytest.raises(ModelLoadError, match="set model.name=smollm2-135m-instruct"):
        check_adapter(str(old), load_config(CONFIG))


# --------------------------------------------------------------------------- in-process helpers


def test_split_overrides_from_questions(adapter):
    from trec_accel.predict import parse
    args, cfg, overrides, questions = parse(["--json", f"adapter={adapter}", "eval.batch_size=2",
                                             "What is 2+2=4 ?", "--", "x.y=z ?"])
    assert args.json and overrides == [f"adapter={adapter}", "eval.batch_size=2"]
    assert questions == ["What is 2+2=4 ?", "x.y=z ?"]
    assert (cfg.adapter, cfg.eval.batch_size, cfg.model.name, cfg.data.task) == \
        (str(adapter), 2, "tiny-random-mistral", "coarse")


def test_adapter_config_wins_over_config_file_unless_overridden(adapter, tmp_path):
    from trec_accel.predict import resolve_config
    other = tmp_path / "other.yaml"
    other.write_text("model:\n  name: smollm2-135m-instruct\ndata:\n  task: fine\n  template: chat\n")
    cfg = resolve_config(str(other), [f"adapter={adapter}"])
    assert (cfg.model.name, cfg.data.task, cfg.data.template) == ("tiny-random-mistral", "coarse", "notebook")
    cfg = resolve_config(str(other), [f"adapter={adapter}", "data.task=fine"])
    assert cfg.data.task == "fine"


def test_read_questions():
    from trec_accel.predict import read_questions
    from trec_accel.scoring import EvalError
    assert read_questions([], None, io.StringIO("a ?\nb ?\n\n")) == ["a ?", "b ?"]
    with pytest.raises(EvalError, match="question 1 is empty"):
        read_questions(["", "b"], None, io.StringIO(""))
    with pytest.raises(EvalError, match="no questions"):
        read_questions([], None, io.StringIO(""))
