"""What this process runs on, decided once per run: the Accelerator, the backend, the main-process flag and the
precision. Training, evaluation and prediction start here and ask the `Runtime` rather than the Accelerator's
state, so that each of these decisions is made in one place."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, ConfigError
from .launcher import check_devices, check_joined

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def backend_of(accelerator) -> str:
    """single, ddp, fsdp, deepspeed (ZeRO-1/2) or zero3, read from the Accelerator's distributed type."""
    from accelerate.utils import DistributedType
    t = accelerator.distributed_type
    if t == DistributedType.FSDP:
        return "fsdp"
    if t == DistributedType.DEEPSPEED:
        return "zero3" if accelerator.state.deepspeed_plugin.zero_stage == 3 else "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def model_dtype(name: str, cuda: bool) -> str:
    """`model.dtype` resolved: bf16 where the device supports it for 'auto', else fp32."""
    bf16 = cuda and torch.cuda.is_bf16_supported()
    if name == "auto":
        return "bf16" if bf16 else "fp32"
    if name == "bf16" and cuda and not bf16:
        raise ConfigError("model.dtype=bf16 is not supported by this GPU; use model.dtype=fp16 or fp32")
    return name


@dataclass(frozen=True)
class Runtime:
    accelerator: object
    backend: str          # see backend_of
    is_main: bool         # the process that writes files and logs
    dtype: torch.dtype    # the base model's weights and compute dtype

    @classmethod
    def of(cls, accelerator, dtype: str) -> Runtime:
        cuda = accelerator.device.type == "cuda"
        return cls(accelerator, backend_of(accelerator), accelerator.is_main_process, DTYPES[model_dtype(dtype, cuda)])

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def precision(self) -> str:
        """Autocast precision: bf16, fp16 or no."""
        return self.accelerator.mixed_precision

    @property
    def sharded(self) -> bool:
        """Whether the backend shards (and places) the parameters itself."""
        return self.backend in ("fsdp", "zero3")


def start(cfg: Config, gradient_accumulation_steps: int = 1) -> Runtime:
    """The Accelerator for this run, and what it decides."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, parse_flag_from_env

    # Decided before the Accelerator exists: creating a PartialState first would fix the device and
    # ignore `accelerate launch --cpu`.
    cuda = torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU")
    check_devices(cuda)
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if not precision or precision == "no":
        precision = "bf16" if cuda and model_dtype(cfg.model.dtype, cuda) == "bf16" else "no"
    trackers = [] if cfg.log.tracker == "none" else [cfg.log.tracker]
    if cfg.log.tracker == "wandb" and not os.environ.get("WANDB_API_KEY") and not (Path.home() / ".netrc").is_file():
        os.environ.setdefault("WANDB_MODE", "offline")  # no key or no network: keep the run on disk
    project = ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=cfg.output_dir)
    accelerator = Accelerator(gradient_accumulation_steps=gradient_accumulation_steps, mixed_precision=precision,
                              log_with=trackers or None, project_config=project,
                              step_scheduler_with_optimizer=False)
    check_joined(accelerator)
    return Runtime.of(accelerator, cfg.model.dtype)


def show_logs(runtime: Runtime) -> None:
    """INFO logs on stderr, from the main process only: the others would repeat them."""
    if runtime.is_main:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
