"""scripts/benchmark.py's table: every timed scoring variant gets its row (the timings themselves need a GPU); the
GPU-only scripts refuse a CPU in one line."""
import pytest
import torch

from conftest import launch
from trec_accel.benchmark import table


def test_table_shows_each_scoring_variant_at_its_fastest_batch():
    e = {"generate_questions_per_s": 1.25, "score_questions_per_s": 625.0, "score_seconds_for_test": 0.8,
         "eval_batch": "256/16384", "n_test": 500, "speedup": 500.0,
         "fused_seconds_by_batch": {"128/16384": 0.8, "256/16384": 0.75}, "merged_seconds_by_batch": {},
         "dequantized_merged_seconds_by_batch": {"128/16384": 0.6, "256/16384": 0.55}}
    rows = [r for r in table({"coarse/eval": e}).splitlines() if "eval: the same" in r]
    assert rows == [
        "| coarse | eval: the same, LoRA layers fused in groups (batch/tokens 256/16384), 500 questions in 0.75 s "
        "| 667 q/s | | | | x533 vs generate |",
        "| coarse | eval: the same, 4-bit base dequantized, adapter merged into the weights (batch/tokens 256/16384), "
        "500 questions in 0.55 s | 909 q/s | | | | x727 vs generate |"]


def test_a_variant_given_twice_keeps_both_runs(monkeypatch, tmp_path):
    """`--c-variants "" ""` measures a host's first and second run of the same setting: both get their row."""
    import argparse

    from trec_accel import benchmark
    seconds = iter([25.0, 20.0])
    monkeypatch.setattr(benchmark, "_train_process", lambda args, overrides, out: (
        {"sequences": 4864, "train_seconds": next(seconds), "first_step_seconds": 3.0, "global_batch": 256,
         "peak_mem_gib": 10.0}, 30.0))
    args = argparse.Namespace(batch=[256], c_variants=["", ""], config="c.yaml", model="m", data="d", checkpointing=1,
                              c_overrides=[], out_dir=str(tmp_path))
    results = {"coarse/mean_sequence_tokens": 20.0}
    benchmark.trec_accel_setup(args, "coarse", 4907, 20.0, results)
    assert [round(results[k]["sequences_per_s"], 1) for k in ("coarse/c/256", "coarse/c/256 (run 2)")] == [194.6, 243.2]
    rows = [r.split(" | ")[1] for r in table(results).splitlines() if "(c)" in r and "without" not in r]
    assert rows == ["(c) trec-accel, batch 256", "(c) trec-accel, batch 256 (run 2)"]
    steady = [r for r in table(results).splitlines() if "(c)" in r and "without" in r]
    assert len(steady) == 2 and all("train.py 30.0 s" in r for r in steady)  # the whole process, loading included


@pytest.mark.skipif(torch.cuda.is_available(), reason="they run on a GPU")
@pytest.mark.parametrize("script, args, says", [
    ("benchmark.py", [], "error: the benchmark needs a CUDA GPU"),
    ("bench_prefix_attention.py", [], "error: bench_prefix_attention.py times CUDA kernels and needs a CUDA GPU"),
    ("check_graphs.py", ["--config", "configs/tiny.yaml"], "error: CUDA graphs need a CUDA GPU")])
def test_the_gpu_only_scripts_say_so_in_one_line_on_a_cpu(script, args, says):
    r = launch(script, args, timeout=120)
    assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (2, says), r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_profile_step_ends_bad_input_in_one_line(tmp_path):
    r = launch("profile_step.py", ["--config", str(tmp_path / "missing.yaml")], timeout=120)
    assert (r.returncode, r.stderr.strip().splitlines()[-1]) == (2, f"error: config file not found: "
                                                                 f"{tmp_path / 'missing.yaml'}"), r.stderr[-2000:]
