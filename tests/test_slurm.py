"""SLURM launch scripts and accelerate config files.

* every script under scripts/slurm passes `bash -n`;
* scripts/slurm/launch.sh renders the exact `accelerate launch` argv for a fake
  2-node allocation (fake `scontrol` on PATH, TREC_ACCEL_DRY_RUN=1);
* every accelerate_configs/*.yaml loads with accelerate's own loader and carries
  the flags the QLoRA set-ups need;
* (CPU, a few seconds) launch.sh really starts a 2-"node" c10d gloo job on this
  machine, and a SIGUSR1 sent to every process of the "step" makes the workers
  save while the launcher survives and exits 0.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = ROOT / "scripts" / "slurm"
LAUNCH = SLURM_DIR / "launch.sh"
ACC_DIR = ROOT / "accelerate_configs"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash not available")

SLURM_SCRIPTS = sorted(p for p in SLURM_DIR.iterdir() if p.suffix in (".sh", ".sbatch"))


# --------------------------------------------------------------------------- bash -n
def test_slurm_scripts_exist():
    names = {p.name for p in SLURM_SCRIPTS}
    assert {"launch.sh", "train_single_node.sbatch", "train_multi_node.sbatch", "evaluate.sbatch"} <= names


@pytest.mark.parametrize("script", SLURM_SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    r = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("script", [p for p in SLURM_SCRIPTS if p.suffix == ".sbatch"], ids=lambda p: p.name)
def test_sbatch_headers(script):
    text = script.read_text()
    assert "#SBATCH --ntasks-per-node=1" in text
    assert "#SBATCH --gres=gpu:" in text
    assert "#SBATCH --output=logs/%x-%j.out" in text
    assert "ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-accelerate_configs/ddp.yaml}" in text
    assert "bash scripts/slurm/launch.sh" in text  # node-specific vars are read on each node
    if script.name.startswith("train_"):
        for flag in ("--signal=B:USR1@120", "--requeue", "--open-mode=append"):
            assert f"#SBATCH {flag}" in text
        assert "trap on_usr1 USR1" in text and "trap on_term TERM" in text
        assert 'kill -USR1 "$SRUN_PID"' in text
        assert 'scontrol requeue "$SLURM_JOB_ID"' in text


# --------------------------------------------------------------------------- launch.sh
def _fake_scontrol(tmp_path: Path, hosts: str = "gpu-node-07\ngpu-node-08") -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    sc = bindir / "scontrol"
    printf_arg = hosts.replace("\n", "\\n") + "\\n"
    sc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = show ] && [ "$2" = hostnames ]; then
            printf '{printf_arg}'
            exit 0
        fi
        echo "fake scontrol: unexpected args: $*" >&2
        exit 1
        """))
    sc.chmod(0o755)
    return bindir


def _clean_env(bindir: Path, **overrides) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in {
               "GPUS_PER_NODE", "TRAIN_CONFIG", "ACCELERATE_CONFIG", "SCRIPT", "MAIN_PORT", "RESUME",
               "TREC_ACCEL_DRY_RUN"}}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def _two_node_env(bindir: Path, node_id: int, **extra) -> dict:
    return _clean_env(
        bindir,
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_NNODES=2,
        SLURM_NODEID=node_id,
        SLURM_GPUS_ON_NODE=4,
        SLURM_JOB_ID=4242,
        TRAIN_CONFIG="configs/mistral7b_coarse.yaml",
        ACCELERATE_CONFIG="accelerate_configs/fsdp_qlora.yaml",
        TREC_ACCEL_DRY_RUN=1,
        **extra,
    )


