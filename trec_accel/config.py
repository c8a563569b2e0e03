"""The one typed run configuration: dataclasses loaded from YAML, overridden by dotted ``key=value``.

Every default and its meaning lives here, once, in the ``help`` metadata of its field; the README's
config reference and ``--help-config`` are generated from it.
"""
from __future__ import annotations

import dataclasses
import difflib
import errno
import json
import os
import re
import tempfile
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .files import write_atomic
from .task import TaskError, load_task


class ConfigError(ValueError):
    """A bad config: unknown key, wrong type or impossible value. Its message is one line."""


def _f(default: Any, help: str, choices: tuple | None = None):
    meta = {"help": help, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    name: str = _f("tiny-random-mistral", "Base model: a hub id, a local folder, or a built-in offline model "
                   "(tiny-random-mistral, smollm2-135m-instruct, mistral-7b-random).")
    quantization: str = _f("auto", "'nf4' loads the base in 4-bit NF4 through bitsandbytes (CUDA only); 'none' keeps "
                           "it in `dtype`; 'auto' is nf4 on CUDA and none elsewhere.", ("auto", "nf4", "none"))
    double_quant: bool = _f(True, "bitsandbytes nested quantization of the 4-bit scales (saves ~0.4 bit/param).")
    dtype: str = _f("auto", "Compute dtype: bf16 where the device supports it ('auto'), else fp32.",
                    ("auto", "bf16", "fp16", "fp32"))
    attn_implementation: str = _f("sdpa", "Attention kernel: PyTorch's SDPA (run by trec-accel's own attention "
                                  "function, which reads the shared instruction itself: model.prefix_attention), or "
                                  "Transformers' eager or FlashAttention-2 attention.",
                                  ("sdpa", "eager", "flash_attention_2"))
    prefix_attention: str = _f("auto", "How the question tokens attend to the shared instruction under SDPA: "
                               "'joined' copies it before every row and runs SDPA with each key/value head's query "
                               "heads folded into its rows, 'grouped' reads its one copy by grouped matrix products; "
                               "'auto' joins, measured faster on H200s at every shape, in training and scoring "
                               "(BENCHMARKS.md, session 17).", ("auto", "grouped", "joined"))
    cudnn_attention: bool = _f(False, "Let PyTorch's SDPA pick cuDNN attention on CUDA. Off: cuDNN builds an "
                               "execution plan for every new input shape (2-4 s each on an H100, measured), and "
                               "length-grouped training batches and evaluation batches keep changing shape; the other "
                               "kernels run as fast here.")
    gradient_checkpointing: bool = _f(False, "Non-reentrant activation checkpointing: less memory, ~30% more compute.")
    unchecked_layers: int = _f(0, "With gradient_checkpointing: the last N decoder layers run without it. Each skips "
                               "its recomputation and holds its activations until its backward pass instead: for the "
                               "7B shape at batch 256, 1.0-1.3 GiB more per layer; at 3 layers +2-4% sequences/s, "
                               "13.9 GiB peak on coarse and 15.9 GiB on fine (BENCHMARKS.md, sessions 14 and 17).")
    liger_kernels: bool = _f(False, "Patch RMSNorm/RoPE/SwiGLU with Liger Triton kernels (CUDA; from the checkout: "
                             "`pip install -e '.[liger]'`) for training: less elementwise traffic, ~1 GiB less peak "
                             "memory on the 7B recipe, +21-29% per replayed step for SmolLM2 (`eval.liger_kernels`: "
                             "the same for evaluation and prediction). Triton compiles them once per machine and keeps "
                             "them in its cache (~/.triton); for Llama and Mistral models, on a side thread while the "
                             "weights load.")


@dataclass
class LoraConfig:
    r: int = _f(32, "LoRA rank.")
    alpha: int = _f(16, "LoRA alpha (scale = alpha / r).")
    dropout: float = _f(0.1, "Dropout on the LoRA input.")
    target_modules: list = _f(PROJECTIONS + ["lm_head"],
                              "Modules that get adapters (the notebook's 7 projections + lm_head).")
    fused: str = _f("auto", "Run the LoRA layers that read one input (q/k/v, gate/up) as one group: one dropout kernel "
                    "(a mask per layer, as peft draws them), one product with the stacked A matrices, and each "
                    "layer's B product added to its base output in one call; fewer kernels than peft's forward, the "
                    "same results. auto: on, except under FSDP and ZeRO-3 (they gather each layer's weights when it "
                    "is called).", ("auto", "on", "off"))


@dataclass
class DataConfig:
    path: str = _f("CogComp/trec", "Hub dataset id, a folder with train_5500.label/TREC_10.label or "
                   "train/test .jsonl/.csv/.parquet, or one such file. `${TREC_DATA_DIR:-CogComp/trec}` style "
                   "environment references are expanded.")
    task: str | dict = _f("coarse", "The labels to classify into: the TREC tasks coarse (6 labels) or fine (50), a "
                          "task file (YAML: labels, optional descriptions and instruction; a relative path starts at "
                          "the working directory), or that mapping inline (README: Your own labels). Loading the "
                          "config reads the file: the saved config holds the task itself.")
    text_column: str = _f("text", "Column of the text to classify in .jsonl/.csv/.parquet files and hub datasets.")
    label_column: str = _f("label", "Column of the label: a label name of the task, or its id (0-based). For the "
                           "TREC tasks, the hub's coarse_label / fine_label columns serve when it is absent.")
    val_fraction: float = _f(0.1, "Share of shuffled train held out as validation (floor; 545 of 5,452).")
    split_seed: int = _f(42, "Seed of the train/validation shuffle (the notebook's 42).")
    template: str = _f("notebook", "Prompt: the notebook's `[INST] ... [/INST]\\n question = LABEL`, or the "
                       "model's own chat template.", ("notebook", "chat"))
    max_examples: int = _f(0, "Use only the first N training examples (0 = all); for smoke runs.")


@dataclass
class TrainConfig:
    max_steps: int = _f(200, "Optimizer steps; 0 means run `epochs` epochs instead.")
    epochs: float = _f(1.0, "Epochs over the training split when max_steps is 0.")
    batch_size: int = _f(1, "Sequences per micro-batch per process.")
    grad_accum: int = _f(8, "Micro-batches per optimizer step (global batch = batch_size x grad_accum x processes).")
    lr: float = _f(2e-4, "Peak learning rate.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    warmup_steps: int = _f(0, "Linear warm-up steps before the schedule.")
    scheduler: str = _f("cosine", "Learning-rate schedule after warm-up.", ("cosine", "linear", "constant"))
    optimizer: str = _f("adamw", "adamw (torch's, one fused kernel for all LoRA tensors on one GPU or DDP), or "
                        "bitsandbytes' paged_adamw_32bit / paged_adamw_8bit / adamw_8bit, which wait for the GPU after "
                        "each tensor (the 7B step 8% slower with paged_adamw_32bit; BENCHMARKS.md).",
                        ("adamw", "paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"))
    max_grad_norm: float = _f(0.3, "Gradient clipping norm (0 = off).")
    shared_prefix: str = _f("auto", "Run the instruction shared by every example once per micro-batch and reuse its "
                            "key/value cache. auto: for batches of 2 or more, on with CUDA graphs, above 2B "
                            "parameters or on a CPU (3x faster for SmolLM2), off for an eager small model on a GPU "
                            "(a second pass doubles its launches; measured in BENCHMARKS.md). Falls back to full "
                            "sequences (logged) where it cannot run.",
                            ("auto", "on", "off"))
    cuda_graphs: str = _f("auto", "Replay each micro-batch's forward and backward from a CUDA graph captured once per "
                          "batch shape. auto: on for one CUDA process, at any model size (the 7B shape: +35% once "
                          "captured, BENCHMARKS.md); falls back to eager steps (logged) where it cannot run.",
                          ("auto", "on", "off"))
    pad_multiple: int = _f(8, "Pad each micro-batch's width to a multiple of this many tokens, so that batch shapes "
                           "repeat (one CUDA graph per shape).")
    group_by_length: bool = _f(False, "Batch questions of similar length together (shuffled in mega-batches).")
    max_batch_tokens: int = _f(0, "At most this many padded tokens (rows x width, after the shared prefix) per forward "
                               "and backward pass: a micro-batch over it runs as several passes of length-sorted rows, "
                               "with the same gradient, so its longest questions no longer set the peak memory. "
                               "Splitting needs one process or DDP: under FSDP and DeepSpeed a cap that a "
                               "micro-batch would exceed is refused (0 = no cap).")
    log_every: int = _f(10, "Log loss, lr, grad norm, tokens/s and memory every N optimizer steps.")
    eval_every: int = _f(0, "Validation loss and accuracy every N steps (0 = only at the end).")
    save_every: int = _f(100, "Checkpoint every N steps (0 = only on signal and at the end).")
    keep_last: int = _f(2, "Checkpoints kept; older ones are deleted (the best-accuracy one is kept too).")


@dataclass
class EvalConfig:
    split: str = _f("test", "Split to evaluate: train, validation, test, or a path to a data file.")
    method: str = _f("score", "score: rank every valid label by its log-likelihood; generate: the notebook's free "
                     "greedy generation with substring matching.", ("score", "generate"))
    batch_size: int = _f(64, "Questions per scoring batch per process (at most).")
    max_batch_tokens: int = _f(16384, "At most this many padded tokens per scoring batch, questions x (longest "
                               "question + label tokens): short questions go many to a batch, the long tail a few "
                               "(0 = no cap).")
    normalize: str = _f("sum", "Label score: sum of log-probs of the label tokens and EOS, or their mean.",
                        ("sum", "mean"))
    liger_kernels: bool = _f(False, "`model.liger_kernels` for evaluation and prediction: a 7B scoring pass ran "
                             "10-12% faster with them, but importing them adds 3-4 s to the start-up, more than a few "
                             "hundred questions of a small model take to score.")
    max_new_tokens: int = _f(10, "Generation length for method=generate.")
    max_examples: int = _f(0, "Evaluate only the first N questions (0 = all).")
    dequantize: str = _f("auto", "With an adapter on a 4-bit base: dequantize the base to `model.dtype` once and "
                         "merge the adapter into its weights, as on an unquantized base (the same scores up to "
                         "rounding). At 7B on an H200 scoring is 20-30% faster, with the dequantized weights' memory "
                         "(14.5 GB in bf16 against about 4). auto: on where the GPU's free memory after the 4-bit load "
                         "holds the dequantized weights and 10 GiB for scoring, never under FSDP or ZeRO-3 (they "
                         "place and shard the weights); off: the 4-bit base with LoRA layers.", ("auto", "on", "off"))


@dataclass
class LogConfig:
    tracker: str = _f("none", "Experiment tracker; wandb goes offline without an API key.",
                      ("none", "wandb", "tensorboard"))
    project: str = _f("trec-accel", "Tracker project name.")
    run_name: str = _f("", "Run name (default: the output folder's name).")


@dataclass
class Config:
    output_dir: str = _f("runs/default", "Where config.yaml, checkpoints/, adapter/ and reports go.")
    seed: int = _f(42, "Seed for LoRA init, dropout and data order.")
    resume: str = _f("", "'' (fresh run), 'latest' (newest complete checkpoint in output_dir, if any) or a "
                     "checkpoint path. The checkpoint's state fits only its lora.r, lora.alpha, lora.target_modules "
                     "and train.optimizer (paged or not): a resume that changes them is refused.")
    adapter: str = _f("", "Trained adapter folder to evaluate or predict with ('' = zero-shot base model).")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


_ENV_REF = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def _expand_env(value: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) in os.environ and os.environ[m.group(1)]:
            return os.environ[m.group(1)]
        if m.group(2) is not None:
            return m.group(2)
        raise ConfigError(f"environment variable {m.group(1)} is not set (referenced as {m.group(0)})")
    return _ENV_REF.sub(sub, value)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    if typing.get_args(typ):  # a union: the first of its types that takes the value
        for arm in typing.get_args(typ):
            try:
                return _coerce(key, value, arm)
            except ConfigError:
                pass
        names = " or ".join(a.__name__ for a in typing.get_args(typ))
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    if typ is dict:
        if isinstance(value, dict):
            return value
    elif typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 2e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return _expand_env(str(value))
        if value is None:
            return ""
    elif typ is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key}: expected {name}, got {value!r}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, options) -> ConfigError:
    close = difflib.get_close_matches(key, list(options), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint}")


