#!/usr/bin/env python
"""Profile trec-accel (on a GPU; a CPU runs it too, for a smoke test): a training step, or an evaluation of the
test split; wall times, peak memory, and the kernels that take the time.

    python scripts/profile_step.py --config configs/mistral7b_coarse.yaml model.name=mistral-7b-random \
        model.gradient_checkpointing=true --batch 256
    python scripts/profile_step.py --eval --config configs/mistral7b_coarse.yaml model.name=mistral-7b-random
"""
import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from trec_accel import cli
from trec_accel.batching import Encoder, collate, epoch_order
from trec_accel.config import load_config
from trec_accel.data import load_data
from trec_accel.loss import LabelLoss
from trec_accel.memory import GIB
from trec_accel.model import add_lora, load_base, parameter_counts, prepare_for_training
from trec_accel.runtime import start
from trec_accel.scoring import evaluate_examples
from trec_accel.step import TrainStep, decide_cuda_graphs, decide_shared_prefix
from trec_accel.task import load_task
from trec_accel.train import make_optimizer

CUDA = torch.cuda.is_available()
ACTIVITIES = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])


def timed(fn) -> float:
    sync = torch.cuda.synchronize if CUDA else (lambda: None)
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def report(prof, wall: float, what: str) -> None:
    ka = prof.key_averages()
    peak = f", peak {torch.cuda.max_memory_allocated() / GIB:.2f} GiB" if CUDA else ""
    print(f"{what}: {1000 * wall:.0f} ms wall{peak}")
    print(ka.table(sort_by="self_device_time_total" if CUDA else "self_cpu_time_total", row_limit=14,
                   max_name_column_width=50))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--eval", action="store_true", help="profile the evaluation of the test split instead")
    p.add_argument("--batch", type=int, default=256, help="training micro-batch")
    p.add_argument("--steps", type=int, default=6, help="training steps run; then the last two are run again, profiled")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    runtime = start(cfg)  # the Accelerator and precision training would have
    acc = runtime.accelerator
    base, tok, _ = load_base(cfg, runtime, training=not args.eval)
    task = load_task(cfg.data.task)
    enc = Encoder(tok, task, cfg.data.template)
    splits = load_data(cfg.data, task)
    if args.eval:
        model = add_lora(base, cfg, sharded=False).eval()

        def run():
            return evaluate_examples(model, enc, splits["test"], acc, cfg.eval)

        with acc.autocast():
            # The first pass meets every batch shape for the first time; the second is what a warm process pays.
            print("evaluation seconds, first and second pass:", [round(timed(run), 3) for _ in range(2)])
            with profile(activities=ACTIVITIES) as prof:
                wall = timed(run)
        report(prof, wall, f"evaluation of {len(splits['test'])} questions")
        return
    model = add_lora(prepare_for_training(base, cfg), cfg, sharded=False)
    _, total = parameter_counts(model)
    encs = [enc.encode(e.text, e.label) for e in splits["train"]]
    order = epoch_order([len(e.prompt_ids) for e in encs], cfg.seed, 0, True, args.batch)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = make_optimizer(cfg.train, params, fused=CUDA)
    lm, opt = acc.prepare(LabelLoss(model).train(), opt)  # as training does: autocast around the forward
    # The same per-run decisions as training, so the profile shows the step a run of this config takes.
    graphs = decide_cuda_graphs(cfg.train.cuda_graphs, acc.device, runtime.backend, runtime.precision,
                                cfg.model.attn_implementation)
    shared = decide_shared_prefix(cfg.train.shared_prefix, acc.device, runtime.backend, args.batch, graphs.on, total,
                                  0)
    print(f"CUDA graphs: {graphs}; shared prefix: {shared}")
    step_fn = TrainStep(lm, acc, params, graphs.on)
    b, slots = args.batch, enc.longest_label
    batches = [collate([encs[j] for j in order[i * b:(i + 1) * b]], tok.pad_token_id,
                       enc.prefix_ids if shared.on else None, slots, cfg.train.pad_multiple) for i in range(args.steps)]

    def step(batch):
        step_fn(batch, 1.0 / batch.n_label_tokens)
        opt.step()
        opt.zero_grad(set_to_none=not step_fn.keep_grads)

    times = [timed(lambda b=batch: step(b)) for batch in batches]
    # The last two batches again: their shapes have run by now (with graphs: captured where seen twice), so the
    # profile holds what every later step of those shapes costs, not a first run or a capture.
    with profile(activities=ACTIVITIES) as prof:
        wall = timed(lambda: [step(batch) for batch in batches[-2:]])
    print("step seconds", [round(x, 3) for x in times], "widths", [x.input_ids.shape[1] for x in batches],
          f"graph capture {step_fn.capture_seconds:.1f} s for {len(step_fn.graphs)} shapes")
    report(prof, wall, "the last two steps again")


if __name__ == "__main__":
    sys.exit(cli.main(main))
