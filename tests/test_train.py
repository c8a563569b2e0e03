"""The training recipe end to end: loss goes down, exact resume, signal checkpoints, bad checkpoints, bad input.

Every run is a few optimizer steps of the tiny random Mistral on CPU. The data is the `toy_data` fixture, or
the real TREC files (a small slice of them) when TREC_DATA_DIR is set.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TREC_DATA_DIR
from trec_accel import checkpoint
from trec_accel.config import load_config
from trec_accel.task import COARSE
from trec_accel.train import run

TINY = str(ROOT / "configs" / "tiny.yaml")
# Small micro-batches so that an epoch spans many optimizer steps (the toy train split holds 62 questions).
SMALL = ["train.batch_size=2", "train.grad_accum=2", "train.log_every=1", "train.save_every=0",
         "eval.batch_size=16", "eval.max_examples=8"]


def data_overrides(toy_data: Path) -> list[str]:
    if TREC_DATA_DIR:  # the real files: 80 training questions and a 54-question validation split
        return [f"data.path={TREC_DATA_DIR}", "data.max_examples=80", "data.val_fraction=0.01"]
    return [f"data.path={toy_data}", "data.max_examples=80"]


def script_env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_MIXED_PRECISION", None)
    return env


def train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "scripts/train.py", "--config", TINY, *overrides]


def run_script(overrides: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(overrides), cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=timeout)


def run_inprocess(overrides: list[str]) -> dict:
    from trec_accel.train import run
    return run(load_config(TINY, overrides))


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def trainable_state(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(ckpt / "model.safetensors"))


# --------------------------------------------------------------------------- 1. end to end


def test_script_trains_and_writes_a_loadable_adapter(tmp_path, toy_data, tiny_model_path, tokenizer):
    out = tmp_path / "run"
    overrides = [f"output_dir={out}", *data_overrides(toy_data), *SMALL,
                 "train.max_steps=30", "train.lr=2e-2", "train.save_every=30"]
    proc = run_script(overrides)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # The loss of the last logged step is far below the first one (random init starts near ln(32000) = 10.4).
    history = read_json(out / "history.json")
    rows = [r for r in history if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = rows[0]["train/loss"], rows[-1]["train/loss"]
    assert last < 0.5 * first, [round(r["train/loss"], 2) for r in rows]
    assert {"val/loss", "val/accuracy", "val/macro_f1"} <= set(rows[-1])
    summary = read_json(out / "train_summary.json")
    assert summary["status"] == "finished" and summary["step"] == 30
    # What the benchmark derives its steady-state speed from.
    cfg = load_config(TINY, overrides)
    assert summary["global_batch"] == cfg.train.batch_size * cfg.train.grad_accum
    assert summary["sequences"] == 30 * summary["global_batch"]
    assert 0 < summary["first_step_seconds"] < summary["train_seconds"]

    # The resolved config is saved and reloads equal to what the run was given.
    want = load_config(TINY, overrides)
    assert load_config(out / "config.yaml") == want

    # The adapter folder is complete: PEFT files, tokenizer, our metadata and the config.
    adapter = out / "adapter"
    names = {p.name for p in adapter.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", "tokenizer.json",
            "trec_accel.json", "config.yaml"} <= names, names
    assert not (out / "adapter.tmp").exists()
    meta = read_json(adapter / "trec_accel.json")
    assert meta["model"] == "tiny-random-mistral" and meta["task"] == COARSE.to_dict()
    assert [label if isinstance(label, str) else label["name"] for label in meta["task"]["labels"]] == \
        ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"]
    assert load_config(adapter / "config.yaml") == want

    # Plain PEFT loads it, and it computes what the trained model (rebuilt from the final checkpoint) computes.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trec_accel.loss import LabelLoss
    from trec_accel.model import add_lora

    ids = tokenizer(["[INST] Classify: Who wrote Hamlet ? [/INST]\n question = HUM"], return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_path).eval()(ids).logits
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), str(adapter))
        adapter_logits = peft_model.eval()(ids).logits
        trained = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_path), want, sharded=False)
        result = LabelLoss(trained).load_state_dict(trainable_state(out / "checkpoints" / "step-30"), strict=False)
        assert not result.unexpected_keys
        assert not [k for k in result.missing_keys if "lora_" in k]  # every LoRA weight came from the checkpoint
        trained_logits = trained.eval()(ids).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(adapter_logits, trained_logits, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- 2. exact resume


def test_stopped_and_resumed_run_equals_uninterrupted(tmp_path, toy_data):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    overrides = [f"output_dir={out}", *data_overrides(toy_data), *SMALL, "lora.dropout=0.1",
                 "train.max_steps=12", "train.save_every=4", "train.lr=1e-2", "train.keep_last=3"]
    summary = run_inprocess(overrides)
    assert summary["status"] == "finished" and summary["step"] == 12
    assert (summary["sessions"], summary["sequences"]) == (1, 12 * 4)
    uninterrupted = read_json(out / "history.json")
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert step_dirs(out / "checkpoints") == ["step-12", "step-4", "step-8"]
    # Step 8 is in the middle of the first epoch, so the resume must restore the position in the data order.
    assert 0 < uninterrupted[7]["train/epoch"] < 1, uninterrupted[7]

    # As if the job had been stopped right after the step-8 checkpoint.
    shutil.rmtree(out / "checkpoints" / "step-12")
    shutil.rmtree(out / "adapter")
    for name in ("history.json", "train_summary.json"):
        (out / name).unlink()
    torch.manual_seed(1234)  # the resume must not depend on the state the process happens to be in
    summary = run_inprocess(overrides + ["resume=latest"])
    assert summary["status"] == "finished" and summary["step"] == 12
    assert read_json(out / "checkpoints" / "step-12" / "trainer_state.json")["step"] == 12

    resumed = read_json(out / "history.json")
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(uninterrupted[8:], resumed[8:]):
        for key in ("train/loss", "train/lr", "train/grad_norm", "val/loss", "val/accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key, a[key], b[key])
    resumed_weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert resumed_weights.keys() == weights.keys()
    for k in weights:
        torch.testing.assert_close(resumed_weights[k], weights[k], atol=1e-6, rtol=0, msg=k)

    # train_summary.json counts every session: steps 1-8 came from the checkpoint's record, 9-12 from this one.
    step8 = read_json(out / "checkpoints" / "step-8" / "trainer_state.json")
    assert (step8["sessions"], step8["sequences"]) == (1, 8 * 4) and step8["train_seconds"] > 0
    resumed_summary = read_json(out / "train_summary.json")
    assert (resumed_summary["sessions"], resumed_summary["sequences"]) == (2, 12 * 4)
    assert resumed_summary["train_seconds"] > step8["train_seconds"]
    # Resuming the finished run (nothing left to train) keeps its totals instead of reporting 0 s and 0 sequences.
    again = run_inprocess(overrides + ["resume=latest"])
    assert (again["sessions"], again["sequences"]) == (3, 12 * 4)
    assert again["train_seconds"] == pytest.approx(resumed_summary["train_seconds"])
    assert read_json(out / "train_summary.json")["sessions"] == 3


def test_fused_lora_trains_as_peft_layers_do(tmp_path, toy_data):
    """The same run with LoRA groups and with peft's layers, dropout on: the same losses, gradient norms and
    validation at every step (on the CPU the groups draw the very masks peft's layers draw)."""
    runs = {}
    for fused in ("on", "off"):
        run_inprocess([f"output_dir={tmp_path / fused}", *data_overrides(toy_data), *SMALL, "lora.dropout=0.1",
                       "train.max_steps=4", "train.eval_every=2", "train.lr=1e-2", f"lora.fused={fused}"])
        runs[fused] = read_json(tmp_path / fused / "history.json")
    assert len(runs["on"]) == len(runs["off"]) == 4
    for a, b in zip(runs["off"], runs["on"]):
        for key in ("train/loss", "train/grad_norm", "val/loss", "val/accuracy"):
            assert (key in a) == (key in b)
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)


