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

Sparse activations (a TopK pair, COO, CSR; canonical form `CsrActs`) fill the
same statistics from their stored values alone, in O(nnz·d): an implicit entry
is an activation of 0, so with shift 0 it adds nothing to any sum. Shift 0
is also accurate whenever a latent has an implicit zero in the batch (then
min ≤ 0 ≤ max, so |a| ≤ max - min); a latent stored in every row of the
batch is shifted by its minimum instead, which keeps always-on latents far
from 0 exact.
"""

import contextlib
import threading
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


class CsrActs(NamedTuple):
    """Sparse (N, M) activations in compressed-row form, the canonical form of every
    sparse input; entries not stored are activations of 0. A TopK pair is the case
    crow_indices = k·arange(N + 1)."""

    crow_indices: Tensor  # (N+1,) int64: row n's entries are [crow_indices[n], crow_indices[n+1])
    col_indices: Tensor  # (nnz,) int64: the latent of each stored value, distinct within a row
    values: Tensor  # (nnz,) floating point
    num_latents: int  # M

    @property
    def num_rows(self) -> int:
        return self.crow_indices.shape[0] - 1


def entry_rows(crow_indices: Tensor, num_entries: int) -> Tensor:
    """(nnz,) int64: the row of each stored entry of a compressed-row matrix (a static
    output size, so no host sync and no data-dependent shape)."""
    num_rows = crow_indices.shape[0] - 1
    return torch.repeat_interleave(
        torch.arange(num_rows, device=crow_indices.device), crow_indices.diff(), output_size=num_entries
    )


class MonoScoreStats(NamedTuple):
    """Additive statistics of a batch; b = acts - shift, Ê = unit rows of emb."""

    cross: Tensor  # (d, M) float32: Σ_n Ê[n] b[n, :] (sparse inputs: an (M, d) buffer, transposed)
    unit_emb_sum: Tensor  # (d,) float64: Σ_n Ê[n]
    shift: Tensor  # (M,) float32: the per-latent shift (each backend's choice, see above)
    act_range: Tensor  # (2, M) float32: per-latent min, max
    moments: Tensor  # (4, M) float64: Σb, Σb², and both over zero-norm embedding rows
    counts: Tensor  # (2,) float64: N, number of nonzero-norm embedding rows


def reshift_moments(moments: Tensor, counts: Tensor, delta: Tensor) -> Tensor:
    """(4, M) float64 moments of b - delta, from those of b and the counts."""
    num_rows, num_unit_rows = counts[0], counts[1]
    num_zero_rows = num_rows - num_unit_rows
    sum_b, sumsq_b, zero_sum_b, zero_sumsq_b = moments.unbind(0)
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
    return stats._replace(cross=cross, shift=shift, moments=reshift_moments(stats.moments, stats.counts, delta))


def finalize(stats: MonoScoreStats, cross_sq_at_min: Tensor | None = None) -> Tensor:
    """MonoScore per latent, (M,) in the dtype of `cross` (float32 from every kernel;
    float64 sums give float64 scores), NaN where undefined. Differentiable; never
    writes into `stats`. `cross_sq_at_min`: ‖Σ Ê (a - min)‖² per latent where a kernel
    computed it with the statistics (see `_dispatch.loss_stats_function`), else None.

    Works at the shift b = a - min (= ã·(max - min)). ‖Σ Ê b‖² comes from
    `shifted_sq_norms`, which forms Σ Ê b = cross - δ ΣÊ in the precision of `cross`
    (the shift is at most a few ranges, so nothing cancels; the expanded
    ‖cross‖² - 2δΣêᵀcross + δ²‖Σê‖² would). The rest is one op, `finalize_scores`,
    with its own backward op.
    """
    dtype = stats.cross.dtype
    if cross_sq_at_min is None:
        act_min, act_max = stats.act_range[0], stats.act_range[1]
        delta = act_min.double() - stats.shift.double()  # (M,)
        # A constant (no gradient: the result does not depend on it); 1 for constant latents.
        act_scale = torch.where(act_max > act_min, act_max - act_min, 1.0).detach().to(dtype)  # (M,)
        cross_sq_at_min = torch.ops.monoloss_kernels.shifted_sq_norms(
            stats.cross, stats.unit_emb_sum.to(dtype), delta.to(dtype), act_scale
        )
    return torch.ops.monoloss_kernels.finalize_scores(
        stats.moments, stats.act_range, stats.shift, stats.counts, cross_sq_at_min, DEN_RTOL, dtype
    )


def score_terms(moments: Tensor, act_range: Tensor, shift: Tensor, counts: Tensor, den_rtol: float):
    """float64 per-latent terms of the score at the shift b = a - min: δ, the moments there
    (Σb, Σb², Σ over zero-norm rows of b²), the denominator and where the score is defined."""
    act_min, act_max = act_range[0], act_range[1]
    delta = act_min.double() - shift.double()
    sum_a, sumsq_a, _, zero_sumsq_a = reshift_moments(moments, counts, delta).unbind(0)
    num_rows = counts[0]
    denominator = sum_a * sum_a - sumsq_a
    defined = (act_max > act_min) & (denominator > den_rtol * num_rows * sum_a * sum_a)
    return delta, sum_a, sumsq_a, zero_sumsq_a, denominator, defined


def torch_finalize_scores(moments: Tensor, act_range: Tensor, shift: Tensor, counts: Tensor, cross_sq_at_min: Tensor,
                          den_rtol: float, out_dtype: torch.dtype) -> Tensor:
    """`finalize_scores` in plain torch, for every device (the extension replaces it on
    the CPU and CUDA)."""
    delta, sum_a, sumsq_a, zero_sumsq_a, denominator, defined = score_terms(
        moments, act_range, shift, counts, den_rtol)
    numerator = cross_sq_at_min - (sumsq_a - zero_sumsq_a)
    safe_denominator = torch.where(defined, denominator, torch.ones_like(denominator))
    return torch.where(defined, numerator / safe_denominator, float("nan")).to(out_dtype)


def torch_finalize_scores_backward(grad_scores: Tensor, moments: Tensor, act_range: Tensor, shift: Tensor,
                                   counts: Tensor, cross_sq_at_min: Tensor,
                                   den_rtol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`finalize_scores_backward` in plain torch, for every device."""
    delta, sum_a, sumsq_a, zero_sumsq_a, denominator, defined = score_terms(
        moments, act_range, shift, counts, den_rtol)
    num_rows, num_zero_rows = counts[0], counts[0] - counts[1]
    sum_b, _, zero_sum_b, _ = moments.unbind(0)
    safe_denominator = torch.where(defined, denominator, torch.ones_like(denominator))
    score = (cross_sq_at_min - (sumsq_a - zero_sumsq_a)) / safe_denominator
    grad = torch.where(defined, grad_scores.double(), 0.0)
    grad_num = grad / safe_denominator
    grad_den = -grad * score / safe_denominator
    grad_sum_a = 2 * sum_a * grad_den
    grad_sumsq_a = -grad_num - grad_den
    grad_zero_sumsq_a = grad_num
    grad_delta = (-num_rows * grad_sum_a + (2 * num_rows * delta - 2 * sum_b) * grad_sumsq_a
                  + (2 * num_zero_rows * delta - 2 * zero_sum_b) * grad_zero_sumsq_a)
    grad_moments = torch.stack([grad_sum_a - 2 * delta * grad_sumsq_a, grad_sumsq_a,
                                -2 * delta * grad_zero_sumsq_a, grad_zero_sumsq_a])
    grad_range = torch.stack([grad_delta, torch.zeros_like(grad_delta)]).to(act_range.dtype)
    return (grad_moments.to(moments.dtype), grad_range, (-grad_delta).to(shift.dtype),
            grad_num.to(cross_sq_at_min.dtype))


