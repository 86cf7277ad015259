"""The two O(N²) ways of computing MonoScore that the scaling benchmark times against
the linear methods, both in the inputs' dtype (as a user would run them), both exact up
to that dtype's rounding:

- `pairwise_loop_monoscore`: the literal double loop of the original metric code
  (sae-for-vlm's metric.py; MonoLoss's `compute_monosemanticity_ref`, the baseline of the
  paper's timing figure): one Python iteration per sample n and per chunk of 100 later
  samples m, each computing the chunk's cosines and activation products in torch.
- `pairwise_blocked_monoscore`: the same pair sums as matrix products over row blocks,
  never holding the N×N similarity matrix: what one writes to make the definition fast.

Ground truth stays `monoloss_kernels.reference.pairwise_monoscore` (float64); these are
timed baselines, checked against it (or the float64 closed form) before they count.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

# The original scripts take the later samples 100 at a time (their `batch_size`).
LOOP_CHUNK_ROWS = 100
# Rows of the similarity block per matrix product: (block, N) similarities stay small
# next to the (N, M) activations, and the products are large enough to run at GEMM speed.
BLOCK_ROWS = 1024


def min_max_scaled(acts: Tensor) -> Tensor:
    """(acts - min) / (max - min) per latent, in the inputs' dtype, as the original code
    scales them (NaN for a constant latent, which makes its score NaN)."""
    act_min = acts.amin(dim=0, keepdim=True)
    act_max = acts.amax(dim=0, keepdim=True)
    return (acts - act_min) / (act_max - act_min)


@torch.no_grad()
def pairwise_loop_monoscore(acts: Tensor, emb: Tensor, *, chunk_rows: int = LOOP_CHUNK_ROWS) -> Tensor:
    """MonoScore by the original double loop over pairs n < m.

    acts (N, M) and emb (N, d) on one device, in any float dtype; per-latent sums in
    float32 (the original's accumulators). Returns (M,) float32, NaN where the weight
    sum is 0. About N²/(2·chunk_rows) Python iterations, each O(chunk_rows·(M + d)).
    No progress bar: it would be timed too.
    """
    scaled = min_max_scaled(acts)
    num_rows, num_latents = acts.shape
    weighted_sim_sum = torch.zeros(num_latents, device=acts.device)
    weight_sum = torch.zeros(num_latents, device=acts.device)
    for n in range(num_rows):
        for m0 in range(n + 1, num_rows, chunk_rows):
            m1 = min(m0 + chunk_rows, num_rows)
            sims = F.cosine_similarity(emb[n].expand(m1 - m0, -1), emb[m0:m1], dim=1)  # (chunk,)
            weights = scaled[n] * scaled[m0:m1]  # (chunk, M): ã[n] ã[m]
            weighted_sim_sum += (weights * sims[:, None]).sum(dim=0)
            weight_sum += weights.sum(dim=0)
    return torch.where(weight_sum != 0, weighted_sim_sum / weight_sum, float("nan"))


@torch.no_grad()
def pairwise_blocked_monoscore(acts: Tensor, emb: Tensor, *, block_rows: int = BLOCK_ROWS) -> Tensor:
    """MonoScore as blocked matrix products over the pairs n < m.

    For each block of rows n, one product of the stacked (masked similarities; mask)
    (2B, N−n0) with ã[n0:] (N−n0, M) gives Σ_{m>n} s[n,m] ã[m] and Σ_{m>n} ã[m] for every
    latent; only columns m ≥ n0 are formed, so the work is ~2·N²·M multiply-adds. In the
    inputs' dtype, block sums added up in float32. acts (N, M), emb (N, d); returns (M,)
    float32, NaN where the weight sum is 0. Extra memory: one scaled copy of acts and
    O(block_rows·(N + M)).
    """
    scaled = min_max_scaled(acts)
    unit_emb = F.normalize(emb, dim=1)
    num_rows, num_latents = acts.shape
    weighted_sim_sum = torch.zeros(num_latents, device=acts.device)
    weight_sum = torch.zeros(num_latents, device=acts.device)
    for n0 in range(0, num_rows, block_rows):
        n1 = min(n0 + block_rows, num_rows)
        # later[r, c] = 1 where sample n0 + c comes after sample n0 + r.
        later = torch.ones(n1 - n0, num_rows - n0, dtype=acts.dtype, device=acts.device).triu_(1)
        sims = (unit_emb[n0:n1] @ unit_emb[n0:].T).to(acts.dtype) * later  # (B, N - n0)
        sums = torch.cat([sims, later]) @ scaled[n0:]  # (2B, M)
        block = scaled[n0:n1].float()
        weighted_sim_sum += (block * sums[: n1 - n0].float()).sum(dim=0)
        weight_sum += (block * sums[n1 - n0:].float()).sum(dim=0)
    return torch.where(weight_sum != 0, weighted_sim_sum / weight_sum, float("nan"))
