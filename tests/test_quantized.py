"""A 4-bit base projection in a checkpointed layer is dequantized for the forward pass and the recomputation only,
with bitsandbytes' results; elsewhere bitsandbytes' own product runs and nothing more is kept."""
import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trec_accel import forward
from trec_accel.batching import Encoder, collate
from trec_accel.config import load_config
from trec_accel.loss import LabelLoss, batch_loss
from trec_accel.model import add_lora, prepare_for_training
from trec_accel.quantized import base_output
from trec_accel.task import COARSE


@pytest.fixture
def dequantized(monkeypatch):
    """The shapes bitsandbytes' `dequantize_4bit` is called for, in order."""
    calls = []
    original = bnb_functional.dequantize_4bit

    def counting(packed, quant_state=None, *args, **kwargs):
        calls.append(tuple(quant_state.shape))
        return original(packed, quant_state, *args, **kwargs)
    monkeypatch.setattr(bnb_functional, "dequantize_4bit", counting)
    return calls


def linear_4bit(linear: nn.Linear, dtype=torch.float32) -> nn.Module:
    """`linear` in 4-bit NF4 (bitsandbytes quantizes when the layer moves to a device, the CPU included)."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=dtype, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


@pytest.mark.parametrize("bias", [False, True])
def test_in_a_checkpointed_layer_the_weight_is_dequantized_for_forward_and_recomputation_only(dequantized, bias):
    torch.manual_seed(0)
    layer = linear_4bit(nn.Linear(64, 32, bias=bias), torch.bfloat16)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)

    def run(fn):
        x.grad = None
        out = checkpoint(fn, x, use_reentrant=False)
        out.float().pow(2).sum().backward()
        return out.detach(), x.grad.clone()

    ours = run(lambda h: forward._marked_checkpointed(base_output, layer, h))
    assert dequantized == [(32, 64), (32, 64)]   # the first forward pass and the recomputation; none backward
    theirs = run(layer)                          # bitsandbytes' product, checkpointed
    assert ours[0].dtype == theirs[0].dtype == torch.bfloat16
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    torch.testing.assert_close(ours[1], theirs[1], rtol=0, atol=0)


def test_outside_a_checkpointed_layer_bitsandbytes_runs_and_no_weight_is_kept(dequantized):
    torch.manual_seed(0)
    layer = linear_4bit(nn.Linear(64, 32))
    x = torch.randn(8, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = base_output(layer, x)
    assert (32, 64) not in saved   # a dequantized weight kept here would be kept for every layer of the model
    torch.testing.assert_close(out, layer(x), rtol=0, atol=0)


def tiny_4bit(tiny_model_path, checkpointed: bool):
    """The tiny model with its decoder's projections in 4-bit NF4, LoRA on them (seeded, B non-zero), run as
    fused groups."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, linear_4bit(child))
    cfg = load_config(None, ["lora.r=4", "lora.dropout=0.0", "model.name=tiny-random-mistral", "lora.fused=on",
                             f"model.gradient_checkpointing={str(checkpointed).lower()}"])
    torch.manual_seed(0)
    model = add_lora(prepare_for_training(model, cfg), cfg, sharded=False)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def two_questions(tokenizer, shared: bool):
    enc = Encoder(tokenizer, COARSE, "notebook")
    return collate([enc.encode(q, i) for i, q in enumerate(["Who wrote Hamlet ?", "What is a sonnet ?"])],
                   tokenizer.pad_token_id, enc.prefix_ids if shared else None)


def trained(tiny_model_path, batch, checkpointed: bool, calls: list | None = None):
    """(loss, LoRA gradients, dequantizations in `calls` during the step) of one step of `tiny_4bit`."""
    calls = [] if calls is None else calls
    model = tiny_4bit(tiny_model_path, checkpointed)
    start = len(calls)
    loss_sum, n = batch_loss(LabelLoss(model).train(), batch)
    (loss_sum / n).backward()
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    return loss_sum.item(), grads, len(calls) - start


def test_a_checkpointed_4bit_model_trains_as_without_checkpointing(tiny_model_path, tokenizer, dequantized):
    batch = two_questions(tokenizer, shared=False)
    plain_loss, plain, _ = trained(tiny_model_path, batch, False, dequantized)
    loss, grads, calls = trained(tiny_model_path, batch, True, dequantized)
    # 7 projections x 2 layers dequantized forward and recomputing only, but the first layer's q/k/v: their input,
    # the embeddings, needs no gradient, so bitsandbytes' product runs there (and needs no backward).
    assert calls == 2 * (7 * 2 - 3)
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert len(grads) == 2 * 7 * 2 + 2
    for name, g in plain.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_the_prefix_pass_keeps_bitsandbytes_product(tiny_model_path, tokenizer, monkeypatch):
    """The shared instruction's pass is not checkpointed: a weight saved there would be held for every layer until
    the backward pass. With the prefix, the checkpointed model still trains as the plain one."""
    from trec_accel import quantized
    batch = two_questions(tokenizer, shared=True)
    writing = []
    apply = quantized._DequantizedOnce.apply
    monkeypatch.setattr(quantized._DequantizedOnce, "apply",
                        lambda *a: writing.append(forward._writing_cache.get()) or apply(*a))
    plain_loss, plain, _ = trained(tiny_model_path, batch, False)
    loss, grads, _ = trained(tiny_model_path, batch, True)
    assert writing and not any(writing)   # used for the rows' layers, never while the prefix writes its cache
    assert loss == pytest.approx(plain_loss, rel=1e-6)
    for name, g in plain.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
