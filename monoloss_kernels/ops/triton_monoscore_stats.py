"""MonoScore statistics in one Triton kernel, registered as a torch.library.triton_op.

One program owns a (BLOCK_D x BLOCK_M) tile of `cross` and a range of rows; it
streams acts and emb through in BLOCK_N-row steps, shifts acts by acts[0],
scales emb rows to unit norm on the fly and accumulates ÊᵀB on the tensor
cores. The programs of the first d-tile also reduce the per-latent min/max and
float64 moments of the rows they read, so acts is read from DRAM once: the
other d-tiles of the same latent block run next to them and hit L2.

Precision: "tf32x3" (split TF32, three tensor-core products) keeps float32
accuracy; plain TF32 would not meet the 2e-5 bound. Under TRITON_INTERPRET=1
(CPU) the dot is evaluated in float32 ("ieee").
"""

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..stats import MonoScoreStats, empty_stats_like, row_inv_norm

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class KernelConfig(NamedTuple):
    block_d: int  # rows of the cross tile (embedding dims) per program
    block_m: int  # latents per program
    block_n: int  # rows (samples) per step
    num_warps: int
    num_stages: int
    rows_per_split: int  # bounds each float32 accumulation; more programs for small d x M
    dot_precision: str  # tl.dot input_precision: "tf32x3" (split TF32, float32-accurate) or "ieee"


# GPU tiles: the fastest tf32x3 candidate of benchmarks/tune_triton.py on an
# H200 (N=65536, M=8192, d=768): 128x64 over 4 warps, 33 ms (128x128 over 8
# warps: 42 ms). A bf16x6 split ran faster (24 ms) but was not float32-accurate
# on the GPU (1.3e-4; benchmarks/results/NVIDIA-H200/run3), so it is not used.
# The interpreter runs programs one by one on numpy: small tiles, few programs.
GPU_CONFIG = KernelConfig(
    block_d=128, block_m=64, block_n=32, num_warps=4, num_stages=3, rows_per_split=16384,
    dot_precision="tf32x3",
)
INTERPRETER_CONFIG = KernelConfig(
    block_d=32, block_m=32, block_n=32, num_warps=1, num_stages=1, rows_per_split=16384,
    dot_precision="ieee",
)
CONFIG = INTERPRETER_CONFIG if INTERPRET else GPU_CONFIG


