"""Running out of GPU memory ends a run with one line that says which settings lower memory, not a
traceback from deep inside PyTorch."""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

GIB = 2**30

EVAL_MEMORY_SETTINGS = "a smaller eval.max_batch_tokens or eval.batch_size"
# scripts/evaluate.py loads the adapter itself (eval.dequantize applies); validation during training scores the
# model being trained, whose base stays in 4 bits.
INFERENCE_MEMORY_SETTINGS = (f"{EVAL_MEMORY_SETTINGS}, or eval.dequantize=off (with an adapter on a 4-bit base: "
                             "keeps the weights in 4 bits)")


class OutOfMemory(RuntimeError):
    """The GPU ran out of memory; the message names the batch and the settings that lower memory."""


@contextlib.contextmanager
def out_of_memory(what: str, settings: str, shape: Callable[[], tuple] | None = None, training: bool = False):
    """Turn a CUDA out-of-memory error inside the block into `OutOfMemory`, naming `settings` to lower and,
    when `shape()` is given, the shape of the batch that failed (batch, width, label slots, prefix); in a
    `training` run, that its checkpoints are kept."""
    try:
        yield
    except torch.OutOfMemoryError:
        batch = ""
        if shape is not None and shape():
            b, w, k, p = shape()
            batch = (f" at a micro-batch of {b} x {w} tokens ({k} label slots"
                     + (f", {p} shared prefix tokens)" if p else ")"))
        gpu = ""
        if torch.cuda.is_available():
            device = torch.cuda.current_device()
            total = torch.cuda.get_device_properties(device).total_memory / GIB
            peak = torch.cuda.max_memory_allocated(device) / GIB
            gpu = f": the GPU has {total:.1f} GiB and tensors took {peak:.1f} GiB at the peak"
        kept = " (checkpoints already saved are kept: resume=latest continues from the newest)" if training else ""
        raise OutOfMemory(f"CUDA out of memory in {what}{batch}{gpu}; to use less, set {settings}{kept}") from None
