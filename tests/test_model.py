"""The loading plan follows the active backend, and impossible combinations are refused before loading."""
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from trec_accel.config import ConfigError, load_config
from trec_accel.model import load_plan
from trec_accel.runtime import Runtime


def fake_runtime(kind=DistributedType.NO, processes=1, device="cpu", zero_stage=2, dtype="auto"):
    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage))
    accelerator = SimpleNamespace(distributed_type=kind, num_processes=processes, device=torch.device(device),
                                  state=state, is_main_process=True)
    return Runtime.of(accelerator, dtype)


def test_cpu_runs_unquantized_fp32():
    runtime = fake_runtime()
    plan = load_plan(load_config(), runtime)
    # Loaded straight onto the process's device, where training and evaluation use it.
    cpu = torch.device("cpu")
    assert (runtime.backend, plan.quantize, plan.dtype, plan.device_map) == ("single", False, torch.float32, {"": cpu})
    bf16 = load_config(None, ["model.dtype=bf16"])
    assert load_plan(bf16, fake_runtime(dtype=bf16.model.dtype)).dtype == torch.bfloat16


def test_nf4_on_cpu_is_refused():
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_plan(load_config(None, ["model.quantization=nf4"]), fake_runtime())


@pytest.mark.parametrize("kind, stage, backend", [(DistributedType.FSDP, 0, "fsdp"),
                                                  (DistributedType.DEEPSPEED, 3, "zero3"),
                                                  (DistributedType.DEEPSPEED, 2, "deepspeed"),
                                                  (DistributedType.MULTI_GPU, 0, "ddp")])
def test_backend_is_read_from_the_accelerator(kind, stage, backend):
    assert fake_runtime(kind, processes=2, zero_stage=stage).backend == backend


@pytest.mark.parametrize("kind, stage", [(DistributedType.FSDP, 0), (DistributedType.DEEPSPEED, 3)])
@pytest.mark.parametrize("setting, says", [("train.optimizer=paged_adamw_32bit", "train.optimizer=paged_adamw_32bit"),
                                           ("lora.fused=on", "lora.fused=on")])
def test_settings_that_need_whole_weights_are_refused_before_loading_where_the_backend_shards(kind, stage, setting,
                                                                                              says):
    with pytest.raises(ConfigError, match=f"{says} cannot be used with"):
        load_plan(load_config(None, [setting]), fake_runtime(kind, processes=2, zero_stage=stage))


def test_offline_model_is_built_outside_zero3_partitioned_init(monkeypatch):
    from accelerate.utils import DeepSpeedPlugin
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    import trec_accel.model as model_module
    seen = []
    monkeypatch.setattr(model_module, "resolve_model_path",
                        lambda name: seen.append(is_deepspeed_zero3_enabled()) or "/m")
    plugin = DeepSpeedPlugin(zero_stage=3, zero3_init_flag=True)
    try:
        plugin.set_deepspeed_weakref()  # what the Accelerator does before from_pretrained
        assert is_deepspeed_zero3_enabled()
        accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
        assert model_module.model_path(load_config(), accelerator) == "/m"
        assert seen == [False]               # built as a plain model ...
        assert is_deepspeed_zero3_enabled()  # ... and ZeRO-3 init is back on for the real load
    finally:
        unset_hf_deepspeed_config()


@pytest.mark.parametrize("tied", [False, True])
def test_merged_adapter_computes_what_the_adapter_does(tiny_model_path, tied):
    """Inference folds the adapter into unquantized weights: the same logits, no LoRA layers left, and an lm_head
    tied to the input embeddings leaves the embeddings as they were."""
    from transformers import AutoModelForCausalLM

    from trec_accel.model import add_lora, merge_adapter
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    if tied:  # as SmolLM2 is: one matrix for the input embeddings and the output head
        base.get_output_embeddings().weight = base.get_input_embeddings().weight
        base.config.tie_word_embeddings = True
    embeddings = base.get_input_embeddings().weight.detach().clone()
    model = add_lora(base, load_config(None, ["lora.r=4", "lora.dropout=0.0"]), sharded=False)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.05)
    ids = torch.tensor([[1, 5, 9, 13, 200], [1, 7, 3, 99, 42]])
    with torch.no_grad():
        expected = model.eval()(ids).logits
        merged = merge_adapter(model)
        got = merged(ids).logits
    assert not [n for n, _ in merged.named_parameters() if "lora_" in n]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.get_input_embeddings().weight, embeddings, rtol=0, atol=0)
    # The adapter changed the output head (its B is non-zero): merging it into a tied head must not have been lost.
    assert not torch.equal(merged.get_output_embeddings().weight, embeddings)
