"""The training recipe: QLoRA on TREC with a plain PyTorch loop wrapped by Accelerate.

Features: 4-bit NF4 base (CUDA) or bf16/fp32, LoRA, shared-prefix batches, steps replayed from CUDA graphs on
one GPU (`step`), loss, tokens/s, MFU and peak memory in the step log, gradient accumulation with the
loss normalised by the label tokens of the whole global batch (so N processes train exactly like one),
clipping, AdamW / paged AdamW, cosine or linear schedule with warm-up, periodic validation loss and
accuracy, W&B or TensorBoard, atomic checkpoints every N steps, exact mid-epoch resume, and one checkpoint
and exit 0 on SIGTERM / SIGUSR1 / SIGINT, however many and whenever they come (`signals`).

`TrainRecipe` has the phases in the order they run: `setup`, `train` (one `_step` per optimizer step),
`validate`, `save_checkpoint`, `cleanup`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import checkpoint, signals
from .batching import Encoded, Encoder, batch_rounds, collate, epoch_order, micro_batches, passes, row_width, shard
from .config import Config, ConfigError, TrainConfig, check_output_dir, flat_dict, save_config
from .data import load_data
from .files import publish_folder
from .forward import parts
from .loss import LabelLoss, batch_loss
from .memory import EVAL_MEMORY_SETTINGS, GIB, out_of_memory
from .model import (
    ADAPTER_META,
    adapter_meta,
    add_lora,
    check_model_folder,
    context_length,
    fsdp_lora_state_dict,
    load_base,
    parameter_counts,
    prepare_for_training,
    write_adapter,
)
from .offline_models import portable_name
from .reports import log_to_trackers, plot_confusion_matrix, plot_training_curves, write_json
from .runtime import Runtime, show_logs, start
from .scoring import evaluate_examples
from .step import TrainStep, decide_cuda_graphs, decide_shared_prefix
from .task import Task, load_task
from .throughput import ModelFlops, peak_flops

log = logging.getLogger("trec_accel")

TRAIN_MEMORY_SETTINGS = ("a smaller train.batch_size (a larger train.grad_accum keeps the global batch) or "
                         "train.max_batch_tokens (the same batches, in more passes), model.gradient_checkpointing=true "
                         "(with fewer model.unchecked_layers), or train.cuda_graphs=off")


def make_optimizer(t: TrainConfig, params, foreach: bool | None = None, fused: bool = False):
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


def resume_settings(cfg: Config) -> dict:
    """The settings a checkpoint's state fits, as its trainer state records them (`checkpoint.check_settings`): the
    LoRA weights' shapes and scale, and the optimizer whose state it holds."""
    return {"lora.r": cfg.lora.r, "lora.alpha": cfg.lora.alpha, "lora.target_modules": sorted(cfg.lora.target_modules),
            "train.optimizer": cfg.train.optimizer}


def make_scheduler(t: TrainConfig, optimizer, total_steps: int):
    from transformers import get_scheduler
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[t.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=total_steps)


def configure_backend(runtime: Runtime, t: TrainConfig) -> None:
    """Hand DeepSpeed the batch and clipping it would otherwise take from a dataloader."""
    if runtime.backend in ("deepspeed", "zero3"):
        ds = runtime.accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = t.batch_size
        ds["gradient_accumulation_steps"] = t.grad_accum
        ds["gradient_clipping"] = t.max_grad_norm or 0.0


def stop_requested(accelerator, flag: signals.StopFlag) -> bool:
    """Whether any process has received a stop signal; every process must ask at the same point. One process
    reads its own flag: a collective (and its device sync) only where there are several."""
    if accelerator.num_processes == 1:
        return flag.signum > 0
    return accelerator.reduce(torch.tensor(float(flag.signum), device=accelerator.device), "max").item() > 0


