"""Loading the base model (hub id, local folder or built-in offline model), 4-bit NF4 where asked, and LoRA."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .config import Config, ConfigError
from .forward import checkpoint_layers, parts, register_prefix_attention
from .liger import WarmUp, apply_liger
from .lora_groups import decide_fused_lora, fuse_lora
from .lora_merge import merge_plain_lora, plain_scale, untie_from_embeddings
from .memory import GIB, out_of_memory
from .offline_models import BUILD_VERSION, auto_tokenizer, offline_name, portable_name, resolve_model_path
from .runtime import Runtime
from .step import Decision
from .task import BUILTIN, Task, TaskError, load_task

log = logging.getLogger(__name__)

ADAPTER_META = "trec_accel.json"
# Memory kept free for scoring beside a dequantized base's weights when eval.dequantize=auto turns it on. At 7B
# scoring took 8-9 GiB beyond the weights (H200, 2026-11-30: peaks of 12.1 GiB over ~4 GiB of 4-bit weights, and
# 22.7 GiB over 13.5 GiB of bf16 ones); 10 GiB leaves some slack.
DEQUANTIZE_HEADROOM = 10 * GIB


class ModelLoadError(RuntimeError):
    """A model, tokenizer or adapter that cannot be loaded; the message says which and why."""


@dataclass
class LoadPlan:
    """How to load the base model under the run's backend."""
    quantize: bool
    dtype: torch.dtype
    device_map: dict | None    # None under FSDP / ZeRO-3: the backend places (and shards) the weights
    quant_storage: torch.dtype | None


def load_plan(cfg: Config, runtime: Runtime) -> LoadPlan:
    cuda = runtime.device.type == "cuda"
    q = cfg.model.quantization
    if q == "nf4" and not cuda:
        raise ConfigError("model.quantization=nf4 needs a CUDA GPU (bitsandbytes 4-bit); "
                          "use model.quantization=none on CPU")
    quantize = q == "nf4" or (q == "auto" and cuda)
    dtype, sharded = runtime.dtype, runtime.sharded
    if sharded and cfg.train.optimizer.startswith("paged"):
        raise ConfigError(f"train.optimizer={cfg.train.optimizer} cannot be used with {runtime.backend}: the backend "
                          "shards optimizer state itself; use train.optimizer=adamw")
    decide_fused_lora(cfg.lora.fused, sharded)  # lora.fused=on under FSDP / ZeRO-3 is refused before the weights load
    dequantize_ruled_out(cfg.eval.dequantize, quantize, bool(cfg.adapter), sharded)  # and so is eval.dequantize=on
    # Sharding backends flatten parameters of one dtype: 4-bit weights are stored in the training dtype
    # (bnb_4bit_quant_storage) and placed by the backend, not by device_map. Elsewhere the weights load
    # straight onto this process's device, where training and evaluation use them.
    device_map = None if sharded else {"": runtime.device}
    return LoadPlan(quantize, dtype, device_map, dtype if (quantize and sharded) else None)


