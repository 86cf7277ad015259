"""Times the Triton statistics kernel under several tile configurations on a GPU,
next to the ceilings (bare float32 GEMM, TF32 GEMM) and the published algorithm.

    python benchmarks/tune_triton.py [--n 65536 --m 8192 --d 768]

Every configuration's scores are checked against the default's before timing.
"""

import argparse

import torch
import triton

import monoloss_kernels as mk
from monoloss_kernels.ops.triton_monoscore_stats import GPU_CONFIG, KernelConfig, stats_with_config
from monoloss_kernels.reference import closed_form_monoscore, published_monoscore
from monoloss_kernels.stats import MonoScoreStats, finalize

# Measured on an H200 (2026-11-27, tf32x3), ms: 128x128/8 warps 42, 128x64/4 warps 33
# (the default), 64x64/4 warps 39, 256x64/8 warps 41 (benchmarks/results/NVIDIA-H200/).
CANDIDATES = [
    GPU_CONFIG,
    GPU_CONFIG._replace(block_m=128, num_warps=8),
    GPU_CONFIG._replace(block_d=64),
    GPU_CONFIG._replace(num_stages=4),
    GPU_CONFIG._replace(block_n=16, num_stages=4),
]


def median_ms(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--m", type=int, default=8192)
    parser.add_argument("--d", type=int, default=768)
    args = parser.parse_args()
    torch.manual_seed(0)
    acts = torch.relu(torch.randn(args.n, args.m, device="cuda"))
    # A shared direction, as in CLIP features: large scores expose inexact products.
    emb = torch.randn(args.n, args.d, device="cuda") + 0.7 * torch.randn(1, args.d, device="cuda")
    unit_emb = torch.nn.functional.normalize(emb, dim=1)
    reference = closed_form_monoscore(acts, emb)  # float64: independent of every candidate
    rows = [("peer (published)", median_ms(lambda: published_monoscore(acts, emb)))]
    rows.append(("fp32 GEMM", median_ms(lambda: unit_emb.T @ acts)))
    torch.backends.cuda.matmul.allow_tf32 = True
    rows.append(("tf32 GEMM (inexact)", median_ms(lambda: unit_emb.T @ acts)))
    torch.backends.cuda.matmul.allow_tf32 = False
    if "cuda" in mk.available_backends(acts.device):
        rows.append(("cuda backend", median_ms(lambda: mk.monoscore(acts, emb, backend="cuda"))))
    for config in CANDIDATES:
        name = "triton " + ",".join(str(v) for v in config)
        try:
            scores = finalize(MonoScoreStats(*stats_with_config(acts, emb, config)))
            err = (scores.double() - reference).abs().nan_to_num(0).max().item()
            if err > 2e-5:
                rows.append((name + f" WRONG err={err:.1e}", float("nan")))
                continue
            rows.append((name, median_ms(lambda: stats_with_config(acts, emb, config))))
        except Exception as exc:  # a config may not fit the chip (shared memory, registers)
            rows.append((name + f" failed: {type(exc).__name__}", float("nan")))
    print(f"N={args.n} M={args.m} d={args.d} on {torch.cuda.get_device_name()}")
    print("fields: " + ",".join(KernelConfig._fields))
    for name, ms in rows:
        print(f"{name:55} {ms:9.3f} ms")


if __name__ == "__main__":
    main()