@pytest.mark.parametrize("shared", ["on", "off"])
def test_a_token_cap_runs_the_same_steps_in_more_passes(tmp_path, toy_data, monkeypatch, shared):
    """train.max_batch_tokens=1 runs every row of a micro-batch as a pass of its own: the same losses and gradient
    norms at every step as whole micro-batches (dropout off), with and without the shared prefix."""
    from trec_accel import step
    calls = []
    monkeypatch.setattr(step.TrainStep, "__call__", lambda self, batch, scale, _call=step.TrainStep.__call__:
                        calls.append(batch.input_ids.shape[0]) or _call(self, batch, scale))
    runs = {}
    for cap in (0, 1):
        calls.clear()
        run_inprocess([f"output_dir={tmp_path / str(cap)}", *data_overrides(toy_data), *SMALL, "lora.dropout=0",
                       "train.max_steps=4", "train.eval_every=0", "train.lr=1e-2", f"train.shared_prefix={shared}",
                       f"train.max_batch_tokens={cap}"])
        runs[cap] = read_json(tmp_path / str(cap) / "history.json")
        assert calls == ([2] * 8 if cap == 0 else [1] * 16)  # 4 steps x 2 micro-batches of 2 rows
    for a, b in zip(runs[0], runs[1], strict=True):
        for key in ("train/loss", "train/grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)


def test_a_token_cap_that_would_split_a_micro_batch_is_refused_where_the_backend_counts_backward_passes():
    from trec_accel.batching import Encoded
    from trec_accel.config import ConfigError, TrainConfig
    from trec_accel.train import check_pass_cap
    # The widest row: 10 prefix tokens, 27 after them with its label, padded to 32.
    encoded = [Encoded(list(range(30)), [1, 2]), Encoded(list(range(35)), [1, 2])]
    t = TrainConfig(batch_size=8, max_batch_tokens=255, pad_multiple=8)
    for backend in ("deepspeed", "zero3", "fsdp"):
        with pytest.raises(ConfigError, match=f"train.max_batch_tokens=255 would run a micro-batch of 8 rows "
                                              fr"\(up to 32 tokens wide\) in several backward passes, which {backend}"):
            check_pass_cap(backend, t, encoded, 10)
        check_pass_cap(backend, TrainConfig(batch_size=8, max_batch_tokens=256, pad_multiple=8), encoded, 10)
        check_pass_cap(backend, TrainConfig(batch_size=8, max_batch_tokens=0), encoded, 10)
    for backend in ("single", "ddp"):  # they run the passes
        check_pass_cap(backend, t, encoded, 10)


def test_validation_runs_the_instruction_once_whatever_training_does(tmp_path, toy_data, monkeypatch):
    """With the training step on full sequences (train.shared_prefix=off), validation scoring still runs the
    instruction once for the whole set, and scores as full sequences do (tests/test_forward.py)."""
    from trec_accel import scoring
    calls = []
    real = scoring.shared_prefix
    monkeypatch.setattr(scoring, "shared_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    summary = run_inprocess([f"output_dir={tmp_path / 'run'}", *data_overrides(toy_data), *SMALL,
                             "train.max_steps=2", "train.shared_prefix=off"])
    assert summary["shared_prefix"] is False
    assert calls == [1]  # one validation at the end, one instruction pass
    assert "val/accuracy" in read_json(tmp_path / "run" / "history.json")[-1]


