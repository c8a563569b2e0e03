"""Speed and memory of the reference recipes against trec-accel, on one GPU, in one run.

Training setups (each: sequences/s, tokens/s, seconds per epoch of the training split, peak memory):
  a  the reference notebook: trl SFTTrainer, batch 1 x accumulation 8, gradient checkpointing, paged AdamW 32-bit
  b  a fast plain Transformers Trainer: large batch, length grouping, gradient checkpointing, label-only loss
  c  trec-accel: scripts/train.py for one epoch (shared prefix, label-position logits), in its own process
Evaluation: questions/s of the notebook's one-question-at-a-time generation against trec-accel's scoring.

tokens/s counts the tokens of the full prompt + label sequences, the same unit for every setup, so the
ratios of tokens/s and of sequences/s agree.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from .batching import IGNORE, Encoder
from .cli import require_cuda
from .config import PROJECTIONS, load_config
from .data import load_data
from .memory import GIB
from .task import BUILTIN


def _cfg(args, task: str, overrides=()):
    return load_config(args.config, [f"model.name={args.model}", f"data.path={args.data}", f"data.task={task}",
                                      *overrides])


def _dataset(tokenizer, encoder: Encoder, examples):
    """Tokenized full sequences with the loss on the label tokens (what a careful Trainer user builds)."""
    rows = []
    for e in examples:
        enc = encoder.encode(e.text, e.label)
        ids = enc.prompt_ids + enc.label_ids
        rows.append({"input_ids": ids, "attention_mask": [1] * len(ids),
                     "labels": [IGNORE] * len(enc.prompt_ids) + enc.label_ids})
    return rows


class _StepTimer:
    def __init__(self, warmup: int):
        self.warmup, self.times, self._t = warmup, [], 0.0

    def callback(self):
        from transformers import TrainerCallback
        timer = self

        class CB(TrainerCallback):
            def on_step_begin(self, *a, **k):
                torch.cuda.synchronize()
                timer._t = time.perf_counter()

            def on_step_end(self, *a, **k):
                torch.cuda.synchronize()
                timer.times.append(time.perf_counter() - timer._t)
        return CB()

    def seconds_per_step(self) -> float:
        t = sorted(self.times[self.warmup:])
        return t[len(t) // 2]


def _fresh_lora(base, cfg):
    """peft's own LoRA layers: what the baselines run, and the reference the fused groups are timed against."""
    from .model import add_lora
    return add_lora(base, dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, fused="off")), sharded=False)