def _all_keys(cls=Config, prefix: str = "") -> list[str]:
    keys = []
    for name, typ in _types(cls).items():
        if dataclasses.is_dataclass(typ):
            keys += _all_keys(typ, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _set(cfg: Any, key: str, value: Any, full_key: str) -> None:
    head, _, rest = key.partition(".")
    types_ = _types(type(cfg))
    if head not in types_:
        raise _unknown(full_key, _all_keys())
    typ = types_[head]
    if dataclasses.is_dataclass(typ):
        if rest:
            _set(getattr(cfg, head), rest, value, full_key)
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{full_key}: expected a mapping of {', '.join(_types(typ))}, got {value!r}")
        for k, v in value.items():
            _set(getattr(cfg, head), str(k), v, f"{full_key}.{k}")
        return
    if rest:
        raise _unknown(full_key, _all_keys())
    choices = _fields(type(cfg))[head].metadata.get("choices") or ()
    if isinstance(value, bool) and "on" in choices:  # YAML's true/false for an auto/on/off switch
        value = "on" if value else "off"
    setattr(cfg, head, _coerce(full_key, value, typ))


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, _, raw = item.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides; validated before anything heavy runs."""
    cfg = Config()
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: expected a mapping at the top level")
        for k, v in data.items():
            _set(cfg, str(k), v, str(k))
    for item in overrides:
        key, value = parse_override(item)
        _set(cfg, key, value, key)
    validate(cfg)
    return cfg


def _check_choices(obj: Any, prefix: str) -> None:
    for name, f in _fields(type(obj)).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            _check_choices(value, f"{prefix}{name}.")
        elif f.metadata.get("choices") and value not in f.metadata["choices"]:
            raise ConfigError(f"{prefix}{name}: '{value}' is not one of {', '.join(f.metadata['choices'])}")


def validate(cfg: Config) -> None:
    _check_choices(cfg, "")
    t, lo, d, e = cfg.train, cfg.lora, cfg.data, cfg.eval
    checks = [
        (lo.r > 0, "lora.r must be > 0"),
        (lo.alpha > 0, "lora.alpha must be > 0"),
        (0.0 <= lo.dropout < 1.0, "lora.dropout must be in [0, 1)"),
        (len(lo.target_modules) > 0, "lora.target_modules must name at least one module"),
        (0.0 < d.val_fraction < 1.0, "data.val_fraction must be in (0, 1)"),
        (d.max_examples >= 0, "data.max_examples must be >= 0"),
        (t.max_steps >= 0, "train.max_steps must be >= 0"),
        (t.max_steps > 0 or t.epochs > 0, "train.epochs must be > 0 when train.max_steps is 0"),
        (t.batch_size > 0, "train.batch_size must be > 0"),
        (t.grad_accum > 0, "train.grad_accum must be > 0"),
        (t.lr > 0, "train.lr must be > 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0"),
        (t.log_every > 0, "train.log_every must be > 0"),
        (t.pad_multiple > 0, "train.pad_multiple must be > 0"),
        (t.max_batch_tokens >= 0, "train.max_batch_tokens must be >= 0 (0 = no cap)"),
        (t.eval_every >= 0 and t.save_every >= 0, "train.eval_every and train.save_every must be >= 0"),
        (t.keep_last > 0, "train.keep_last must be > 0"),
        (e.batch_size > 0, "eval.batch_size must be > 0"),
        (e.max_batch_tokens >= 0, "eval.max_batch_tokens must be >= 0"),
        (e.max_new_tokens > 0, "eval.max_new_tokens must be > 0"),
        (e.max_examples >= 0, "eval.max_examples must be >= 0"),
        # numpy takes seeds in [0, 2**32): accelerate's set_seed seeds its legacy generator with `seed`
        (0 <= cfg.seed < 2**32, "seed must be in [0, 2**32)"),
        (0 <= d.split_seed < 2**32, "data.split_seed must be in [0, 2**32)"),
        (bool(cfg.output_dir), "output_dir must not be empty"),
        (bool(cfg.model.name), "model.name must not be empty"),
        (cfg.model.unchecked_layers >= 0, "model.unchecked_layers must be >= 0"),
        (cfg.model.prefix_attention == "auto" or cfg.model.attn_implementation == "sdpa",
         f"model.prefix_attention={cfg.model.prefix_attention} needs model.attn_implementation=sdpa (got "
         f"{cfg.model.attn_implementation}, whose attention reads the shared instruction from the cache)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    try:  # the task file is read once, here: from now on the config holds the task itself
        d.task = load_task(d.task).spec()
    except TaskError as e:
        raise ConfigError(str(e)) from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def flat_dict(cfg: Config) -> dict[str, Any]:
    """{dotted.key: scalar}: what trackers take as run parameters (TensorBoard refuses lists and nesting)."""
    def walk(d: dict, prefix: str):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            elif isinstance(v, list):  # a task's labels may be mappings (name: description)
                yield prefix + k, ",".join(x if isinstance(x, str) else json.dumps(x) for x in v)
            else:
                yield prefix + k, v
    return dict(walk(to_dict(cfg), ""))


def check_output_dir(folder: str | os.PathLike) -> None:
    """ConfigError unless `folder` exists or can be created, and files can be written in it. Run before anything
    is loaded; it leaves nothing behind (a folder it would have to create is probed in its nearest existing parent)."""
    folder = Path(folder).absolute()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(existing))
        os.rmdir(tempfile.mkdtemp(prefix=".trec_accel_probe-", dir=existing))
    except OSError as e:
        raise ConfigError(f"output_dir {folder} cannot be {'written' if existing == folder else 'created'} "
                          f"({e.strerror}: {existing}); set output_dir to a folder you can write to") from None


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    write_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def reference(cls=Config, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(dotted key, default, help) for every field: the source of the README's config table."""
    rows = []
    defaults = cls()
    for name, f in _fields(cls).items():
        value = getattr(defaults, name)
        if dataclasses.is_dataclass(value):
            rows += reference(type(value), f"{prefix}{name}.")
        else:
            help_ = f.metadata["help"]
            if f.metadata.get("choices"):
                help_ += f" One of: {', '.join(f.metadata['choices'])}."
            rows.append((prefix + name, value, help_))
    return rows


def reference_markdown() -> str:
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    for key, default, help_ in reference():
        shown = ",".join(default) if isinstance(default, list) else default
        lines.append(f"| `{key}` | `{shown}` | {help_} |")
    return "\n".join(lines)
