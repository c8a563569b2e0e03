#!/usr/bin/env python
"""One attention layer over a shared prefix, forward and backward, on CUDA: the prefix joined to every row and
SDPA with the query heads folded into rows (`model.prefix_attention=joined`, what `auto` runs), the grouped products
(`grouped`), and Transformers' SDPA over the joined rows (each key/value head repeated for its query heads);
milliseconds, and each output's relative error against Transformers' SDPA in fp32. The figures behind `auto`
(trec_accel/forward.py).

    python scripts/bench_prefix_attention.py                   # the 7B shape: 32 / 8 heads of 128, a 140-token prefix
    python scripts/bench_prefix_attention.py --heads 9 --kv-heads 3 --head-dim 64 --prefix 130   # SmolLM2's
"""
import argparse
import sys
import time

import torch
import torch.nn.functional as F

from trec_accel import cli
from trec_accel.forward import folded_heads_sdpa, grouped_prefix_attention, joined


def joined_sdpa(q, k, v, prefix_k, prefix_v, allow):
    """What Transformers' SDPA runs on the joined keys and values: each key/value head repeated over its group."""
    k, v = joined(prefix_k, prefix_v, k, v)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allow).transpose(1, 2)


def folded(q, k, v, prefix_k, prefix_v, allow):
    """What `model.prefix_attention=joined` runs."""
    k, v = joined(prefix_k, prefix_v, k, v)
    return folded_heads_sdpa(q, k, v, allow, 0.0, None)


def grouped(q, k, v, prefix_k, prefix_v, allow):
    return grouped_prefix_attention(q, k, v, prefix_k, prefix_v, allow, q.shape[-1] ** -0.5, 0.0)


def milliseconds(fn, inputs, n: int = 20) -> float:
    grad = torch.randn_like(fn(*inputs))
    for _ in range(3):
        fn(*inputs).backward(grad)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn(*inputs).backward(grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--prefix", type=int, default=140)
    p.add_argument("--shapes", nargs="+", default=["256x16", "256x24", "256x32", "256x40", "256x48", "32x16"],
                   help="rows x width")
    args = p.parse_args()
    cli.require_cuda("bench_prefix_attention.py times CUDA kernels and needs a CUDA GPU")
    torch.backends.cuda.enable_cudnn_sdp(False)  # as model.cudnn_attention=false
    h, h_kv, d, n_prefix = args.heads, args.kv_heads, args.head_dim, args.prefix
    print("| rows x width | joined ms | grouped ms | Transformers' SDPA ms | joined error | grouped error |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for shape in args.shapes:
        b, s = map(int, shape.split("x"))
        torch.manual_seed(0)
        full = [torch.randn(*size, device="cuda") * 2 for size in
                [(b, h, s, d), (b, h_kv, s, d), (b, h_kv, s, d), (1, h_kv, n_prefix, d), (1, h_kv, n_prefix, d)]]
        r = torch.arange(s, device="cuda")
        lengths = torch.randint(s // 2, s + 1, (b,), device="cuda")
        own = (r[None, :, None] >= r[None, None, :]) & (r[None, None, :] < lengths[:, None, None])
        allow = torch.cat([own.new_ones(b, s, n_prefix), own], 2)[:, None]
        reference = joined_sdpa(*full, allow)
        inputs = [x.bfloat16().requires_grad_() for x in full] + [allow]
        ms = [milliseconds(fn, inputs) for fn in (folded, grouped, joined_sdpa)]
        errors = [((fn(*inputs).float() - reference).norm() / reference.norm()).item() for fn in (folded, grouped)]
        print(f"| {b} x {s} | {ms[0]:.2f} | {ms[1]:.2f} | {ms[2]:.2f} | {errors[0]:.1e} | {errors[1]:.1e} |",
              flush=True)


if __name__ == "__main__":
    sys.exit(cli.main(main))
