"""Liger's RoPE runs on a batch folded into one row: the same result, and one kernel for every batch size."""
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.models.mistral import modeling_mistral

from trec_accel.liger import apply_liger, rows_as_one_batch

TRANSFORMERS_ROPE = modeling_mistral.apply_rotary_pos_emb


def reference_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    """Transformers' RoPE under the signature of Liger's, recording the batch size it was called with."""
    reference_rope.batches.append(q.shape[0])
    return TRANSFORMERS_ROPE(q, k, cos, sin, unsqueeze_dim)


reference_rope.batches = []


def projected(b, s, heads, d, generator):
    """(B, H, S, D) laid out (B, S, H, D) in memory, as an attention layer's projection leaves it."""
    return torch.randn(b, s, heads * d, generator=generator).view(b, s, heads, d).transpose(1, 2).requires_grad_()


@pytest.mark.parametrize("cos_rows", [3, 1])
def test_a_batch_folded_into_one_row_gets_the_same_rotation_and_gradients(cos_rows):
    g = torch.Generator().manual_seed(0)
    b, s, d = 3, 5, 8
    q, k = projected(b, s, 4, d, g), projected(b, s, 2, d, g)
    # Rows at different positions (scoring's rows are), or one set of positions for every row.
    positions = torch.arange(s)[None] + 7 * torch.arange(cos_rows)[:, None]
    angles = positions[..., None] * torch.rand(d // 2, generator=g)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    weights = torch.randn(b, 4, s, d, generator=g), torch.randn(b, 2, s, d, generator=g)

    def run(rope):
        qe, ke = rope(q, k, cos, sin)
        ((qe * weights[0]).sum() + (ke * weights[1]).sum()).backward()
        grads = q.grad.clone(), k.grad.clone()
        q.grad = k.grad = None
        return qe.detach(), ke.detach(), *grads

    reference_rope.batches.clear()
    want = run(reference_rope)
    got = run(rows_as_one_batch(reference_rope))
    assert reference_rope.batches == [b, 1]
    assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_apply_liger_folds_the_models_rope(monkeypatch, tiny_model_path):
    """With liger-kernel's entry points stood in for (its kernels need CUDA), apply_liger leaves the model's RoPE
    wrapped, and the model computes what it computed before."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits

    def patch_instance(model, **kwargs):  # what Liger's instance patch does to the RoPE of a Mistral model
        modeling_mistral.apply_rotary_pos_emb = reference_rope
    liger = types.ModuleType("liger_kernel")
    liger.transformers = types.ModuleType("liger_kernel.transformers")
    liger.transformers._apply_liger_kernel_to_instance = patch_instance
    liger.transformers.rope = types.ModuleType("liger_kernel.transformers.rope")
    liger.transformers.rope.liger_rotary_pos_emb = reference_rope
    for name, module in [("liger_kernel", liger), ("liger_kernel.transformers", liger.transformers),
                         ("liger_kernel.transformers.rope", liger.transformers.rope)]:
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(modeling_mistral, "apply_rotary_pos_emb", TRANSFORMERS_ROPE)

    apply_liger(model)
    assert modeling_mistral.apply_rotary_pos_emb.__wrapped__ is reference_rope
    reference_rope.batches.clear()
    with torch.no_grad():
        got = model(ids).logits
    assert reference_rope.batches == [1] * model.config.num_hidden_layers
    torch.testing.assert_close(got, want)


def test_keywords_of_ropes_that_take_more_reach_them():
    """Liger's newer RoPE takes `rotary_dim`: the fold passes such keywords on, folded or not."""
    seen = []

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1, **kwargs):
        seen.append((q.shape[0], kwargs))
        return q, k
    g = torch.Generator().manual_seed(0)
    for b in (3, 1):
        q, k = projected(b, 4, 2, 8, g), projected(b, 4, 1, 8, g)
        rows_as_one_batch(rope)(q, k, torch.ones(b, 4, 8), torch.zeros(b, 4, 8), rotary_dim=8)
    assert seen == [(1, {"rotary_dim": 8}), (1, {"rotary_dim": 8})]
