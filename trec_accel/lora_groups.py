"""LoRA layers that read one input, run as one group: q/k/v of attention, gate/up of the MLP.

peft runs every LoRA layer on its own: a cast of the input to the adapter's fp32, dropout, casts of both adapter
weights, two matrix products, a scaling and an add, and as many kernels again backward. A 135M step is thousands of
such small kernels (BENCHMARKS.md), so their number is its cost. A group draws its members' dropout masks in one
kernel (one mask per member, independent, as peft's separate dropouts draw them), casts the stacked A matrices and
the stacked, scaled B matrices once, multiplies by the A matrices in one batched product, and adds each member's B
product to its base output in one `addmm`. Every other LoRA layer is a group of one and saves the casts and the
scaling of activations. The frozen base projections run as before, but a 4-bit one in a checkpointed layer keeps
its dequantized weight for the backward pass (`quantized.base_output`).

The members stay peft's modules with peft's weights (saving, loading, merging and counting are peft's); only their
`forward` is replaced. The first member called computes the whole group; the others take their outputs when called
with the same input tensor, and compute their own otherwise, so a model that calls them differently still gets
peft's results. Anything peft does beyond plain LoRA (several adapters, DoRA, merged or disabled adapters,
per-call arguments) goes to peft's own forward.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .quantized import base_output
from .step import Decision

log = logging.getLogger("trec_accel")

# Projections that a decoder layer calls on the same tensor (Llama, Mistral, Qwen2, Gemma, SmolLM2 naming).
SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def decide_fused_lora(mode: str, sharded: bool) -> Decision:
    """Whether LoRA layers run as groups (`lora.fused`: auto / on / off). Measured on H200s (BENCHMARKS.md): SmolLM2
    trains 6-10% faster per replayed step at batch 32, the same at 256; the 7B shape trains as fast, with 0.1 GiB more
    peak memory, and scores 500 test questions in 0.81 s against 1.03 s."""
    if mode == "off":
        return Decision(False, "lora.fused=off")
    if sharded:
        if mode == "on":
            raise ConfigError("lora.fused=on cannot be used with FSDP or ZeRO-3: they gather each LoRA layer's "
                              "weights when that layer is called, and a group reads its members' weights together; "
                              "use lora.fused=auto")
        return Decision(False, "FSDP and ZeRO-3 gather each LoRA layer's weights only when it is called")
    return Decision(True, "lora.fused=on" if mode == "on" else "one whole copy of the weights in this process")


def member_dropout(x: torch.Tensor, members: int, p: float) -> torch.Tensor:
    """(members, *x.shape): x under an independent dropout mask for each member."""
    return F.dropout(x.expand(members, *x.shape), p, training=True)


def lora_outputs(members: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Every member's output for input x: its base projection plus its LoRA update, computed together."""
    name = members[0].active_adapters[0]
    lora_a = [m.lora_A[name].weight for m in members]
    lora_b = [m.lora_B[name].weight for m in members]
    dropout = members[0].lora_dropout[name]
    p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
    base = [base_output(m.base_layer, x) for m in members]
    # The dtype peft's products run in: autocast's, else the adapter's own (peft casts the input to it).
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else lora_a[0].dtype
    h = x.to(dtype).reshape(-1, x.shape[-1])
    k, r = len(members), lora_a[0].shape[0]
    a = (lora_a[0] if k == 1 else torch.cat(lora_a)).to(dtype)   # (k r, in): one cast for the group
    # The scale goes into B: a multiplication of a small weight, none of activations or their gradients.
    b = ((lora_b[0] if k == 1 else torch.cat(lora_b)) * members[0].scaling[name]).to(dtype)   # (sum of outs, r)
    if p > 0:
        u = torch.bmm(member_dropout(h, k, p), a.view(k, r, -1).transpose(1, 2)).unbind(0)  # k x (tokens, r)
    else:
        u = (h @ a.t()).split(r, dim=1)
    # base + u B^T in one call per member (peft: a product, a multiplication and an add)
    return [torch.addmm(y.reshape(-1, y.shape[-1]).to(dtype), u_i, b_i.t()).view(y.shape).to(y.dtype)
            for y, u_i, b_i in zip(base, u, b.split([w.shape[0] for w in lora_b]))]


class LoraGroup:
    """LoRA layers that a decoder layer calls on one input; see the module's docstring."""

    def __init__(self, members: list[nn.Module]):
        self.members = members
        self.source: torch.Tensor | None = None   # the input whose outputs wait in `pending`
        self.pending: dict[int, torch.Tensor] = {}

    def install(self) -> None:
        for i, m in enumerate(self.members):
            m.forward = functools.partial(self._forward, i, m.forward)

    def _plain(self) -> bool:
        """Plain LoRA of one adapter, as `lora_outputs` computes it."""
        names = self.members[0].active_adapters
        return len(names) == 1 and all(
            not m.merged and not m.disable_adapters and names[0] in m.lora_A and m.active_adapters == names
            and not getattr(m, "lora_variant", {}).get(names[0]) and not m.use_dora.get(names[0], False)
            for m in self.members)

    def _forward(self, i: int, peft_forward, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        plain = not args and not kwargs and self._plain()
        if plain and self.source is x and i in self.pending:
            out = self.pending.pop(i)
            if not self.pending:
                self.source = None
            return out
        self.source, self.pending = None, {}  # any other call starts over: nothing computed before is served
        if not plain:
            return peft_forward(x, *args, **kwargs)
        outs = lora_outputs(self.members, x)
        self.pending = {j: o for j, o in enumerate(outs) if j != i}
        self.source = x if self.pending else None
        return outs[i]


def lora_groups(model: nn.Module) -> list[LoraGroup]:
    """The model's LoRA layers as groups: members of SHARED_INPUTS under one parent with the same input size, rank,
    scale and dropout run together; every other LoRA layer is a group of one."""
    from peft.tuners.lora import LoraLayer
    groups = []
    for parent in model.modules():
        children = {n: c for n, c in parent.named_children() if isinstance(c, LoraLayer)}
        for names in SHARED_INPUTS:
            found = [children[n] for n in names if n in children]
            if len(found) > 1 and len({_shape(m) for m in found}) == 1:
                groups.append(LoraGroup(found))
                for n in names:
                    children.pop(n, None)
        groups += [LoraGroup([c]) for c in children.values()]
    return groups


def _shape(m: nn.Module) -> tuple:
    name = m.active_adapters[0]
    dropout = m.lora_dropout[name]
    return (m.in_features, m.r[name], m.scaling[name], dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
            m.lora_A[name].weight.dtype)


def fuse_lora(model: nn.Module, mode: str, sharded: bool) -> Decision:
    """Replaces the forward of the model's LoRA layers by their groups' where `decide_fused_lora` allows; logs it."""
    decision = decide_fused_lora(mode, sharded)
    if decision.on:
        groups = lora_groups(model)
        for g in groups:
            g.install()
        shared = sum(len(g.members) for g in groups if len(g.members) > 1)
        log.info("LoRA layers run fused (%s): %d groups, %d layers of them sharing an input", decision.why,
                 len(groups), shared)
    else:
        log.info("LoRA layers run as peft's: %s", decision.why)
    return decision