@triton.jit
def _monoscore_stats_kernel(
    acts_ptr, emb_ptr, inv_norm_ptr, shift_ptr,
    cross_ptr, moments_ptr, range_ptr,  # partials: (splits, d, M), (splits, 4, M), (splits, 2, M)
    N, M, D, num_d_tiles, rows_per_split,
    stride_an, stride_am, stride_en, stride_ed,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1).to(tl.int64)
    # d-tiles vary fastest, so the programs sharing a latent block run together.
    pid_m = pid // num_d_tiles
    pid_d = pid % num_d_tiles
    # int64 offsets: offs * stride overflows int32 for strided inputs past 2^31 elements.
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    m_mask = offs_m < M
    d_mask = offs_d < D
    shift = tl.load(shift_ptr + offs_m, mask=m_mask, other=0.0)

    acc = tl.zeros((BLOCK_D, BLOCK_M), dtype=tl.float32)
    sum_b = tl.zeros((BLOCK_M,), dtype=tl.float64)
    sumsq_b = tl.zeros((BLOCK_M,), dtype=tl.float64)
    zero_sum_b = tl.zeros((BLOCK_M,), dtype=tl.float64)
    zero_sumsq_b = tl.zeros((BLOCK_M,), dtype=tl.float64)
    act_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    act_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)

    row_begin = split * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, N)
    for n0 in range(row_begin, row_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = offs_n < row_end
        tile_mask = n_mask[:, None] & m_mask[None, :]
        a = tl.load(acts_ptr + offs_n[:, None] * stride_an + offs_m[None, :] * stride_am,
                    mask=tile_mask, other=0.0).to(tl.float32)
        b = tl.where(tile_mask, a - shift[None, :], 0.0)  # (BLOCK_N, BLOCK_M)
        inv_norm = tl.load(inv_norm_ptr + offs_n, mask=n_mask, other=0.0)
        unit_emb = tl.load(emb_ptr + offs_n[:, None] * stride_en + offs_d[None, :] * stride_ed,
                           mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        unit_emb = unit_emb * inv_norm[:, None]  # (BLOCK_N, BLOCK_D)
        acc = tl.dot(tl.trans(unit_emb), b, acc, input_precision=DOT_PRECISION)
        if pid_d == 0:
            b64 = b.to(tl.float64)
            sum_b += tl.sum(b64, axis=0)
            sumsq_b += tl.sum(b64 * b64, axis=0)
            zero_row = (inv_norm == 0.0) & n_mask
            b64_zero = tl.where(zero_row[:, None], b64, 0.0)
            zero_sum_b += tl.sum(b64_zero, axis=0)
            zero_sumsq_b += tl.sum(b64_zero * b64, axis=0)
            act_min = tl.minimum(act_min, tl.min(tl.where(tile_mask, a, float("inf")), axis=0))
            act_max = tl.maximum(act_max, tl.max(tl.where(tile_mask, a, float("-inf")), axis=0))

    cross_out = cross_ptr + split * D * M + offs_d[:, None] * M + offs_m[None, :]
    tl.store(cross_out, acc, mask=d_mask[:, None] & m_mask[None, :])
    if pid_d == 0:
        moments_out = moments_ptr + split * 4 * M + offs_m
        tl.store(moments_out, sum_b, mask=m_mask)
        tl.store(moments_out + M, sumsq_b, mask=m_mask)
        tl.store(moments_out + 2 * M, zero_sum_b, mask=m_mask)
        tl.store(moments_out + 3 * M, zero_sumsq_b, mask=m_mask)
        range_out = range_ptr + split * 2 * M + offs_m
        tl.store(range_out, act_min, mask=m_mask)
        tl.store(range_out + M, act_max, mask=m_mask)


def stats_with_config(acts: torch.Tensor, emb: torch.Tensor, config: KernelConfig, launch=lambda kernel: kernel):
    """The statistics tuple of (acts, emb) computed with `config`; `launch` wraps the
    kernel (`wrap_triton` inside the op, so torch.compile can trace the launch)."""
    num_rows, num_latents = acts.shape
    dim = emb.shape[1]
    inv_norm = row_inv_norm(emb)
    shift = acts[0].to(torch.float32, copy=True)  # must not alias acts
    num_splits = triton.cdiv(num_rows, config.rows_per_split)
    f32 = dict(device=acts.device, dtype=torch.float32)
    cross_partial = torch.empty((num_splits, dim, num_latents), **f32)
    moments_partial = torch.empty((num_splits, 4, num_latents), device=acts.device, dtype=torch.float64)
    range_partial = torch.empty((num_splits, 2, num_latents), **f32)
    if num_latents > 0:
        num_d_tiles = max(triton.cdiv(dim, config.block_d), 1)  # d = 0 still needs the moments
        grid = (triton.cdiv(num_latents, config.block_m) * num_d_tiles, num_splits)
        launch(_monoscore_stats_kernel)[grid](
            acts, emb, inv_norm, shift,
            cross_partial, moments_partial, range_partial,
            num_rows, num_latents, dim, num_d_tiles, config.rows_per_split,
            acts.stride(0), acts.stride(1), emb.stride(0), emb.stride(1),
            BLOCK_N=config.block_n, BLOCK_D=config.block_d, BLOCK_M=config.block_m,
            DOT_PRECISION=config.dot_precision, num_warps=config.num_warps, num_stages=config.num_stages,
        )
    unit_emb_sum = (emb.float() * inv_norm[:, None]).sum(0, dtype=torch.float64)
    counts = torch.stack([
        torch.full((), num_rows, device=acts.device, dtype=torch.float64),
        (inv_norm > 0).sum().double(),
    ])
    return (
        cross_partial.sum(0),
        unit_emb_sum,
        shift,
        torch.stack([range_partial[:, 0].amin(0), range_partial[:, 1].amax(0)]),
        moments_partial.sum(0),
        counts,
    )


@triton_op("monoloss_kernels::monoscore_stats_triton", mutates_args=())
def monoscore_stats_triton(
    acts: torch.Tensor, emb: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`MonoScoreStats` of (acts, emb) computed by `_monoscore_stats_kernel`."""
    return stats_with_config(acts, emb, CONFIG, launch=wrap_triton)


@monoscore_stats_triton.register_fake
def _(acts, emb):
    return tuple(empty_stats_like(acts, emb))


def triton_stats(acts: torch.Tensor, emb: torch.Tensor) -> MonoScoreStats:
    return MonoScoreStats(*torch.ops.monoloss_kernels.monoscore_stats_triton(acts, emb))