def reference_setups(args, task: str, base, tokenizer, train, results: dict) -> None:
    """Setups a and b on an already loaded 4-bit base model (a fresh LoRA each)."""
    from datasets import Dataset
    from peft import prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    cfg = _cfg(args, task)
    encoder = Encoder(tokenizer, BUILTIN[task], cfg.data.template)
    mean_len = sum(len(r["input_ids"]) for r in _dataset(tokenizer, encoder, train)) / len(train)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                           gradient_checkpointing_kwargs={"use_reentrant": False})
    runs = [(s_, b_) for s_ in args.setups if s_ in ("a", "b") for b_ in (args.trainer_batch if s_ == "b" else [1])]
    for setup, batch in runs:
        # trl >= 1.x refuses LoRA on lm_head (its loss reads lm_head.weight directly): setup a adapts the
        # seven projections only, 1.4% fewer trainable parameters, the same speed class.
        lora_cfg = _cfg(args, task, ["lora.target_modules=" + ",".join(PROJECTIONS)]) if setup == "a" else cfg
        model = _fresh_lora(base, lora_cfg)
        timer = _StepTimer(warmup=2)
        torch.cuda.reset_peak_memory_stats()
        common = dict(output_dir=f"/tmp/bench_{setup}", max_steps=args.steps + 2, bf16=True, learning_rate=2e-4,
                      lr_scheduler_type="cosine", max_grad_norm=0.3, logging_steps=1000, save_strategy="no",
                      report_to=[], gradient_checkpointing=True,
                      gradient_checkpointing_kwargs={"use_reentrant": False}, optim="paged_adamw_32bit",
                      dataloader_num_workers=2, remove_unused_columns=False)
        if setup == "a":
            from trl import SFTConfig, SFTTrainer
            texts = [encoder.prompt(e.text, e.label).text.replace(tokenizer.eos_token, "") for e in train]
            sft_args = SFTConfig(per_device_train_batch_size=1, gradient_accumulation_steps=8,
                                 dataset_text_field="text", packing=False, max_length=1024, **common)
            trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_dict({"text": texts}),
                                 processing_class=tokenizer, callbacks=[timer.callback()])
            seqs_per_step = 8
        else:
            bs = batch
            import inspect
            params = inspect.signature(TrainingArguments).parameters  # the option was renamed in transformers 5
            grouping = ({"train_sampling_strategy": "group_by_length"} if "train_sampling_strategy" in params
                        else {"group_by_length": True})
            targs = TrainingArguments(per_device_train_batch_size=bs, gradient_accumulation_steps=1, **grouping,
                                      **common)
            data = Dataset.from_list(_dataset(tokenizer, encoder, train))
            trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[timer.callback()],
                              data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, pad_to_multiple_of=8))
            seqs_per_step = bs
        trainer.train()
        sps = seqs_per_step / timer.seconds_per_step()
        key = f"{task}/{setup}" + (f"/{batch}" if setup == "b" else "")
        results[key] = {"sequences_per_s": sps, "tokens_per_s": sps * mean_len,
                                      "seconds_per_epoch": len(train) / sps,
                                      "peak_gib": torch.cuda.max_memory_allocated() / GIB,
                                      "seconds_per_step": timer.seconds_per_step(), "sequences_per_step": seqs_per_step}
        results[key]["batch"] = seqs_per_step
        print(json.dumps({key: results[key]}), flush=True)
        base = model.unload()
        del trainer, model
        torch.cuda.empty_cache()


