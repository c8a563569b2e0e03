"""Liger's RoPE runs on a batch folded into one row: the same result, and one kernel for every batch size; its
kernels are compiled ahead while the weights load."""
import logging
import sys
import threading
import types

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.mistral import modeling_mistral

from trec_accel.liger import (
    apply_liger,
    quiet_optional_backends,
    rms_norm_backward_rows,
    rows_as_one_batch,
    warm_up_kernels,
)

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


def specialisation(n: int) -> str:
    """How Triton tells an integer argument apart when it compiles a kernel."""
    return "1" if n == 1 else "16" if n % 16 == 0 else "other"


@pytest.mark.parametrize("sm_count", [20, 108, 132])
def test_the_warm_up_meets_every_specialisation_of_rms_norm_backward(sm_count):
    """Every (rows, rows per multiprocessor) pair of specialisations a pass of more than one token can give."""
    met = {(specialisation(n), specialisation(-(-n // sm_count))) for n in rms_norm_backward_rows(sm_count)}
    assert met == {(rows, per_sm) for rows in ("16", "other") for per_sm in ("1", "16", "other")}


class StandIns:
    """Liger's three autograd functions stood in for by their arithmetic in plain torch, recording each call's
    inputs and each backward pass."""

    def __init__(self, stop_after=None, stop=None):
        self.calls, self.backward, self.stop_after, self.stop = [], [], stop_after, stop

    def _seen(self, name, out, **inputs):
        self.calls.append((name, inputs))
        if out.requires_grad:
            out.register_hook(lambda g: self.backward.append(name))
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            self.stop.set()
        return out

    def rms_norm(self, x, w, eps, offset, casting_mode, in_place, row_mode):
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype) * (w + offset)
        return self._seen("rms_norm", y, x=x, w=w, eps=eps, offset=offset, casting_mode=casting_mode)

    def silu_mul(self, a, b):
        return self._seen("silu_mul", torch.nn.functional.silu(a) * b, a=a, b=b)

    def rope(self, q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        q1, k1 = TRANSFORMERS_ROPE(q, k, cos, sin, unsqueeze_dim)
        self._seen("rope", q1, q=q, k=k, cos=cos)
        return q1, k1

    def ops(self):
        return self.rms_norm, self.silu_mul, self.rope


def test_the_warm_up_runs_each_kernel_forward_and_backward_at_the_models_sizes(tiny_model_path):
    config = AutoConfig.from_pretrained(tiny_model_path)
    ops = StandIns()
    cpu = torch.device("cpu")
    passes = warm_up_kernels(config, torch.bfloat16, cpu, 20, ops.ops(), threading.Event())
    assert passes == 4 + len(rms_norm_backward_rows(20))
    assert ops.backward == [name for name, _ in ops.calls]  # each forward followed by its backward
    norms = [i for name, i in ops.calls if name == "rms_norm"]
    assert [i["x"].shape for i in norms] == [(n, config.hidden_size) for n in [16, *rms_norm_backward_rows(20)]]
    for i in norms:  # Mistral's and Llama's patch: Llama's casting, no offset, the model's epsilon, a frozen weight
        assert (i["eps"], i["offset"], i["casting_mode"]) == (config.rms_norm_eps, 0.0, "llama")
        assert i["x"].dtype == i["w"].dtype == torch.bfloat16 and i["x"].requires_grad and not i["w"].requires_grad
    (swiglu,) = [i for name, i in ops.calls if name == "silu_mul"]
    assert swiglu["a"].shape[1:] == swiglu["b"].shape[1:] == (config.intermediate_size,)
    ropes = [i for name, i in ops.calls if name == "rope"]
    head_dim = config.hidden_size // config.num_attention_heads
    # The batch folded into one row (rows_as_one_batch), at a length divisible by 16 and one that is not, laid
    # out as the projections leave q and k: (1, H, S, D) views of (1, S, H, D) storage.
    assert [i["q"].shape for i in ropes] == [(1, config.num_attention_heads, s, head_dim) for s in (18, 16)]
    for i in ropes:
        assert i["k"].shape[1] == config.num_key_value_heads and i["cos"].shape == (1, i["q"].shape[2], head_dim)
        assert i["q"].transpose(1, 2).is_contiguous() and i["k"].transpose(1, 2).is_contiguous()


def test_the_warm_up_for_evaluation_runs_each_kernel_forward_only(tiny_model_path):
    """Evaluation never runs the backward kernels, nor RMSNorm backward's batch-dependent specialisations."""
    config = AutoConfig.from_pretrained(tiny_model_path)
    ops = StandIns()
    passes = warm_up_kernels(config, torch.bfloat16, torch.device("cpu"), 20, ops.ops(), threading.Event(),
                             backward=False)
    assert passes == 4 and ops.backward == []
    assert [name for name, _ in ops.calls] == ["rms_norm", "silu_mul", "rope", "rope"]
    assert all(not t.requires_grad for _, i in ops.calls for t in i.values() if isinstance(t, torch.Tensor))


def test_the_warm_up_stops_between_kernels_once_asked(tiny_model_path):
    config = AutoConfig.from_pretrained(tiny_model_path)
    stop = threading.Event()
    ops = StandIns(stop_after=2, stop=stop)
    assert warm_up_kernels(config, torch.float32, torch.device("cpu"), 20, ops.ops(), stop) == 2
    stop.set()
    assert warm_up_kernels(config, torch.float32, torch.device("cpu"), 20, StandIns().ops(), stop) == 0


def test_liger_s_warnings_about_optional_backends_it_cannot_import_are_dropped(caplog):
    """Every run on CUDA logged two such warnings (CuTe DSL, Ascend) at its first RoPE; other warnings still show."""
    quiet_optional_backends()
    registry = logging.getLogger("liger_kernel.backends.registry")
    with caplog.at_level(logging.WARNING):
        registry.warning("Backend impl '%s' for op '%s' could not be imported: %s: %s",
                         "liger_kernel.ops.backends._cutedsl.rope", "rope", "ImportError", "no CuTe DSL")
        registry.warning("a kernel failed")
    assert [r.getMessage() for r in caplog.records] == ["a kernel failed"]


@pytest.mark.parametrize("training, overrides, says", [
    (True, ["model.liger_kernels=true"], "model.liger_kernels=true needs CUDA"),
    (False, ["model.liger_kernels=true"], None),   # evaluation follows eval.liger_kernels, off by default
    (False, ["eval.liger_kernels=true"], "eval.liger_kernels=true needs CUDA"),
    (True, ["eval.liger_kernels=true"], None),
])
def test_training_follows_model_liger_kernels_and_evaluation_eval_liger_kernels(tiny_model_path, caplog, training,
                                                                                 overrides, says):
    """On this CPU machine neither applies Liger; the log says which setting asked for it."""
    from accelerate import Accelerator

    from trec_accel.config import load_config
    from trec_accel.model import load_base
    from trec_accel.runtime import Runtime

    cfg = load_config(None, [f"model.name={tiny_model_path}", *overrides])
    with caplog.at_level(logging.INFO, logger="trec_accel"):
        load_base(cfg, Runtime.of(Accelerator(cpu=True), "auto"), training=training)
    said = [r.getMessage() for r in caplog.records if "liger_kernels" in r.getMessage()]
    assert said == ([f"{says}: running without it"] if says else [])
