r"""The sufficient statistics of MonoScore, and `finalize`, which turns them into scores.

Definition (A: N x M activations, E: N x d embeddings):

    ã[n,k] = (A[n,k] - min_n A[:,k]) / (max_n A[:,k] - min_n A[:,k])
    s[n,m] = cos(E[n], E[m])            (0 where either row has zero norm)
    MS[k]  = Σ_{n<m} ã[n,k] ã[m,k] s[n,m] / Σ_{n<m} ã[n,k] ã[m,k]

With Ê the unit rows (zero rows stay zero) and w[n] = ‖Ê[n]‖² ∈ {0, 1}:

    2·numerator   = ‖Σ_n Ê[n] ã[n,k]‖² - Σ_n w[n] ã[n,k]²
    2·denominator = (Σ_n ã[n,k])² - Σ_n ã[n,k]²

Both are homogeneous of degree 2 in ã, so the scale 1/(max - min) cancels and
ã may be replaced by a - min. The min is not known until the whole batch has
been read, so the kernels accumulate sums of b = a - shift for a shift known up
front and `finalize` moves them to a - min in closed form, with δ = min - shift.
The shift keeps b small for latents far from 0 (the GPU kernels use the first
row; the CPU one uses 0 and recomputes such latents at their min):

    Σ (a - min)   = Σ b - N δ
    Σ (a - min)²  = Σ b² - 2 δ Σ b + N δ²
    Σ Ê (a - min) = Σ Ê b - δ Σ Ê

Every backend (C++ CPU, CUDA, Triton, plain torch) fills the same
`MonoScoreStats`; the statistics of disjoint row sets are additive once
expressed with a common shift.
"""

from typing import NamedTuple

import torch
from torch import Tensor

# A latent is undefined (NaN) when its denominator is zero: it is constant, or
# fewer than two samples sit above its minimum. The denominator is computed
# from float64 sums whose rounding is about N·2^-52·(Σã)², so "zero" means
# below DEN_RTOL·N·(Σã)² -- far under any real pair's weight at float32 input.
DEN_RTOL = 32 * torch.finfo(torch.float64).eps
# Rows per float32 product in the plain-torch statistics (see torch_monoscore_stats).
TORCH_ROWS_PER_PRODUCT = 8192


class MonoScoreStats(NamedTuple):
    """Additive statistics of a batch; b = acts - shift, Ê = unit rows of emb."""

    cross: Tensor  # (d, M) float32: Σ_n Ê[n] b[n, :]
    unit_emb_sum: Tensor  # (d,) float64: Σ_n Ê[n]
    shift: Tensor  # (M,) float32: the per-latent shift (each backend's choice, see above)
    act_range: Tensor  # (2, M) float32: per-latent min, max
    moments: Tensor  # (4, M) float64: Σb, Σb², and both over zero-norm embedding rows
    counts: Tensor  # (2,) float64: N, number of nonzero-norm embedding rows


def _reshift_moments(stats: MonoScoreStats, delta: Tensor) -> Tensor:
    """(4, M) float64 moments of b - delta."""
    num_rows, num_unit_rows = stats.counts[0], stats.counts[1]
    num_zero_rows = num_rows - num_unit_rows
    sum_b, sumsq_b, zero_sum_b, zero_sumsq_b = stats.moments.unbind(0)
    return torch.stack([
        sum_b - num_rows * delta,
        sumsq_b - 2 * delta * sum_b + num_rows * delta * delta,
        zero_sum_b - num_zero_rows * delta,
        zero_sumsq_b - 2 * delta * zero_sum_b + num_zero_rows * delta * delta,
    ])


def reshift(stats: MonoScoreStats, shift: Tensor) -> MonoScoreStats:
    """The same statistics expressed with another per-latent shift (float64 result).

    With δ = shift - stats.shift, b' = b - δ, so Σb' = Σb - Nδ,
    Σb'² = Σb² - 2δΣb + Nδ² (likewise over zero-norm rows) and
    Σ Ê b' = Σ Ê b - δ Σ Ê. Differentiable in every input.
    """
    shift = shift.double()
    delta = shift - stats.shift.double()  # (M,)
    cross = stats.cross.double() - stats.unit_emb_sum[:, None] * delta[None, :]
    return stats._replace(cross=cross, shift=shift, moments=_reshift_moments(stats, delta))


