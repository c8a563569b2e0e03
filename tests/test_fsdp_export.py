"""The adapter export under FSDP gathers the trained LoRA weights whole, not a shard and not the initial values,
and the adapter written from the FSDP-wrapped model loads back with all of them."""
import os
import subprocess
import sys

from conftest import ROOT, free_port


def test_lora_weights_gathered_from_fsdp_units_equal_unwrapped_training(tiny_model_path, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()),
                        str(ROOT / "tests" / "fsdp_export_worker.py"), str(tiny_model_path), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.count("LoRA tensors match") == 2, r.stdout[-2000:]
