"""MonoScore statistics of sparse activations (TopK pairs, COO, CSR) with a Triton kernel.

The per-latent sums (min, max, moments) are O(nnz) scatters shared with the
torch backend (`stats.csr_latent_stats`). The O(nnz·d) part, cross, is this
kernel: the entries are sorted by latent, and each program sums
Σ_e weight[e]·emb[row[e], d-tile] over at most CHUNK entries of one latent,
gathering the embedding rows it needs. A latent with more entries (an
always-on latent stores N) is split over several programs whose float32
partial sums meet in one atomic add each, so the grid stays balanced
whatever the distribution of latents.

The duplicate check reads one number back from the device (the sort that
orders entries by latent exposes them), so unlike the dense kernel this path
is an opaque `torch.library.custom_op` rather than a traceable `triton_op`.
"""

import os

import torch
import triton
import triton.language as tl

from ..stats import CsrActs, MonoScoreStats, csr_latent_stats, empty_stats_like, latent_major_order

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Entries per program: long enough to amortise a program's start (the mean
# TopK latent has N·k/M entries, 128-512 in practice), short enough that one
# always-on latent spreads over the GPU. Entries are gathered BLOCK_E at a time.
ENTRIES_PER_PROGRAM = 256
BLOCK_E = 16
BLOCK_D = 32 if INTERPRET else 128
NUM_WARPS = 1 if INTERPRET else 4


@triton.jit
def _csr_cross_kernel(
    item_latent_ptr, item_begin_ptr, item_end_ptr,  # (items,) one latent's entry range per program
    rows_ptr, weights_ptr,  # (nnz,) latent-major entries: sample row, (value - shift) / ‖emb[row]‖
    emb_ptr, cross_t_ptr,  # (N, d) any strides; (M, d) float32, zero-initialised
    D, stride_en, stride_ed,
    BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
):
    item = tl.program_id(0)
    offs_d = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    d_mask = offs_d < D
    latent = tl.load(item_latent_ptr + item).to(tl.int64)
    begin = tl.load(item_begin_ptr + item)
    end = tl.load(item_end_ptr + item)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for e0 in range(begin, end, BLOCK_E):
        offs_e = e0 + tl.arange(0, BLOCK_E)
        e_mask = offs_e < end
        rows = tl.load(rows_ptr + offs_e, mask=e_mask, other=0)
        weights = tl.load(weights_ptr + offs_e, mask=e_mask, other=0.0)
        tile = tl.load(emb_ptr + rows[:, None] * stride_en + offs_d[None, :] * stride_ed,
                       mask=e_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * weights[:, None], axis=0)
    tl.atomic_add(cross_t_ptr + latent * D + offs_d, acc, mask=d_mask & (end > begin))


def _work_items(latent_offsets: torch.Tensor, num_entries: int):
    """(latent, begin, end) per program: each latent's entries cut into
    ENTRIES_PER_PROGRAM pieces. The grid is the static bound M + nnz / CHUNK; the
    programs past the real pieces get an empty range (no host sync)."""
    num_latents = latent_offsets.shape[0] - 1
    stored = latent_offsets.diff()
    pieces = (stored + ENTRIES_PER_PROGRAM - 1) // ENTRIES_PER_PROGRAM
    piece_end = pieces.cumsum(0)
    num_items = num_latents + triton.cdiv(num_entries, ENTRIES_PER_PROGRAM)
    item = torch.arange(num_items, device=latent_offsets.device)
    latent = torch.searchsorted(piece_end, item, right=True).clamp(max=max(num_latents - 1, 0))
    piece = item - (piece_end[latent] - pieces[latent])
    begin = latent_offsets[latent] + piece * ENTRIES_PER_PROGRAM
    end = torch.minimum(begin + ENTRIES_PER_PROGRAM, latent_offsets[latent + 1])
    end = torch.where(item < piece_end[-1], end, begin)  # past the last piece: nothing to do
    return latent, begin, end


def _csr_stats(acts: CsrActs, emb: torch.Tensor) -> MonoScoreStats:
    """`MonoScoreStats` of sparse acts; cross from `_csr_cross_kernel`."""
    stats, rows, b, inv_norm = csr_latent_stats(acts, emb)
    order = latent_major_order(acts, rows)
    num_latents, dim = acts.num_latents, emb.shape[1]
    entry_rows = rows[order]
    entry_weights = (b[order] * inv_norm[entry_rows].double()).float()
    latent_offsets = torch.zeros(num_latents + 1, device=emb.device, dtype=torch.int64)
    latent_offsets[1:] = torch.bincount(acts.col_indices, minlength=num_latents).cumsum(0)
    cross_t = torch.zeros((num_latents, dim), device=emb.device, dtype=torch.float32)
    if num_latents > 0 and dim > 0 and entry_rows.numel() > 0:
        item_latent, item_begin, item_end = _work_items(latent_offsets, entry_rows.numel())
        grid = (item_latent.numel(), triton.cdiv(dim, BLOCK_D))
        _csr_cross_kernel[grid](
            item_latent, item_begin, item_end, entry_rows, entry_weights, emb, cross_t,
            dim, emb.stride(0), emb.stride(1),
            BLOCK_E=BLOCK_E, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
        )
    return stats._replace(cross=cross_t.T)


@torch.library.custom_op("monoloss_kernels::monoscore_stats_csr_triton", mutates_args=())
def monoscore_stats_csr_triton(
    crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor, emb: torch.Tensor, num_latents: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`MonoScoreStats` of CSR activations computed with `_csr_cross_kernel`."""
    return tuple(_csr_stats(CsrActs(crow_indices, col_indices, values, num_latents), emb))


@monoscore_stats_csr_triton.register_fake
def _(crow_indices, col_indices, values, emb, num_latents):
    return tuple(empty_stats_like(emb, emb, num_latents))


def triton_csr_stats(acts: CsrActs, emb: torch.Tensor) -> MonoScoreStats:
    return MonoScoreStats(*torch.ops.monoloss_kernels.monoscore_stats_csr_triton(
        acts.crow_indices, acts.col_indices, acts.values, emb, acts.num_latents
    ))
