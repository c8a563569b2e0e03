"""LoRA layers run as groups (`lora.fused`) compute what peft's layers compute: the same outputs, losses and
gradients, the same dropout masks' distribution, and peft's own forward wherever a group does not apply."""
import pytest
import torch

from trec_accel.batching import Encoder, collate
from trec_accel.config import ConfigError, load_config
from trec_accel.lora_groups import decide_fused_lora, lora_groups, member_dropout
from trec_accel.loss import LabelLoss, batch_loss
from trec_accel.model import add_lora, prepare_for_training
from trec_accel.task import COARSE

QUESTIONS = ["Who wrote Hamlet ?", "How many legs does a spider have ?", "What is a sonnet ?",
             "What does NASA stand for ?", "Where is the highest waterfall in the United States ?"]


def lora_model(path, fused: str, dropout: float = 0.0, checkpointing: bool = False):
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    cfg = load_config(None, ["lora.r=4", f"lora.dropout={dropout}", f"lora.fused={fused}",
                             f"model.gradient_checkpointing={str(checkpointing).lower()}"])
    torch.manual_seed(0)  # the same A matrices in every model
    model = add_lora(prepare_for_training(base, cfg), cfg, sharded=False)
    torch.manual_seed(1)  # B starts at zero: give every adapter weights, so that every gradient is non-trivial
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def loss_and_grads(model, batch, seed: int = 0):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss_sum, n = batch_loss(LabelLoss(model).train(), batch)
    (loss_sum / n).backward()
    return loss_sum.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("shared, checkpointing, dropout", [(False, False, 0.0), (True, False, 0.0),
                                                            (True, True, 0.0), (True, False, 0.3),
                                                            (False, True, 0.3)])
def test_groups_give_peft_losses_and_gradients(tiny_model_path, tokenizer, shared, checkpointing, dropout):
    enc = Encoder(tokenizer, COARSE, "notebook")
    batch = collate([enc.encode(q, i) for i, q in enumerate(QUESTIONS)], tokenizer.pad_token_id,
                    enc.prefix_ids if shared else None)
    peft_loss, peft_grads = loss_and_grads(lora_model(tiny_model_path, "off", dropout, checkpointing), batch)
    loss, grads = loss_and_grads(lora_model(tiny_model_path, "on", dropout, checkpointing), batch)
    # With dropout, the same masks too: on the CPU, one draw of (members, tokens, features) takes the generator's
    # numbers in the order peft's q, k, v (gate, up) draws take them one after another.
    assert loss == pytest.approx(peft_loss, rel=1e-5)
    assert len(grads) == 2 * 7 * 2 + 2
    for name, g in peft_grads.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_groups_are_the_layers_that_read_one_input(tiny_model_path):
    model = lora_model(tiny_model_path, "on")
    members = sorted(tuple(n.rsplit(".", 1)[-1] for n, m in model.named_modules() if any(m is x for x in g.members))
                     for g in lora_groups(model))
    # Per layer (2): q/k/v, gate/up, o and down alone; lm_head alone.
    assert members == sorted([("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("o_proj",),
                              ("down_proj",)] * 2 + [("lm_head",)])


def test_member_dropout_draws_an_independent_mask_per_member():
    torch.manual_seed(0)
    x = torch.randn(4096, 64)
    y = member_dropout(x, 3, 0.2)
    kept = y != 0
    assert y.shape == (3, 4096, 64)
    for i in range(3):
        assert kept[i].float().mean().item() == pytest.approx(0.8, abs=0.01)
        torch.testing.assert_close(y[i][kept[i]], x[kept[i]] / 0.8)
    # Independent masks agree on p^2 + (1-p)^2 = 68% of the positions; one shared mask would agree on all.
    for i, j in ((0, 1), (1, 2), (0, 2)):
        assert (kept[i] == kept[j]).float().mean().item() == pytest.approx(0.68, abs=0.01)


def test_a_member_called_alone_or_a_disabled_adapter_gets_peft_forward(tiny_model_path):
    peft_model, model = lora_model(tiny_model_path, "off"), lora_model(tiny_model_path, "on")
    attn = model.base_model.model.model.layers[0].self_attn
    peft_attn = peft_model.base_model.model.model.layers[0].self_attn
    x, other = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        q = attn.q_proj(x)          # computes k and v of x too, for the calls that follow
        k_other = attn.k_proj(other)  # not the input the group ran on: its own output
        torch.testing.assert_close(q, peft_attn.q_proj(x))
        torch.testing.assert_close(k_other, peft_attn.k_proj(other))
        torch.testing.assert_close(attn.k_proj(x), peft_attn.k_proj(x))
        torch.testing.assert_close(attn.v_proj(x), peft_attn.v_proj(x))
        with model.disable_adapter():
            torch.testing.assert_close(attn.q_proj(x), attn.q_proj.base_layer(x))
        assert not torch.allclose(attn.q_proj(x), attn.q_proj.base_layer(x))


def test_decision():
    assert decide_fused_lora("auto", False).on
    assert decide_fused_lora("on", False).on
    assert not decide_fused_lora("off", False).on
    off = decide_fused_lora("auto", True)
    assert not off.on and "FSDP" in off.why
    with pytest.raises(ConfigError, match="lora.fused=on cannot be used with FSDP or ZeRO-3"):
        decide_fused_lora("on", True)
