"""Liger's Triton kernels for RMSNorm, RoPE and SwiGLU (`model.liger_kernels`), patched in so that they compile
a fixed set of kernels whatever the batch."""
from __future__ import annotations

import functools
import logging
import sys

log = logging.getLogger(__name__)


def apply_liger(model) -> None:
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