# --------------------------------------------------------------------------- 3. signal-triggered checkpoint


def _wait_for_step(proc: subprocess.Popen, log: Path, min_step: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pattern = re.compile(r'"step": (\d+), "train/loss"')
    while time.monotonic() < deadline:
        steps = [int(s) for s in pattern.findall(log.read_text(errors="replace"))]
        if steps and max(steps) >= min_step:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended early (rc {proc.returncode}): {log.read_text()[-3000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no training step {min_step} logged in {timeout} s: {log.read_text()[-3000:]}")


def test_signal_saves_a_checkpoint_and_exits_cleanly_then_resume_continues(tmp_path, toy_data, caplog):
    base = [*data_overrides(toy_data), *SMALL, "train.max_steps=100000", "train.eval_every=0"]
    procs = {}
    try:
        # Both signals at once: the two runs share the start-up time.
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            out = tmp_path / sig.name
            log = tmp_path / f"{sig.name}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(train_cmd([f"output_dir={out}", *base]), cwd=ROOT, env=script_env(),
                                        stdout=f, stderr=subprocess.STDOUT)
            procs[sig] = (proc, out, log)
        for sig, (proc, _, log) in procs.items():
            _wait_for_step(proc, log, 3, timeout=180)
            proc.send_signal(sig)
        for proc, _, log in procs.values():
            assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        for proc, _, _ in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    stopped_at = {}
    for sig, (_, out, log) in procs.items():
        summary = read_json(out / "train_summary.json")
        assert summary["status"] == "interrupted", summary
        n = summary["step"]
        assert 3 <= n < 100000
        assert step_dirs(out / "checkpoints") == [f"step-{n}"]  # published, no temporary folder left
        ckpt = out / "checkpoints" / f"step-{n}"
        assert (ckpt / "MANIFEST.json").is_file() and checkpoint.verify(ckpt) is None
        state = read_json(ckpt / "trainer_state.json")
        assert state["step"] == n and [r["step"] for r in state["history"]] == list(range(1, n + 1))
        assert not (out / "adapter").exists()  # an interrupted run publishes no adapter
        assert f"signal {int(sig)} received: saved a checkpoint at step {n}" in log.read_text()
        stopped_at[sig] = n

    # Resuming goes on from the step the signal saved.
    out, n = procs[signal.SIGUSR1][1], stopped_at[signal.SIGUSR1]
    before = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.INFO, logger="trec_accel"):
        summary = run_inprocess([f"output_dir={out}", *base, f"train.max_steps={n + 3}", "resume=latest"])
    assert signal.getsignal(signal.SIGTERM) is before  # run() hands the signal handlers back
    assert f"at step {n} " in "\n".join(r.getMessage() for r in caplog.records if "resumed from" in r.getMessage())
    assert summary["status"] == "finished" and summary["step"] == n + 3
    history = read_json(out / "history.json")
    assert [r["step"] for r in history] == list(range(1, n + 4))  # steps 1..n from the checkpoint, then n+1..
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


# --------------------------------------------------------------------------- 4. bad checkpoints


def test_partial_or_corrupt_checkpoints_are_skipped(tmp_path, toy_data, caplog):
    out = tmp_path / "run"
    run_inprocess([f"output_dir={out}", *data_overrides(toy_data), *SMALL, "train.max_steps=6",
                   "train.save_every=2", "train.keep_last=3"])
    root = out / "checkpoints"
    assert step_dirs(root) == ["step-2", "step-4", "step-6"]
    assert checkpoint.find_resume("latest", root) == root / "step-6"
    assert checkpoint.find_resume("", root) is None

    # step-6: a file truncated after the save; step-4: no manifest; .step-99.tmp: a save that never finished.
    with open(root / "step-6" / "optimizer.bin", "r+b") as f:
        f.truncate(100)
    (root / "step-4" / "MANIFEST.json").unlink()
    partial = root / ".step-99.tmp"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"partial")

    with caplog.at_level(logging.WARNING, logger="trec_accel.checkpoint"):
        assert checkpoint.find_resume("latest", root) == root / "step-2"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step-6" in w and "optimizer.bin" in w and "does not match" in w for w in warnings), warnings
    assert any("step-4" in w and "no manifest" in w for w in warnings), warnings
    assert not any("step-99" in w for w in warnings)  # not a step-N folder: never a candidate

    with pytest.raises(ValueError, match=r"step-6.*optimizer\.bin.*does not match"):
        checkpoint.find_resume(str(root / "step-6"), root)
    with pytest.raises(ValueError, match="no manifest"):
        checkpoint.find_resume(str(root / "step-4"), root)
    with pytest.raises(ValueError, match="no manifest"):
        checkpoint.find_resume(str(partial), root)
    with pytest.raises(ValueError, match="folder not found"):
        checkpoint.find_resume(str(root / "step-123"), root)
    assert checkpoint.find_resume(str(root / "step-2"), root) == root / "step-2"

    # Nothing intact: a fresh start, not an error.
    shutil.rmtree(root / "step-2")
    assert checkpoint.find_resume("latest", root) is None


