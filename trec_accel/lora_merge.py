"""A plain LoRA adapter merged into unquantized weights without peft: W += (alpha / r) B A, layer by layer.

Evaluation and prediction fold the trained adapter into the base weights (`model.attach_adapter`). peft does that
too, but importing peft imports bitsandbytes and costs about 3 s of every `scripts/evaluate.py` start (3.1 s on this
project's CI machine, 3.2 s on the GPU hosts; BENCHMARKS.md sessions 10 and 14), more than scoring the test set.
The adapters trec-accel trains are plain LoRA on linear layers, which takes one product and one addition per layer.
An adapter that asks for more (DoRA, rsLoRA, per-layer ranks, bias, saved modules, another initialisation, weights
of other kinds) is left to peft: `plain_scale` says None and nothing is changed.

The arithmetic is peft's own merge: A and B in fp32 on the weight's device (peft loads an adapter's weights in
fp32), B @ A times the scale, added in place to the weight in its own dtype; the merged weights are the same.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
# Fields of peft's LoraConfig that do not change what a saved plain adapter adds to its layers. Any other field
# with a value (true, non-empty) asks for something else, and the adapter goes to peft.
_NEUTRAL = {"peft_type", "peft_version", "base_model_name_or_path", "revision", "task_type", "inference_mode", "r",
            "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "layers_pattern", "layers_to_transform",
            "megatron_core", "qalora_group_size", "auto_mapping", "bias", "init_lora_weights"}


def plain_scale(folder: Path) -> float | None:
    """alpha / r of the adapter in `folder` where its config and weights file are plain LoRA, else None."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(config, dict) and config.get("peft_type") == "LORA" and config.get("bias", "none") == "none"
            and config.get("init_lora_weights", True) in (True, False, "gaussian")
            and (folder / "adapter_model.safetensors").is_file()
            and not [k for k, v in config.items() if k not in _NEUTRAL and v]):
        return None
    r, alpha = config.get("r"), config.get("lora_alpha")
    ok = isinstance(r, int) and r > 0 and isinstance(alpha, (int, float))
    return alpha / r if ok else None


def merge_plain_lora(model: nn.Module, folder: Path, scale: float) -> bool:
    """Add `scale` x B A of every layer in `folder`'s adapter to the causal LM `model`'s weights; False (and `model`
    unchanged) where a weight does not fit a linear layer of the model as peft would place it."""
    from safetensors import safe_open
    modules = dict(model.named_modules())
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        pairs: dict[str, dict[str, str]] = {}
        for key in f.keys():
            m = _KEY.fullmatch(key)
            if m is None or not isinstance(modules.get(m.group(1)), nn.Linear):
                return False
            pairs.setdefault(m.group(1), {})[m.group(2)] = key
        for name, pair in pairs.items():
            out_features, in_features = modules[name].weight.shape
            shapes = {k: f.get_slice(v).get_shape() for k, v in pair.items()}
            if (len(pair) != 2 or len(shapes["A"]) != 2 or shapes["A"][1] != in_features
                    or shapes["B"] != [out_features, shapes["A"][0]]):
                return False
        untie_from_embeddings(model, [modules[name] for name in pairs])
        with torch.no_grad():
            for name, pair in pairs.items():
                weight = modules[name].weight
                a, b = (f.get_tensor(pair[k]).to(weight.device, torch.float32) for k in "AB")
                weight += (b @ a) * scale
    return True


def untie_from_embeddings(model: nn.Module, layers) -> None:
    """Each of `layers` (about to have an adapter merged in) whose weight is the input embeddings' matrix, as a tied
    output head's is, gets a copy of its own: the embeddings stay the base model's. `model`: the causal LM, or peft's
    model around it."""
    embeddings = model.get_input_embeddings().weight
    for layer in layers:
        if layer.weight is embeddings:
            layer.weight = nn.Parameter(embeddings.detach().clone(), requires_grad=False)
            model.config.tie_word_embeddings = False