@torch.library.custom_op("monoloss_kernels::finalize_scores", mutates_args=())
def finalize_scores(moments: Tensor, act_range: Tensor, shift: Tensor, counts: Tensor, cross_sq_at_min: Tensor,
                    den_rtol: float, out_dtype: torch.dtype) -> Tensor:
    """(M,) scores in `out_dtype` from the statistics and ‖Σ Ê (a - min)‖² per latent:
    (‖·‖² - Σ_{unit rows} (a - min)²) / ((Σ (a - min))² - Σ (a - min)²), NaN where undefined
    (constant latents, denominators below den_rtol·N·(Σ(a - min))²), in float64.

    One op (with `finalize_scores_backward`) rather than the ~25 elementwise torch ops it
    replaces, and ~40 more in their autograd: on a GPU each is a kernel launch, and a
    MonoLoss step there was bound by the host (benchmarks/results/NVIDIA-H200/run6-suite).
    `torch_finalize_scores` serves every device; the extension registers CPU and CUDA
    kernels that replace it (csrc/finalize_math.h: the per-latent arithmetic both share).
    """
    return torch_finalize_scores(moments, act_range, shift, counts, cross_sq_at_min, den_rtol, out_dtype)


@finalize_scores.register_fake
def _(moments, act_range, shift, counts, cross_sq_at_min, den_rtol, out_dtype):
    return moments.new_empty((moments.shape[1],), dtype=out_dtype)


