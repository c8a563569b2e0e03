"""The loading plan follows the active backend, and impossible combinations are refused before loading."""
from pathlib import Path
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


def tie_output_head(model) -> None:
    """As SmolLM2 is: one matrix for the input embeddings and the output head."""
    model.get_output_embeddings().weight = model.get_input_embeddings().weight
    model.config.tie_word_embeddings = True


@pytest.mark.parametrize("tied", [False, True])
def test_merged_adapter_computes_what_the_adapter_does(tiny_model_path, tied):
    """Inference folds the adapter into unquantized weights: the same logits, no LoRA layers left, and an lm_head
    tied to the input embeddings leaves the embeddings as they were."""
    from transformers import AutoModelForCausalLM

    from trec_accel.model import add_lora, merge_adapter
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    if tied:
        tie_output_head(base)
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


GIB = 2**30


@pytest.mark.parametrize("mode, quantized, adapter, sharded, free, on, says", [
    ("off", True, True, False, 100 * GIB, False, "eval.dequantize=off"),
    ("on", False, True, False, 100 * GIB, False, "not quantized"),
    ("auto", True, False, False, 100 * GIB, False, "nothing to merge"),
    ("auto", True, True, True, 100 * GIB, False, "FSDP and ZeRO-3"),
    ("auto", True, True, False, 21 * GIB, True, "20.0 GiB needed"),
    ("auto", True, True, False, 19 * GIB, False, "too little free memory: 20.0 GiB needed (the dequantized weights "
                                                 "10.0 GiB more, scoring 10 GiB), 19.0 GiB free"),
    ("on", True, True, False, 0, True, "eval.dequantize=on"),
])
def test_dequantize_decision(mode, quantized, adapter, sharded, free, on, says):
    from trec_accel.model import DEQUANTIZE_HEADROOM, decide_dequantize
    assert DEQUANTIZE_HEADROOM == 10 * GIB  # the figures above
    decision = decide_dequantize(mode, quantized, adapter, sharded, free, 10 * GIB)
    assert decision.on is on and says in decision.why


def test_dequantize_on_is_refused_where_the_backend_shards_before_the_weights_load():
    from trec_accel.model import decide_dequantize
    with pytest.raises(ConfigError, match="eval.dequantize=on cannot be used with FSDP or ZeRO-3"):
        decide_dequantize("on", True, True, True, 100 * GIB, 0)
    # CUDA, so that the base would load in 4-bit; fp32, so that no GPU is asked whether it supports bf16.
    fsdp = fake_runtime(DistributedType.FSDP, processes=2, device="cuda", dtype="fp32")
    with pytest.raises(ConfigError, match="eval.dequantize=on cannot be used with FSDP or ZeRO-3"):
        load_plan(load_config(None, ["eval.dequantize=on", "adapter=runs/x/adapter"]), fsdp)
    # Training loads no adapter: the setting is not its concern.
    assert load_plan(load_config(None, ["eval.dequantize=on"]), fsdp).quantize


def test_dequantized_extra_bytes_counts_the_4bit_layers():
    import bitsandbytes as bnb

    from trec_accel.model import dequantized_extra_bytes
    # bitsandbytes packs the weights (two 4-bit values a byte) when they move to a device, the CPU included.
    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 32, quant_type="nf4"),
                                bnb.nn.Linear4bit(32, 128, quant_type="nf4"), torch.nn.Linear(8, 8)).to("cpu")
    assert all(m.weight.bnb_quantized for m in model[:2])
    packed = 64 * 32 // 2 + 32 * 128 // 2
    assert dequantized_extra_bytes(model, torch.bfloat16) == (64 * 32 + 32 * 128) * 2 - packed
    assert dequantized_extra_bytes(model, torch.float32) == (64 * 32 + 32 * 128) * 4 - packed


def test_free_memory_is_the_least_of_every_process(monkeypatch):
    from trec_accel.model import free_gpu_bytes
    runtime = fake_runtime(DistributedType.MULTI_GPU, processes=2)
    others = torch.tensor([7 * GIB])
    # What accelerate's gather returns: this process's value and the other's, in one tensor.
    runtime.accelerator.gather = lambda t: torch.cat([t, others])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (9 * GIB, 141 * GIB))
    assert free_gpu_bytes(runtime) == 7 * GIB
    others[0] = 11 * GIB
    assert free_gpu_bytes(runtime) == 9 * GIB


