"""The training recipe: QLoRA on TREC with a plain PyTorch loop wrapped by Accelerate.

Features: 4-bit NF4 base (CUDA) or bf16/fp32, LoRA, shared-prefix batches, gradient accumulation with the
loss normalised by the label tokens of the whole global batch (so N processes train exactly like one),
clipping, AdamW / paged AdamW, cosine or linear schedule with warm-up, periodic validation loss and
accuracy, W&B or TensorBoard, atomic checkpoints every N steps, exact mid-epoch resume, and one checkpoint
and exit 0 on SIGTERM / SIGUSR1 / SIGINT, however many and whenever they come (`signals`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from . import checkpoint, signals
from .batching import Encoder, batch_rounds, collate, epoch_order, micro_batches, shard
from .config import Config, ConfigError, check_output_dir, flat_dict, save_config
from .data import load_splits
from .forward import parts
from .launcher import check_joined
from .loss import LabelLoss, batch_loss
from .memory import EVAL_MEMORY_SETTINGS, out_of_memory
from .model import (
    ADAPTER_META,
    adapter_meta,
    add_lora,
    backend_of,
    context_length,
    fsdp_lora_state_dict,
    load_base,
    parameter_counts,
    prepare_for_training,
    write_adapter,
)
from .offline_models import portable_name
from .step import TrainStep, decide_cuda_graphs, decide_shared_prefix
from .throughput import ModelFlops, peak_flops

log = logging.getLogger("trec_accel")


def make_accelerator(cfg: Config, gradient_accumulation_steps: int = 1):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, parse_flag_from_env

    # Decided before the Accelerator exists: creating a PartialState first would fix the device and
    # ignore `accelerate launch --cpu`.
    cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if not precision or precision == "no":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() and cfg.model.dtype in ("auto", "bf16") else "no"
    trackers = [] if cfg.log.tracker == "none" else [cfg.log.tracker]
    if cfg.log.tracker == "wandb" and not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        os.environ.setdefault("WANDB_MODE", "offline")  # no key or no network: keep the run on disk
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=precision,
                              log_with=trackers or None, project_config=project,
                              step_scheduler_with_optimizer=False)
    check_joined(accelerator)
    return accelerator


def make_optimizer(cfg: Config, params, foreach: bool | None = None, fused: bool = False):
    t = cfg.train
    if t.optimizer == "adamw":
        if fused:
            return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, fused=True)
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, foreach=foreach)
    try:
        import bitsandbytes.optim as bnb_optim
    except ImportError:
        raise ConfigError(f"train.optimizer={t.optimizer} needs bitsandbytes") from None
    cls = {"paged_adamw_32bit": bnb_optim.PagedAdamW32bit, "paged_adamw_8bit": bnb_optim.PagedAdamW8bit,
           "adamw_8bit": bnb_optim.AdamW8bit}[t.optimizer]
    return cls(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(cfg: Config, optimizer, total_steps: int):
    from transformers import get_scheduler
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.train.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.train.warmup_steps, num_training_steps=total_steps)


def configure_backend(accelerator, cfg: Config) -> None:
    """Hand DeepSpeed the batch and clipping it would otherwise take from a dataloader."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        ds["gradient_accumulation_steps"] = cfg.train.grad_accum
        ds["gradient_clipping"] = cfg.train.max_grad_norm or 0.0


def stop_requested(accelerator, flag: signals.StopFlag) -> bool:
    """Whether any process has received a stop signal; every process must ask at the same point. One process
    reads its own flag: a collective (and its device sync) only where there are several."""
    if accelerator.num_processes == 1:
        return flag.signum > 0
    return accelerator.reduce(torch.tensor(float(flag.signum), device=accelerator.device), "max").item() > 0


def stopped_during_startup(accelerator, flag: signals.StopFlag, step: int) -> dict:
    """The end of a run stopped before its first step: there is nothing new to save."""
    log.warning("signal %d received during start-up: exiting before training, at step %d", flag.signum, step)
    accelerator.end_training()
    return {"status": "interrupted", "step": step}


