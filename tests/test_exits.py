"""How runs end when a new user gets something wrong or a scheduler stops them (issue 12): one `error: ...` line
that names the problem and what to change, exit code 2, before anything expensive runs and with nothing left
behind that a later run would trust; or, on a signal, one checkpoint and exit code 0."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from trec_accel import checkpoint, cli
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
    monkeypatch.setattr(train_module, "load_data", expensive)
    monkeypatch.setattr(train_module, "load_base", expensive)


def test_a_script_body_gives_its_exit_code_or_one_error_line(capsys):
    from trec_accel.config import ConfigError

    def bad_input():
        raise ConfigError("train.lr: expected float, got 'abc'")
    assert [cli.main(lambda: 1), cli.main(lambda: {"steps": 3}), cli.main(lambda: None)] == [1, 0, 0]
    capsys.readouterr()
    assert cli.main(bad_input) == 2
    assert capsys.readouterr().err == "error: train.lr: expected float, got 'abc'\n"


def test_missing_resume_path_stops_before_anything_is_loaded(tmp_path, capsys, nothing_expensive):
    out, missing = tmp_path / "run", tmp_path / "run" / "checkpoints" / "step-7"
    rc, err = run_train(capsys, [f"output_dir={out}", f"resume={missing}"])
    assert rc == 2
    assert err == [f"error: cannot resume from {missing}: folder not found; set resume to a complete checkpoint folder "
                   "(output_dir/checkpoints/step-N) or to 'latest'"]
    assert not out.exists()  # no config.yaml


def test_an_adapter_folder_given_as_the_model_stops_before_anything_is_loaded(tmp_path, capsys, nothing_expensive):
    """Transformers would fail on it later, with a message about tokenizer backends."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    rc, err = run_train(capsys, [f"output_dir={tmp_path / 'run'}", f"model.name={adapter}"])
    assert rc == 2
    assert err == [f"error: model.name={adapter} is a folder without a config.json, not a saved model: it holds a LoRA "
                   f"adapter: pass it as adapter={adapter} and its base model as model.name"]
    rc, err = run_train(capsys, [f"output_dir={tmp_path / 'run'}", f"model.name={tmp_path}"])
    assert rc == 2 and err[0].endswith("give a folder written by save_pretrained, a hub id, or a built-in model")


@pytest.mark.parametrize("where", [pytest.param("/proc/trec-accel/run", marks=pytest.mark.skipif(
    not Path("/proc/self").exists(), reason="needs /proc")), "file/run"])
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
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", **extra)
    return env


def launch_training(config, out, data) -> subprocess.CompletedProcess:
    """`accelerate launch -q --config_file config scripts/train.py` of the tiny model on `data`, into `out`."""
    from conftest import free_port
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(config),
                           "--main_process_port", str(free_port()), "scripts/train.py", "--config", TINY,
                           f"output_dir={out}", f"data.path={data}"],
                          cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)


def test_accelerate_launch_quiet_keeps_the_error_line_last(tmp_path):
    """The README's `accelerate launch -q`: no CalledProcessError traceback after the script's error line. The
    launcher exits 1 for any failure of its child: its quiet mode does not pass the child's code 2 on."""
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


UNJOINED = ("error: this is one of 2 processes started by a launcher, but they did not join one distributed group "
            "(does the launch config ask for GPUs this machine does not have?), so each would run alone in the same "
            "output_dir; "
            "to run 2 processes on this machine's CPU: ACCELERATE_USE_CPU=1 accelerate launch -q --config_file "
            "accelerate_configs/cpu_multiprocess.yaml --multi_gpu --num_processes 2 ...; or launch one process "
            "(--num_processes 1)")