# --------------------------------------------------------------------------- 5. refusing bad input


def test_bad_data_and_bad_config_stop_before_training(tmp_path, toy_data):
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = (toy_data / "train.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"text": "   ", "label": "HUM"})
    lines[5] = json.dumps({"text": "What is this ?", "label": "NOPE"})
    (bad / "train.jsonl").write_text("\n".join(lines) + "\n")
    out_data, out_cfg = tmp_path / "run-data", tmp_path / "run-cfg"
    cases = {
        "data": train_cmd([f"output_dir={out_data}", f"data.path={bad}", *SMALL]),
        "config": train_cmd([f"output_dir={out_cfg}", f"data.path={toy_data}", "train.max_step=3"]),
    }
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for k, c in cases.items()}
    results = {k: (p.communicate(timeout=120), p.returncode) for k, p in procs.items()}

    (stdout, stderr), rc = results["data"]
    assert rc == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "Traceback" not in stderr
    train_file = bad / "train.jsonl"
    assert f"{train_file}:3: empty text" in errors[0]
    assert f"{train_file}:6: unknown coarse label 'NOPE'" in errors[0]
    assert not (out_data / "checkpoints").exists() and not (out_data / "adapter").exists()

    (stdout, stderr), rc = results["config"]
    assert rc == 2, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"], stderr
    assert not out_cfg.exists()


