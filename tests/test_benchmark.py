"""scripts/benchmark.py's table: every timed scoring variant gets its row (the timings themselves need a GPU)."""
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