def check_pass_cap(backend: str, t: TrainConfig, encoded: list[Encoded], p: int) -> None:
    """Refuse a train.max_batch_tokens that would run a micro-batch in several backward passes under a backend that
    cannot: DeepSpeed counts backward passes to find the end of an accumulation window, and FSDP reduces in hooks.
    A cap that no micro-batch reaches (the 7B configs' at batch 8) is no obstacle. `p`: the shared prefix's tokens."""
    if not t.max_batch_tokens or backend in ("single", "ddp"):
        return
    widest = max(row_width(e, p, t.pad_multiple) for e in encoded)
    if t.batch_size * widest > t.max_batch_tokens:
        raise ConfigError(f"train.max_batch_tokens={t.max_batch_tokens} would run a micro-batch of {t.batch_size} "
                          f"rows (up to {widest} tokens wide) in several backward passes, which {backend} cannot; "
                          "set train.max_batch_tokens=0, or lower train.batch_size and raise train.grad_accum")


def run_totals(start: dict, train_seconds: float, sequences: int) -> dict:
    """The run's totals over its sessions: those recorded in the trainer state this session started from, plus this
    session's. A checkpoint written before they were recorded counts as one session of unknown time (0 s,
    0 sequences)."""
    return {"sessions": start.get("sessions", 1 if start["step"] else 0) + 1,
            "train_seconds": start.get("train_seconds", 0.0) + train_seconds,
            "sequences": start.get("sequences", 0) + sequences}