def test_an_fsdp_launch_without_gpus_is_refused_in_one_line(monkeypatch):
    from trec_accel.launcher import LaunchError, check_devices

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(LaunchError) as e:
        check_devices(cuda=False)
    assert f"error: {e.value}" == NO_FSDP
    check_devices(cuda=True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_devices(cuda=False)


NO_FSDP = ("error: the launch config asks for FSDP, which needs GPUs, but this process runs on the CPU (no CUDA "
           "device, or ACCELERATE_USE_CPU); to run 2 processes on this machine's CPU: ACCELERATE_USE_CPU=1 accelerate "
           "launch -q --config_file accelerate_configs/cpu_multiprocess.yaml --multi_gpu --num_processes 2 ...; or "
           "launch one process (--num_processes 1)")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the config starts a real FSDP run on GPUs")
def test_the_shipped_fsdp_config_without_gpus_starts_no_training(tmp_path, toy_data):
    out = tmp_path / "run"
    r = launch_training("accelerate_configs/fsdp_qlora.yaml", out, toy_data)
    assert NO_FSDP in r.stderr.splitlines(), r.stderr[-3000:]
    assert "no available devices" not in r.stderr  # accelerate's own failure, inside its FSDP plugin
    assert re.search(r"exitcode\s*: 2 ", r.stderr), r.stderr[-3000:]
    assert not out.exists()


# accelerate's examples/config_yaml_templates/multi_gpu.yaml
MULTI_GPU_TEMPLATE = """\
distributed_type: "MULTI_GPU"
mixed_precision: "bf16"
num_processes: 2
"""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the template starts a real DDP run on GPUs")
def test_accelerates_multi_gpu_template_without_gpus_starts_no_training(tmp_path, toy_data):
    config = tmp_path / "multi_gpu.yaml"
    config.write_text(MULTI_GPU_TEMPLATE)
    out = tmp_path / "run"
    r = launch_training(config, out, toy_data)
    # The first process to refuse exits with code 2, and the launcher stops the other. (Its torchrun path ignores
    # -q: torch's ChildFailedError report follows, and it exits 1.)
    assert UNJOINED in r.stderr.splitlines(), r.stderr[-3000:]
    assert re.search(r"exitcode\s*: 2 ", r.stderr), r.stderr[-3000:]
    assert r.returncode == 1
    assert not out.exists()  # neither wrote config.yaml, checkpoints or an adapter


# --------------------------------------------------------------------------- signals


def catches(pid: int, sig: int) -> bool:
    """Whether process `pid` has a handler for `sig` (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (sig - 1) & 1)


def send(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # it has exited
        pass


def child_of(proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        if children:
            return int(children[0])
        assert proc.poll() is None, "the launcher exited early"
        time.sleep(0.05)
    pytest.fail("the launcher started no process")


def logged_steps(log: Path) -> list[int]:
    return [int(s) for s in re.findall(r'"step": (\d+), "train/loss"', log.read_text(errors="replace"))]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_signals_in_any_rhythm_give_one_checkpoint_and_exit_0(tmp_path, toy_data):
    """Real signals to real training processes started by `accelerate launch -q`: a scheduler that repeats its
    SIGTERM 50-300 ms apart, a mix of SIGUSR1 / SIGINT / SIGTERM, and signals during start-up. Each then keeps
    getting SIGTERM every 100 ms until it has exited: the handler stays installed to the end."""
    T, U, I = signal.SIGTERM, signal.SIGUSR1, signal.SIGINT
    rhythms = {"startup": [(T, 0), (I, 0.05), (U, 0.1)],  # first: the others wait for steps
               "repeated": [(T, 0), (T, 0.05), (T, 0.3)], "mixed": [(U, 0), (I, 0.1), (T, 0.05), (U, 0.2), (I, 0)]}
    runs = {}
    try:
        for name in rhythms:
            out, log = tmp_path / name, tmp_path / f"{name}.log"
            with open(log, "w") as f:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "accelerate.commands.launch", "-q", "--cpu", "--num_processes", "1",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "scripts/train.py",
                     "--config", TINY, f"output_dir={out}", f"data.path={toy_data}", "train.max_steps=100000",
                     "train.batch_size=2", "train.grad_accum=1", "train.log_every=1", "train.save_every=0",
                     "eval.max_examples=8"],
                    cwd=ROOT, env=launcher_env(PYTHONUNBUFFERED="1"), stdout=f, stderr=subprocess.STDOUT)
            runs[name] = (proc, out, log)
        for name, (proc, out, log) in runs.items():
            pid = child_of(proc, 60)
            runs[name] = (proc, pid, out, log)
            deadline = time.monotonic() + 180
            # start-up: as soon as the script has installed its SIGTERM handler; else after 2 training steps
            while not (catches(pid, T) if name == "startup" else max(logged_steps(log), default=0) >= 2):
                assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.01)
            for sig, pause in rhythms[name]:
                time.sleep(pause)
                send(pid, sig)
        deadline = time.monotonic() + 180
        while any(proc.poll() is None for proc, *_ in runs.values()) and time.monotonic() < deadline:
            for proc, pid, _, _ in runs.values():
                if proc.poll() is None:
                    send(pid, T)
            time.sleep(0.1)
    finally:
        for proc, *_ in runs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    for name, (proc, _, out, log) in runs.items():
        text = log.read_text()
        assert proc.returncode == 0, (name, text[-3000:])
        assert "Traceback" not in text, (name, text[-3000:])
        if name == "startup":
            assert "received during start-up: exiting before training, at step 0" in text, text[-3000:]
            assert not out.exists(), text  # no config.yaml, no checkpoint
            continue
        summary = json.loads((out / "train_summary.json").read_text())
        n = summary["step"]
        assert summary["status"] == "interrupted" and n >= 2, summary
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step-{n}"]
        assert checkpoint.verify(out / "checkpoints" / f"step-{n}") is None
        first = int(rhythms[name][0][0])
        assert re.findall(r"signal (\d+) received: saved a checkpoint at step", text) == [str(first)], text[-3000:]
        assert not (out / "adapter").exists()
