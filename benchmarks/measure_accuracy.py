"""Measures the worst absolute error of every backend against the float64 definition.

    python benchmarks/measure_accuracy.py [--large]

Small cases are compared with the O(N²) pairwise sum; --large adds N = 100_003
compared with the float64 closed form (equal to the pairwise sum, see tests).
Prints one table row per (backend, device, dtype, case).
"""

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import monoloss_kernels as mk  # noqa: E402
from monoloss_kernels.reference import closed_form_monoscore, pairwise_monoscore  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # the tests' input makers
from tests.helpers import make_acts, make_emb  # noqa: E402

CASES = ["relu", "negative", "offset", "dead_constant"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_inputs(case, n, m, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return make_acts(case, n, m, gen), make_emb("zero_dup", n, d, gen)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="also N=100003 (float32) against the closed form")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for backend in mk.available_backends(torch.device(device)):
            for dtype in DTYPES:
                for case in CASES:
                    acts, emb = make_inputs(case, 1031, 97, 65, seed=len(rows))
                    acts, emb = acts.to(device, dtype), emb.to(device, dtype)
                    err = (mk.monoscore(acts, emb, backend=backend).double().cpu() - pairwise_monoscore(acts, emb).cpu())
                    rows.append((backend, device, str(dtype).replace("torch.", ""), case, "1031x97x65",
                                 err.nan_to_num(0).abs().max().item()))
            if args.large and not (backend == "triton" and device == "cpu"):
                for case in ["relu", "offset"]:
                    acts, emb = make_inputs(case, 100_003, 33, 65, seed=len(rows))
                    acts, emb = acts.to(device, torch.float32), emb.to(device, torch.float32)
                    err = mk.monoscore(acts, emb, backend=backend).double().cpu() - closed_form_monoscore(acts, emb).cpu()
                    rows.append((backend, device, "float32", case, "100003x33x65", err.nan_to_num(0).abs().max().item()))
    print(f"{'backend':8} {'device':6} {'dtype':9} {'case':14} {'N x M x d':14} max|err|")
    for backend, device, dtype, case, shape, err in rows:
        print(f"{backend:8} {device:6} {dtype:9} {case:14} {shape:14} {err:.2e}")


if __name__ == "__main__":
    main()