def load_tokenizer(path: str):
    try:
        tok = auto_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - library errors are many and deep
        raise ModelLoadError(f"could not load the tokenizer of '{path}': {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return tok


def model_path(cfg: Config, accelerator) -> str:
    """`model.name` as something from_pretrained loads. A built-in offline model is built on first use with
    ZeRO-3's partitioned initialisation off (its builder loads whole state dicts); Transformers' own ZeRO-3
    switch is turned off and back on, since accelerate's `zero3_init_context_manager(enable=False)` leaves it on."""
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config
    check_model_folder(cfg.model.name)
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not is_deepspeed_zero3_enabled():
        return resolve_model_path(cfg.model.name)
    unset_hf_deepspeed_config()
    try:
        return resolve_model_path(cfg.model.name)
    finally:
        plugin.set_deepspeed_weakref()


def check_model_folder(name: str) -> None:
    """A local folder given as `model.name` holds a saved model (its config.json); a common slip is an adapter's
    folder, which Transformers would fail on with a message about tokenizer backends."""
    folder = Path(name)
    if offline_name(name) is None and folder.is_dir() and not (folder / "config.json").is_file():
        hint = ("it holds a LoRA adapter: pass it as adapter=" + name + " and its base model as model.name"
                if (folder / "adapter_config.json").is_file() else
                "give a folder written by save_pretrained, a hub id, or a built-in model")
        raise ModelLoadError(f"model.name={name} is a folder without a config.json, not a saved model: {hint}")


def load_base(cfg: Config, runtime: Runtime, training: bool = True):
    """(base model, tokenizer, plan). No adapter yet. `training` picks the Liger setting: `model.liger_kernels`,
    else `eval.liger_kernels`."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = model_path(cfg, runtime.accelerator)
    plan = load_plan(cfg, runtime)
    attn = cfg.model.attn_implementation
    if attn == "sdpa":
        attn = register_prefix_attention(cfg.model.prefix_attention)
    kwargs = dict(dtype=plan.dtype, attn_implementation=attn)
    if plan.quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=plan.dtype,
            bnb_4bit_use_double_quant=cfg.model.double_quant,
            bnb_4bit_quant_storage=plan.quant_storage or torch.uint8)
    if plan.device_map is not None:
        kwargs["device_map"] = plan.device_map
    tokenizer = load_tokenizer(path)
    wants_liger = cfg.model.liger_kernels if training else cfg.eval.liger_kernels
    liger = wants_liger and runtime.device.type == "cuda"
    warm_up = WarmUp(path, plan.dtype, runtime.device, backward=training) if liger else None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load model '{cfg.model.name}' ({path}): {str(e).splitlines()[0]}") from None
    finally:
        if warm_up is not None:
            warm_up.finish()
    model.config.use_cache = False
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(cfg.model.cudnn_attention)
    if liger:
        apply_liger(model)
    elif wants_liger:  # Liger's kernels are Triton, CUDA only
        log.info("%s.liger_kernels=true needs CUDA: running without it", "model" if training else "eval")
    return model, tokenizer, plan


def context_length(model) -> int | None:
    """The positions the model was built for (None where its config does not say)."""
    return getattr(model.config, "max_position_embeddings", None)


def prepare_for_training(model, cfg: Config):
    """Activation checkpointing, when asked, before LoRA is applied.

    peft's `prepare_model_for_kbit_training` is deliberately not used: it upcasts embeddings, norms and
    lm_head to fp32, which makes the whole residual stream fp32 and a 7B step four times slower
    (BENCHMARKS.md). The frozen base stays in the compute dtype; LoRA weights are fp32 under autocast.
    """
    if cfg.model.gradient_checkpointing:
        n = len(parts(model)[0].layers)
        if cfg.model.unchecked_layers > n:
            raise ConfigError(f"model.unchecked_layers={cfg.model.unchecked_layers} is more than the {n} decoder "
                              f"layers of {cfg.model.name}")
        checkpoint_layers(model, cfg.model.unchecked_layers)
    return model


def add_lora(model, cfg: Config, *, sharded: bool):
    """The model with LoRA adapters (peft), run as fused groups where `lora.fused` allows (`sharded`: the backend
    is FSDP or ZeRO-3)."""
    from peft import LoraConfig, get_peft_model
    lc = cfg.lora
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [m for m in lc.target_modules if m not in present]
    if missing:
        raise ConfigError(f"lora.target_modules: {', '.join(missing)} not found in {cfg.model.name}")
    config = LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=list(lc.target_modules),
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    fuse_lora(model, lc.fused, sharded)
    return model


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total), 4-bit weights counted as the parameters they pack."""
    return model.get_nb_trainable_parameters()


def fsdp_lora_state_dict(root: nn.Module) -> dict:
    """The LoRA weights of an FSDP-1 wrapped model, whole, on every process (all must call it).

    Each LoRA layer is an FSDP unit of its own (peft's wrap policy), so the units are gathered one at a
    time, never the 4-bit base; names are those of the unwrapped module. FSDP's FULL_STATE_DICT would gather
    the whole model, and fails on CPU processes (gloo).
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    out = {}
    for name, unit in root.named_modules():
        if isinstance(unit, FSDP) and "lora_" in name and isinstance(unit.module, nn.Linear):
            with FSDP.summon_full_params(unit, recurse=False, writeback=False):
                out[name.replace("_fsdp_wrapped_module.", "") + ".weight"] = unit.module.weight.detach().cpu().clone()
    return out


def write_adapter(model, lora_weights: dict, folder: Path, base_model: str) -> None:
    """A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) from LoRA weights named as in
    `model.named_parameters()` (".default." included), naming `base_model` as its base (peft would name the
    folder the model was loaded from: for a built-in offline model, a cache path of this machine).

    The weights file is written here, every weight given, rather than by peft's `save_pretrained(state_dict=...)`,
    which keeps only some of them when FSDP units are nested inside the model (BENCHMARKS.md, "Several GPUs").
    """
    import copy

    from safetensors.torch import save_file
    name = model.active_adapter
    weights = {k.replace(f".{name}", ""): v.detach().cpu().contiguous()
               for k, v in lora_weights.items() if "lora_" in k}
    if not weights:
        raise ValueError("no LoRA weights to save")
    config = copy.copy(model.peft_config[name])
    config.inference_mode = True
    config.base_model_name_or_path = base_model
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    save_file(weights, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def adapter_meta(cfg: Config, task: Task) -> dict:
    """trec_accel.json: the base as configured and as another machine loads it, how to rebuild a built-in offline
    base (its name and build version), the whole task (as a task file holds it) and the prompt template."""
    meta = {"model": cfg.model.name, "base_model": portable_name(cfg.model.name), "task": task.to_dict(),
            "template": cfg.data.template}
    offline = offline_name(cfg.model.name)
    if offline is not None:
        meta["offline_model"] = {"name": offline, "build_version": BUILD_VERSION}
    return meta


def adapter_task(meta: dict, folder: Path) -> Task | None:
    """The task an adapter was trained for: recorded whole, or by a built-in's name (adapters written before tasks
    were recorded whole); None where the adapter records none."""
    spec = meta.get("task")
    if spec is None:
        return None
    if isinstance(spec, str) and spec not in BUILTIN:
        raise ModelLoadError(f"{folder / ADAPTER_META}: unknown task '{spec}'")
    try:
        return load_task(spec, str(folder / ADAPTER_META))
    except TaskError as e:
        raise ModelLoadError(str(e)) from None


def adapter_folder(adapter: str) -> Path:
    """The adapter's folder, which must exist."""
    folder = Path(adapter)
    if not folder.is_dir():
        raise ModelLoadError(f"adapter folder not found: {folder}")
    return folder


