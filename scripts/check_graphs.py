#!/usr/bin/env python
"""On a CUDA GPU: a training step replayed from a CUDA graph computes what the eager step computes.

For each micro-batch, the same weights, the gradients of the eager step and of the graph step (replayed from the
graph of its shape, after the eager first pass that every shape gets) are compared by ||graph - eager|| /
||eager||, with the summed loss. Dropout is off so that both draw nothing at random.

    python scripts/check_graphs.py --config configs/smollm2_coarse.yaml [key=value ...]
"""
import argparse
import sys

import torch

from trec_accel import cli
from trec_accel.batching import Encoder, collate
from trec_accel.config import load_config
from trec_accel.data import load_data
from trec_accel.loss import LabelLoss
from trec_accel.model import add_lora, load_base
from trec_accel.runtime import start
from trec_accel.step import TrainStep
from trec_accel.task import load_task


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cli.require_cuda("CUDA graphs need a CUDA GPU")
    cfg = load_config(args.config, [*args.overrides, "lora.dropout=0"])
    runtime = start(cfg)  # bf16 autocast where the model's dtype is bf16, as in training
    acc = runtime.accelerator
    base, tok, _ = load_base(cfg, runtime)
    model = add_lora(base, cfg, sharded=False)
    with torch.no_grad():  # LoRA B starts at zero: give it weights so that every gradient is non-trivial
        for n, w in model.named_parameters():
            if "lora_B" in n:
                w.normal_(0, 0.02)
    params = [w for w in model.parameters() if w.requires_grad]
    lm = acc.prepare(LabelLoss(model).train())
    task = load_task(cfg.data.task)
    enc = Encoder(tok, task, cfg.data.template)
    train = load_data(cfg.data, task)["train"]
    encs = sorted((enc.encode(e.text, e.label) for e in train[: 8 * args.batch]), key=lambda e: len(e.prompt_ids))
    slots = enc.longest_label
    # Widths padded to 64: few shapes, several batches of each.
    batches = [collate(encs[i : i + args.batch], tok.pad_token_id, enc.prefix_ids, slots, 64)
               for i in range(0, len(encs), args.batch)]
    eager, graphed = TrainStep(lm, acc, params, False), TrainStep(lm, acc, params, True)
    for w in params:  # one set of gradient tensors, zeroed in place: the graphs write into these
        w.grad = torch.zeros_like(w)
    for batch in batches:  # a shape's first micro-batch runs eagerly: below, every graphed step is a replay
        graphed(batch, 0.0)
    worst = 0.0
    for batch in batches:
        results = []
        for step in (eager, graphed):
            for w in params:
                w.grad.zero_()
            loss = float(step(batch, 1.0))
            results.append((loss, torch.cat([w.grad.flatten().float() for w in params])))
        (le, ge), (lg, gg) = results
        rel = float((gg - ge).norm() / ge.norm())
        worst = max(worst, rel)
        print(f"batch {tuple(batch.input_ids.shape)}: loss eager {le:.6f} graph {lg:.6f}, "
              f"gradient relative difference {rel:.2e}")
    print(f"graphs captured: {len(graphed.graphs)}; worst gradient relative difference {worst:.2e}")
    # fp32 must agree to rounding; bf16 differs by kernel choices and the non-deterministic attention backward
    # (eager against eager in bf16 differs as much: BENCHMARKS.md).
    tolerance = 1e-4 if cfg.model.dtype == "fp32" else 5e-2
    print(f"tolerance ({cfg.model.dtype}): {tolerance:.0e}")
    return 0 if graphed.graphs and worst < tolerance else 1


if __name__ == "__main__":
    sys.exit(cli.main(main))