def _train_process(args, overrides, out: Path) -> tuple[dict, float]:
    """scripts/train.py in its own process (its peak memory is its own): (train_summary.json, wall seconds)."""
    cmd = [sys.executable, "scripts/train.py", *overrides, f"output_dir={out}"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    return json.loads((out / "train_summary.json").read_text()), time.perf_counter() - t


def _summary_row(s: dict, n_train: int, mean_len: float) -> dict:
    sps = s["sequences"] / s["train_seconds"]
    # Without the process's first step (one-off kernel selection, allocator growth) and the CUDA graph captures
    # (once per shape and run: they record kernels and compute nothing): what an epoch costs once they are done.
    rest = s["train_seconds"] - s["first_step_seconds"] - (s.get("graph_capture_seconds") or 0.0)
    steady = (s["sequences"] - s["global_batch"]) / rest if rest > 0 else sps
    return {"sequences_per_s": sps, "tokens_per_s": sps * mean_len, "seconds_per_epoch": n_train / sps,
            "peak_gib": s["peak_mem_gib"], "steady_sequences_per_s": steady,
            "steady_seconds_per_epoch": n_train / steady, "first_step_seconds": s["first_step_seconds"],
            "graph_capture_seconds": s.get("graph_capture_seconds"), "graph_shapes": s.get("graph_shapes"),
            "cuda_graphs": s.get("cuda_graphs"), "shared_prefix": s.get("shared_prefix"),
            "train_seconds": s["train_seconds"], "sequences": s["sequences"], "global_batch": s["global_batch"]}


def _run_note(run: int) -> str:
    return f" (run {run})" if run > 1 else ""


def trec_accel_setup(args, task: str, n_train: int, mean_len: float, results: dict) -> None:
    """Setup c: the real entry point for one epoch, at each --batch and each --c-variants set of overrides."""
    for batch in args.batch:
        for variant in args.c_variants:
            name = f"{task}/c/{batch}" + (f"/{variant}" if variant else "")
            run = 1 + sum(k == name or k.startswith(name + " (run ") for k in results)
            name += _run_note(run)  # a variant given twice: the host's second run of it
            overrides = ["--config", args.config, f"model.name={args.model}", f"data.path={args.data}",
                         f"data.task={task}", "train.max_steps=0", "train.epochs=1", f"train.batch_size={batch}",
                         "train.grad_accum=1", "train.group_by_length=true",
                         f"model.gradient_checkpointing={'true' if args.checkpointing else 'false'}",
                         "train.eval_every=0", "train.save_every=0", "train.log_every=1000", *args.c_overrides,
                         *variant.split()]
            s, wall = _train_process(args, overrides, Path(args.out_dir) / name.replace("/", "_"))
            results[name] = {**_summary_row(s, n_train, mean_len), "batch": batch, "variant": variant, "run": run,
                             "checkpointing": bool(args.checkpointing), "train_wall_seconds": wall}
            print(json.dumps({name: results[name]}), flush=True)


def config_runs(args, results: dict) -> None:
    """Each shipped config as a user runs it: training, then scripts/evaluate.py on its adapter, wall times."""
    for config in args.configs:
        name = f"config/{Path(config).stem}"
        out = Path(args.out_dir) / name.replace("/", "_")
        model = [f"model.name={args.model}"] if "mistral7b" in config else []
        s, wall = _train_process(args, ["--config", config, *model], out)
        t = time.perf_counter()
        subprocess.run([sys.executable, "scripts/evaluate.py", "--config", config, *model, f"adapter={out}/adapter",
                        f"output_dir={out}/test"], check=True)
        eval_wall = time.perf_counter() - t
        metrics = json.loads((out / "test" / "metrics.json").read_text())
        results[name] = {"train_seconds": s["train_seconds"], "first_step_seconds": s["first_step_seconds"],
                         "graph_capture_seconds": s.get("graph_capture_seconds"), "train_wall_seconds": wall,
                         "steps": s["step"], "sequences": s["sequences"], "peak_gib": s["peak_mem_gib"],
                         "cuda_graphs": s.get("cuda_graphs"), "shared_prefix": s.get("shared_prefix"),
                         "val_accuracy": s.get("best_accuracy"), "evaluate_wall_seconds": eval_wall,
                         "test_accuracy": metrics["accuracy"]}
        print(json.dumps({name: results[name]}), flush=True)


def _scoring_seconds(args, model, encoder, test, accelerator, cfg) -> dict:
    """{"batch/max tokens[/prefix attention]": seconds to score the test questions}, each after a warm-up on 64 of
    them."""
    from .forward import set_prefix_attention
    from .scoring import evaluate_examples
    by_batch = {}
    for mode in args.eval_prefix_attention or [None]:
        if mode:
            set_prefix_attention(model, mode)
        for batch in args.eval_batch:
            for cap in args.eval_tokens or [cfg.eval.max_batch_tokens]:
                ev = dataclasses.replace(cfg.eval, batch_size=batch, max_batch_tokens=cap)
                evaluate_examples(model, encoder, test[:64], accelerator, ev)  # warm-up
                torch.cuda.synchronize()
                t = time.perf_counter()
                evaluate_examples(model, encoder, test, accelerator, ev)
                torch.cuda.synchronize()
                by_batch[f"{batch}/{cap}" + (f"/{mode}" if mode else "")] = time.perf_counter() - t
    if args.eval_prefix_attention:
        set_prefix_attention(model, cfg.model.prefix_attention)
    return by_batch


def eval_setups(args, task: str, base, tokenizer, test, results: dict) -> None:
    """The notebook's generation against trec-accel's scoring, with the adapter as peft's LoRA layers, as fused
    groups (`lora.fused`, what scripts/evaluate.py runs on a 4-bit base with eval.dequantize off) and, on an
    unquantized base, folded into the weights as scripts/evaluate.py does there (`model.merge_adapter`). A 4-bit
    base stays 4-bit here: later setups share it; `dequantized_setups` times it dequantized, after them."""
    from accelerate import Accelerator

    from .lora_groups import fuse_lora
    from .model import merge_adapter
    from .scoring import generate_labels

    cfg = _cfg(args, task)
    model = _fresh_lora(base, cfg).eval()
    encoder = Encoder(tokenizer, BUILTIN[task], cfg.data.template)
    accelerator = Accelerator()
    n_gen = min(args.generate_questions, len(test))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate_labels(model, encoder, [encoder.encode(test[0].text).prompt_ids], 10)  # warm-up
        torch.cuda.synchronize()
        t = time.perf_counter()
        for e in test[:n_gen]:  # the notebook: one question at a time
            generate_labels(model, encoder, [encoder.encode(e.text).prompt_ids], 10)
        torch.cuda.synchronize()
        gen_qps = n_gen / (time.perf_counter() - t)
        by_batch = _scoring_seconds(args, model, encoder, test, accelerator, cfg)
        fuse_lora(model, "on", sharded=False)
        fused = _scoring_seconds(args, model, encoder, test, accelerator, cfg)
        # A fresh adapter's B is zero: merging it leaves the shared base's values as they were.
        merged = _scoring_seconds(args, merge_adapter(model), encoder, test, accelerator, cfg) \
            if getattr(base, "hf_quantizer", None) is None else {}
    batch, score_s = min(by_batch.items(), key=lambda kv: kv[1])
    results[f"{task}/eval"] = {"generate_questions_per_s": gen_qps, "score_questions_per_s": len(test) / score_s,
                               "score_seconds_for_test": score_s, "eval_batch": batch,
                               "score_seconds_by_batch": by_batch, "n_test": len(test),
                               "speedup": len(test) / score_s / gen_qps, "fused_seconds_by_batch": fused,
                               "merged_seconds_by_batch": merged}
    print(json.dumps({f"{task}/eval": results[f"{task}/eval"]}), flush=True)
    if not merged:
        model.unload()


def dequantized_setups(args, base, tokenizer, tests: dict, results: dict) -> None:
    """Scoring each task's test questions with the 4-bit base dequantized once and a fresh adapter merged into it,
    what scripts/evaluate.py runs with eval.dequantize on; last, since it leaves the shared base dequantized."""
    from accelerate import Accelerator

    from .model import merge_adapter

    # In bf16 throughout, as scripts/evaluate.py loads it: setups a and b upcast the shared base's embeddings, norms
    # and lm_head to fp32 (peft's prepare_model_for_kbit_training).
    base = base.dequantize(dtype=torch.bfloat16).to(torch.bfloat16)
    accelerator = Accelerator()
    for task, test in tests.items():
        cfg = _cfg(args, task)
        encoder = Encoder(tokenizer, BUILTIN[task], cfg.data.template)
        # A fresh adapter's B is zero: merging it leaves the base's values as they were, for the next task.
        base = merge_adapter(_fresh_lora(base, cfg).eval())
        with torch.autocast("cuda", dtype=torch.bfloat16):
            seconds = _scoring_seconds(args, base, encoder, test, accelerator, cfg)
        results[f"{task}/eval"]["dequantized_merged_seconds_by_batch"] = seconds
        print(json.dumps({f"{task}/eval": {"dequantized_merged_seconds_by_batch": seconds}}), flush=True)


def table(results: dict) -> str:
    lines = ["| task | setup | sequences/s | tokens/s | s/epoch | peak GiB | x (b) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    names = {"a": "(a) notebook SFTTrainer", "b": "(b) Trainer, large batch"}
    for task in ("coarse", "fine"):
        bs = {r["batch"]: r["sequences_per_s"] for k, r in results.items() if k.startswith(f"{task}/b/")}
        rows = [(names["a"], results[f"{task}/a"])] if f"{task}/a" in results else []
        rows += [(f"{names['b']} {r['batch']}", r) for k, r in results.items() if k.startswith(f"{task}/b/")]
        rows += [(f"(c) trec-accel, batch {r['batch']} {r['variant']}".rstrip() + _run_note(r["run"]), r)
                 for k, r in results.items() if k.startswith(f"{task}/c/")]
        for label, r in rows:
            # Against (b) at the same batch where it ran, else its first batch.
            ref = bs.get(r["batch"], next(iter(bs.values()), None))
            ratio = f"{r['sequences_per_s'] / ref:.1f}" if ref else "-"
            lines.append(f"| {task} | {label} | {r['sequences_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['seconds_per_epoch']:.1f} | {r['peak_gib']:.1f} | {ratio} |")
            if "steady_sequences_per_s" in r:
                ratio = f"{r['steady_sequences_per_s'] / ref:.1f}" if ref else "-"
                extra = (f", graphs {r['graph_shapes']} shapes in {r['graph_capture_seconds']:.1f} s"
                         if r.get("cuda_graphs") else "")
                if "train_wall_seconds" in r:  # the whole scripts/train.py process: start-up and loading included
                    extra += f", train.py {r['train_wall_seconds']:.1f} s"
                tokens_per_s = r['steady_sequences_per_s'] * results[f'{task}/mean_sequence_tokens']
                lines.append(f"| {task} | {label}, without its first step ({r['first_step_seconds']:.1f} s{extra}) | "
                             f"{r['steady_sequences_per_s']:.1f} | {tokens_per_s:,.0f} | "
                             f"{r['steady_seconds_per_epoch']:.1f} | {r['peak_gib']:.1f} | {ratio} |")
        e = results.get(f"{task}/eval")
        if e:
            lines.append(f"| {task} | eval: generate, 1 question at a time | {e['generate_questions_per_s']:.2f} q/s "
                         "| | | | |")
            lines.append(f"| {task} | eval: trec-accel scoring (batch/tokens {e['eval_batch']}), {e['n_test']} "
                         f"questions in {e['score_seconds_for_test']:.2f} s "
                         f"| {e['score_questions_per_s']:.0f} q/s | | | | x{e['speedup']:.0f} vs generate |")
            for key, what in (("fused_seconds_by_batch", "LoRA layers fused in groups"),
                              ("merged_seconds_by_batch", "adapter merged into the weights"),
                              ("dequantized_merged_seconds_by_batch",
                               "4-bit base dequantized, adapter merged into the weights")):
                if e.get(key):
                    batch, seconds = min(e[key].items(), key=lambda kv: kv[1])
                    lines.append(f"| {task} | eval: the same, {what} (batch/tokens {batch}), {e['n_test']} questions "
                                 f"in {seconds:.2f} s | {e['n_test'] / seconds:.0f} q/s | | | | "
                                 f"x{e['n_test'] / seconds / e['generate_questions_per_s']:.0f} vs generate |")
    configs = [(k, r) for k, r in results.items() if k.startswith("config/")]
    if configs:
        lines += ["", "| config | steps | training loop s | first step s | graph capture s | peak GiB | train wall s | "
                      "evaluate.py wall s | val acc | test acc |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for k, r in configs:
            lines.append(f"| {k[7:]} | {r['steps']} | {r['train_seconds']:.1f} | {r['first_step_seconds']:.1f} | "
                         f"{r['graph_capture_seconds'] or 0:.1f} | {r['peak_gib'] or 0:.1f} | "
                         f"{r['train_wall_seconds']:.1f} | {r['evaluate_wall_seconds']:.1f} | "
                         f"{r['val_accuracy'] or 0:.3f} | {r['test_accuracy']:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mistral-7b-random")
    p.add_argument("--data", default=os.environ.get("TREC_DATA_DIR", "CogComp/trec"))
    p.add_argument("--config", default="configs/mistral7b_coarse.yaml")
    p.add_argument("--tasks", nargs="+", default=["coarse", "fine"])
    p.add_argument("--setups", nargs="+", default=["a", "b", "c", "eval"])
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps of setups a and b (after 2 warm-up)")
    p.add_argument("--trainer-batch", type=int, nargs="+", default=[64], help="setup b's batch sizes")
    p.add_argument("--batch", type=int, nargs="+", default=[256], help="trec-accel micro-batches for setup c")
    p.add_argument("--c-variants", nargs="+", default=[""],
                   help="setup c once per variant: a space-separated set of config overrides ('' = as configured)")
    p.add_argument("--configs", nargs="*", default=[], help="shipped configs to run end to end (train + evaluate.py)")
    p.add_argument("--checkpointing", type=int, default=1, help="activation checkpointing in setup c (1/0)")
    p.add_argument("--eval-batch", type=int, nargs="+", default=[128, 256, 512],
                   help="scoring batch sizes (questions, at most) to time")
    p.add_argument("--eval-tokens", type=int, nargs="*", default=[],
                   help="eval.max_batch_tokens values to time with each batch size (default: the config's)")
    p.add_argument("--eval-prefix-attention", nargs="*", default=[], choices=["auto", "grouped", "joined"],
                   help="model.prefix_attention modes to time scoring with, at every batch (default: the config's)")
    p.add_argument("--generate-questions", type=int, default=20)
    p.add_argument("--c-overrides", nargs="*", default=[])
    p.add_argument("--out-dir", default="runs/benchmark")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    require_cuda("the benchmark needs a CUDA GPU")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(), "model": args.model, "args": vars(args)}
    base = tokenizer = None
    tests = {}  # each task's test questions, for the dequantized base's scoring after the task loop
    for task in args.tasks:
        cfg = _cfg(args, task)
        splits = load_data(cfg.data, BUILTIN[task])
        if {"a", "b", "eval"} & set(args.setups) and base is None:
            from accelerate import Accelerator

            from .model import load_base
            from .runtime import Runtime
            # Liger's kernels as the config sets them for training (setups a, b) or else for evaluation (evaluate.py's).
            base, tokenizer, _ = load_base(cfg, Runtime.of(Accelerator(), cfg.model.dtype),
                                           training=bool({"a", "b"} & set(args.setups)))
        if tokenizer is None:
            from .model import load_tokenizer
            from .offline_models import resolve_model_path
            tokenizer = load_tokenizer(resolve_model_path(args.model))
        encoder = Encoder(tokenizer, BUILTIN[task], cfg.data.template)
        lens = [len(encoder.encode(e.text, e.label).prompt_ids) + len(encoder.candidates[e.label])
                for e in splits["train"]]
        mean_len = sum(lens) / len(lens)
        results[f"{task}/mean_sequence_tokens"] = mean_len
        results[f"{task}/prefix_tokens"] = len(encoder.prefix_ids)
        if "eval" in args.setups:
            tests[task] = splits["test"]
            eval_setups(args, task, base, tokenizer, splits["test"], results)
        if {"a", "b"} & set(args.setups):
            reference_setups(args, task, base, tokenizer, splits["train"], results)
        if "c" in args.setups:
            trec_accel_setup(args, task, len(splits["train"]), mean_len, results)
        (out / "benchmark.json").write_text(json.dumps(results, indent=1))
    if tests and getattr(base, "hf_quantizer", None) is not None:
        dequantized_setups(args, base, tokenizer, tests, results)
    config_runs(args, results)
    (out / "benchmark.json").write_text(json.dumps(results, indent=1))
    print(table(results))
    (out / "benchmark.md").write_text(table(results) + "\n")
    return 0
