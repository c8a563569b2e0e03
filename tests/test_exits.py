"""How runs end when a new user gets something wrong or a scheduler stops them (issue 12): one `error: ...` line
that names the problem and what to change, exit code 2, before anything expensive runs and with nothing left
behind that a later run would trust; or, on a signal, one checkpoint and exit code 0."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT
from trec_accel import cli
from trec_accel.config import load_config

TINY = str(ROOT / "configs" / "tiny.yaml")


def run_train(capsys, overrides: list[str]) -> tuple[int, list[str]]:
    """scripts/train.py's body in this process: (exit code, stderr lines)."""
    from trec_accel.train import run
    capsys.readouterr()
    rc = cli.main(lambda: run(load_config(TINY, overrides)))
    return rc, capsys.readouterr().err.splitlines()


@pytest.fixture
def nothing_expensive(monkeypatch):
    """Loading the data or the model fails the test: the error must come before."""
    import trec_accel.train as train_module

    def expensive(*args, **kwargs):
        raise AssertionError("the run went on to load data or the model")
    monkeypatch.setattr(train_module, "load_splits", expensive)
    monkeypatch.setattr(train_module, "load_base", expensive)


def test_missing_resume_path_stops_before_anything_is_loaded(tmp_path, capsys, nothing_expensive):
    out, missing = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-7"
    rc, err = run_train(capsys, [f"output_dir={out}", f"resume={missing}"])
    assert rc == 2
    assert err == [f"error: cannot resume from {missing}: folder not found; set resume to a complete checkpoint folder "
                   "(output_dir/checkpoints/step-N) or to 'latest'"]
    assert not out.exists()  # no config.yaml


@pytest.mark.parametrize("where", ["/proc/trec-accel/run", "file/run"])
def test_output_dir_that_cannot_be_created_stops_before_anything_is_loaded(tmp_path, capsys, nothing_expensive, where):
    (tmp_path / "file").write_text("a file, not a folder")
    out = tmp_path / where if not where.startswith("/") else where
    rc, err = run_train(capsys, [f"output_dir={out}"])
    assert rc == 2
    parent = "/proc" if where.startswith("/") else tmp_path / "file"
    reason = "No such file or directory" if where.startswith("/") else "not a folder"
    assert err == [f"error: output_dir {out} cannot be created ({reason}: {parent}); set output_dir to a folder you "
                   "can write to"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe left nothing


def launcher_env(**extra) -> dict:
    import os
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)
    return env


def test_accelerate_launch_quiet_keeps_the_error_line_last(tmp_path):
    """The README's `accelerate launch -q`: no CalledProcessError traceback after the script's error line. The
    launcher exits 1 for any failure of its child: its quiet mode does not pass the child's code 2 on."""
    import subprocess
    import sys

    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--cpu", "--num_processes", "1",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "scripts/train.py", "--config", TINY, f"output_dir={out}", "train.max_step=3"],
                       cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    assert r.stderr.splitlines()[-1] == "error: unknown config key 'train.max_step' (did you mean 'train.max_steps'?)"
    assert "Traceback" not in r.stderr
    assert r.returncode == 1
    assert not out.exists()


def test_processes_that_did_not_join_refuse_to_start(monkeypatch):
    """What a launcher tells each process (WORLD_SIZE), against the processes its Accelerator sees."""
    from types import SimpleNamespace

    from trec_accel.launcher import LaunchError, check_joined

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LaunchError) as e:
        check_joined(SimpleNamespace(num_processes=1))
    assert f"error: {e.value}" == UNJOINED
    check_joined(SimpleNamespace(num_processes=2))  # joined
    monkeypatch.delenv("WORLD_SIZE")
    check_joined(SimpleNamespace(num_processes=1))  # started alone


UNJOINED = ("error: this is one of 2 processes started by a launcher, but they did not join one distributed group (does "
            "the launch config ask for GPUs this machine does not have?), so each would run alone in the same output_dir; "
            "to run 2 processes on this machine's CPU: ACCELERATE_USE_CPU=1 accelerate launch -q --config_file "
            "accelerate_configs/cpu_multiprocess.yaml --multi_gpu --num_processes 2 ...; or launch one process "
            "(--num_processes 1)")

# accelerate's examples/config_yaml_templates/multi_gpu.yaml
MULTI_GPU_TEMPLATE = """\
distributed_type: "MULTI_GPU"
mixed_precision: "bf16"
num_processes: 2
"""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the template starts a real DDP run on GPUs")
def test_accelerates_multi_gpu_template_without_gpus_starts_no_training(tmp_path, toy_data):
    import subprocess
    import sys

    from conftest import free_port

    config = tmp_path / "multi_gpu.yaml"
    config.write_text(MULTI_GPU_TEMPLATE)
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(config),
                        "--main_process_port", str(free_port()), "scripts/train.py", "--config", TINY,
                        f"output_dir={out}", f"data.path={toy_data}"],
                       cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    # The first process to refuse exits with code 2, and the launcher stops the other. (Its torchrun path ignores
    # -q: torch's ChildFailedError report follows, and it exits 1.)
    assert UNJOINED in r.stderr.splitlines(), r.stderr[-3000:]
    assert re.search(r"exitcode\s*: 2 ", r.stderr), r.stderr[-3000:]
    assert r.returncode == 1
    assert not out.exists()  # neither wrote config.yaml, checkpoints or an adapter
