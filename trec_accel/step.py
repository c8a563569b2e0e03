"""How a training step runs: one micro-batch's forward and backward, eager or replayed from a CUDA graph,
and the two per-run decisions behind it (CUDA graphs, shared prefix).

At 135M parameters an eager step is thousands of small kernels, each dispatched from Python: it cost
0.3-0.45 s on an H100 whatever the batch (BENCHMARKS.md). A CUDA graph records the kernels of one batch
shape once and replays them with one call. Batches are padded to a multiple of `train.pad_multiple` tokens
so that shapes repeat. A shape's first micro-batch runs eagerly, on a side stream: a real step that is also the
warm-up a capture needs (lazy initialisation, kernel choices). Its second is captured, then replayed, and so
are all later ones: a shape seen once costs no capture, and no pass is spent on warm-up alone. Capturing is
reported as `graph_capture_seconds`. Gradients accumulate in place in `.grad` tensors that never move, so
graphs of different shapes and eager passes can follow each other within one optimizer step.
"""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass

import torch

from .batching import Batch
from .loss import batch_loss

log = logging.getLogger("trec_accel")

# Above this many parameters an eager step's arithmetic outweighs its launches, so running the instruction once
# per batch saves more than its second pass costs even without CUDA graphs (BENCHMARKS.md: the 7B shape).
COMPUTE_BOUND_PARAMETERS = 2_000_000_000


@dataclass
class Decision:
    on: bool
    why: str

    def __str__(self) -> str:
        return f"{'on' if self.on else 'off'} ({self.why})"


def decide_cuda_graphs(mode: str, device: torch.device, backend: str, precision: str, attn: str) -> Decision:
    """Whether training steps are replayed from CUDA graphs (`train.cuda_graphs`: auto / on / off). auto: wherever
    they can run, at any model size: SmolLM2's replayed step is 10x its eager one, and even the 7B shape's eager
    step leaves the GPU waiting on Python (graphs: 309 against 228 sequences/s once captured, the same peak memory;
    BENCHMARKS.md, session 8)."""
    if mode == "off":
        return Decision(False, "train.cuda_graphs=off")
    why_not = None
    if device.type != "cuda":
        why_not = "they need CUDA"
    elif backend != "single":
        why_not = f"the {backend} backend reduces or gathers in hooks during the backward pass; graphs run one process"
    elif precision == "fp16":
        why_not = "fp16's gradient scaler checks for overflow on the host"
    elif attn == "flash_attention_2":
        why_not = "FlashAttention-2's padding path reads lengths on the host"
    if why_not:
        return Decision(False, why_not)
    return Decision(True, "train.cuda_graphs=on" if mode == "on" else "one process on CUDA")


def decide_shared_prefix(mode: str, device: torch.device, backend: str, batch_size: int, graphs: bool,
                         n_parameters: int, unshared: int) -> Decision:
    """Whether the instruction runs once per micro-batch (`train.shared_prefix`: auto / on / off).

    It saves (batch - 1) x prefix tokens of every layer's work and costs a second, batch-1 pass through
    the layers: worth it wherever the arithmetic is the cost. Measured (BENCHMARKS.md): on a GPU, off is faster
    for an eager 135M model (two passes, twice the launches), on is faster with CUDA graphs and at 7B; on a CPU,
    where every kernel is arithmetic, on is 3x faster for SmolLM2 (its training steps and its validations).
    """
    if mode == "off":
        return Decision(False, "train.shared_prefix=off")
    if backend == "fsdp":
        # Seen on the GPU: FSDP-1 reduces a unit's gradient in a hook that runs once per backward, and the
        # instruction pass plus the question pass call each unit twice, leaving bf16 gradients beside fp32
        # parameters at the optimizer step.
        return Decision(False, "FSDP-1 reduces each wrapped layer's gradient once per step, and the shared prefix "
                               "calls every layer twice")
    if unshared:
        return Decision(False, f"{unshared} prompts do not start with the instruction's tokens (the tokenizer "
                               "merges across it)")
    if mode == "on":
        return Decision(True, "train.shared_prefix=on")
    if batch_size < 2:
        return Decision(False, "a micro-batch of one sequence has nothing to share")
    if device.type == "cpu":
        return Decision(True, "a CPU's step is its arithmetic, at any model size")
    if graphs or n_parameters > COMPUTE_BOUND_PARAMETERS:
        return Decision(True, "CUDA graphs or a compute-bound model: the saved arithmetic is the cost")
    return Decision(False, "an eager step of a small model is bound by launches, which a second pass doubles")


