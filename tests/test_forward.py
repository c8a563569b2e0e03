"""The shared-prefix and tree-scoring paths compute exactly what the plain full-sequence path computes."""
import contextlib

import pytest
import torch

from trec_accel import forward
from trec_accel.batching import Encoder, collate
from trec_accel.config import load_config
from trec_accel.loss import LabelLoss, batch_loss
from trec_accel.model import add_lora, prepare_for_training
from trec_accel.scoring import score_prompts, shared_prefix
from trec_accel.task import BUILTIN, COARSE, load_task

QUESTIONS = ["Who wrote Hamlet ?", "How many legs does a spider have ?", "What is a sonnet ?",
             "What does NASA stand for ?", "Where is the highest waterfall in the United States ?"]


@pytest.fixture(scope="module")
def lora_model(tiny_model_path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    cfg = load_config(None, ["lora.r=4", "lora.dropout=0.0", "model.name=tiny-random-mistral"])
    model = add_lora(model, cfg, sharded=False)
    # LoRA B starts at zero; give the adapters weights so their gradients are all non-trivial.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module")
def checkpointed_model(tiny_model_path, lora_model):
    """The same weights as lora_model, with activation checkpointing of every layer."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    cfg = load_config(None, ["lora.r=4", "lora.dropout=0.0", "model.name=tiny-random-mistral",
                             "model.gradient_checkpointing=true"])
    model = add_lora(prepare_for_training(model, cfg), cfg, sharded=False)
    model.load_state_dict(lora_model.state_dict())
    return model


@contextlib.contextmanager
def attention(*models, mode: str):
    """The models attend to a shared prefix as `model.prefix_attention=mode` makes them ("sdpa": Transformers'
    own SDPA, the prefix joined through the cache)."""
    from trec_accel.forward import set_prefix_attention
    for m in models:
        if mode == "sdpa":
            m.get_base_model().set_attn_implementation("sdpa")
        else:
            set_prefix_attention(m, mode)
    try:
        yield
    finally:
        for m in models:
            m.get_base_model().set_attn_implementation("sdpa")


def grads(model, loss_model, batch):
    model.zero_grad(set_to_none=True)
    loss_sum, n = batch_loss(loss_model, batch)
    (loss_sum / n).backward()
    return loss_sum.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("task", ["coarse", "fine"])
@pytest.mark.parametrize("mode", ["sdpa", "grouped", "joined"])
def test_shared_prefix_matches_full_sequences(lora_model, checkpointed_model, tokenizer, task, mode):
    enc = Encoder(tokenizer, BUILTIN[task], "notebook")
    exs = [enc.encode(q, i % len(enc.labels)) for i, q in enumerate(QUESTIONS)]
    loss_model = LabelLoss(lora_model).train()
    plain_loss, plain = grads(lora_model, loss_model, collate(exs, tokenizer.pad_token_id))
    ckpt = LabelLoss(checkpointed_model).train()
    with attention(lora_model, checkpointed_model, mode=mode):
        shared_loss, shared = grads(lora_model, loss_model, collate(exs, tokenizer.pad_token_id, enc.prefix_ids))
        # The same with every layer checkpointed: the recomputation must see the same prefix.
        ckpt_loss, ckpt_grads = grads(checkpointed_model, ckpt, collate(exs, tokenizer.pad_token_id,
                                                                        enc.prefix_ids))
    assert ckpt_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, g in plain.items():
        torch.testing.assert_close(ckpt_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
    assert shared_loss == pytest.approx(plain_loss, rel=1e-5)
    assert len(plain) == 2 * 7 * 2 + 2  # lora_A and lora_B of 7 projections x 2 layers, plus lm_head's
    for name, g in plain.items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(shared[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_unchecked_layers_run_once_and_give_the_same_gradients(tiny_model_path, lora_model, tokenizer):
    """model.unchecked_layers=1: the last layer's forward runs once, the first's twice (recomputed in the
    backward pass); loss and every LoRA gradient as without checkpointing. More layers than the model has: a
    ConfigError naming the setting."""
    from transformers import AutoModelForCausalLM

    from trec_accel.config import ConfigError
    overrides = ["lora.r=4", "lora.dropout=0.0", "model.name=tiny-random-mistral", "model.gradient_checkpointing=true"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with pytest.raises(ConfigError, match="model.unchecked_layers=3 is more than the 2 decoder layers"):
        prepare_for_training(model, load_config(None, [*overrides, "model.unchecked_layers=3"]))
    cfg = load_config(None, [*overrides, "model.unchecked_layers=1"])
    model = add_lora(prepare_for_training(model, cfg), cfg, sharded=False)
    model.load_state_dict(lora_model.state_dict())
    calls = [0, 0]
    for i, layer in enumerate(model.get_base_model().model.layers):
        layer.self_attn.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    enc = Encoder(tokenizer, COARSE, "notebook")
    batch = collate([enc.encode(q, i % 6) for i, q in enumerate(QUESTIONS)], tokenizer.pad_token_id)
    loss, got = grads(model, LabelLoss(model).train(), batch)
    assert calls == [2, 1]
    want_loss, want = grads(lora_model, LabelLoss(lora_model).train(), batch)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)


# Tasks of one's own: labels of several words, two sharing their first word, non-ASCII; and a few hundred labels.
TASKS = {**BUILTIN,
         "support": load_task({"labels": ["billing", "refund request", "account access", "account deletion",
                                          "Störung der Station", "app bug"]}),
         "many": load_task({"labels": [f"{w} {i}" for i in range(60) for w in ("topic", "Thema", "tema")]})}


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("shared", [None, "sdpa", "grouped"])
def test_tree_scores_match_one_sequence_per_candidate(lora_model, tokenizer, task, shared):
    """Scored without the shared prefix, with it through Transformers' SDPA, and through the grouped attention."""
    enc = Encoder(tokenizer, TASKS[task], "notebook")
    lora_model.eval()
    prompts = [enc.encode(q).prompt_ids for q in QUESTIONS]
    prefix = shared_prefix(lora_model, enc) if shared else None
    with attention(lora_model, mode=shared or "sdpa"):
        got = score_prompts(lora_model, enc, prompts, prefix, "sum")
    assert got.shape == (len(prompts), len(enc.labels))
    # Each reference is a whole forward pass with logits at every position: few of them for the long instruction.
    checked = prompts if len(enc.labels) <= 50 else prompts[:1]
    with torch.no_grad():
        for i, q in enumerate(checked):
            for k, cand in list(enumerate(enc.candidates))[:: 1 if len(enc.labels) <= 50 else 89]:
                ids = torch.tensor([q + cand])
                logp = torch.log_softmax(lora_model(input_ids=ids).logits[0].float(), -1)
                want = sum(logp[len(q) - 1 + j, t].item() for j, t in enumerate(cand))
                assert got[i, k].item() == pytest.approx(want, abs=2e-4), (i, enc.labels[k])
    with attention(lora_model, mode=shared or "sdpa"):
        mean = score_prompts(lora_model, enc, prompts, prefix, "mean")
    lens = torch.tensor([len(c) for c in enc.candidates], dtype=torch.float32)
    torch.testing.assert_close(mean, got / lens)
    lora_model.train()


def test_cache_interface(lora_model, tokenizer):
    """The parts of Transformers' cache that `SharedPrefix` relies on, beyond the model's public forward:
    the returned cache's `layers`, each layer's `keys` / `values` (batch, kv heads, length, head dim), and
    `update(key_states, value_states, layer_idx, ...)` called once per attention layer and pass."""
    from trec_accel.forward import SharedPrefix, hidden_states, parts
    enc = Encoder(tokenizer, COARSE, "notebook")
    decoder, _ = parts(lora_model)
    cfg = decoder.config
    with torch.no_grad():
        prefix = SharedPrefix(decoder, torch.tensor([enc.prefix_ids]))
        assert len(prefix.cache.layers) == cfg.num_hidden_layers
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        for k, v in prefix.states:
            assert k.shape == v.shape == (1, cfg.num_key_value_heads, len(enc.prefix_ids), head_dim)
        calls = []
        update = prefix.cache.update
        prefix.cache.update = lambda k, v, i, *a, **kw: calls.append(i) or update(k, v, i, *a, **kw)
        ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
        hidden_states(decoder, ids, torch.ones_like(ids), prefix)
    assert calls == list(range(cfg.num_hidden_layers))


@pytest.mark.parametrize("mode", ["auto", "grouped", "joined"])
def test_prefix_attention_modes(lora_model, tokenizer, monkeypatch, mode):
    """Each mode takes its path (auto: joined) and gives the full sequences' hidden states."""
    calls = []
    real = forward.grouped_prefix_attention
    monkeypatch.setattr(forward, "grouped_prefix_attention", lambda *a: calls.append(1) or real(*a))
    enc = Encoder(tokenizer, COARSE, "notebook")
    decoder, _ = forward.parts(lora_model)
    ids = torch.arange(5, 5 + 2 * 12).view(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    prefix = torch.tensor([enc.prefix_ids])
    with torch.no_grad(), attention(lora_model, mode=mode):
        got = forward.hidden_states(decoder, ids, mask, prefix)
    assert len(calls) == (decoder.config.num_hidden_layers if mode == "grouped" else 0)
    with torch.no_grad():
        full = forward.hidden_states(decoder, torch.cat([prefix.expand(2, -1), ids], 1),
                                     torch.cat([torch.ones_like(prefix).expand(2, -1), mask], 1))
    torch.testing.assert_close(got[mask.bool()], full[:, prefix.shape[1]:][mask.bool()], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["auto", "joined"])
def test_auto_joins_the_prefix_in_training_and_scoring(monkeypatch, mode):
    """auto joins the prefix to every row, with gradients (training) and without (scoring): measured faster than
    grouping at every shape (BENCHMARKS.md session 17); the rows then go to SDPA with the prefix before them."""
    monkeypatch.setattr(forward, "grouped_prefix_attention", lambda *a: pytest.fail("grouped under " + mode))
    module = torch.nn.Module()
    module.layer_idx = 0
    prefix = type("P", (), {"states": [(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))]})()
    q = torch.randn(2, 1, 5, 4)
    allow = torch.ones(2, 1, 5, 8, dtype=torch.bool)
    sdpa = lambda m, q, k, v, mask, **kw: (k.shape, None)  # noqa: E731 - what the joined path hands to SDPA
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            shape, _ = forward.prefix_attention(module, q, q, q, allow, shared_prefix=prefix, mode=mode, sdpa=sdpa)
        assert shape == (2, 1, 8, 4)


@pytest.mark.parametrize("mode", ["sdpa", "joined"])
def test_prefix_gradient_is_summed_within_its_layer(lora_model, tokenizer, mode):
    """Each layer's per-row gradient of the prefix keys and values is summed over the rows during that layer's
    backward, not held until every layer's backward has run (4.4 GiB at 7B for 256 coarse rows, when it was)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from trec_accel.forward import parts
    enc = Encoder(tokenizer, COARSE, "notebook")
    exs = [enc.encode(q, i % len(enc.labels)) for i, q in enumerate(QUESTIONS)]
    rows, p = len(exs), len(enc.prefix_ids)
    events = []

    class SumsOverRows(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            x = args[0]
            if func is torch.ops.aten.sum.dim_IntList and x.dim() == 4 and x.shape[0] == rows and x.shape[2] == p:
                events.append("prefix")
            return func(*args, **(kwargs or {}))

    layers = parts(lora_model)[0].layers
    hooks = [layer.register_full_backward_hook(lambda *_, i=i: events.append(i)) for i, layer in enumerate(layers)]
    try:
        with attention(lora_model, mode=mode):
            loss_sum, _ = batch_loss(LabelLoss(lora_model).train(), collate(exs, tokenizer.pad_token_id,
                                                                            enc.prefix_ids))
            with SumsOverRows():
                loss_sum.backward()
    finally:
        for h in hooks:
            h.remove()
        lora_model.zero_grad(set_to_none=True)
    # The last layer's keys and values are summed before that layer's backward ends (a layer whose inputs need no
    # gradient, the first, reports as soon as its outputs' gradients are known, so it is not checked).
    assert events[:3] == ["prefix", "prefix", len(layers) - 1]
    assert events.count("prefix") == 2 * len(layers)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_grouped_prefix_attention_is_sdpa_over_the_joined_sequence(heads, kv_heads):
    """Output and the gradients of queries, keys, values and the prefix's keys and values equal SDPA's over the
    prefix joined to every row (each key/value head repeated over its group), under an arbitrary mask."""
    from trec_accel.forward import grouped_prefix_attention, joined
    torch.manual_seed(0)
    b, s, p, d = 3, 5, 7, 8
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in
              [(b, heads, s, d), (b, kv_heads, s, d), (b, kv_heads, s, d), (1, kv_heads, p, d), (1, kv_heads, p, d)]]
    allow = torch.rand(b, 1, s, p + s) < 0.6
    allow[..., 0] = True  # no row without a key

    def reference(q, k, v, pk, pv):
        k, v = (x.repeat_interleave(heads // kv_heads, 1) for x in joined(pk, pv, k, v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allow, scale=0.3).transpose(1, 2)

    want = reference(*inputs)
    got = grouped_prefix_attention(*inputs, allow, 0.3, 0.0)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for a, b_ in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        torch.testing.assert_close(a, b_)


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (6, 1), (9, 3)])
def test_folded_heads_are_sdpa_with_each_key_value_head_repeated(heads, kv_heads):
    """Output and the gradients of queries, keys and values equal SDPA's over the key/value heads repeated for their
    query heads, under an arbitrary mask, broadcast over the batch or not."""
    from trec_accel.forward import folded_heads_sdpa
    torch.manual_seed(0)
    b, s, k, d = 3, 5, 9, 8
    inputs = [torch.randn(*shape, dtype=torch.float64, requires_grad=True) for shape in
              [(b, heads, s, d), (b, kv_heads, k, d), (b, kv_heads, k, d)]]
    for rows in (b, 1):
        allow = torch.rand(rows, 1, s, k) < 0.6
        allow[..., 0] = True  # no row without a key
        repeated = [x.repeat_interleave(heads // kv_heads, 1) for x in inputs[1:]]
        want = torch.nn.functional.scaled_dot_product_attention(inputs[0], *repeated, attn_mask=allow,
                                                                scale=0.3).transpose(1, 2)
        got = folded_heads_sdpa(*inputs, allow, 0.0, 0.3)
        torch.testing.assert_close(got, want)
        grad = torch.randn_like(want)
        for a, b_ in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, inputs, grad)):
            torch.testing.assert_close(a, b_)