def adapter_config(overrides) -> Path | None:
    """The training config saved in the adapter folder that an `adapter=DIR` override names, where there is one."""
    adapter = ""
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "adapter":
            adapter = value
    own = adapter_folder(adapter) / "config.yaml" if adapter else None
    return own if own is not None and own.is_file() else None


def check_adapter(adapter: str, cfg: Config) -> dict:
    """The adapter's recorded metadata, its base model and task checked against this run's config."""
    folder = adapter_folder(adapter)
    config = folder / "adapter_config.json"
    if not config.is_file():
        raise ModelLoadError(f"{folder} is not a PEFT adapter folder (no adapter_config.json)")
    try:
        fields = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{config} is not a JSON object ({e}): the adapter folder is damaged") from None
    if not isinstance(fields, dict):
        raise ModelLoadError(f"{config} is not a JSON object: the adapter folder is damaged")
    if "peft_type" not in fields:
        raise ModelLoadError(f"{config} names no peft_type: not an adapter saved by peft")
    meta_path = folder / ADAPTER_META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    built = meta.get("offline_model", {}).get("build_version", BUILD_VERSION)
    if built != BUILD_VERSION:
        log.warning("adapter %s was trained on build %s of %s, this is build %s: the base may differ", folder, built,
                    meta["offline_model"]["name"], BUILD_VERSION)
    if meta.get("model") and portable_name(meta["model"]) != portable_name(cfg.model.name):
        raise ModelLoadError(f"adapter {folder} was trained on base model '{meta['model']}', "
                             f"not '{cfg.model.name}' (set model.name={meta['model']})")
    trained, task = adapter_task(meta, folder), load_task(cfg.data.task)
    if trained is not None and trained != task:
        hint = f"set data.task={trained.name}" if trained.name in BUILTIN else \
            f"set data.task to the task in {folder / ADAPTER_META}, or leave out --config to use the adapter's own"
        other = f"another {task.name} task (its labels or instruction differ)" if trained.name == task.name else \
            task.name
        raise ModelLoadError(f"adapter {folder} was trained for the {trained.name} task, not {other}: {hint}")
    return meta


