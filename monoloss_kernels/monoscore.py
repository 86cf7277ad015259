"""The public MonoScore entry point."""

import torch
from torch import Tensor

from ._dispatch import stats_function
from ._validate import check_finite, check_stats_finite, validate_acts
from .refine import refine_ill_conditioned
from .stats import CsrActs, finalize


def monoscore(acts, emb: Tensor, *, num_latents: int | None = None, backend: str = "auto") -> Tensor:
    r"""Exact MonoScore of every latent, in one pass over the activations.

    MS[k] = Σ_{n<m} ã[n,k] ã[m,k] cos(emb[n], emb[m]) / Σ_{n<m} ã[n,k] ã[m,k], with
    ã[:,k] the min-max normalisation of acts[:,k] over the N samples and
    cos = 0 for a zero embedding row. Equal to the O(N²) pairwise definition
    (`monoloss_kernels.reference.pairwise_monoscore`) within float32 rounding: the
    latents for which one pass in float32 is not enough (one sample carries nearly all
    of the latent's mass) are recomputed from their nonzero entries in float64
    (`monoloss_kernels/refine.py`).

    Sparse activations cost O(nnz·d) instead of O(N·M·d); entries not stored are
    activations of 0 (also in each latent's min and max), so the result equals
    the dense definition on the densified matrix.

    Args:
        acts: the activations of N samples over M latents, float32/float16/
            bfloat16/float64, in one of these forms:
            - a dense (N, M) tensor, any strides;
            - the (values, indices) pair of `torch.topk` (N x k each, the
              namedtuple or a plain tuple), with `num_latents=M`; the indices of
              a row must be distinct;
            - a 2-D torch sparse COO tensor (repeated coordinates add up) or CSR
              tensor (the latents of a row must be distinct);
            - the outputs of the SAE libraries (sparsify's EncoderOutput, openai's
              (indices, values) order, dictionary_learning's return_topk tuple):
              the full list is in `monoloss_kernels._validate`'s docstring.
              Indices may have any integer dtype.
        emb: (N, d) embeddings of the same N samples (e.g. CLIP image features),
            same device; need not be normalised.
        num_latents: M. Required with a (values, indices) pair; otherwise
            optional and checked against the number of columns.
        backend: "auto" (the first of `available_backends(device)`), "cuda" (C++/CUDA),
            "triton", "cpu" (C++), or "torch" (plain-torch reference of the
            same statistics).

    Returns:
        (M,) float32 on the inputs' device; NaN for latents whose denominator
        is zero (constant latents, or fewer than two samples above the
        latent's minimum), and all NaN when N < 2.

    Raises:
        TypeError / ValueError naming the argument for non-tensors, wrong rank,
        unsupported dtypes, mismatched N, different devices, NaN or Inf values,
        latent indices out of range or repeated within a row, a (values,
        indices) pair without num_latents.
    """
    acts, emb = validate_acts(acts, emb, num_latents)
    sparse = isinstance(acts, CsrActs)
    num_rows, num_latents = (acts.num_rows, acts.num_latents) if sparse else acts.shape
    if num_rows < 2:
        check_finite(acts, emb)
        return torch.full((num_latents,), float("nan"), device=emb.device, dtype=torch.float32)
    stats = stats_function(backend, emb.device, sparse)(acts, emb)
    check_stats_finite(stats, emb)
    return refine_ill_conditioned(finalize(stats), acts, emb, stats)