def run_totals(start: dict, train_seconds: float, sequences: int) -> dict:
    """The run's totals over its sessions: those recorded in the trainer state this session started from, plus this
    session's. A checkpoint written before they were recorded counts as one session of unknown time (0 s,
    0 sequences)."""
    return {"sessions": start.get("sessions", 1 if start["step"] else 0) + 1,
            "train_seconds": start.get("train_seconds", 0.0) + train_seconds,
            "sequences": start.get("sequences", 0) + sequences}


class TrainClock:
    """Seconds spent in training steps, validation and saving excluded, with as few device syncs as that
    allows: one after the first step (its one-off costs are reported apart), one at each pause and log."""

    def __init__(self, device: torch.device):
        self.device = device
        self.total, self.first_step, self._logged = 0.0, None, 0.0
        self._mark = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self._mark = time.perf_counter()

    def stop(self) -> None:
        if self._mark is not None:
            self._sync()
            self.total += time.perf_counter() - self._mark
            self._mark = None

    def step_done(self) -> None:
        if self.first_step is None:
            self.stop()
            self.first_step = self.total
            self.start()

    @contextlib.contextmanager
    def paused(self):
        running = self._mark is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()

    def interval(self) -> float:
        """Training seconds since the previous call."""
        self.stop()
        self.start()
        seconds, self._logged = self.total - self._logged, self.total
        return seconds


