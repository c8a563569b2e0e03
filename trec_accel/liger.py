"""Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (`model.liger_kernels`), patched in so that they compile
a fixed set of kernels whatever the batch."""
from __future__ import annotations

import functools
import logging
import sys
import threading
import time

import torch

log = logging.getLogger(__name__)


class _OptionalBackends(logging.Filter):
    """Liger's dispatcher warns at each run's first use of an op about the optional backends it cannot import (CuTe
    DSL, for Blackwell; Ascend NPUs): expected wherever they are not installed, and not a problem on CUDA."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        return not (msg.startswith("Backend impl") and "could not be imported" in msg)


_OPTIONAL_BACKENDS = _OptionalBackends()


def quiet_optional_backends() -> None:
    logging.getLogger("liger_kernel.backends.registry").addFilter(_OPTIONAL_BACKENDS)


def apply_liger(model) -> None:
    quiet_optional_backends()
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:
        log.warning("model.liger_kernels=true, but liger-kernel is not installed: running without it")
        return
    # The loss takes logits only at label positions already, so Liger's fused linear cross-entropy is not used.
    _apply_liger_kernel_to_instance(model=model, fused_linear_cross_entropy=False, cross_entropy=False)
    modeling = sys.modules[type(model).__module__]
    if getattr(modeling, "apply_rotary_pos_emb", None) is liger_rotary_pos_emb:
        modeling.apply_rotary_pos_emb = rows_as_one_batch(liger_rotary_pos_emb)


def rows_as_one_batch(rope):
    """`rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, **kwargs)` applied to a batch of B rows as to one
    row of B x S positions, each with its own cos and sin: the same arithmetic on every element.

    Liger's RoPE kernel takes the batch size as a compile-time constant, so every new number of rows in a pass
    (a pass under the token cap, the last batch of an epoch, each scoring batch) compiled a new kernel: 12 in a
    fresh 7B epoch. One row of B x S positions compiles only for the two divisibilities by 16 that Triton tells
    apart: 4 (forward and backward), and that epoch took 19.1 s with Triton's cache emptied against 21.9-22.8 s
    (BENCHMARKS.md, session 11).
    """
    @functools.wraps(rope)
    def apply(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, **kwargs):
        b, s = q.shape[0], q.shape[2]
        if b == 1 or unsqueeze_dim != 1 or cos.dim() > 3:
            return rope(q, k, cos, sin, position_ids, unsqueeze_dim, **kwargs)
        cos, sin = (t.expand(b, s, t.shape[-1]).reshape(1, b * s, t.shape[-1]) for t in (cos, sin))
        # (B, H, S, D) whose storage is (B, S, H, D), as the projections leave it: views, not copies.
        q1, k1 = (t.transpose(1, 2).reshape(1, b * s, t.shape[1], t.shape[3]).transpose(1, 2) for t in (q, k))
        q1, k1 = rope(q1, k1, cos, sin, None, unsqueeze_dim, **kwargs)
        return tuple(t.transpose(1, 2).reshape(b, s, t.shape[1], t.shape[3]).transpose(1, 2) for t in (q1, k1))
    return apply


# Model types whose Liger patch runs the kernels below with these settings (RMSNorm: Llama's casting, no offset).
WARMED_MODEL_TYPES = ("llama", "mistral")


def rms_norm_backward_rows(sm_count: int) -> list[int]:
    """Token counts that meet every specialisation Triton makes of RMSNorm backward's batch-dependent integers:
    the row count (divisible by 16 or not) and the rows per multiprocessor (1, divisible by 16, neither), most
    common first. Triton compiles a kernel for each such combination it meets (a pass of one token, the only
    other one, does not occur)."""
    s = 16 * sm_count
    return [s + 16, s + 1, s, s - 1, 16, 17]


def warm_up_kernels(config, dtype: torch.dtype, device: torch.device, sm_count: int, ops, stop: threading.Event,
                    backward: bool = True) -> int:
    """Run Liger's RMSNorm, SwiGLU and (batch-folded) RoPE once for each specialisation a run can meet, at the
    model's sizes, so that Triton compiles them now; stops between kernels once `stop` is set. `ops`: (rms_norm,
    silu_mul, rope), Liger's autograd functions. With `backward` (training) each pass runs backward too, and
    RMSNorm's backward meets its batch-dependent specialisations; without it (evaluation) forward kernels only,
    which take no batch-dependent integer. Returns the passes run."""
    rms_norm, silu_mul, rope = ops
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    eps = config.rms_norm_eps

    def randn(*shape):
        return torch.randn(*shape, dtype=dtype, device=device, requires_grad=backward)

    def finish(*outs):
        if backward:
            sum(o.sum() for o in outs).backward()

    def norm(rows):
        finish(rms_norm(randn(rows, hidden), torch.ones(hidden, dtype=dtype, device=device), eps, 0.0, "llama", True,
                        None))

    def swiglu():
        finish(silu_mul(randn(16, config.intermediate_size), randn(16, config.intermediate_size)))

    def rotary(rows, length):  # (B, H, S, D) laid out (B, S, H, D), as the projections leave q and k
        q, k = (torch.randn(rows, length, h * head_dim, dtype=dtype, device=device).view(rows, length, h, head_dim)
                .transpose(1, 2).requires_grad_(backward) for h in (heads, kv_heads))
        cos = torch.rand(rows, length, head_dim, dtype=dtype, device=device)
        finish(*rows_as_one_batch(rope)(q, k, cos, cos.flip(-1)))

    passes = [lambda: norm(16), swiglu, lambda: rotary(2, 9), lambda: rotary(2, 8)]
    if backward:
        passes += [functools.partial(norm, rows) for rows in rms_norm_backward_rows(sm_count)]
    done = 0
    for run in passes:
        if stop.is_set():
            break
        run()
        done += 1
    return done


class WarmUp:
    """Liger's kernels compiled on a side thread while the base model's weights load. On a fresh host Triton's
    compilation (its one-off start, code generation, ptxas, gcc building the launchers) cost the first 7B training
    step 2-3 s; with it beside the load, the first step took 3.2-4.2 s against 5.3-6.1 s (BENCHMARKS.md, session
    15). `finish()`, called once the model is loaded, stops it between kernels and waits for the one compiling:
    what is left compiles at first use, as it would have. `backward`: False for evaluation, which never runs the
    backward kernels."""

    def __init__(self, model_path: str, dtype: torch.dtype, device: torch.device, backward: bool = True):
        self.stop, self.passes, self.error, self.seconds = threading.Event(), 0, None, 0.0
        self.thread = None
        quiet_optional_backends()
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
            from liger_kernel.transformers.rope import liger_rotary_pos_emb
            from transformers import AutoConfig
            config = AutoConfig.from_pretrained(model_path)
        except Exception as e:  # noqa: BLE001 - no warm-up: the kernels compile at first use
            log.info("Liger's kernels are not compiled ahead (%s)", str(e).splitlines()[0] if str(e) else type(e))
            return
        if config.model_type not in WARMED_MODEL_TYPES:
            return
        ops = (LigerRMSNormFunction.apply, LigerSiLUMulFunction.apply, liger_rotary_pos_emb)
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        self.thread = threading.Thread(target=self._run, args=(config, dtype, device, sm_count, ops, backward),
                                       daemon=True, name="liger-warm-up")
        self.thread.start()

    def _run(self, config, dtype, device, sm_count, ops, backward):
        start = time.perf_counter()
        try:
            with torch.cuda.device(device):
                self.passes = warm_up_kernels(config, dtype, device, sm_count, ops, self.stop, backward)
                torch.cuda.synchronize(device)
        except Exception as e:  # noqa: BLE001 - a failed warm-up costs only the time it took
            self.error = e
        self.seconds = time.perf_counter() - start

    def finish(self) -> None:
        if self.thread is None:
            return
        waited = time.perf_counter()
        self.stop.set()
        self.thread.join()
        waited = time.perf_counter() - waited
        if self.error is not None:
            log.warning("Liger's kernels could not be compiled ahead (%s: %s); they compile at first use",
                        type(self.error).__name__, str(self.error).splitlines()[0] if str(self.error) else "")
        else:
            log.info("Liger's kernels: %d warm-up passes in %.1f s beside the weights' loading (%.1f s waited after)",
                     self.passes, self.seconds, waited)