def check_adapter_weights(model, folder: Path) -> None:
    """Every weight in the adapter file lands in the model: peft only warns about ones that do not, and a
    model without its adapter weights quietly scores like the untrained one."""
    from safetensors import safe_open
    path = folder / "adapter_model.safetensors"
    if not path.is_file():
        return  # an older .bin adapter: peft's own checks only
    with safe_open(str(path), "pt") as f:
        saved = list(f.keys())
    names = {n.replace(".default.", ".") for n, _ in model.named_parameters()}
    unused = [k for k in saved if k not in names]
    if unused:
        raise ModelLoadError(f"adapter {folder}: {len(unused)} of its {len(saved)} weights match no layer of the "
                             f"model (first: {unused[0]}); it was saved from another model or by a broken export")


def merge_adapter(model):
    """The base model with the adapter folded into its weights (W + scale x B A): inference then runs one matrix
    product per projection instead of three and the adapter's Python around them (BENCHMARKS.md). Only for
    unquantized or dequantized bases: 4-bit weights would have to be quantized again. An lm_head tied to the input
    embeddings gets weights of its own first, so that the embeddings stay the base model's."""
    untie_from_embeddings(model, [m.base_layer for m in model.modules() if hasattr(m, "base_layer")])
    return model.merge_and_unload()


def dequantize_ruled_out(mode: str, quantized: bool, has_adapter: bool, sharded: bool) -> Decision | None:
    """The `eval.dequantize` decision where the run alone settles it, None where memory decides. Also called when the
    load is planned, so that eval.dequantize=on under FSDP or ZeRO-3 is refused before the weights load."""
    if mode == "off":
        return Decision(False, "eval.dequantize=off")
    if not quantized:
        return Decision(False, "the base is not quantized: the adapter is merged into its weights as they are")
    if not has_adapter:
        return Decision(False, "no adapter: nothing to merge")
    if sharded:
        if mode == "on":
            raise ConfigError("eval.dequantize=on cannot be used with FSDP or ZeRO-3: they place and shard the "
                              "weights themselves, and a merged copy would be whole in every process; use "
                              "eval.dequantize=auto")
        return Decision(False, "FSDP and ZeRO-3 place and shard the weights: a merged copy would be whole")
    return None