def _where(e: BaseException) -> str:
    """file:line of the innermost frame outside PyTorch: the code that did what a capture cannot hold."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "/torch/" not in f.filename]
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    scale: torch.Tensor
    loss: torch.Tensor


class TrainStep:
    """`step(batch, scale)` runs forward and backward of one micro-batch (a CPU `Batch`), adds
    scale x the gradient of its summed label loss into `.grad`, and returns the summed loss (a device tensor
    to be used before the next call: a graph's output is overwritten by its next replay)."""

    def __init__(self, loss_model, accelerator, params: list[torch.Tensor], graphs: bool):
        self.loss_model, self.accelerator, self.params = loss_model, accelerator, params
        self.graphs_on = graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.seen: set[tuple] = set()  # shapes run once, eagerly: the next micro-batch of such a shape is captured
        self.side = torch.cuda.Stream(accelerator.device) if graphs else None
        self.pool = None
        self.capture_seconds = 0.0
        self.last_shape: tuple = ()

    @property
    def keep_grads(self) -> bool:
        """Gradients must stay at fixed addresses (zeroed, not freed) while graphs hold them."""
        return self.graphs_on

    def __call__(self, batch: Batch, scale: float) -> torch.Tensor:
        self.last_shape = batch.shape
        if self.graphs_on and batch.shape not in self.seen:
            self.seen.add(batch.shape)
            return self._eager_on_side_stream(batch, scale)
        if self.graphs_on:
            try:
                return self._replay(batch, scale)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - any capture failure falls back to the eager step
                if self.graphs:
                    raise  # graphs that captured before and fail now are a bug, not a missing feature
                log.warning("CUDA graphs: the first capture failed at %s (%s: %s); training runs eagerly",
                            _where(e), type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.graphs_on = False
        return self._eager(batch, scale)

    def _eager(self, batch: Batch, scale: float) -> torch.Tensor:
        loss_sum, _ = batch_loss(self.loss_model, batch.to(self.accelerator.device))
        self.accelerator.backward(loss_sum * scale)
        return loss_sum.detach()

    def _eager_on_side_stream(self, batch: Batch, scale: float) -> torch.Tensor:
        current = torch.cuda.current_stream(self.accelerator.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            loss = self._eager(batch, scale)
        current.wait_stream(self.side)
        return loss

    def _replay(self, batch: Batch, scale: float) -> torch.Tensor:
        g = self.graphs.get(batch.shape) or self._capture(batch)
        for static, new in zip(g.inputs, batch.tensors()):
            static.copy_(new, non_blocking=True)
        # accelerator.backward divides by the accumulation steps; the graph's backward does the same.
        g.scale.fill_(scale / self.accelerator.gradient_accumulation_steps)
        g.graph.replay()
        return g.loss

    def _forward_backward(self, static: Batch, scale: torch.Tensor) -> torch.Tensor:
        loss_sum, _ = batch_loss(self.loss_model, static)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def _capture(self, batch: Batch) -> _Graph:
        device = self.accelerator.device
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for p in self.params:  # backward must add into existing tensors, so that graphs can accumulate
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        static = batch.to(device)
        scale = torch.zeros((), device=device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # records the kernels without running them
            loss = self._forward_backward(static, scale)
        self.pool = graph.pool()
        g = _Graph(graph, static.tensors(), scale, loss)
        self.graphs[batch.shape] = g
        torch.cuda.synchronize(device)
        self.capture_seconds += time.perf_counter() - start
        log.info("CUDA graph captured for batch shape %s (%d shapes, %.1f s capturing so far)", batch.shape,
                 len(self.graphs), self.capture_seconds)
        return g
