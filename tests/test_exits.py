"""How runs end when a new user gets something wrong or a scheduler stops them (issue 12): one `error: ...` line
that names the problem and what to change, exit code 2, before anything expensive runs and with nothing left
behind that a later run would trust; or, on a signal, one checkpoint and exit code 0."""
from __future__ import annotations

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
