#!/usr/bin/env python
"""Profile trec-accel's training step on a GPU: step times, peak memory, and the kernels that take the time.

    python scripts/profile_train_step.py --config configs/mistral7b_coarse.yaml model.name=mistral-7b-random \
        model.gradient_checkpointing=true --batch 256
"""
import argparse
import time

import torch
from accelerate import Accelerator
from torch.profiler import ProfilerActivity, profile

from trec_accel.batching import Encoder, collate, epoch_order
from trec_accel.config import load_config
from trec_accel.data import load_splits
from trec_accel.loss import LabelLoss, batch_loss
from trec_accel.model import add_lora, load_base, prepare_for_training


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=6, help="steps run; the last two are profiled")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    acc = Accelerator(mixed_precision="bf16")
    base, tok, plan = load_base(cfg, acc)
    model = add_lora(prepare_for_training(base, cfg), cfg)
    enc = Encoder(tok, cfg.data.task, cfg.data.template)
    train = load_splits(cfg.data.path, cfg.data.task, cfg.data.val_fraction, cfg.data.split_seed)["train"]
    encs = [enc.encode(e.text, e.label) for e in train]
    order = epoch_order([len(e.prompt_ids) for e in encs], cfg.seed, 0, True, args.batch)
    lm = LabelLoss(model).train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=cfg.train.lr)
    b = args.batch
    batches = [collate([encs[j] for j in order[i * b:(i + 1) * b]], tok.pad_token_id, enc.prefix_ids).to(acc.device)
               for i in range(args.steps)]
    prof, times = None, []
    for i, batch in enumerate(batches):
        if i == args.steps - 2:
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.__enter__()
        torch.cuda.synchronize()
        t = time.perf_counter()
        with acc.autocast():
            loss, n = batch_loss(lm, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    prof.__exit__(None, None, None)
    print("step seconds", [round(x, 3) for x in times], "widths", [x.input_ids.shape[1] for x in batches])
    print(f"peak GiB {torch.cuda.max_memory_allocated() / 2**30:.2f}")
    ka = prof.key_averages()
    busy = sum(e.self_device_time_total for e in ka) / 1e3 / 2
    print(f"GPU busy per step: {busy:.0f} ms of {1000 * sum(times[-2:]) / 2:.0f} ms wall")
    print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