@dataclass
class TrainState:
    """Where training stands: what a checkpoint's trainer_state.json records beside the run totals
    (`run_totals`)."""
    step: int = 0
    epoch: int = 0
    position: int = 0  # examples of the epoch's order already trained on
    history: list[dict] = field(default_factory=list)
    best_accuracy: float | None = None
    best_step: int | None = None

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        """From trainer_state.json; the run totals in it are read by `run_totals`."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


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


def run(cfg: Config) -> dict:
    """Train as configured; returns a summary (also in output_dir/train_summary.json). SIGTERM, SIGUSR1 and SIGINT
    end it with a checkpoint (see `signals`)."""
    with signals.stop_flag() as flag:
        recipe = TrainRecipe(cfg, flag)
        if not recipe.setup():
            return recipe.stopped_during_startup()
        recipe.train()
        return recipe.cleanup()


class TrainRecipe:
    def __init__(self, cfg: Config, flag: signals.StopFlag):
        self.cfg, self.flag = cfg, flag
        self.out = Path(cfg.output_dir)
        self.interrupted = False

    # ------------------------------------------------------------------ setup

    def setup(self) -> bool:
        """Everything before the first step; False when a stop signal came first."""
        cfg = self.cfg
        # Before anything is loaded or written: a wrong resume path, output folder or model folder shows in a second.
        self.resume_from = checkpoint.find_resume(cfg.resume, self.out / "checkpoints")
        check_output_dir(self.out)
        check_model_folder(cfg.model.name)
        # The trainer state this session starts from, as recorded (run totals included).
        self.start = checkpoint.load_trainer_state(self.resume_from) if self.resume_from is not None else \
            asdict(TrainState())
        self.state = TrainState.from_dict(self.start)
        if self.resume_from is not None:  # before the model loads: a setting the state does not fit shows in a second
            checkpoint.check_settings(self.resume_from, self.start.get("settings"), resume_settings(cfg))
        self.task = load_task(cfg.data.task)
        splits = load_data(cfg.data, self.task)
        self.train_examples = splits["train"][: cfg.data.max_examples or None]
        self.val_examples = splits["validation"]

        self.runtime = start(cfg, cfg.train.grad_accum)
        self.accelerator = self.runtime.accelerator
        configure_backend(self.runtime, cfg.train)
        show_logs(self.runtime)
        if stop_requested(self.accelerator, self.flag):
            return False
        if self.runtime.is_main:
            save_config(cfg, self.out / "config.yaml")
        from accelerate.utils import set_seed
        set_seed(cfg.seed)

        self._load_model()
        self._encode_data()
        self._build_optimizer()
        if self.resume_from is not None:
            self._resume()
        if stop_requested(self.accelerator, self.flag):
            return False
        self._start_trackers()
        self._start_counters()
        return True

    def _load_model(self) -> None:
        cfg, runtime = self.cfg, self.runtime
        model, self.tokenizer, plan = load_base(cfg, runtime)
        self.model = add_lora(prepare_for_training(model, cfg), cfg, sharded=runtime.sharded)
        if runtime.backend == "fsdp":
            # FSDP-1 flattens each wrapped unit into one parameter that must be all trainable or all frozen:
            # peft's policy wraps every LoRA layer in a unit of its own.
            from peft.utils.other import fsdp_auto_wrap_policy
            self.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(self.model)
        self.trainable, self.total = parameter_counts(self.model)
        log.info("trainable parameters: %s of %s (%.3f%%), backend %s, %s%s", f"{self.trainable:,}",
                 f"{self.total:,}", 100 * self.trainable / self.total, runtime.backend, plan.dtype,
                 " 4-bit NF4" if plan.quantize else "")

    def _encode_data(self) -> None:
        cfg, runtime, t = self.cfg, self.runtime, self.cfg.train
        self.encoder = Encoder(self.tokenizer, self.task, cfg.data.template, context_length(self.model))
        encode_all = self.encoder.encode_all
        self.encoded = encode_all([e.text for e in self.train_examples], [e.label for e in self.train_examples])
        self.encoder.count_shortened(self.encoded, "training questions", warn=runtime.is_main)
        # Encoded once for the run: prompts alone for scoring, with their labels for the loss.
        self.val_prompts = encode_all([e.text for e in self.val_examples])
        self.val_encoded = encode_all([e.text for e in self.val_examples], [e.label for e in self.val_examples])
        self.graphs = decide_cuda_graphs(t.cuda_graphs, runtime.device, runtime.backend, runtime.precision,
                                         cfg.model.attn_implementation)
        self.shared = decide_shared_prefix(t.shared_prefix, runtime.device, runtime.backend, t.batch_size,
                                           self.graphs.on, self.total,
                                           sum(not self.encoder.shares_prefix(e) for e in self.encoded))
        self.prefix = self.encoder.prefix_ids if self.shared.on else None
        check_pass_cap(runtime.backend, t, self.encoded, len(self.prefix or ()))
        log.info("CUDA graphs: %s; shared prefix: %s%s", self.graphs, self.shared,
                 f", {len(self.encoder.prefix_ids)} tokens run once per micro-batch" if self.shared.on else "")
        self.global_micro = t.batch_size * self.accelerator.num_processes
        steps_per_epoch = len(self.encoded) // self.global_micro // t.grad_accum
        if steps_per_epoch == 0:
            raise ConfigError(f"{len(self.encoded)} training examples are fewer than one optimizer step needs "
                              f"({self.global_micro * t.grad_accum}); lower train.batch_size or train.grad_accum")
        self.total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)

    def _build_optimizer(self) -> None:
        accelerator, fsdp = self.accelerator, self.runtime.backend == "fsdp"
        loss_model = LabelLoss(self.model)
        if fsdp:  # FSDP replaces the parameters with flat ones: the optimizer must hold those
            loss_model = accelerator.prepare(loss_model)
        self.params = [p for p in loss_model.parameters() if p.requires_grad]
        # Per-tensor AdamW under FSDP is the setup verified on GPUs (BENCHMARKS.md); FSDP holds the LoRA weights
        # in a few flat parameters, so multi-tensor kernels would save little there. Elsewhere on CUDA, the fused
        # kernel: one launch for all of LoRA's tensors.
        fused = self.runtime.device.type == "cuda" and self.runtime.backend in ("single", "ddp")
        optimizer = make_optimizer(self.cfg.train, self.params, foreach=False if fsdp else None, fused=fused)
        self.scheduler = make_scheduler(self.cfg.train, optimizer, self.total_steps)
        if fsdp:
            self.optimizer = accelerator.prepare(optimizer)
        else:
            loss_model, self.optimizer = accelerator.prepare(loss_model, optimizer)
        self.loss_model = loss_model
        accelerator.register_for_checkpointing(self.scheduler)
        keep = {n for n, p in loss_model.named_parameters() if p.requires_grad}

        def adapter_weights_only(models, weights, output_dir):
            # Frozen base weights are the same in every checkpoint: store only what training changes.
            for w in weights:
                for k in [k for k in w if not any(k.endswith(t) or t.endswith(k) for t in keep)]:
                    del w[k]

        accelerator.register_save_state_pre_hook(adapter_weights_only)

    def _resume(self) -> None:
        # Checkpoints hold the trainable weights only; DeepSpeed's engine names the same switch differently.
        deepspeed = self.runtime.backend in ("deepspeed", "zero3")
        checkpoint.load_state(self.accelerator, self.resume_from,
                              **{"load_module_strict" if deepspeed else "strict": False})
        if not deepspeed and "settings" not in self.start:  # DeepSpeed's engine keeps the optimizer state itself
            checkpoint.check_optimizer_state(self.resume_from, self.cfg.train.optimizer, self.optimizer.state_dict())
        # load_state restores Accelerate's micro-batch counter, which decides when gradients sync and the optimizer
        # steps. A checkpoint always falls between optimizer steps, so a new window starts here, whatever
        # grad_accum was before (3 micro-batches of grad_accum=1, resumed with 2, would step mid-window).
        self.accelerator.step = 0
        log.info("resumed from %s at step %d (epoch %d, example %d)", self.resume_from, self.state.step,
                 self.state.epoch, self.state.position)

    def _start_trackers(self) -> None:
        cfg = self.cfg
        if cfg.log.tracker != "none":
            run_name = cfg.log.run_name or self.out.name
            self.accelerator.init_trackers(cfg.log.project, config=flat_dict(cfg),
                                           init_kwargs={"wandb": {"name": run_name}} if cfg.log.tracker == "wandb"
                                           else {})

    def _start_counters(self) -> None:
        device = self.runtime.device
        self.lengths = [len(e.prompt_ids) + len(e.label_ids) for e in self.encoded]
        self.step_fn = TrainStep(self.loss_model, self.accelerator, self.params, self.graphs.on)
        self.flops = ModelFlops(*parts(self.accelerator.unwrap_model(self.loss_model).model))
        self.peak = peak_flops(device)
        self.label_slots = self.encoder.longest_label  # a fixed K: batch shapes repeat
        self.clock = TrainClock(device)
        self.grad_norm = None
        self.tokens_seen, self.flops_seen, self.sequences = 0, 0.0, 0
        # Summed over the steps of one log interval.
        self.loss_sum, self.label_tokens = torch.zeros((), device=device), 0

    def stopped_during_startup(self) -> dict:
        """The end of a run stopped before its first step: there is nothing new to save."""
        log.warning("signal %d received during start-up: exiting before training, at step %d", self.flag.signum,
                    self.state.step)
        self.accelerator.end_training()
        return {"status": "interrupted", "step": self.state.step}

    # ------------------------------------------------------------------ train

    def train(self) -> None:
        """Optimizer steps until total_steps or a stop signal. A global batch may span two epochs."""
        state, grad_accum = self.state, self.cfg.train.grad_accum
        self.pbar = None
        if state.step >= self.total_steps:  # a finished run resumed: no step to take, no time to count
            return
        self.loss_model.train()
        if self.runtime.is_main:
            from tqdm.auto import tqdm
            self.pbar = tqdm(total=self.total_steps, initial=state.step, desc="train", dynamic_ncols=True)
        window: list[list[int]] = []  # the micro-batches of the global batch being gathered
        done = False
        self.clock.start()
        while state.step < self.total_steps and not done:
            order = epoch_order(self.lengths, self.cfg.seed, state.epoch, self.cfg.train.group_by_length,
                                self.global_micro)
            for position, indices in micro_batches(order, state.position, self.global_micro):
                window.append(indices)
                if len(window) < grad_accum:
                    continue
                self._step(window)
                window = []
                state.step, state.position = state.step + 1, position
                done = self._after_step(position / len(order))
                if done:
                    break
            else:
                state.epoch, state.position = state.epoch + 1, 0
        self.clock.stop()
        if self.pbar is not None:
            self.pbar.close()

    def _step(self, window: list[list[int]]) -> None:
        """One optimizer step on a global batch: grad_accum micro-batches, each split across the processes.

        Accelerate does the accumulation: `accumulate` skips the gradient sync and the optimizer step until the
        window's last micro-batch. The window is gathered first for the normaliser: the gradient must be that
        of the summed label-token loss over the global batch's n_global label tokens. `accelerator.backward`
        divides by grad_accum and DDP averages over the processes, so the scale multiplies both back in.
        """
        accelerator, t = self.accelerator, self.cfg.train
        world, rank = accelerator.num_processes, accelerator.process_index
        # Every process knows the global batch, so the normaliser needs no communication.
        n_global = sum(len(self.encoded[i].label_ids) for idx in window for i in idx)
        scale = t.grad_accum * world / n_global
        with out_of_memory("training", TRAIN_MEMORY_SETTINGS, lambda: self.step_fn.last_shape, training=True):
            for idx in window:
                with accelerator.accumulate(self.loss_model):
                    self._micro_batch([self.encoded[i] for i in shard(idx, rank, world)], scale)
            self.grad_norm = accelerator.clip_grad_norm_(self.params, t.max_grad_norm or float("inf"))
            self.optimizer.step()
            # CUDA graphs hold the gradients' addresses: they are zeroed, not freed, while graphs are on.
            self.optimizer.zero_grad(set_to_none=not self.step_fn.keep_grads)
        self.label_tokens += n_global
        self.scheduler.step()
        self.clock.step_done()
        self.sequences += sum(len(idx) for idx in window)

    def _micro_batch(self, examples: list[Encoded], scale: float) -> None:
        """Forward and backward of this process's share of one micro-batch, in passes of at most
        train.max_batch_tokens. Under DDP only the last pass all-reduces: every process runs exactly one
        synchronising pass per micro-batch, however many passes its share takes."""
        t = self.cfg.train
        groups = passes(examples, len(self.prefix or ()), t.pad_multiple, t.max_batch_tokens)
        for k, rows in enumerate(groups):
            batch = collate([examples[i] for i in rows], self.tokenizer.pad_token_id, self.prefix, self.label_slots,
                            t.pad_multiple)
            self.tokens_seen += batch.n_tokens  # counted on the CPU tensors: no device sync
            self.flops_seen += self.flops.of(batch)
            last = k == len(groups) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.loss_model):
                self.loss_sum += self.step_fn(batch, scale)

    def _after_step(self, epoch_fraction: float) -> bool:
        """Log, validate and checkpoint as configured; whether training ends at this step."""
        state, t = self.state, self.cfg.train
        if self.pbar is not None:
            self.pbar.update(1)
        stop = stop_requested(self.accelerator, self.flag)
        last = state.step >= self.total_steps
        if state.step % t.log_every == 0 or last:
            row = self._train_metrics(state.epoch + epoch_fraction)
            if (t.eval_every and state.step % t.eval_every == 0) or last:
                row.update(self.validate())
                if state.best_accuracy is None or row["val/accuracy"] > state.best_accuracy:
                    state.best_accuracy, state.best_step = row["val/accuracy"], state.step
            self._record(row)
        if stop or last:
            self.clock.stop()  # so that the last checkpoint records this session's whole training time
        if stop or (t.save_every and state.step % t.save_every == 0) or state.best_step == state.step:
            self.save_checkpoint()
        if stop:
            log.warning("signal %d received: saved a checkpoint at step %d, exiting", self.flag.signum, state.step)
            self.interrupted = True
        return stop or last

    def _train_metrics(self, epoch: float) -> dict:
        """The log row's training metrics, over the steps since the previous log."""
        accelerator, device = self.accelerator, self.runtime.device
        # The mean over every label token since the last log, not just this step's.
        loss = accelerator.reduce(self.loss_sum, "sum").item() / self.label_tokens
        self.loss_sum.zero_()
        self.label_tokens = 0
        seconds = self.clock.interval()
        toks, fl = accelerator.reduce(torch.tensor([float(self.tokens_seen), self.flops_seen], device=device,
                                                   dtype=torch.float64), "sum").tolist()
        self.tokens_seen, self.flops_seen = 0, 0.0
        row = {"step": self.state.step, "train/loss": loss, "train/lr": self.scheduler.get_last_lr()[0],
               "train/grad_norm": float(self.grad_norm) if self.grad_norm is not None else None,
               "train/tokens_per_s": toks / seconds, "train/epoch": epoch}
        if self.peak:
            row["train/mfu"] = fl / seconds / (self.peak * accelerator.num_processes)
        if device.type == "cuda":
            row["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        return row

    def _record(self, row: dict) -> None:
        self.state.history.append(row)
        self.accelerator.log({k: v for k, v in row.items() if v is not None and k != "step"}, step=row["step"])
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{row['train/loss']:.4f}", lr=f"{row['train/lr']:.2e}")
        log.info(json.dumps(row))

    # ------------------------------------------------------------------ validate, save

    def validate(self) -> dict:
        """Validation loss, accuracy and macro-F1; the confusion matrix to the tracker."""
        cfg, accelerator, loss_model = self.cfg, self.accelerator, self.loss_model
        loss_model.eval()
        with self.clock.paused(), out_of_memory("validation", EVAL_MEMORY_SETTINGS, training=True):
            # Scoring runs inside the wrapped module's forward, where FSDP and ZeRO-3 have gathered the weights. It
            # runs the instruction once for the whole set whatever the training step does: without gradients there
            # is no second pass per step to weigh. FSDP keeps full sequences, as its training does.
            metrics, _ = evaluate_examples(accelerator.unwrap_model(loss_model).model, self.encoder,
                                           self.val_examples, accelerator, cfg.eval, "score",
                                           self.runtime.backend != "fsdp", call_model=lambda fn: loss_model(call=fn),
                                           encoded=self.val_prompts)
            val_loss = validation_loss(loss_model, self.val_encoded, accelerator, cfg.eval.batch_size, self.prefix,
                                       self.tokenizer.pad_token_id)
        loss_model.train()
        if cfg.log.tracker != "none":
            png = self.out / "val_confusion_matrix.png"
            if self.runtime.is_main:
                plot_confusion_matrix(metrics, png)
            log_to_trackers(accelerator, metrics, png, self.state.step)
        return {"val/loss": val_loss, "val/accuracy": metrics["accuracy"], "val/macro_f1": metrics["macro_f1"]}

    def totals(self) -> dict:
        return run_totals(self.start, self.clock.total, self.sequences)

    def save_checkpoint(self) -> Path:
        """A checkpoint of this step; the best step's is kept whatever train.keep_last says."""
        state = self.state
        best = (state.best_step,) if state.best_step is not None else ()
        with self.clock.paused():
            return checkpoint.save(self.accelerator, self.out / "checkpoints", state.step,
                                   {**asdict(state), **self.totals(), "settings": resume_settings(self.cfg)},
                                   self.cfg.train.keep_last, protect=best)

    # ------------------------------------------------------------------ cleanup

    def cleanup(self) -> dict:
        """The adapter (unless interrupted), reports and the summary; the trackers closed."""
        cfg, state, main = self.cfg, self.state, self.runtime.is_main
        summary = self.summary()
        if not self.interrupted:
            save_adapter(self.runtime, self.loss_model, self.tokenizer, cfg, self.task, self.out / "adapter",
                         state.step)
            if main:
                plot_training_curves(state.history, self.out / "training_curves.png")
                write_json(state.history, self.out / "history.json")
        if main:
            write_json(summary, self.out / "train_summary.json")
            final = state.history[-1] if state.history else {}
            if "val/accuracy" in final:
                print(f"step {state.step}: validation accuracy {final['val/accuracy']:.1%} (macro-F1 "
                      f"{final['val/macro_f1']:.3f}, loss {final['val/loss']:.4f}) on {len(self.val_examples)} "
                      "questions", flush=True)
        self.accelerator.end_training()
        return summary

    def summary(self) -> dict:
        device, state = self.runtime.device, self.state
        peaks = None
        if device.type == "cuda":
            peak = torch.tensor([torch.cuda.max_memory_allocated(device) / GIB], device=device)
            peaks = self.accelerator.gather(peak).tolist()
        return {"status": "interrupted" if self.interrupted else "finished", "step": state.step,
                "trainable_parameters": self.trainable, "total_parameters": self.total,
                "shared_prefix": self.shared.on, "cuda_graphs": self.step_fn.graphs_on,
                "graph_shapes": len(self.step_fn.graphs), "graph_capture_seconds": self.step_fn.capture_seconds,
                "best_accuracy": state.best_accuracy, "best_step": state.best_step,
                **self.totals(), "first_step_seconds": self.clock.first_step,
                "global_batch": self.global_micro * self.cfg.train.grad_accum,
                "peak_mem_gib": peaks[0] if peaks else None, "peak_mem_gib_per_process": peaks}


def validation_loss(loss_model, encoded, accelerator, batch_size: int, prefix, pad: int) -> float:
    """Mean label-token loss over the encoded examples, sharded across processes."""
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    total = torch.zeros(2, device=accelerator.device)
    with torch.no_grad():
        for chunk, counted in batch_rounds(batches, accelerator.process_index, accelerator.num_processes):
            loss_sum, n = batch_loss(loss_model, collate(chunk, pad, prefix).to(accelerator.device))
            if counted:
                total += torch.stack([loss_sum.float(), n.float()])
    total = accelerator.reduce(total, "sum")
    return (total[0] / total[1]).item()


def save_adapter(runtime: Runtime, loss_model, tokenizer, cfg: Config, task: Task, dest: Path, steps: int) -> None:
    """The PEFT adapter (gathered whole under FSDP / ZeRO-3), tokenizer and resolved config, published atomically."""
    accelerator = runtime.accelerator
    # Every process takes part in the gather.
    if runtime.backend == "fsdp":
        state_dict = fsdp_lora_state_dict(loss_model)
    else:
        state_dict = accelerator.get_state_dict(loss_model)
    if runtime.is_main:
        inner = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
        lora_b = [v for k, v in inner.items() if "lora_B" in k]
        if steps > 0 and lora_b and all(not v.any() for v in lora_b):
            # LoRA B starts at zero and any optimizer step moves it: an all-zero B is an export that lost the
            # training. Saved anyway (with the checkpoints, it is what there is), but said loudly.
            log.error("the adapter gathered for saving has all-zero LoRA B weights after %d steps: it is the untrained "
                      "initialisation, so the export under this backend is broken; please report it", steps)
        with publish_folder(dest) as tmp:
            write_adapter(accelerator.unwrap_model(loss_model).model, inner, tmp, portable_name(cfg.model.name))
            tokenizer.save_pretrained(str(tmp))
            save_config(cfg, tmp / "config.yaml")
            (tmp / ADAPTER_META).write_text(json.dumps(adapter_meta(cfg, task), indent=1, ensure_ascii=False))
        log.info("adapter saved to %s", dest)
    accelerator.wait_for_everyone()