@torch.library.custom_op("monoloss_kernels::finalize_scores_backward", mutates_args=())
def finalize_scores_backward(grad_scores: Tensor, moments: Tensor, act_range: Tensor, shift: Tensor, counts: Tensor,
                             cross_sq_at_min: Tensor, den_rtol: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of `finalize_scores` with respect to moments, act_range (its min row;
    the max row only selects where a score is defined), shift and cross_sq_at_min, each
    in its input's dtype; zero where the score is undefined. With score = num / den,
    g_num = g / den and g_den = -g·score / den, through the moments at b = a - min
    (Σ(a - min) = Σb - Nδ, Σ(a - min)² = Σb² - 2δΣb + Nδ², likewise over zero-norm rows)
    and δ = min - shift."""
    return torch_finalize_scores_backward(grad_scores, moments, act_range, shift, counts, cross_sq_at_min, den_rtol)


@finalize_scores_backward.register_fake
def _(grad_scores, moments, act_range, shift, counts, cross_sq_at_min, den_rtol):
    return (torch.empty_like(moments), torch.empty_like(act_range), torch.empty_like(shift),
            torch.empty_like(cross_sq_at_min))


def _finalize_scores_setup_context(ctx, inputs, output):
    moments, act_range, shift, counts, cross_sq_at_min, den_rtol, _ = inputs
    ctx.save_for_backward(moments, act_range, shift, counts, cross_sq_at_min)
    ctx.den_rtol = den_rtol


def _finalize_scores_autograd(ctx, grad_scores):
    grad_moments, grad_range, grad_shift, grad_cross_sq = torch.ops.monoloss_kernels.finalize_scores_backward(
        grad_scores, *ctx.saved_tensors, ctx.den_rtol)
    needed = ctx.needs_input_grad
    return (grad_moments if needed[0] else None, grad_range if needed[1] else None,
            grad_shift if needed[2] else None, None, grad_cross_sq if needed[4] else None, None, None)


finalize_scores.register_autograd(_finalize_scores_autograd, setup_context=_finalize_scores_setup_context)


def _is_latent_major(cross: Tensor) -> bool:
    """Whether (d, M) `cross` is the transpose of a contiguous (M, d) buffer, as the
    sparse kernels write it (the C++ kernels test the same)."""
    return not cross.is_contiguous() and cross.T.is_contiguous()


def _sq_norm_chunks(cross: Tensor):
    """How shifted_sq_norms walks `cross` (d, M): (x, latent_major, slices), x being
    cross's storage order as a contiguous matrix -- cross itself, or for the sparse
    kernels' latent-major buffer its (M, d) transpose -- and slices chunks of x's rows.

    On the CPU a chunk is L2-sized (1 MiB) and each step reuses it from cache, where
    whole (d, M) temporaries cost a trip to memory each, and fresh pages: at d=768,
    M=8192 the loss's finalize forward and backward went from ~36 ms to ~10 ms. Walking
    against the storage order was 30x slower still. On a GPU, one chunk: the whole matrix.
    """
    latent_major = _is_latent_major(cross)
    x = cross.T if latent_major else cross.contiguous()
    rows = max(1, x.shape[0])  # d = 0: no chunk, and no zero step
    if x.device.type == "cpu":
        rows = max(1, 2**20 // (x.element_size() * max(x.shape[1], 1)))
    return x, latent_major, [slice(i, i + rows) for i in range(0, x.shape[0], rows)]


def torch_shifted_sq_norms(cross: Tensor, unit_emb_sum: Tensor, delta: Tensor, scale: Tensor) -> Tensor:
    """`shifted_sq_norms` in plain torch, for every device (the extension replaces it on
    the CPU): chunk by chunk of cross's storage order, squares summed in cross's dtype."""
    x, latent_major, chunks = _sq_norm_chunks(cross)
    buffer = x.new_empty((chunks[0].stop - chunks[0].start if chunks else 0, x.shape[1]))
    sq_norms = torch.zeros(cross.shape[1], device=cross.device, dtype=torch.float64)
    for rows in chunks:
        part = buffer[: x[rows].shape[0]]
        if latent_major:  # rows of x are latents
            torch.addr(x[rows], delta[rows], unit_emb_sum, alpha=-1, out=part)
            sq_norms[rows] = part.div_(scale[rows, None]).square_().sum(1)
        else:  # rows of x are embedding dims
            torch.addr(x[rows], unit_emb_sum[rows], delta, alpha=-1, out=part)
            sq_norms += part.div_(scale).square_().sum(0)
    return sq_norms * scale.double() ** 2


def torch_shifted_sq_norms_backward(grad_sq_norms: Tensor, cross: Tensor, unit_emb_sum: Tensor,
                                    delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`shifted_sq_norms_backward` in plain torch, chunk by chunk as the forward."""
    weight = (2 * grad_sq_norms).to(cross.dtype)  # (M,)
    x, latent_major, chunks = _sq_norm_chunks(cross)
    grad_x = torch.empty_like(x)
    grad_unit_emb_sum = torch.zeros_like(unit_emb_sum, dtype=cross.dtype)
    grad_delta = torch.zeros_like(delta, dtype=cross.dtype)
    for rows in chunks:
        part = grad_x[rows]
        if latent_major:
            torch.addr(x[rows], delta[rows], unit_emb_sum, alpha=-1, out=part)
            part.mul_(weight[rows, None])
            grad_unit_emb_sum -= delta[rows] @ part
            grad_delta[rows] = -(part @ unit_emb_sum)
        else:
            torch.addr(x[rows], unit_emb_sum[rows], delta, alpha=-1, out=part)
            part.mul_(weight)
            grad_unit_emb_sum[rows] = -(part @ delta)
            grad_delta -= unit_emb_sum[rows] @ part
    return (grad_x.T if latent_major else grad_x), grad_unit_emb_sum, grad_delta


@torch.library.custom_op("monoloss_kernels::shifted_sq_norms", mutates_args=())
def shifted_sq_norms(cross: Tensor, unit_emb_sum: Tensor, delta: Tensor, scale: Tensor) -> Tensor:
    """(M,) float64: ‖cross[:, k] - unit_emb_sum · delta[k]‖², for cross (d, M) and
    unit_emb_sum (d,), delta, scale (M,) in cross's dtype.

    Each shifted column is divided by scale[k] (the latent's range) before it is
    squared: then its entries are at most N in size, so float32 squares cannot
    overflow whatever the activations' scale. The result does not depend on scale,
    which gets no gradient.

    `torch_shifted_sq_norms` serves every device; the extension registers a CPU kernel
    for this op and for `shifted_sq_norms_backward` that replaces it
    (csrc/cpu/shifted_sq_norms_cpu.cpp: one pass over cross, squares summed in float64).
    """
    return torch_shifted_sq_norms(cross, unit_emb_sum, delta, scale)


@shifted_sq_norms.register_fake
def _(cross, unit_emb_sum, delta, scale):
    return cross.new_empty((cross.shape[1],), dtype=torch.float64)


@torch.library.custom_op("monoloss_kernels::shifted_sq_norms_backward", mutates_args=())
def shifted_sq_norms_backward(grad_sq_norms: Tensor, cross: Tensor, unit_emb_sum: Tensor,
                              delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `shifted_sq_norms` with respect to cross (in cross's storage
    order), unit_emb_sum and delta, in cross's dtype. With c = cross - unit_emb_sum ⊗
    delta and g = grad_sq_norms: 2 g c, -(2 g c) delta and -unit_emb_sumᵀ (2 g c)."""
    return torch_shifted_sq_norms_backward(grad_sq_norms, cross, unit_emb_sum, delta)


@shifted_sq_norms_backward.register_fake
def _(grad_sq_norms, cross, unit_emb_sum, delta):
    grad_cross = cross.new_empty(cross.shape[::-1]).T if _is_latent_major(cross) else cross.new_empty(cross.shape)
    return (grad_cross, unit_emb_sum.new_empty(unit_emb_sum.shape, dtype=cross.dtype),
            delta.new_empty(delta.shape, dtype=cross.dtype))


def _shifted_sq_norms_setup_context(ctx, inputs, output):
    cross, unit_emb_sum, delta, _ = inputs
    ctx.save_for_backward(cross, unit_emb_sum, delta)


def _shifted_sq_norms_autograd(ctx, grad_sq_norms):
    grads = torch.ops.monoloss_kernels.shifted_sq_norms_backward(grad_sq_norms, *ctx.saved_tensors)
    return *(grad if needed else None for grad, needed in zip(grads, ctx.needs_input_grad)), None


shifted_sq_norms.register_autograd(_shifted_sq_norms_autograd, setup_context=_shifted_sq_norms_setup_context)


_ieee_lock = threading.Lock()
_ieee_depth = 0  # live ieee_float32_matmuls contexts, all threads
_ieee_saved: list = []  # (settings object, its precision) switched by the outermost


@contextlib.contextmanager
def ieee_float32_matmuls():
    """Float32 products in IEEE float32 inside, whatever the caller's
    torch.set_float32_matmul_precision or fp32_precision say ("high" lets cuBLAS use
    TF32, "medium" lets oneDNN use bf16 on CPUs with AMX; either breaks the accuracy
    bound). The Python side of csrc's IeeeFloat32Matmuls: the settings are
    process-wide, so they are switched while any context lives and then restored."""
    global _ieee_depth
    with _ieee_lock:
        if _ieee_depth == 0:
            _ieee_saved.clear()
            for settings in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul):
                if settings.fp32_precision in ("tf32", "bf16"):
                    _ieee_saved.append((settings, settings.fp32_precision))
                    settings.fp32_precision = "ieee"
        _ieee_depth += 1
    try:
        yield
    finally:
        with _ieee_lock:
            _ieee_depth -= 1
            if _ieee_depth == 0:
                for settings, precision in _ieee_saved:
                    settings.fp32_precision = precision


@torch.library.custom_op("monoloss_kernels::ieee_matmul", mutates_args=())
def ieee_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a @ b in IEEE float32 (see ieee_float32_matmuls): an op, so that torch.compile
    keeps the precision switch out of its graphs."""
    with ieee_float32_matmuls():
        return a @ b


@ieee_matmul.register_fake
def _(a, b):
    return a @ b


def row_inv_norm(emb: Tensor) -> Tensor:
    """1/‖emb[n]‖ as float32: 0 for zero rows, NaN for rows with NaN/Inf values or whose
    1/‖row‖ is not a normal float32 (‖row‖ above ~8.5e37 or below ~2.9e-39: no float32
    unit row), so that unit_emb_sum exposes bad rows. The norm is taken in float64: a
    float32 row at 1e-30 or 1e20, whose squares under- or overflow float32, is an
    ordinary row."""
    norm = torch.linalg.vector_norm(emb, dim=1, dtype=torch.float64)
    inv_norm = torch.where(norm > 0, norm.reciprocal(), 0.0).float()
    f32 = torch.finfo(torch.float32)
    usable = (norm == 0) | (torch.isfinite(norm) & (inv_norm >= f32.tiny) & (inv_norm <= f32.max))
    return inv_norm.masked_fill(~usable, float("nan"))


def empty_stats_like(acts: Tensor, emb: Tensor, num_latents: int | None = None) -> MonoScoreStats:
    """Outputs of a statistics op, uninitialised (also the fake impls). Dense: acts is
    the (N, M) matrix. Sparse (`num_latents` given): acts is any tensor on the device,
    and `cross` is the transpose of an (M, d) buffer, as the sparse kernels write it."""
    sparse = num_latents is not None
    if not sparse:
        num_latents = acts.shape[1]
    dim = emb.shape[1]
    f32 = dict(device=acts.device, dtype=torch.float32)
    f64 = dict(device=acts.device, dtype=torch.float64)
    return MonoScoreStats(
        cross=acts.new_empty((num_latents, dim), **f32).T if sparse else acts.new_empty((dim, num_latents), **f32),
        unit_emb_sum=acts.new_empty((dim,), **f64),
        shift=acts.new_empty((num_latents,), **f32),
        act_range=acts.new_empty((2, num_latents), **f32),
        moments=acts.new_empty((4, num_latents), **f64),
        counts=acts.new_empty((2,), **f64),
    )


def empty_batch_stats(num_latents: int, dim: int, device, cross_dtype=torch.float32) -> MonoScoreStats:
    """The statistics of no rows: zero sums, shift 0, min +inf and max -inf (so that
    adding or reducing real statistics into them leaves those unchanged)."""
    f64 = dict(device=device, dtype=torch.float64)
    return MonoScoreStats(
        cross=torch.zeros(dim, num_latents, device=device, dtype=cross_dtype),
        unit_emb_sum=torch.zeros(dim, **f64),
        shift=torch.zeros(num_latents, device=device, dtype=cross_dtype),
        act_range=torch.stack([
            torch.full((num_latents,), float("inf"), device=device),
            torch.full((num_latents,), float("-inf"), device=device),
        ]),
        moments=torch.zeros(4, num_latents, **f64),
        counts=torch.zeros(2, **f64),
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
        ieee_matmul(unit_emb[n0 : n0 + TORCH_ROWS_PER_PRODUCT].T, shifted[n0 : n0 + TORCH_ROWS_PER_PRODUCT]).double()
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


def csr_latent_stats(acts: CsrActs, emb: Tensor) -> tuple[MonoScoreStats, Tensor, Tensor, Tensor]:
    """Everything but `cross` for sparse activations, from the stored entries alone.

    Returns (stats with cross=None, rows, b, inv_norm): the row of each stored entry,
    its value minus its latent's shift (float64), and 1/‖emb[n]‖. Plain torch ops
    with static shapes and no host sync, so the Triton path shares it on the GPU.
    """
    num_rows, num_latents = acts.num_rows, acts.num_latents
    device = emb.device
    cols, values = acts.col_indices, acts.values
    rows = entry_rows(acts.crow_indices, cols.shape[0])
    stored = torch.zeros(num_latents, device=device, dtype=torch.int64).index_add_(
        0, cols, torch.ones_like(cols)
    )
    value32 = values.float()
    stored_min = torch.full((num_latents,), float("inf"), device=device).scatter_reduce_(0, cols, value32, "amin")
    stored_max = torch.full((num_latents,), float("-inf"), device=device).scatter_reduce_(0, cols, value32, "amax")
    has_implicit_zero = stored < num_rows
    shift = torch.where(has_implicit_zero, 0.0, stored_min)
    act_range = torch.stack([
        torch.where(has_implicit_zero, stored_min.clamp(max=0), stored_min),
        torch.where(has_implicit_zero, stored_max.clamp(min=0), stored_max),
    ])
    inv_norm = row_inv_norm(emb)
    b = values.double() - shift.double()[cols]
    b_zero = torch.where(inv_norm[rows] == 0, b, 0.0)
    moments = torch.zeros(4, num_latents, device=device, dtype=torch.float64)
    for i, term in enumerate((b, b * b, b_zero, b_zero * b)):
        moments[i].index_add_(0, cols, term)
    unit_emb_sum = (emb.float() * inv_norm[:, None]).sum(0, dtype=torch.float64)
    counts = torch.stack([
        torch.full((), num_rows, device=device, dtype=torch.float64),
        (inv_norm > 0).sum().double(),
    ])
    stats = MonoScoreStats(None, unit_emb_sum, shift, act_range, moments, counts)
    return stats, rows, b, inv_norm


def latent_major_order(acts: CsrActs, rows: Tensor) -> Tensor:
    """The entries sorted by (latent, row), as sort keys latent·N + row; refuses a
    latent stored twice in one row (every kernel would count it twice)."""
    sorted_keys, order = (acts.col_indices * acts.num_rows + rows).sort()
    repeated = sorted_keys[1:][sorted_keys[1:] == sorted_keys[:-1]]
    if repeated.numel() > 0:
        key = int(repeated[0])
        raise ValueError(
            f"acts stores latent {key // acts.num_rows} twice in row {key % acts.num_rows}; "
            "the latent indices of a row must be distinct (as torch.topk returns them)"
        )
    return order


def torch_monoscore_stats_csr(acts: CsrActs, emb: Tensor) -> MonoScoreStats:
    """The sparse statistics in plain torch (readable reference; O(nnz·d) in float64)."""
    stats, rows, b, inv_norm = csr_latent_stats(acts, emb)
    latent_major_order(acts, rows)  # for its duplicate check; index_add_ takes any order
    unit_emb = emb.double() * inv_norm.double()[:, None]
    cross_t = torch.zeros(acts.num_latents, emb.shape[1], device=emb.device, dtype=torch.float64)  # (M, d)
    for e0 in range(0, b.shape[0], TORCH_ROWS_PER_PRODUCT):  # bounds the gathered (entries, d) block
        e = slice(e0, e0 + TORCH_ROWS_PER_PRODUCT)
        cross_t.index_add_(0, acts.col_indices[e], unit_emb[rows[e]] * b[e, None])
    return stats._replace(cross=cross_t.float().T)


# The plain-torch statistics as ops, like every other backend: one registered
# backward (monoloss_kernels/_autograd.py) then serves them all.
StatsTuple = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


@torch.library.custom_op("monoloss_kernels::monoscore_stats_torch", mutates_args=())
def monoscore_stats_torch(acts: Tensor, emb: Tensor) -> StatsTuple:
    return tuple(torch_monoscore_stats(acts, emb))


@monoscore_stats_torch.register_fake
def _(acts, emb):
    return tuple(empty_stats_like(acts, emb))


@torch.library.custom_op("monoloss_kernels::monoscore_stats_csr_torch", mutates_args=())
def monoscore_stats_csr_torch(
    crow_indices: Tensor, col_indices: Tensor, values: Tensor, emb: Tensor, num_latents: int
) -> StatsTuple:
    return tuple(torch_monoscore_stats_csr(CsrActs(crow_indices, col_indices, values, num_latents), emb))


@monoscore_stats_csr_torch.register_fake
def _(crow_indices, col_indices, values, emb, num_latents):
    return tuple(empty_stats_like(emb, emb, num_latents))
