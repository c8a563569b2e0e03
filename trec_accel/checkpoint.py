"""Checkpoints that are either complete or ignored.

A checkpoint is written by `accelerator.save_state` into a hidden temporary folder; the main process then
records every file's size and SHA-256 in `MANIFEST.json` and renames the folder to `step-N`. A folder
without a manifest, or whose files no longer match it, is skipped on resume with a warning.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from .files import replace_folder, sha256, write_atomic

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
TRAINER_STATE = "trainer_state.json"
_STEP = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint named by `resume=PATH` that is missing or incomplete."""


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path) -> None:
    entries = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)} for p in _files(folder)}
    write_atomic(folder / MANIFEST, json.dumps(entries, indent=1))


def verify(folder: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it is not."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return "no manifest (the save did not finish)"
    try:
        entries = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return "unreadable manifest"
    for rel, want in entries.items():
        p = folder / rel
        if not p.is_file():
            return f"missing file {rel}"
        if p.stat().st_size != want["bytes"] or sha256(p) != want["sha256"]:
            return f"file {rel} does not match its recorded size and checksum"
    if TRAINER_STATE not in entries:
        return f"no {TRAINER_STATE}"
    return None


def step_of(folder: Path) -> int:
    m = _STEP.match(folder.name)
    return int(m.group(1)) if m else -1


def checkpoints(root: Path) -> list[Path]:
    """step-N folders under root, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _STEP.match(p.name)), key=step_of, reverse=True)


def find_resume(resume: str, root: Path) -> Path | None:
    """The checkpoint to resume from: `latest` is the newest intact one under root (or None: a fresh start);
    a path must itself be intact (else CheckpointError)."""
    if not resume:
        return None
    if resume != "latest":
        folder = Path(resume)
        reason = verify(folder) if folder.is_dir() else "folder not found"
        if reason:
            raise CheckpointError(f"cannot resume from {folder}: {reason}; set resume to a complete checkpoint folder "
                                  f"(output_dir/checkpoints/step-N) or to 'latest'")
        return folder
    for folder in checkpoints(root):
        reason = verify(folder)
        if reason is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, reason)
    return None


def save(accelerator, root: Path, step: int, trainer_state: dict, keep: int, protect: tuple[int, ...] = ()) -> Path:
    """Save on every process (each writes its own RNG state), publish atomically on the main one, prune."""
    final = root / f"step-{step}"
    tmp = root / f".step-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        write_manifest(tmp)
        replace_folder(tmp, final)
        for old in checkpoints(root)[keep:]:
            if step_of(old) not in protect:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_trainer_state(folder: Path) -> dict:
    return json.loads((folder / TRAINER_STATE).read_text())


def _state_layout(optimizer: str | None) -> str | None:
    """train.optimizer up to paging, which does not change the state an optimizer keeps (another state cannot be
    stepped: torch's AdamW found no `exp_avg` in bitsandbytes' state and ended in a KeyError)."""
    return optimizer.removeprefix("paged_") if optimizer else optimizer


def _refuse(folder: Path, setting: str, written: str) -> None:
    raise CheckpointError(f"cannot resume from {folder} with {setting}: its state was written with {written}; resume "
                          "with that, or start a new run")


def check_settings(folder: Path, recorded: dict | None, now: dict) -> None:
    """Refuse to resume from `folder` with settings its state does not fit: `recorded` is what its trainer state
    records (None where it was written before it recorded them), `now` this run's (train.resume_settings)."""
    for key, written in (recorded or {}).items():
        same = (_state_layout(written) == _state_layout(now.get(key)) if key == "train.optimizer"
                else written == now.get(key))
        if not same:
            _refuse(folder, f"{key}={now.get(key)}", f"{key}={written}")


def check_optimizer_state(folder: Path, optimizer: str, state: dict) -> None:
    """For a checkpoint that records no settings: refuse `optimizer` where its loaded state dict is another family's
    (torch's AdamW keeps `exp_avg` beside `step`, bitsandbytes' optimizers other names)."""
    keys = {k for per_tensor in state.get("state", {}).values() for k in per_tensor}
    if not keys - {"step"}:  # no step taken yet: nothing to tell them apart by, nor to misread
        return
    torch_state = "exp_avg" in keys
    if torch_state != (optimizer == "adamw"):
        _refuse(folder, f"train.optimizer={optimizer}",
                "train.optimizer=adamw" if torch_state else "one of bitsandbytes' optimizers")


# What PyTorch says when a checkpoint's weights or optimizer state do not fit the model and optimizer built now.
_MISFIT = ("size mismatch", "doesn't match the size of optimizer's group", "different number of parameter groups")


def load_state(accelerator, folder: Path, **kwargs) -> None:
    """`accelerator.load_state`, with a checkpoint that does not fit this run's LoRA (written before checkpoints
    recorded their settings) refused in one line instead of PyTorch's list of mismatched tensors."""
    try:
        accelerator.load_state(str(folder), **kwargs)
    except (RuntimeError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if any(m in line for m in _MISFIT)]
        if not lines:
            raise
        raise CheckpointError(f"cannot resume from {folder}: its trainable weights do not fit this run's LoRA "
                              f"(lora.r or lora.target_modules changed?): {lines[0]}") from None