@pytest.fixture(scope="module")
def lora_adapter(tiny_model_path, tmp_path_factory) -> str:
    """A PEFT adapter folder for the tiny model, every LoRA B non-zero (a trained adapter changes the outputs)."""
    from transformers import AutoModelForCausalLM

    from trec_accel.model import add_lora
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    model = add_lora(base, load_config(None, ["lora.r=4", "lora.dropout=0.0"]), sharded=False)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(str(folder))
    return str(folder)


def saved_adapter(tiny_model_path, folder, overrides=(), tied=False, **config) -> str:
    """A PEFT adapter of the tiny model (LoraConfig fields `config` beyond `overrides`), every LoRA B non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    if tied:
        tie_output_head(base)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj", "lm_head"],
                                            **config))
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.05)
    # Only LoRA's weights, as trec-accel writes adapters (`write_adapter`): peft would add the output head's own.
    model.save_pretrained(str(folder), save_embedding_layers=False)
    return str(folder)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_plain_adapter_is_merged_as_peft_merges_it(tiny_model_path, tmp_path, tied, dtype):
    """`lora_merge` gives the weights peft's merge gives, to the bit, a tied output head included (the embeddings
    stay the base's)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trec_accel.lora_merge import merge_plain_lora, plain_scale
    from trec_accel.model import merge_adapter
    folder = Path(saved_adapter(tiny_model_path, tmp_path, tied=tied))

    def base():
        m = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=dtype)
        if tied:
            tie_output_head(m)
        return m
    ours = base()
    embeddings = ours.get_input_embeddings().weight.detach().clone()
    assert plain_scale(folder) == 4.0
    assert merge_plain_lora(ours, folder, 4.0)
    theirs = merge_adapter(PeftModel.from_pretrained(base(), str(folder)))
    want = dict(theirs.named_parameters())
    assert sorted(dict(ours.named_parameters())) == sorted(want)
    for name, w in ours.named_parameters():
        assert torch.equal(w, want[name]), name
    assert torch.equal(ours.get_input_embeddings().weight, embeddings)
    assert not torch.equal(ours.get_output_embeddings().weight, embeddings)


@pytest.mark.parametrize("config", [{"use_rslora": True}, {"use_dora": True}, {"rank_pattern": {"q_proj": 2}},
                                    {"modules_to_save": ["embed_tokens"]}, {"init_lora_weights": "pissa"}])
def test_adapters_beyond_plain_lora_are_left_to_peft(tiny_model_path, tmp_path, config):
    from trec_accel.lora_merge import plain_scale
    assert plain_scale(Path(saved_adapter(tiny_model_path, tmp_path, **config))) is None


