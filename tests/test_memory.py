"""Out of GPU memory ends in one line naming the batch and the settings that lower memory, exit code 2."""
import pytest
import torch

from trec_accel import cli
from trec_accel.memory import EVAL_MEMORY_SETTINGS, INFERENCE_MEMORY_SETTINGS, OutOfMemory, out_of_memory


def test_out_of_memory_names_the_batch_and_the_settings(capsys):
    def body():
        with out_of_memory("training", "a smaller train.batch_size", lambda: (256, 64, 4, 140), training=True):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert cli.main(body) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: CUDA out of memory in training at a micro-batch of 256 x 64 tokens "
                          "(4 label slots, 140 shared prefix tokens)")
    assert "set a smaller train.batch_size" in err and "resume=latest" in err and "\n" not in err
    with pytest.raises(OutOfMemory, match="in evaluation; to use less, set a smaller eval.max_batch_tokens") as e:
        with out_of_memory("evaluation", INFERENCE_MEMORY_SETTINGS):
            raise torch.OutOfMemoryError("CUDA out of memory")
    assert "eval.dequantize=off" in str(e.value) and "resume=latest" not in str(e.value)  # evaluation keeps nothing
    # Validation during training scores the model being trained: its base is never dequantized.
    assert "dequantize" not in EVAL_MEMORY_SETTINGS
    with out_of_memory("evaluation", EVAL_MEMORY_SETTINGS):  # other errors and success pass through untouched
        pass
    with pytest.raises(ValueError):
        with out_of_memory("evaluation", EVAL_MEMORY_SETTINGS):
            raise ValueError("not memory")