def decide_dequantize(mode: str, quantized: bool, has_adapter: bool, sharded: bool, free_bytes: int,
                      need_bytes: int) -> Decision:
    """Whether a 4-bit base is dequantized once and the adapter merged into it for scoring (`eval.dequantize`: auto /
    on / off); `need_bytes`: what the dequantized weights take beyond the 4-bit ones, `free_bytes`: the GPU's free
    memory after the 4-bit load. Measured at 7B on two H200s (500 test questions): 20-30% faster than 4-bit with
    fused LoRA layers (coarse 0.48-0.58 s against 0.65-0.82 s), 22.7 GiB peak against 12.1 GiB; SmolLM2 trained in
    4-bit gave the same 500 predictions either way (BENCHMARKS.md, session 8)."""
    ruled_out = dequantize_ruled_out(mode, quantized, has_adapter, sharded)
    if ruled_out is not None:
        return ruled_out
    if mode == "on":
        return Decision(True, "eval.dequantize=on")
    need = need_bytes + DEQUANTIZE_HEADROOM
    numbers = (f"{need / GIB:.1f} GiB needed (the dequantized weights {need_bytes / GIB:.1f} GiB more, scoring "
               f"{DEQUANTIZE_HEADROOM / GIB:.0f} GiB), {free_bytes / GIB:.1f} GiB free")
    if free_bytes < need:
        return Decision(False, f"too little free memory: {numbers}")
    return Decision(True, numbers)


def dequantized_extra_bytes(model, dtype: torch.dtype) -> int:
    """The bytes the model's 4-bit linear layers take more once dequantized to `dtype`."""
    from bitsandbytes.nn import Linear4bit  # here, not at import: only a 4-bit base has such layers
    return sum(m.in_features * m.out_features * dtype.itemsize - m.weight.numel() * m.weight.element_size()
               for m in model.modules() if isinstance(m, Linear4bit))


def free_gpu_bytes(runtime: Runtime) -> int:
    """The GPU's free memory, the least of every process's: they decide alike, and score with the same arithmetic."""
    free = torch.tensor([torch.cuda.mem_get_info(runtime.device)[0]], device=runtime.device)
    return int(runtime.accelerator.gather(free).min())


def dequantize_decision(model, cfg: Config, runtime: Runtime, dtype: torch.dtype) -> Decision:
    """`decide_dequantize` for a 4-bit base that an adapter is about to be given, logged."""
    decision = decide_dequantize(cfg.eval.dequantize, True, True, runtime.sharded, free_gpu_bytes(runtime),
                                 dequantized_extra_bytes(model, dtype))
    log.info("4-bit base dequantized and the adapter merged: %s", decision)
    return decision


def attach_adapter(model, cfg: Config, runtime: Runtime, plan: LoadPlan, adapter: str):
    """The base with the trained adapter: merged into its weights where they are unquantized or dequantized first
    (`eval.dequantize`), else as LoRA layers, fused in groups where `lora.fused` allows. A plain LoRA adapter is
    merged without importing peft (`lora_merge`)."""
    merge = not plan.quantize or dequantize_decision(model, cfg, runtime, plan.dtype).on
    if plan.quantize and merge:
        # transformers': plain linear layers in place of the 4-bit ones. Only `on` skips the check of free memory.
        with out_of_memory("dequantizing the 4-bit base", "eval.dequantize=off (the 4-bit base with LoRA layers) or "
                           "auto (which dequantizes only where the GPU has the room)"):
            model = model.dequantize(dtype=plan.dtype)
    scale = plain_scale(Path(adapter)) if merge else None
    if scale is not None and merge_plain_lora(model, Path(adapter), scale):
        log.info("adapter %s merged into the base weights", adapter)
        return model
    from peft import PeftModel
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"could not load adapter {adapter}: {str(e).splitlines()[0]}") from None
    check_adapter_weights(model, Path(adapter))
    if merge:
        model = merge_adapter(model)
        log.info("adapter %s merged into the base weights", adapter)
    else:
        fuse_lora(model, cfg.lora.fused, runtime.sharded)
    return model


def load_for_inference(cfg: Config, runtime: Runtime, adapter: str = ""):
    """(model in eval mode, tokenizer): the base model, with the trained adapter when given."""
    if adapter:
        check_adapter(adapter, cfg)
    model, tokenizer, plan = load_base(cfg, runtime, training=False)
    if adapter:
        model = attach_adapter(model, cfg, runtime, plan, adapter)
    if plan.device_map is None:
        model = model.to(runtime.device)
    return model.eval(), tokenizer
