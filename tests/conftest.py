import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREC_DATA_DIR = os.environ.get("TREC_DATA_DIR")
needs_trec = pytest.mark.skipif(not TREC_DATA_DIR, reason="TREC_DATA_DIR is not set")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from trec_accel.offline_models import resolve_model_path
    return resolve_model_path("tiny-random-mistral")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from trec_accel.model import load_tokenizer
    return load_tokenizer(tiny_model_path)


@pytest.fixture
def toy_data(tmp_path) -> Path:
    """A small jsonl TREC-like data set with train and test files, every coarse label present."""
    import json
    questions = {
        "ABBR": ["What does NASA stand for ?", "What is the abbreviation for Texas ?"],
        "ENTY": ["What color is the sky ?", "What animal barks ?", "What sport uses a puck ?"],
        "DESC": ["Why is the sea salty ?", "How do bees make honey ?", "What is a sonnet ?"],
        "HUM": ["Who wrote Hamlet ?", "Who invented the telephone ?", "What team won the 1990 World Cup ?"],
        "LOC": ["Where is Lima ?", "What is the capital of Chile ?", "Which country has the most lakes ?"],
        "NUM": ["How many legs does a spider have ?", "When did World War II end ?", "How tall is K2 ?"],
    }
    rows = [{"text": q, "label": label} for label, qs in questions.items() for q in qs]
    folder = tmp_path / "toy"
    folder.mkdir()
    with open(folder / "train.jsonl", "w") as f:
        for i in range(4):
            for r in rows:
                text = r["text"].replace("?", "?" if i == 0 else f"( {i} ) ?")
                f.write(json.dumps({"text": text, "label": r["label"]}) + "\n")
    with open(folder / "test.jsonl", "w") as f:
        for r in rows[:11]:
            f.write(json.dumps(r) + "\n")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, args: list[str], nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a script on `nproc` CPU processes (plain python for one, accelerate launch + gloo for more).

    accelerate 1.x starts several CPU processes only through its torchrun path: --multi_gpu with
    ACCELERATE_USE_CPU=1 (see accelerate_configs/cpu_multiprocess.yaml).
    """
    env = dict(os.environ, ACCELERATE_USE_CPU="1", TOKENIZERS_PARALLELISM="false")
    path = str(ROOT / "scripts" / script)
    if nproc == 1:
        cmd = [sys.executable, path, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), path, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