def _trainable_only(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def run(cfg: Config) -> dict:
    """Train as configured; returns a summary (also in output_dir/train_summary.json). SIGTERM, SIGUSR1 and SIGINT
    end it with a checkpoint (see `signals`)."""
    with signals.stop_flag() as flag:
        return _train(cfg, flag)


def _train(cfg: Config, flag: signals.StopFlag) -> dict:
    from accelerate.utils import set_seed

    from .evaluate import evaluate_examples, log_to_trackers
    from .reports import plot_confusion_matrix, plot_training_curves, write_json

    out = Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    # Before anything is loaded or written: a wrong resume path or output folder shows in a second.
    resume_from = checkpoint.find_resume(cfg.resume, ckpt_root)
    check_output_dir(out)
    state = checkpoint.load_trainer_state(resume_from) if resume_from is not None else \
        {"step": 0, "epoch": 0, "position": 0, "history": [], "best_accuracy": None, "best_step": None}
    start = dict(state)
    splits = load_splits(cfg.data.path, cfg.data.task, cfg.data.val_fraction, cfg.data.split_seed)
    train_examples = splits["train"][: cfg.data.max_examples or None]
    val_examples = splits["validation"]

    accelerator = make_accelerator(cfg, cfg.train.grad_accum)
    configure_backend(accelerator, cfg)
    main = accelerator.is_main_process
    if main:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if stop_requested(accelerator, flag):
        return stopped_during_startup(accelerator, flag, state["step"])
    if main:
        save_config(cfg, out / "config.yaml")
    set_seed(cfg.seed)

    model, tokenizer, plan = load_base(cfg, accelerator)
    model = add_lora(prepare_for_training(model, cfg), cfg)
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp is not None:
        # FSDP-1 flattens each wrapped unit into one parameter that must be all trainable or all frozen:
        # peft's policy wraps every LoRA layer in a unit of its own.
        from peft.utils.other import fsdp_auto_wrap_policy
        fsdp.auto_wrap_policy = fsdp_auto_wrap_policy(model)
    trainable, total = parameter_counts(model)
    log.info("trainable parameters: %s of %s (%.3f%%), backend %s, %s%s", f"{trainable:,}", f"{total:,}",
             100 * trainable / total, plan.backend, plan.dtype, " 4-bit NF4" if plan.quantize else "")

    encoder = Encoder(tokenizer, cfg.data.task, cfg.data.template, context_length(model))
    encoded = [encoder.encode(e.text, e.label) for e in train_examples]
    encoder.count_shortened(encoded, "training questions", warn=main)
    graphs = decide_cuda_graphs(cfg.train.cuda_graphs, accelerator.device, plan.backend, accelerator.mixed_precision,
                                cfg.model.attn_implementation, total)
    shared = decide_shared_prefix(cfg.train.shared_prefix, plan.backend, cfg.train.batch_size, graphs.on, total,
                                  sum(not encoder.shares_prefix(e) for e in encoded))
    prefix = encoder.prefix_ids if shared.on else None
    log.info("CUDA graphs: %s; shared prefix: %s%s", graphs, shared,
             f", {len(encoder.prefix_ids)} tokens run once per micro-batch" if shared.on else "")

    world, rank = accelerator.num_processes, accelerator.process_index
    global_micro = cfg.train.batch_size * world
    steps_per_epoch = len(encoded) // global_micro // cfg.train.grad_accum
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(encoded)} training examples are fewer than one optimizer step needs "
                          f"({global_micro * cfg.train.grad_accum}); lower train.batch_size or train.grad_accum")
    total_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)

    loss_model = LabelLoss(model)
    if fsdp is not None:  # FSDP replaces the parameters with flat ones: the optimizer must hold those
        loss_model = accelerator.prepare(loss_model)
    params = [p for p in loss_model.parameters() if p.requires_grad]
    # Per-tensor AdamW under FSDP is the setup verified on GPUs (BENCHMARKS.md); FSDP holds the LoRA weights
    # in a few flat parameters, so multi-tensor kernels would save little there. Elsewhere on CUDA, the fused
    # kernel: one launch for all of LoRA's tensors.
    optimizer = make_optimizer(cfg, params, foreach=False if fsdp is not None else None,
                               fused=accelerator.device.type == "cuda" and plan.backend in ("single", "ddp"))
    scheduler = make_scheduler(cfg, optimizer, total_steps)
    if fsdp is not None:
        optimizer = accelerator.prepare(optimizer)
    else:
        loss_model, optimizer = accelerator.prepare(loss_model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    keep = _trainable_only(loss_model)

    def adapter_weights_only(models, weights, output_dir):
        # Frozen base weights are the same in every checkpoint: store only what training changes.
        for w in weights:
            for k in [k for k in w if not any(k.endswith(t) or t.endswith(k) for t in keep)]:
                del w[k]

    accelerator.register_save_state_pre_hook(adapter_weights_only)

    if resume_from is not None:
        # Checkpoints hold the trainable weights only; DeepSpeed's engine names the same switch differently.
        deepspeed = plan.backend in ("deepspeed", "zero3")
        accelerator.load_state(str(resume_from), **{"load_module_strict" if deepspeed else "strict": False})
        # load_state restores Accelerate's micro-batch counter, which decides when gradients sync and the optimizer
        # steps. A checkpoint always falls between optimizer steps, so a new window starts here, whatever
        # grad_accum was before (3 micro-batches of grad_accum=1, resumed with 2, would step mid-window).
        accelerator.step = 0
        log.info("resumed from %s at step %d (epoch %d, example %d)", resume_from, state["step"], state["epoch"],
                 state["position"])

    if stop_requested(accelerator, flag):
        return stopped_during_startup(accelerator, flag, state["step"])
    if cfg.log.tracker != "none":
        run_name = cfg.log.run_name or out.name
        accelerator.init_trackers(cfg.log.project, config=flat_dict(cfg),
                                  init_kwargs={"wandb": {"name": run_name}} if cfg.log.tracker == "wandb" else {})

    lengths = [len(e.prompt_ids) + len(e.label_ids) for e in encoded]
    pad = tokenizer.pad_token_id
    max_norm = cfg.train.max_grad_norm or float("inf")
    device = accelerator.device
    step_fn = TrainStep(loss_model, accelerator, params, graphs.on)
    flops = ModelFlops(*parts(accelerator.unwrap_model(loss_model).model))
    peak = peak_flops(device)
    label_slots = max(len(c) for c in encoder.candidates)  # a fixed K: batch shapes repeat
    window: list[list[int]] = []
    clock = TrainClock(device)
    tokens_seen, flops_seen, sequences = 0, 0.0, 0
    loss_local, label_tokens = torch.zeros((), device=device), 0  # summed over the steps of one log interval
    interrupted = False

    def save(step_state: dict) -> Path:
        best = (state["best_step"],) if state["best_step"] is not None else ()
        with clock.paused():
            return checkpoint.save(accelerator, ckpt_root, step_state["step"],
                                   {**step_state, **run_totals(start, clock.total, sequences)}, cfg.train.keep_last,
                                   protect=best)

    def validate(step: int) -> dict:
        loss_model.eval()
        with clock.paused(), out_of_memory("validation", EVAL_MEMORY_SETTINGS):
            metrics, _ = evaluate_examples(accelerator.unwrap_model(loss_model).model, encoder, val_examples,
                                           accelerator, cfg.eval.batch_size, cfg.eval.normalize, prefix is not None,
                                           call_model=lambda fn: loss_model(call=fn),
                                           max_batch_tokens=cfg.eval.max_batch_tokens)
            val_loss = validation_loss(loss_model, encoder, val_examples, accelerator, cfg.eval.batch_size, prefix, pad)
        loss_model.train()
        if cfg.log.tracker != "none":
            png = out / "val_confusion_matrix.png"
            if main:
                plot_confusion_matrix(metrics, png)
            log_to_trackers(accelerator, metrics, png, step)
        return {"val/loss": val_loss, "val/accuracy": metrics["accuracy"], "val/macro_f1": metrics["macro_f1"]}

    loss_model.train()
    pbar = None
    if main:
        from tqdm.auto import tqdm
        pbar = tqdm(total=total_steps, initial=state["step"], desc="train", dynamic_ncols=True)
    train_settings = ("a smaller train.batch_size (a larger train.grad_accum keeps the global batch), "
                      "model.gradient_checkpointing=true, or train.cuda_graphs=off")
    clock.start()
    while state["step"] < total_steps and not interrupted:
        order = epoch_order(lengths, cfg.seed, state["epoch"], cfg.train.group_by_length, global_micro)
        for position, indices in micro_batches(order, state["position"], global_micro):
            window.append(indices)
            if len(window) < cfg.train.grad_accum:
                continue
            # Every process knows the global batch, so the normaliser needs no communication.
            n_global = sum(len(encoded[i].label_ids) for idx in window for i in idx)
            scale = cfg.train.grad_accum * world / n_global
            with out_of_memory("training", train_settings, lambda: step_fn.last_shape):
                for idx in window:
                    batch = collate([encoded[i] for i in shard(idx, rank, world)], pad, prefix, label_slots,
                                    cfg.train.pad_multiple)
                    tokens_seen += batch.n_tokens  # counted on the CPU tensors: no device sync
                    flops_seen += flops.of(batch)
                    with accelerator.accumulate(loss_model):
                        loss_local += step_fn(batch, scale)
                        if accelerator.sync_gradients:
                            grad_norm = accelerator.clip_grad_norm_(params, max_norm)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=not step_fn.keep_grads)
            label_tokens += n_global
            scheduler.step()
            clock.step_done()
            sequences += sum(len(idx) for idx in window)
            window = []
            state["step"] += 1
            state["position"] = position
            step = state["step"]
            if pbar is not None:
                pbar.update(1)

            stop = stop_requested(accelerator, flag)
            last = step >= total_steps
            if step % cfg.train.log_every == 0 or last:
                # The mean over every label token since the last log, not just this step's.
                loss = accelerator.reduce(loss_local, "sum").item() / label_tokens
                loss_local.zero_()
                label_tokens = 0
                seconds = clock.interval()
                toks, fl = accelerator.reduce(torch.tensor([float(tokens_seen), flops_seen], device=device,
                                                           dtype=torch.float64), "sum").tolist()
                row = {"step": step, "train/loss": loss, "train/lr": scheduler.get_last_lr()[0],
                       "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "train/tokens_per_s": toks / seconds, "train/epoch": state["epoch"] + position / len(order)}
                if peak:
                    row["train/mfu"] = fl / seconds / (peak * world)
                if device.type == "cuda":
                    row["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                tokens_seen, flops_seen = 0, 0.0
                if (cfg.train.eval_every and step % cfg.train.eval_every == 0) or last:
                    row.update(validate(step))
                    if state["best_accuracy"] is None or row["val/accuracy"] > state["best_accuracy"]:
                        state["best_accuracy"], state["best_step"] = row["val/accuracy"], step
                state["history"].append(row)
                accelerator.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=step)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['train/lr']:.2e}")
                log.info(json.dumps(row))
            if stop or (cfg.train.save_every and step % cfg.train.save_every == 0) or state["best_step"] == step:
                save(dict(state))
            if stop:
                log.warning("signal %d received: saved a checkpoint at step %d, exiting", flag.signum, step)
                interrupted = True
                break
            if last:
                break
        else:
            state["epoch"] += 1
            state["position"] = 0
    clock.stop()
    if pbar is not None:
        pbar.close()

    peaks = (accelerator.gather(torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device))
             .tolist() if device.type == "cuda" else None)
    summary = {"status": "interrupted" if interrupted else "finished", "step": state["step"],
               "trainable_parameters": trainable, "total_parameters": total, "shared_prefix": shared.on,
               "cuda_graphs": step_fn.graphs_on, "graph_shapes": len(step_fn.graphs),
               "graph_capture_seconds": step_fn.capture_seconds,
               "best_accuracy": state["best_accuracy"], "best_step": state["best_step"],
               **run_totals(start, clock.total, sequences), "first_step_seconds": clock.first_step,
               "global_batch": global_micro * cfg.train.grad_accum,
               "peak_mem_gib": peaks[0] if peaks else None, "peak_mem_gib_per_process": peaks}
    if not interrupted:
        save_adapter(accelerator, loss_model, tokenizer, cfg, encoder.labels, out / "adapter", state["step"])
        if main:
            plot_training_curves(state["history"], out / "training_curves.png")
            write_json(state["history"], out / "history.json")
    if main:
        write_json(summary, out / "train_summary.json")
        final = state["history"][-1] if state["history"] else {}
        if "val/accuracy" in final:
            print(f"step {state['step']}: validation accuracy {final['val/accuracy']:.1%} (macro-F1 "
                  f"{final['val/macro_f1']:.3f}, loss {final['val/loss']:.4f}) on {len(val_examples)} questions",
                  flush=True)
    accelerator.end_training()
    return summary


