"""What a process started by a launcher checks about the others it was started with."""
from __future__ import annotations

import os


class LaunchError(RuntimeError):
    """Processes started together that cannot train together."""


def check_joined(accelerator) -> None:
    """Refuse to run as one of several processes that did not join one distributed group.

    A launcher tells every process it starts how many there are (WORLD_SIZE). Under accelerate's own
    multi_gpu.yaml / multi_xpu.yaml templates on a machine without those devices, each process's Accelerator
    finds nothing to join through and runs alone: as many copies of one run, racing in one output_dir.
    """
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if world > 1 and accelerator.num_processes == 1:
        raise LaunchError(
            f"this is one of {world} processes started by a launcher, but they did not join one distributed group "
            f"(does the launch config ask for GPUs this machine does not have?), so each would run alone in the same "
            f"output_dir; to run {world} processes on this machine's CPU: ACCELERATE_USE_CPU=1 accelerate launch -q "
            f"--config_file accelerate_configs/cpu_multiprocess.yaml --multi_gpu --num_processes {world} ...; or "
            f"launch one process (--num_processes 1)")
