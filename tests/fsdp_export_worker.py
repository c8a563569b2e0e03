"""Run by tests/test_fsdp_export.py under torch.distributed.run (2 CPU processes, gloo): LoRA weights gathered
from FSDP-1 FULL_SHARD units equal those of the same training without FSDP."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from trec_accel.batching import Encoder, collate
from trec_accel.config import load_config
from trec_accel.loss import LabelLoss, batch_loss
from trec_accel.model import add_lora, check_adapter_weights, fsdp_lora_state_dict, load_tokenizer, write_adapter
from trec_accel.task import COARSE


def build(path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return add_lora(model, load_config(None, ["model.name=tiny-random-mistral", "lora.dropout=0"]), sharded=True)


def train(loss_model, batch, steps=3):
    opt = torch.optim.AdamW([p for p in loss_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss, n = batch_loss(loss_model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()


def main(path, out):
    from peft.utils.other import fsdp_auto_wrap_policy
    dist.init_process_group("gloo")
    tok = load_tokenizer(path)
    enc = Encoder(tok, COARSE, "notebook")
    batch = collate([enc.encode(q, i % 6) for i, q in enumerate(["Who wrote Hamlet ?", "What is a sonnet ?"])],
                    tok.pad_token_id)
    reference = build(path)
    train(LabelLoss(reference), batch)
    model = build(path)
    wrapped = FSDP(LabelLoss(model), auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=False,
                   device_id=torch.device("cpu"))
    train(wrapped, batch)  # both ranks see the same batch: the averaged gradient is the single-process one
    got = fsdp_lora_state_dict(wrapped)
    want = {"model." + n: p.detach() for n, p in reference.named_parameters() if "lora_" in n}
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:4]
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-6, msg=k)
    assert any(v.any() for k, v in got.items() if "lora_B" in k)
    if dist.get_rank() == 0:  # the adapter written from the FSDP-wrapped model loads back with every weight
        from peft import PeftModel
        folder = Path(out) / "adapter"
        write_adapter(model, {k[len("model."):]: v for k, v in got.items()}, folder, "tiny-random-mistral")
        loaded = PeftModel.from_pretrained(build(path).get_base_model(), str(folder))
        check_adapter_weights(loaded, folder)
        back = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
        assert len(back) == len(want)
        for n, p in back.items():
            torch.testing.assert_close(p, want["model." + n], rtol=1e-4, atol=1e-6, msg=n)
    print(f"rank {dist.get_rank()}: {len(got)} LoRA tensors match", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