def validation_loss(loss_model, encoder: Encoder, examples, accelerator, batch_size: int, prefix, pad: int) -> float:
    """Mean label-token loss over the examples, sharded across processes."""
    encoded = [encoder.encode(e.text, e.label) for e in examples]
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    total = torch.zeros(2, device=accelerator.device)
    with torch.no_grad():
        for chunk, counted in batch_rounds(batches, accelerator.process_index, accelerator.num_processes):
            loss_sum, n = batch_loss(loss_model, collate(chunk, pad, prefix).to(accelerator.device))
            if counted:
                total += torch.stack([loss_sum.float(), n.float()])
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def save_adapter(accelerator, loss_model, tokenizer, cfg: Config, labels, dest: Path, steps: int) -> None:
    """The PEFT adapter (gathered whole under FSDP / ZeRO-3), tokenizer and resolved config, published atomically."""
    # Every process takes part in the gather.
    if backend_of(accelerator) == "fsdp":
        state_dict = fsdp_lora_state_dict(loss_model)
    else:
        state_dict = accelerator.get_state_dict(loss_model)
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(loss_model).model
        inner = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        lora_b = [v for k, v in inner.items() if "lora_B" in k]
        if steps > 0 and lora_b and all(not v.any() for v in lora_b):
            # LoRA B starts at zero and any optimizer step moves it: an all-zero B is an export that lost the
            # training. Saved anyway (with the checkpoints, it is what there is), but said loudly.
            log.error("the adapter gathered for saving has all-zero LoRA B weights after %d steps: it is the untrained "
                      "initialisation, so the export under this backend is broken; please report it", steps)
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        write_adapter(model, inner, tmp, portable_name(cfg.model.name))
        tokenizer.save_pretrained(str(tmp))
        save_config(cfg, tmp / "config.yaml")
        (tmp / ADAPTER_META).write_text(json.dumps(adapter_meta(cfg, labels), indent=1))
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
        log.info("adapter saved to %s", dest)
    accelerator.wait_for_everyone()