def finalize(stats: MonoScoreStats) -> Tensor:
    """MonoScore per latent, (M,) float32, NaN where undefined. Differentiable.

    Works at the shift b = a - min (= ã·(max - min)). Σ Ê b is formed in the
    float32 of `cross` (the shift is at most a few ranges, so nothing cancels;
    the expanded ‖cross‖² - 2δΣêᵀcross + δ²‖Σê‖² would), and its norm taken
    in float32 (relative error ~1e-7, well inside the 2e-5 bound on scores).
    """
    act_min, act_max = stats.act_range[0], stats.act_range[1]
    delta = act_min.double() - stats.shift.double()  # (M,)
    sum_a, sumsq_a, _, zero_sumsq_a = _reshift_moments(stats, delta).unbind(0)
    dtype = stats.cross.dtype
    cross_at_min = torch.addr(stats.cross, stats.unit_emb_sum.to(dtype), delta.to(dtype), alpha=-1)
    cross_at_min_sq = torch.linalg.vector_norm(cross_at_min, dim=0).double() ** 2
    numerator = cross_at_min_sq - (sumsq_a - zero_sumsq_a)
    denominator = sum_a * sum_a - sumsq_a
    num_rows = stats.counts[0]
    defined = (act_max > act_min) & (denominator > DEN_RTOL * num_rows * sum_a * sum_a)
    safe_denominator = torch.where(defined, denominator, torch.ones_like(denominator))
    score = torch.where(defined, numerator / safe_denominator, torch.full_like(numerator, float("nan")))
    return score.float()


def row_inv_norm(emb: Tensor) -> Tensor:
    """1/‖emb[n]‖ as float32: 0 for zero rows, NaN where the norm is not finite in
    float32 (NaN/Inf values or overflow), so that unit_emb_sum exposes bad rows."""
    norm_dtype = torch.promote_types(emb.dtype, torch.float32)
    norm = torch.linalg.vector_norm(emb, dim=1, dtype=norm_dtype).float()
    inv_norm = torch.where(norm > 0, norm.reciprocal(), torch.zeros_like(norm))
    return inv_norm.masked_fill(norm.isinf(), float("nan"))


def empty_stats_like(acts: Tensor, emb: Tensor) -> MonoScoreStats:
    """Outputs of the statistics op for these inputs, uninitialised (also the fake impl)."""
    num_latents, dim = acts.shape[1], emb.shape[1]
    f32 = dict(device=acts.device, dtype=torch.float32)
    f64 = dict(device=acts.device, dtype=torch.float64)
    return MonoScoreStats(
        cross=acts.new_empty((dim, num_latents), **f32),
        unit_emb_sum=acts.new_empty((dim,), **f64),
        shift=acts.new_empty((num_latents,), **f32),
        act_range=acts.new_empty((2, num_latents), **f32),
        moments=acts.new_empty((4, num_latents), **f64),
        counts=acts.new_empty((2,), **f64),
    )


def torch_monoscore_stats(acts: Tensor, emb: Tensor) -> MonoScoreStats:
    """The statistics in plain torch: the readable specification of the contract.

    Materialises a float32 and a float64 copy of acts, so it is the slow path;
    the C++/CUDA/Triton kernels compute the same numbers in one pass.
    """
    inv_norm = row_inv_norm(emb)
    unit_emb = emb.float() * inv_norm[:, None]  # (N, d)
    shift = acts[0].to(torch.float32, copy=True)  # must not alias acts
    shifted = acts.float() - shift  # (N, M): b
    zero_rows = inv_norm == 0
    b = acts.double() - shift.double()  # exact for float32 inputs
    b_zero = b[zero_rows]
    moments = torch.stack([b.sum(0), (b * b).sum(0), b_zero.sum(0), (b_zero * b_zero).sum(0)])
    counts = torch.stack([torch.tensor(float(acts.shape[0]), device=acts.device), (~zero_rows).sum().double()])
    # float32 products over row blocks, summed in float64: one float32 accumulation
    # over all N rows (cuBLAS, N = 65536) drifts past the 2e-5 bound.
    cross = sum(
        (unit_emb[n0 : n0 + TORCH_ROWS_PER_PRODUCT].T @ shifted[n0 : n0 + TORCH_ROWS_PER_PRODUCT]).double()
        for n0 in range(0, acts.shape[0], TORCH_ROWS_PER_PRODUCT)
    )
    return MonoScoreStats(
        cross=cross.float(),
        unit_emb_sum=unit_emb.sum(0, dtype=torch.float64),
        shift=shift,
        act_range=torch.stack([acts.amin(0), acts.amax(0)]).float(),
        moments=moments,
        counts=counts.double(),
    )