def _run_launch(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BASH, str(LAUNCH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def _expected(node_id: int, nprocs: int = 8, port: str = "29500", config="accelerate_configs/fsdp_qlora.yaml",
              script="scripts/train.py", tail=("resume=latest", "train.max_steps=50")) -> list[str]:
    return ["accelerate", "launch",
            "--quiet",
            "--config_file", config,
            "--num_machines", "2",
            "--num_processes", str(nprocs),
            "--machine_rank", str(node_id),
            "--main_process_ip", "gpu-node-07",
            "--main_process_port", port,
            "--rdzv_backend", "c10d",
            "--max_restarts", "0",
            script, "--config", "configs/mistral7b_coarse.yaml", *tail]


@pytest.mark.parametrize("node_id", [1, 0])
def test_launch_two_nodes_exact_argv(tmp_path, node_id):
    env = _two_node_env(_fake_scontrol(tmp_path), node_id)
    r = _run_launch(env, "train.max_steps=50")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # one line, shell-quoted
    assert shlex.split(lines[0]) == _expected(node_id)


def test_launch_defaults_and_overrides(tmp_path):
    bindir = _fake_scontrol(tmp_path)
    # ACCELERATE_CONFIG defaults to ddp.yaml; GPUS_PER_NODE overrides SLURM_GPUS_ON_NODE;
    # MAIN_PORT / SCRIPT honoured; RESUME= drops resume=latest (evaluate.sbatch).
    env = _two_node_env(bindir, 0, GPUS_PER_NODE=2, MAIN_PORT=31337, SCRIPT="scripts/evaluate.py", RESUME="")
    del env["ACCELERATE_CONFIG"]
    r = _run_launch(env)
    assert r.returncode == 0, r.stderr
    assert shlex.split(r.stdout) == _expected(0, nprocs=4, port="31337", config="accelerate_configs/ddp.yaml",
                                              script="scripts/evaluate.py", tail=())


def test_launch_quotes_awkward_args(tmp_path):
    env = _two_node_env(_fake_scontrol(tmp_path), 1)
    awkward = ["run.name=it's a test", 'x="y z"', "a=$HOME", "semi=;", ""]
    r = _run_launch(env, *awkward)
    assert r.returncode == 0, r.stderr
    argv = shlex.split(r.stdout)
    assert argv[-len(awkward):] == awkward


def test_launch_requires_train_config(tmp_path):
    env = _two_node_env(_fake_scontrol(tmp_path), 0)
    del env["TRAIN_CONFIG"]
    r = _run_launch(env, "train.max_steps=50")
    assert r.returncode != 0
    assert "TRAIN_CONFIG" in r.stderr
    assert r.stdout == ""  # nothing that looks like a command


@pytest.mark.parametrize("var,value", [("SLURM_NNODES", None), ("SLURM_NODEID", None),
                                       ("SLURM_GPUS_ON_NODE", None), ("SLURM_NODEID", "7")])
def test_launch_rejects_bad_slurm_env(tmp_path, var, value):
    env = _two_node_env(_fake_scontrol(tmp_path), 0)
    if value is None:
        del env[var]
    else:
        env[var] = value
    r = _run_launch(env)
    assert r.returncode != 0
    assert var in r.stderr


# --------------------------------------------------------------------------- accelerate configs
def _load(name: str):
    from accelerate.commands.config.config_args import load_config_from_file
    return load_config_from_file(str(ACC_DIR / name))


EXPECTED_TYPES = {
    "single_gpu.yaml": "NO",
    "ddp.yaml": "MULTI_GPU",
    "fsdp_qlora.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3_qlora.yaml": "DEEPSPEED",
    "cpu_multiprocess.yaml": "MULTI_CPU",
}


def test_all_configs_present():
    assert {p.name for p in ACC_DIR.glob("*.yaml")} >= set(EXPECTED_TYPES)


@pytest.mark.parametrize("path", sorted(ACC_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_config_loads_and_has_header(path):
    from accelerate.commands.config.config_args import ClusterConfig
    cfg = _load(path.name)
    assert isinstance(cfg, ClusterConfig)
    assert path.read_text().lstrip().startswith("#"), "each config starts with an explanatory comment header"
    if path.name in EXPECTED_TYPES:
        assert cfg.distributed_type.value == EXPECTED_TYPES[path.name]


def test_single_and_ddp():
    single, ddp = _load("single_gpu.yaml"), _load("ddp.yaml")
    assert single.num_processes == 1 and single.mixed_precision == "bf16"
    assert ddp.num_processes == 2 and ddp.mixed_precision == "bf16"


def test_fsdp_qlora_flags():
    cfg = _load("fsdp_qlora.yaml")
    f = cfg.fsdp_config
    assert cfg.mixed_precision == "bf16"
    assert f["fsdp_version"] == 1
    assert f["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert f["fsdp_use_orig_params"] is False
    assert f["fsdp_cpu_ram_efficient_loading"] is True
    assert f["fsdp_sync_module_states"] is True
    assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert f["fsdp_activation_checkpointing"] is False
    header = (ACC_DIR / "fsdp_qlora.yaml").read_text()
    assert "bnb_4bit_quant_storage" in header and "device_map" in header and "fsdp_auto_wrap_policy" in header


def test_deepspeed_flags():
    z2, z3 = _load("deepspeed_zero2.yaml"), _load("deepspeed_zero3_qlora.yaml")
    assert z2.deepspeed_config["zero_stage"] == 2 and z2.mixed_precision == "bf16"
    # accumulation / clipping left to the code ("auto")
    assert "gradient_accumulation_steps" not in z2.deepspeed_config
    assert "gradient_clipping" not in z2.deepspeed_config
    d = z3.deepspeed_config
    assert d["zero_stage"] == 3
    assert d["zero3_init_flag"] is True
    assert d["zero3_save_16bit_model"] is True
    assert d["offload_optimizer_device"] == "none" and d["offload_param_device"] == "none"
    assert z3.mixed_precision == "bf16"


def test_cpu_multiprocess():
    cfg = _load("cpu_multiprocess.yaml")
    assert cfg.use_cpu is True and cfg.num_processes == 2 and cfg.mixed_precision == "no"


# --------------------------------------------------------------------------- real CPU runs (gloo)
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "node 0 launcher exited early"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listening on port {port}")


def _accelerate_available() -> bool:
    bindir = Path(sys.executable).parent
    return (bindir / "accelerate").exists() or shutil.which("accelerate") is not None


needs_accelerate_cli = pytest.mark.skipif(not _accelerate_available(), reason="accelerate CLI not on PATH")


def _cpu_env(tmp_path: Path, **extra) -> dict:
    bindir = _fake_scontrol(tmp_path, hosts="127.0.0.1")
    env = _clean_env(bindir, SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=1, TRAIN_CONFIG="cfg.yaml",
                     ACCELERATE_USE_CPU=1, OMP_NUM_THREADS=1, **extra)
    env["PATH"] = f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    # torchrun (the --multi_gpu path) is what starts N local processes; use_cpu + gloo
    (tmp_path / "cpu_torchrun.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nuse_cpu: true\nmixed_precision: 'no'\n")
    env["ACCELERATE_CONFIG"] = str(tmp_path / "cpu_torchrun.yaml")
    return env


@needs_accelerate_cli
def test_cpu_multiprocess_config_runs_two_gloo_ranks(tmp_path):
    hello = tmp_path / "hello.py"
    hello.write_text("from accelerate import PartialState\n"
                     "s = PartialState(cpu=True)\n"
                     "print(f'RANK {s.process_index}/{s.num_processes} {s.backend}', flush=True)\n"
                     "s.wait_for_everyone()\n")
    env = _clean_env(tmp_path, OMP_NUM_THREADS=1)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    r = subprocess.run(["accelerate", "launch", "--config_file", str(ACC_DIR / "cpu_multiprocess.yaml"),
                        "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port()),
                        str(hello)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    # ranks' lines may interleave in the shared pipe: match tokens, not lines
    assert sorted(re.findall(r"RANK \d+/\d+ \w+?(?=RANK|\s|$)", r.stdout)) == ["RANK 0/2 gloo", "RANK 1/2 gloo"]


@needs_accelerate_cli
def test_launch_sh_two_fake_nodes_rendezvous_on_cpu(tmp_path):
    """Two launch.sh instances (SLURM_NODEID 0 and 1) meet at the c10d rendezvous: 4 gloo ranks."""
    script = tmp_path / "ranks.py"
    script.write_text("import sys\nfrom accelerate import Accelerator\na = Accelerator()\n"
                      "print(f'RANK {a.process_index}/{a.num_processes} {a.distributed_type.value} {sys.argv[1:]};',"
                      " flush=True)\na.wait_for_everyone()\n")
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = _cpu_env(tmp_path, SLURM_NNODES=2, SLURM_NODEID=node, SLURM_GPUS_ON_NODE=2, SCRIPT=script,
                       MAIN_PORT=port)
        procs.append(subprocess.Popen([BASH, str(LAUNCH), "x.y=1"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
        if node == 0:
            # Both fake "nodes" share this host, so node 1 could grab the rendezvous port first
            # (c10d hosts the store on any node matching the endpoint's host) and node 0's
            # port check would then fail. On a cluster only the head matches; here: wait for
            # node 0's store to listen before starting node 1.
            _wait_listening(port, procs[0])
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]
            outs += re.findall(r"RANK [^;]*", out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert sorted(outs) == [f"RANK {i}/4 MULTI_CPU ['--config', 'cfg.yaml', 'resume=latest', 'x.y=1']"
                            for i in range(4)]


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@needs_accelerate_cli
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_sigusr1_to_whole_step_saves_and_launcher_survives(tmp_path):
    """What Slurm does when the batch trap forwards SIGUSR1 (srun -> every process of the
    step): workers (own handler) save and exit 0; the launcher ignores it and exits 0."""
    worker = tmp_path / "worker.py"
    worker.write_text(textwrap.dedent("""\
        import os, signal, sys, time
        from accelerate import Accelerator
        got = []
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
        a = Accelerator()
        print(f"READY {a.process_index}", flush=True)
        deadline = time.time() + 120
        while not got and time.time() < deadline:
            time.sleep(0.05)
        open(os.path.join(sys.argv[-1], f"saved-{a.process_index}"), "w").write("ok")
        sys.exit(0 if got else 3)
        """))
    outdir = tmp_path / "out"
    outdir.mkdir()
    log = tmp_path / "log.txt"
    env = _cpu_env(tmp_path, SLURM_NNODES=1, SLURM_NODEID=0, SLURM_GPUS_ON_NODE=2, SCRIPT=worker,
                   MAIN_PORT=_free_port())
    with open(log, "w") as fh:
        p = subprocess.Popen([BASH, str(LAUNCH), str(outdir)], cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                             text=True)
    try:
        deadline = time.time() + 120
        while log.read_text().count("READY") < 2:
            assert p.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        step = [p.pid]  # launch.sh exec'd the launcher, so p.pid is it; add its descendants
        for pid in list(step):
            step += _children(pid)
        step += [c for pid in step[1:] for c in _children(pid)]
        assert len(step) >= 3
        for pid in step:
            os.kill(pid, signal.SIGUSR1)
        rc = p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 0, log.read_text()[-3000:]
    assert sorted(x.name for x in outdir.iterdir()) == ["saved-0", "saved-1"]