def test_weights_that_fit_no_linear_layer_leave_the_model_unchanged(tiny_model_path, tmp_path):
    """A weight of the adapter file that is not a LoRA A or B of a linear layer of this model, or of another shape:
    merge_plain_lora says False before it changes anything (peft's path then reports it)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from trec_accel.lora_merge import merge_plain_lora
    folder = Path(saved_adapter(tiny_model_path, tmp_path))
    weights = load_file(str(folder / "adapter_model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for changed in ({"base_model.model.model.embed_tokens.lora_A.weight": weights[a].clone()},
                    {a: torch.zeros(4, weights[a].shape[1] + 1)}):
        save_file({**weights, **changed}, str(folder / "adapter_model.safetensors"))
        assert not merge_plain_lora(model, folder, 4.0)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_evaluation_of_an_unquantized_base_does_not_import_peft(tiny_model_path, tmp_path):
    """peft imports bitsandbytes (3 s of a start); a plain adapter is merged without it, with the scores of peft's."""
    import subprocess
    import sys
    folder = saved_adapter(tiny_model_path, tmp_path)
    code = (f"import sys, torch; from accelerate import Accelerator; from trec_accel.config import load_config; "
            f"from trec_accel.model import load_for_inference; from trec_accel.runtime import Runtime; "
            f"m, _ = load_for_inference(load_config(None, ['model.name={tiny_model_path}']), "
            f"Runtime.of(Accelerator(cpu=True), 'auto'), {folder!r}); "
            f"print(sorted(k for k in sys.modules if k.split('.')[0] in ('peft', 'bitsandbytes'))); "
            f"print(m(torch.tensor([[1, 5, 9, 13, 200]])).logits.sum().item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_path), folder)
        want = peft_model.eval()(torch.tensor([[1, 5, 9, 13, 200]])).logits.sum().item()
    assert float(out[1]) == pytest.approx(want, rel=1e-5)


def load_as_4bit(monkeypatch, tiny_model_path, tokenizer, setting: str, free: int, adapter: str, fail=False):
    """load_for_inference on a base planned as 4-bit: the tiny model, whose `dequantize` records whether LoRA layers
    were present when it was called (or runs out of memory, with `fail`); `free` bytes of GPU memory, 1 GiB of
    weights more once dequantized."""
    from transformers import AutoModelForCausalLM

    import trec_accel.model as model_module
    from trec_accel.model import LoadPlan
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    calls = []

    def dequantize(dtype):
        calls.append((dtype, any(hasattr(m, "lora_A") for m in base.modules())))
        if fail:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 112.00 MiB")
        return base
    base.dequantize = dequantize
    plan = LoadPlan(quantize=True, dtype=torch.float32, device_map={"": torch.device("cpu")}, quant_storage=None)
    monkeypatch.setattr(model_module, "load_base", lambda cfg, runtime, training: (base, tokenizer, plan))
    monkeypatch.setattr(model_module, "dequantized_extra_bytes", lambda model, dtype: GIB)
    monkeypatch.setattr(model_module, "free_gpu_bytes", lambda runtime: free)
    model, _ = model_module.load_for_inference(load_config(None, [setting]), fake_runtime(), adapter)
    ids = torch.tensor([[1, 5, 9, 13, 200], [1, 7, 3, 99, 42]])
    with torch.no_grad():
        logits = model(ids).logits
    return model, calls, logits


def test_a_4bit_base_is_dequantized_before_the_adapter_attaches_and_the_adapter_merged(monkeypatch, tiny_model_path,
                                                                                        tokenizer, lora_adapter):
    merged, calls, logits = load_as_4bit(monkeypatch, tiny_model_path, tokenizer, "eval.dequantize=auto", 100 * GIB,
                                         lora_adapter)
    assert calls == [(torch.float32, False)]  # the plan's dtype, no LoRA layers yet
    assert not any(hasattr(m, "lora_A") for m in merged.modules())
    # The same model as the fuse path's, which keeps the 4-bit base and the adapter as LoRA layers.
    lora, calls, expected = load_as_4bit(monkeypatch, tiny_model_path, tokenizer, "eval.dequantize=off", 100 * GIB,
                                         lora_adapter)
    assert calls == []
    assert any(hasattr(m, "lora_A") for m in lora.modules())
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    # The adapter is in both: the base alone scores otherwise.
    assert not torch.allclose(logits, load_as_4bit(monkeypatch, tiny_model_path, tokenizer, "eval.dequantize=off",
                                                   100 * GIB, "")[2], atol=1e-3)


def test_auto_keeps_the_4bit_base_where_memory_is_short(monkeypatch, tiny_model_path, tokenizer, lora_adapter, caplog):
    import logging
    with caplog.at_level(logging.INFO):
        model, calls, _ = load_as_4bit(monkeypatch, tiny_model_path, tokenizer, "eval.dequantize=auto", 10 * GIB,
                                       lora_adapter)
    assert calls == [] and any(hasattr(m, "lora_A") for m in model.modules())
    assert "dequantized and the adapter merged: off (too little free memory: 11.0 GiB needed" in caplog.text


def test_running_out_of_memory_while_dequantizing_names_the_setting(monkeypatch, tiny_model_path, tokenizer,
                                                                   lora_adapter):
    from trec_accel.memory import OutOfMemory
    with pytest.raises(OutOfMemory, match=r"in dequantizing the 4-bit base.*set eval.dequantize=off"):
        load_as_4bit(monkeypatch, tiny_model_path, tokenizer, "eval.dequantize=on", 0, lora_adapter, fail=True)
