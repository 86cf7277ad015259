r"""The backward of the statistics ops in Triton: ∂L/∂acts (dense) and ∂L/∂values (CSR),
registered as torch.library.triton_ops with the arguments and semantics of the C++ ops
`monoscore_stats_backward` / `monoscore_stats_csr_backward` (csrc/ops.cpp; the formula
is derived in monoloss_kernels/_autograd.py, the reference kernel is
csrc/cpu/monoscore_stats_backward_cpu.cpp):

    grad[n,k] = (Ê G)[n,k] + g₀[k] + 2 b g₁[k] + w[n] (g₂[k] + 2 b g₃[k])
              + [a = min_k] ∂L/∂min_k / #ties_min[k] + [a = max_k] ∂L/∂max_k / #ties_max[k]

with b = a - shift[k], Ê the unit rows of emb, w[n] = 1 for zero-norm rows, G = grad_cross.

dense: one kernel computes a (BLOCK_N x BLOCK_M) tile of Ê·G with tl.dot over d (Ê
       formed on the fly from emb and 1/‖emb[n]‖) and, in its epilogue, reads the same
       tile of acts, adds the per-entry terms and writes the output once, in acts' dtype.
       The tie counts come first from `_count_ties_kernel`, a small reduction over acts
       that compares in float32 exactly as the epilogue does (a torch `acts == min`
       would need a float32 copy of acts to agree for float64 inputs, and an (N, M)
       temporary in any case).
CSR:   one kernel over blocks of stored entries: ê[row_e] · G[:, col_e] over d-steps,
       read from the (M, d) transpose of G so that each entry's read is contiguous,
       plus the same per-entry terms. The row of each entry comes from
       `stats.entry_rows` (torch.repeat_interleave with a static output size):
       O(nnz), no host sync, and 8 bytes per entry next to the d floats each entry
       reads. The tie counts are O(nnz) scatters in torch (stored values equal to the
       extreme, plus the implicit zeros where the extreme is 0).

Accumulation in float32; the per-latent coefficients (shares of the min/max gradient
among the ties) are formed in float64 and rounded once, as in the C++ kernel.
Precision of the product: as the forward kernel (ops/triton_monoscore_stats.py),
"tf32x3" (float32-accurate) on the GPU and "ieee" under TRITON_INTERPRET=1.
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..stats import entry_rows, row_inv_norm
from .triton_monoscore_stats import INTERPRET


class BackwardConfig(NamedTuple):
    block_n: int  # dense: rows (samples) of the output tile
    block_m: int  # dense: latents of the output tile
    block_d: int  # dense: embedding dims per tl.dot step
    block_e: int  # CSR: stored entries per program
    csr_block_d: int  # CSR: embedding dims per gathered step
    ties_block_n: int  # tie counting: rows per step
    ties_block_m: int  # tie counting: latents per program
    ties_rows_per_program: int  # tie counting: rows per program (its counts meet in atomic adds)
    num_warps: int
    num_stages: int
    dot_precision: str  # tl.dot input_precision: "tf32x3" (float32-accurate) or "ieee"


# GPU: the output tile is the forward's tuned tf32x3 tile (128 x 64 over 4 warps,
# benchmarks/tune_triton.py on an H200) with d as the reduction, stepped 32 at a time as
# in a tf32 GEMM. CSR: as in the forward's sparse kernel, 128 dims per gathered row
# segment (512 contiguous bytes of a row of emb or of Gᵀ), 32 entries per program (two
# 16 KiB gathers per step, 32 values per thread each). The tie count steps through
# 32 x 128 tiles (128 contiguous latents per row) and reads 4096 rows per program: 64
# programs per 128 latents at N = 2^18, enough to fill the GPU whatever M. None of these
# is tuned on a GPU yet. The interpreter runs programs one by one on numpy: small tiles,
# few programs.
GPU_CONFIG = BackwardConfig(
    block_n=128, block_m=64, block_d=32, block_e=32, csr_block_d=128,
    ties_block_n=32, ties_block_m=128, ties_rows_per_program=4096,
    num_warps=4, num_stages=3, dot_precision="tf32x3",
)
INTERPRETER_CONFIG = BackwardConfig(
    block_n=32, block_m=32, block_d=32, block_e=64, csr_block_d=32,
    ties_block_n=64, ties_block_m=32, ties_rows_per_program=4096,
    num_warps=1, num_stages=1, dot_precision="ieee",
)
CONFIG = INTERPRETER_CONFIG if INTERPRET else GPU_CONFIG

@triton.jit
def _count_ties_kernel(
    acts_ptr, range_ptr,  # (N, M) any strides and float dtype; (2, M) float32 min, max
    ties_ptr,  # (2, M) int32, zero-initialised: entries equal to the min, to the max
    # (range and ties contiguous)
    N, M, rows_per_program, stride_an, stride_am,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < M
    act_min = tl.load(range_ptr + offs_m, mask=m_mask, other=0.0)
    act_max = tl.load(range_ptr + M + offs_m, mask=m_mask, other=0.0)
    min_ties = tl.zeros((BLOCK_M,), dtype=tl.int32)
    max_ties = tl.zeros((BLOCK_M,), dtype=tl.int32)
    row_begin = tl.program_id(1).to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, N)
    for n0 in range(row_begin, row_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        tile_mask = (offs_n < row_end)[:, None] & m_mask[None, :]
        # Compared in float32, as act_range holds the extremes and as the epilogue compares.
        a = tl.load(acts_ptr + offs_n[:, None] * stride_an + offs_m[None, :] * stride_am,
                    mask=tile_mask, other=0.0).to(tl.float32)
        min_ties += tl.sum((tile_mask & (a == act_min[None, :])).to(tl.int32), axis=0)
        max_ties += tl.sum((tile_mask & (a == act_max[None, :])).to(tl.int32), axis=0)
    tl.atomic_add(ties_ptr + offs_m, min_ties, mask=m_mask)
    tl.atomic_add(ties_ptr + M + offs_m, max_ties, mask=m_mask)


@triton.jit
def _dense_backward_kernel(
    acts_ptr, emb_ptr, inv_norm_ptr, shift_ptr,  # (N, M), (N, d) any strides; (N,), (M,) float32
    grad_cross_ptr, terms_ptr,  # (d, M) float32 any strides; (8, M) float32 contiguous
    out_ptr,  # (N, M) contiguous, acts' dtype
    N, M, D, num_m_blocks,
    stride_an, stride_am, stride_en, stride_ed, stride_gd, stride_gm,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    # Latent blocks vary fastest: the programs reading the same rows of emb run together.
    pid_n = pid // num_m_blocks
    pid_m = pid % num_m_blocks
    # int64 offsets: row * stride passes 2^31 for N·M or N·d beyond 2^31 elements.
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n_mask = offs_n < N
    m_mask = offs_m < M
    inv_norm = tl.load(inv_norm_ptr + offs_n, mask=n_mask, other=0.0)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # Ê·G
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        d_mask = offs_d < D
        unit_emb = tl.load(emb_ptr + offs_n[:, None] * stride_en + offs_d[None, :] * stride_ed,
                           mask=n_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        unit_emb = unit_emb * inv_norm[:, None]  # (BLOCK_N, BLOCK_D)
        g = tl.load(grad_cross_ptr + offs_d[:, None] * stride_gd + offs_m[None, :] * stride_gm,
                    mask=d_mask[:, None] & m_mask[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        acc = tl.dot(unit_emb, g, acc, input_precision=DOT_PRECISION)

    # Epilogue: the per-entry terms, with the tile of acts read once.
    tile_mask = n_mask[:, None] & m_mask[None, :]
    a = tl.load(acts_ptr + offs_n[:, None] * stride_an + offs_m[None, :] * stride_am,
                mask=tile_mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + offs_m, mask=m_mask, other=0.0)
    b = a - shift[None, :]
    term_sum = tl.load(terms_ptr + 0 * M + offs_m, mask=m_mask, other=0.0)
    term_sumsq = tl.load(terms_ptr + 1 * M + offs_m, mask=m_mask, other=0.0)
    term_zero_sum = tl.load(terms_ptr + 2 * M + offs_m, mask=m_mask, other=0.0)
    term_zero_sumsq = tl.load(terms_ptr + 3 * M + offs_m, mask=m_mask, other=0.0)
    min_share = tl.load(terms_ptr + 4 * M + offs_m, mask=m_mask, other=0.0)
    max_share = tl.load(terms_ptr + 5 * M + offs_m, mask=m_mask, other=0.0)
    act_min = tl.load(terms_ptr + 6 * M + offs_m, mask=m_mask, other=0.0)
    act_max = tl.load(terms_ptr + 7 * M + offs_m, mask=m_mask, other=0.0)
    terms = term_sum[None, :] + b * term_sumsq[None, :]
    terms += tl.where(a == act_min[None, :], min_share[None, :], 0.0)
    terms += tl.where(a == act_max[None, :], max_share[None, :], 0.0)
    grad = acc + terms
    zero_row = inv_norm == 0.0
    grad += tl.where(zero_row[:, None], term_zero_sum[None, :] + b * term_zero_sumsq[None, :], 0.0)
    tl.store(out_ptr + offs_n[:, None] * M + offs_m[None, :], grad.to(out_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _csr_backward_kernel(
    rows_ptr, cols_ptr, values_ptr,  # (nnz,) int64, int64, any float dtype (contiguous)
    emb_ptr, inv_norm_ptr, shift_ptr,  # (N, d) any strides; (N,), (M,) float32
    grad_cross_t_ptr, terms_ptr,  # (M, d) float32 contiguous: Gᵀ; (8, M) float32 contiguous
    out_ptr,  # (nnz,) values' dtype
    nnz, M, D, stride_en, stride_ed,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_e = (tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)).to(tl.int64)
    e_mask = offs_e < nnz
    rows = tl.load(rows_ptr + offs_e, mask=e_mask, other=0)
    cols = tl.load(cols_ptr + offs_e, mask=e_mask, other=0)
    inv_norm = tl.load(inv_norm_ptr + rows, mask=e_mask, other=0.0)

    dots = tl.zeros((BLOCK_E,), dtype=tl.float32)  # ê[row_e] · G[:, col_e]
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        mask = e_mask[:, None] & (offs_d < D)[None, :]
        unit_emb = tl.load(emb_ptr + rows[:, None] * stride_en + offs_d[None, :] * stride_ed,
                           mask=mask, other=0.0).to(tl.float32)
        unit_emb = unit_emb * inv_norm[:, None]  # (BLOCK_E, BLOCK_D)
        g = tl.load(grad_cross_t_ptr + cols[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
        dots += tl.sum(unit_emb * g, axis=1)

    a = tl.load(values_ptr + offs_e, mask=e_mask, other=0.0).to(tl.float32)
    b = a - tl.load(shift_ptr + cols, mask=e_mask, other=0.0)
    terms = tl.load(terms_ptr + 0 * M + cols, mask=e_mask, other=0.0)
    terms += b * tl.load(terms_ptr + 1 * M + cols, mask=e_mask, other=0.0)
    zero_row = inv_norm == 0.0
    zero_terms = (tl.load(terms_ptr + 2 * M + cols, mask=e_mask & zero_row, other=0.0)
                  + b * tl.load(terms_ptr + 3 * M + cols, mask=e_mask & zero_row, other=0.0))
    terms += tl.where(zero_row, zero_terms, 0.0)
    act_min = tl.load(terms_ptr + 6 * M + cols, mask=e_mask, other=0.0)
    act_max = tl.load(terms_ptr + 7 * M + cols, mask=e_mask, other=0.0)
    terms += tl.where(a == act_min, tl.load(terms_ptr + 4 * M + cols, mask=e_mask, other=0.0), 0.0)
    terms += tl.where(a == act_max, tl.load(terms_ptr + 5 * M + cols, mask=e_mask, other=0.0), 0.0)
    tl.store(out_ptr + offs_e, (dots + terms).to(out_ptr.dtype.element_ty), mask=e_mask)


def latent_terms(act_range: torch.Tensor, grad_moments: torch.Tensor, grad_range: torch.Tensor,
                 min_ties: torch.Tensor, max_ties: torch.Tensor) -> torch.Tensor:
    """(8, M) float32 per-latent coefficients of the per-entry terms, the rows the
    kernels read: g₀, 2g₁, g₂, 2g₃, ∂L/∂min / #ties, ∂L/∂max / #ties (0 without ties),
    min, max.
    Formed in float64 and rounded once, as the C++ kernel does."""
    g_moments = grad_moments.double()
    g_range = grad_range.double()

    def share(grad: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
        return torch.where(ties > 0, grad / ties.clamp(min=1).double(), 0.0)

    return torch.stack([
        g_moments[0], 2 * g_moments[1], g_moments[2], 2 * g_moments[3],
        share(g_range[0], min_ties), share(g_range[1], max_ties),
        act_range[0].double(), act_range[1].double(),
    ]).float()


def _check_grads(num_latents: int, dim: int, shift, act_range, grad_cross, grad_moments, grad_range) -> None:
    """Shapes of the per-latent arguments (the C++ ops' TORCH_CHECK backstop)."""
    expected = {"shift": (num_latents,), "act_range": (2, num_latents), "grad_cross": (dim, num_latents),
                "grad_moments": (4, num_latents), "grad_range": (2, num_latents)}
    given = {"shift": shift, "act_range": act_range, "grad_cross": grad_cross, "grad_moments": grad_moments,
             "grad_range": grad_range}
    for name, shape in expected.items():
        if tuple(given[name].shape) != shape:
            raise ValueError(f"monoscore_stats_backward_triton: {name} must have shape {shape}, "
                             f"got {tuple(given[name].shape)}")


def dense_backward_with_config(acts, emb, shift, act_range, grad_cross, grad_moments, grad_range,
                               config: BackwardConfig, launch=lambda kernel: kernel) -> torch.Tensor:
    """∂L/∂acts, (N, M) contiguous in acts' dtype, computed with `config`; `launch`
    wraps the kernels (`wrap_triton` inside the op, so torch.compile traces them)."""
    if acts.dim() != 2 or emb.dim() != 2 or acts.shape[0] != emb.shape[0]:
        raise ValueError(f"monoscore_stats_backward_triton: acts (N, M) and emb (N, d) must share N, got "
                         f"{tuple(acts.shape)} and {tuple(emb.shape)}")
    num_rows, num_latents = acts.shape
    dim = emb.shape[1]
    _check_grads(num_latents, dim, shift, act_range, grad_cross, grad_moments, grad_range)
    out = torch.empty((num_rows, num_latents), device=acts.device, dtype=acts.dtype)
    if num_rows == 0 or num_latents == 0:
        return out
    act_range32 = act_range.float().contiguous()
    ties = torch.zeros((2, num_latents), device=acts.device, dtype=torch.int32)
    ties_grid = (triton.cdiv(num_latents, config.ties_block_m), triton.cdiv(num_rows, config.ties_rows_per_program))
    launch(_count_ties_kernel)[ties_grid](
        acts, act_range32, ties,
        num_rows, num_latents, config.ties_rows_per_program, acts.stride(0), acts.stride(1),
        BLOCK_N=config.ties_block_n, BLOCK_M=config.ties_block_m, num_warps=config.num_warps,
    )
    terms = latent_terms(act_range32, grad_moments, grad_range, ties[0], ties[1])
    grad_cross32 = grad_cross.float()
    num_m_blocks = triton.cdiv(num_latents, config.block_m)
    grid = (triton.cdiv(num_rows, config.block_n) * num_m_blocks,)
    launch(_dense_backward_kernel)[grid](
        acts, emb, row_inv_norm(emb), shift.float().contiguous(), grad_cross32, terms, out,
        num_rows, num_latents, dim, num_m_blocks,
        acts.stride(0), acts.stride(1), emb.stride(0), emb.stride(1), grad_cross32.stride(0), grad_cross32.stride(1),
        BLOCK_N=config.block_n, BLOCK_M=config.block_m, BLOCK_D=config.block_d, DOT_PRECISION=config.dot_precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return out


def csr_backward_with_config(crow_indices, col_indices, values, emb, num_latents, shift, act_range, grad_cross,
                             grad_moments, grad_range, config: BackwardConfig,
                             launch=lambda kernel: kernel) -> torch.Tensor:
    """∂L/∂values, (nnz,) in values' dtype, computed with `config` (see
    `dense_backward_with_config` for `launch`)."""
    if crow_indices.dim() != 1 or crow_indices.shape[0] != emb.shape[0] + 1 or values.shape != col_indices.shape:
        raise ValueError(
            "monoscore_stats_csr_backward_triton: crow_indices (N + 1,), col_indices and values (nnz,) and emb "
            f"(N, d) do not fit: {tuple(crow_indices.shape)}, {tuple(col_indices.shape)}, {tuple(values.shape)}, "
            f"{tuple(emb.shape)}"
        )
    num_rows, dim = emb.shape
    num_entries = values.shape[0]
    _check_grads(num_latents, dim, shift, act_range, grad_cross, grad_moments, grad_range)
    out = torch.empty((num_entries,), device=values.device, dtype=values.dtype)
    if num_entries == 0:
        return out
    cols = col_indices.contiguous()
    values = values.contiguous()
    rows = entry_rows(crow_indices, num_entries)
    # Ties: stored values equal to the extreme (compared in float32, as the kernel does),
    # plus the implicit zeros of a latent whose extreme is 0.
    act_range32 = act_range.float()
    value32 = values.float()
    counts = torch.zeros((3, num_latents), device=emb.device, dtype=torch.int64)
    for i, hits in enumerate((torch.ones_like(cols), value32 == act_range32[0, cols], value32 == act_range32[1, cols])):
        counts[i].index_add_(0, cols, hits.long())
    stored, min_ties, max_ties = counts.unbind(0)
    implicit_zeros = num_rows - stored
    min_ties = min_ties + torch.where(act_range32[0] == 0, implicit_zeros, 0)
    max_ties = max_ties + torch.where(act_range32[1] == 0, implicit_zeros, 0)
    terms = latent_terms(act_range32, grad_moments, grad_range, min_ties, max_ties)
    grad_cross_t = grad_cross.float().T.contiguous()  # (M, d); no copy for the sparse ops' own cross layout
    launch(_csr_backward_kernel)[(triton.cdiv(num_entries, config.block_e),)](
        rows, cols, values, emb, row_inv_norm(emb), shift.float().contiguous(), grad_cross_t, terms, out,
        num_entries, num_latents, dim, emb.stride(0), emb.stride(1),
        BLOCK_E=config.block_e, BLOCK_D=config.csr_block_d, num_warps=config.num_warps,
    )
    return out


@triton_op("monoloss_kernels::monoscore_stats_backward_triton", mutates_args=())
def monoscore_stats_backward_triton(
    acts: torch.Tensor, emb: torch.Tensor, shift: torch.Tensor, act_range: torch.Tensor, grad_cross: torch.Tensor,
    grad_moments: torch.Tensor, grad_range: torch.Tensor,
) -> torch.Tensor:
    """∂L/∂acts (N, M), acts' dtype, given ∂L/∂cross (d, M), ∂L/∂moments (4, M) and
    ∂L/∂act_range (2, M) of the statistics of dense acts (N, M) and emb (N, d) taken at
    `shift` (M,) with extremes `act_range` (2, M) float32: `monoscore_stats_backward`."""
    return dense_backward_with_config(acts, emb, shift, act_range, grad_cross, grad_moments, grad_range, CONFIG,
                                      launch=wrap_triton)


@monoscore_stats_backward_triton.register_fake
def _(acts, emb, shift, act_range, grad_cross, grad_moments, grad_range):
    return torch.empty_like(acts, memory_format=torch.contiguous_format)


@triton_op("monoloss_kernels::monoscore_stats_csr_backward_triton", mutates_args=())
def monoscore_stats_csr_backward_triton(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, emb: torch.Tensor,
    num_latents: int, shift: torch.Tensor, act_range: torch.Tensor, grad_cross: torch.Tensor,
    grad_moments: torch.Tensor, grad_range: torch.Tensor,
) -> torch.Tensor:
    """∂L/∂values (nnz,), values' dtype, for CSR activations (crow_indices (N + 1,),
    col_indices and values (nnz,)) with M = num_latents: `monoscore_stats_csr_backward`.
    The implicit zeros count among the ties of a latent whose extreme is 0."""
    return csr_backward_with_config(crow_indices, col_indices, values, emb, num_latents, shift, act_range,
                                    grad_cross, grad_moments, grad_range, CONFIG, launch=wrap_triton)


@monoscore_stats_csr_backward_triton.register_fake
def _(crow_indices, col_indices, values, emb, num_latents, shift, act_range, grad_cross, grad_moments, grad_range):
    return torch.empty_like(values, memory_format=torch.contiguous_format)