# --------------------------------------------------------------------------- 6. resuming with another batch layout


def _checkpoint_of_one_step(out: Path, common: list[str], optimizer: str, recorded: bool) -> Path:
    """A run's step-1 checkpoint; `recorded=False` makes it one written before checkpoints recorded their settings."""
    run_inprocess(common + ["train.max_steps=1", f"train.optimizer={optimizer}"])
    ckpt = out / "checkpoints" / "step-1"
    state = read_json(ckpt / "trainer_state.json")
    assert state["settings"] == {"lora.r": 8, "lora.alpha": 16, "train.optimizer": optimizer,
                                 "lora.target_modules": sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj", "lm_head"])}
    if not recorded:
        del state["settings"]
        (ckpt / "trainer_state.json").write_text(json.dumps(state))
        checkpoint.write_manifest(ckpt)
    return ckpt


@pytest.mark.parametrize("recorded", [True, False])
def test_resume_with_another_optimizer_is_refused(tmp_path, toy_data, recorded):
    """A checkpoint's optimizer state is its optimizer's (the 7B configs moved from bitsandbytes' paged AdamW 32-bit
    to torch's AdamW): another one is refused with one line, before the model loads where the checkpoint records its
    settings, after loading the state where it was written before it did; the checkpoint's own optimizer resumes."""
    out = tmp_path / "run"
    common = [f"output_dir={out}", *data_overrides(toy_data), *SMALL, "train.save_every=1"]
    _checkpoint_of_one_step(out, common, "paged_adamw_32bit", recorded)
    written = "train.optimizer=paged_adamw_32bit" if recorded else "one of bitsandbytes' optimizers"
    with pytest.raises(checkpoint.CheckpointError, match=f"optimizer=adamw: its state was written with {written}"):
        run_inprocess(common + ["train.max_steps=2", "resume=latest"])
    summary = run_inprocess(common + ["train.max_steps=2", "train.optimizer=paged_adamw_32bit", "resume=latest"])
    assert summary["step"] == 2


@pytest.mark.parametrize("change, recorded, says", [
    ("lora.r=4", True, "with lora.r=4: its state was written with lora.r=8"),
    ("lora.r=4", False, "do not fit this run's LoRA .*size mismatch"),
    ("lora.target_modules=[q_proj,v_proj]", False, "do not fit this run's LoRA .*optimizer's group"),
])
def test_resume_with_another_lora_is_refused(tmp_path, toy_data, change, recorded, says):
    """LoRA weights of other shapes (or of other modules) than the checkpoint's are refused with one line, not
    PyTorch's list of mismatched tensors: by the recorded settings, else when the state does not load."""
    out = tmp_path / "run"
    common = [f"output_dir={out}", *data_overrides(toy_data), *SMALL, "train.save_every=1"]
    _checkpoint_of_one_step(out, common, "adamw", recorded)
    with pytest.raises(checkpoint.CheckpointError, match=says):
        run_inprocess(common + ["train.max_steps=2", change, "resume=latest"])


def test_paging_does_not_change_an_optimizers_state():
    """Paged and unpaged bitsandbytes optimizers of one precision keep the same state: either resumes the other."""
    now = {"lora.r": 8, "train.optimizer": "adamw_8bit"}
    checkpoint.check_settings(Path("c"), {"lora.r": 8, "train.optimizer": "paged_adamw_8bit"}, now)
    checkpoint.check_settings(Path("c"), None, now)  # written before settings were recorded
    checkpoint.check_optimizer_state(Path("c"), "paged_adamw_32bit", {"state": {0: {"step": 0}}})  # nothing stepped
    with pytest.raises(checkpoint.CheckpointError, match="written with train.optimizer=paged_adamw_32bit"):
        checkpoint.check_settings(Path("c"), {"train.optimizer": "paged_adamw_32bit"}, now)
    with pytest.raises(checkpoint.CheckpointError, match="written with train.optimizer=adamw"):
        checkpoint.check_optimizer_state(Path("c"), "adamw_8bit", {"state": {0: {"step": 3, "exp_avg": 0}}})


def test_resume_with_another_batch_split_or_size(tmp_path, toy_data):
    """A checkpoint falls between optimizer steps, so a resume may split the global batch differently
    (batch_size x grad_accum) and train as if it had not; a bigger global batch goes on from the same example."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    common = [f"output_dir={out}", *data_overrides(toy_data), *SMALL, "train.lr=1e-2", "train.max_steps=6",
              "train.save_every=3", "train.keep_last=3"]
    run_inprocess(common + ["train.batch_size=2", "train.grad_accum=1"])
    uninterrupted = read_json(out / "history.json")
    weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    step3 = read_json(out / "checkpoints" / "step-3" / "trainer_state.json")
    assert (step3["epoch"], step3["position"]) == (0, 6)
    shutil.copytree(out / "checkpoints" / "step-3", tmp_path / "step-3")

    # The same global batch of 2, now as 2 micro-batches of 1 (3 micro-batches so far: not a multiple of 2).
    shutil.rmtree(out / "checkpoints" / "step-6")
    summary = run_inprocess(common + ["train.batch_size=1", "train.grad_accum=2", "resume=latest"])
    assert summary["step"] == 6
    resumed = read_json(out / "history.json")
    for a, b in zip(uninterrupted[3:], resumed[3:]):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4), (a, b)
    resumed_weights = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for k in weights:
        torch.testing.assert_close(resumed_weights[k], weights[k], atol=1e-5, rtol=1e-4, msg=k)

    # A global batch of 4: two more steps take the next 8 examples of the same epoch order.
    out2 = tmp_path / "bigger"
    shutil.copytree(tmp_path / "step-3", out2 / "checkpoints" / "step-3")
    summary = run_inprocess([f"output_dir={out2}", *data_overrides(toy_data), *SMALL, "train.lr=1e-2",
                             "train.max_steps=5", "train.batch_size=4", "train.grad_accum=1", "resume=latest"])
    assert summary["step"] == 5
    state = read_json(out2 / "checkpoints" / "step-5" / "trainer_state.json")
    assert (state["step"], state["epoch"], state["position"]) == (5, 0, 14)


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
def test_trackers_record_the_run(tmp_path, toy_data, monkeypatch, tracker):
    """Loss and validation metrics reach the tracker; W&B (offline without a key) also gets the per-class table."""
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    cfg = load_config(ROOT / "configs" / "tiny.yaml",
                      [f"output_dir={out}", f"data.path={toy_data}", "train.max_steps=2", "train.log_every=1",
                       "train.eval_every=1", f"log.tracker={tracker}"])
    run(cfg)
    assert (out / "val_confusion_matrix.png").stat().st_size > 0
    if tracker == "tensorboard":
        assert list(out.rglob("events.out.tfevents*"))
    else:
        runs = list((tmp_path / "wandb").glob("offline-run-*"))
        assert len(runs) == 1 and list(runs[0].glob("*.wandb"))


def test_step_decisions_fall_back_where_they_cannot_run():
    """CUDA graphs and the shared prefix: on where they pay, off with a reason where they cannot run or do not pay."""
    from trec_accel.step import decide_cuda_graphs, decide_shared_prefix
    cuda, cpu, small, large = torch.device("cuda"), torch.device("cpu"), 135_000_000, 7_000_000_000
    assert decide_cuda_graphs("auto", cuda, "single", "bf16", "sdpa").on
    assert decide_cuda_graphs("on", cuda, "single", "bf16", "sdpa").on
    for args, why in [(("auto", cpu, "single", "bf16", "sdpa"), "CUDA"),
                      (("on", cuda, "ddp", "bf16", "sdpa"), "ddp backend"),
                      (("on", cuda, "single", "fp16", "sdpa"), "fp16"),
                      (("on", cuda, "single", "bf16", "flash_attention_2"), "FlashAttention-2"),
                      (("off", cuda, "single", "bf16", "sdpa"), "train.cuda_graphs=off")]:
        d = decide_cuda_graphs(*args)
        assert not d.on and why in d.why, (args, d)
    assert decide_shared_prefix("auto", cuda, "single", 32, True, small, 0).on
    assert decide_shared_prefix("auto", cuda, "zero3", 8, False, large, 0).on
    assert decide_shared_prefix("on", cuda, "single", 1, False, small, 0).on
    assert "CPU" in decide_shared_prefix("auto", cpu, "ddp", 8, False, small, 0).why  # arithmetic-bound at any size
    for args, why in [(("auto", cuda, "single", 32, False, small, 0), "launches"),
                      (("auto", cpu, "single", 1, False, small, 0), "nothing to share"),
                      (("on", cpu, "fsdp", 8, False, large, 0), "FSDP"),
                      (("on", cuda, "single", 8, True, small, 3), "3 prompts"),
                      (("off", cpu, "single", 8, True, large, 0), "train.shared_prefix=off")]:
        d = decide_shared_prefix(*args)
        assert not d.on and why in d.why, (args, d)
    # YAML's booleans still work for the switch.
    assert load_config(TINY, ["train.shared_prefix=false"]).train.shared_prefix == "off"
    assert load_config(TINY, ["train.shared_prefix=true"]).train.shared_prefix == "on"


def test_run_totals_count_a_checkpoint_without_them_as_one_session():
    from trec_accel.train import run_totals
    assert run_totals({"step": 8}, 2.5, 16) == {"sessions": 2, "train_seconds": 2.5, "sequences": 16}
    assert run_totals({"step": 0}, 1.0, 4) == {"sessions": 1, "train_seconds": 1.0, "sequences": 4}
