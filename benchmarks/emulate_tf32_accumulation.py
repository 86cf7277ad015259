"""CPU emulation of why split-TF32 products lose float32 accuracy on Hopper tensor cores,
and what keeps it (no GPU needed).

    python -m benchmarks.emulate_tf32_accumulation [--shape N,M,d] [--chunks 256,1024,N]

On an H200 (benchmarks/results/NVIDIA-H200/run6-suite and run7-split-gemm), 3xTF32 through
cuBLAS was off by 2.9e-4 in the scores at N=65536 although every product of TF32 parts is
exact, and a kernel summing 1024-row products in float32 was 2.8e-5 off on embeddings that
share a direction. The model here: the accumulator adds each k-step of 8 exact products and
is truncated toward zero to float32 (what the measured errors suggest; not documented by the
vendor). Truncation errs the same way at every step while the products share a sign, so
the error grows with the rows per product. Centering the unit embeddings first,
cross = (Ê - μ)ᵀ b + μ Σb (exact in closed form), gives the products mixed signs.

Prints max |Δscore| against a float64 cross for the main term emulated (the correction
terms exact), uncentered and centered, per chunk length (rows per product).
"""

import argparse

import numpy as np
import torch

from benchmarks.common import make_embeddings
from benchmarks.probe_split_gemm import scores_from_cross

K_STEP = 8  # rows per TF32 MMA k-step (m64nNk8 on Hopper)


def tf32_truncate(x: np.ndarray) -> np.ndarray:
    return (x.view(np.int32) & np.int32(~0x1FFF)).view(np.float32)


def to_float32_toward_zero(x: np.ndarray) -> np.ndarray:
    rounded = x.astype(np.float32)
    away = np.abs(rounded.astype(np.float64)) > np.abs(x)
    rounded[away] = np.nextafter(rounded[away], np.float32(0))
    return rounded


def truncating_product(e: np.ndarray, a: np.ndarray, chunk: int) -> np.ndarray:
    """eᵀa with a float32 accumulator truncated after each k-step, one per `chunk` rows,
    the chunks summed exactly."""
    total = np.zeros((e.shape[1], a.shape[1]))
    for begin in range(0, e.shape[0], chunk):
        acc = np.zeros((e.shape[1], a.shape[1]), np.float32)
        for step in range(begin, min(begin + chunk, e.shape[0]), K_STEP):
            exact = e[step:step + K_STEP].astype(np.float64).T @ a[step:step + K_STEP].astype(np.float64)
            acc = to_float32_toward_zero(acc.astype(np.float64) + exact)
        total += acc
    return total


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="2048,256,256", help="N,M,d")
    parser.add_argument("--chunks", default="256,1024,2048", help="rows per product")
    args = parser.parse_args()
    num_rows, num_latents, dim = (int(x) for x in args.shape.split(","))
    gen = torch.Generator().manual_seed(0)
    emb = make_embeddings(num_rows, dim, gen, "cpu")  # Gaussian plus one shared direction
    acts = torch.randn(num_rows, num_latents, generator=gen).relu_()
    unit = emb / emb.norm(dim=1, keepdim=True)
    unit64, acts64 = unit.double(), acts.double()
    shift64 = acts64[0]
    exact = scores_from_cross(unit64.T @ (acts64 - shift64), acts64, shift64, unit64)
    shifted = (acts - acts[0]).numpy()
    a_hi = tf32_truncate(shifted)
    print(f"N={num_rows}, M={num_latents}, d={dim}: max |Δscore| of the emulated split-TF32 cross")
    for centered in (False, True):
        mean = unit.numpy().mean(0, keepdims=True) if centered else np.zeros((1, dim), np.float32)
        e = (unit.numpy() - mean).astype(np.float32)
        e_hi = tf32_truncate(e)
        corrections = ((e - e_hi).astype(np.float64).T @ a_hi.astype(np.float64)
                       + e_hi.astype(np.float64).T @ (shifted - a_hi).astype(np.float64))
        mean_term = mean.astype(np.float64).T @ shifted.astype(np.float64).sum(0, keepdims=True)
        for chunk in (int(x) for x in args.chunks.split(",")):
            cross = truncating_product(e_hi, a_hi, chunk) + corrections + mean_term
            err = (scores_from_cross(torch.from_numpy(cross), acts64, shift64, unit64) - exact).abs()
            print(f"  {'centered' if centered else 'uncentered':10s} {chunk:6d} rows per product: "
                  f"{err.nan_to_num(0).max().item():.2e}")


if __name__ == "__main__":
    main()
