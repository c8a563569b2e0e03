"""What a process started by a launcher checks: the devices its backend needs, and the others it was started with."""
from __future__ import annotations

import os


class LaunchError(RuntimeError):
    """Processes started together that cannot train together, or a launch this machine cannot run."""


def launched_processes() -> int:
    """How many processes the launcher says it started (WORLD_SIZE; 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def cpu_instead() -> str:
    world = launched_processes()
    return (f"to run {world} processes on this machine's CPU: ACCELERATE_USE_CPU=1 accelerate launch -q --config_file "
            f"accelerate_configs/cpu_multiprocess.yaml --multi_gpu --num_processes {world} ...; or launch one process "
            f"(--num_processes 1)")


def check_devices(cuda: bool) -> None:
    """Refuse an FSDP launch on a machine without GPUs, before accelerate's FSDP plugin fails inside itself ("There
    are currently no available devices found")."""
    if not cuda and os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        raise LaunchError("the launch config asks for FSDP, which needs GPUs, but this process runs on the CPU (no "
                          "CUDA device, or ACCELERATE_USE_CPU); " + cpu_instead())


def check_joined(accelerator) -> None:
    """Refuse to run as one of several processes that did not join one distributed group.

    A launcher tells every process it starts how many there are (WORLD_SIZE). Under accelerate's own
    multi_gpu.yaml / multi_xpu.yaml templates on a machine without those devices, each process's Accelerator
    finds nothing to join through and runs alone: as many copies of one run, racing in one output_dir.
    """
    world = launched_processes()
    if world > 1 and accelerator.num_processes == 1:
        raise LaunchError(
            f"this is one of {world} processes started by a launcher, but they did not join one distributed group "
            f"(does the launch config ask for GPUs this machine does not have?), so each would run alone in the same "
            f"output_dir; " + cpu_instead())
