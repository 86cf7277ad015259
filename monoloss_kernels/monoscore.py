"""The public MonoScore entry point."""

import torch
from torch import Tensor

from ._dispatch import stats_function
from ._validate import check_stats_finite, validate_dense
from .stats import finalize


def monoscore(acts: Tensor, emb: Tensor, *, backend: str = "auto") -> Tensor:
    r"""Exact MonoScore of every latent, in one pass over the activations.

    MS[k] = Σ_{n<m} ã[n,k] ã[m,k] cos(emb[n], emb[m]) / Σ_{n<m} ã[n,k] ã[m,k], with
    ã[:,k] the min-max normalisation of acts[:,k] over the N samples and
    cos = 0 for a zero embedding row. Equal to the O(N²) pairwise definition
    (`monoloss_kernels.reference.pairwise_monoscore`) within float32 rounding.

    Args:
        acts: (N, M) activations, float32/float16/bfloat16/float64, any strides.
        emb: (N, d) embeddings of the same N samples (e.g. CLIP image features),
            same device; need not be normalised.
        backend: "auto" (fastest available for the device), "cuda" (C++/CUDA),
            "triton", "cpu" (C++), or "torch" (plain-torch reference of the
            same statistics).

    Returns:
        (M,) float32 on the inputs' device; NaN for latents whose denominator
        is zero (constant latents, or fewer than two samples above the
        latent's minimum), and all NaN when N < 2.

    Raises:
        TypeError / ValueError naming the argument for non-tensors, wrong rank,
        unsupported dtypes, mismatched N, different devices, NaN or Inf values.
    """
    acts, emb = validate_dense(acts, emb)
    num_rows, num_latents = acts.shape
    if num_rows < 2:
        return torch.full((num_latents,), float("nan"), device=acts.device, dtype=torch.float32)
    stats = stats_function(backend, acts.device)(acts, emb)
    check_stats_finite(stats, emb)
    return finalize(stats)
