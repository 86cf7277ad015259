"""What the benchmark modules share: the device benchmarked, method names, the accuracy
each timed result is held to, the input makers, and the score check.

Inputs are random and never zero: ReLU'd Gaussians (dense SAE latents) or TopK pairs of
uniform values on distinct latents, with embeddings that share one direction, as CLIP
features do (so cosines, and scores, sit well away from 0).
"""

import math
import os
import warnings

import torch

import monoloss_kernels

from .conftest import OURS_PREFIX, PAIRWISE  # noqa: F401 (method names, shared from here too)

DEVICE = torch.device(os.environ.get("MONOSCORE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))

# Max |score - reference| allowed of our backends (scores lie in [-1, 1]); also of every
# method on float32 inputs. Below float32 the baselines compute in the input dtype by
# design, so their error is reported, not held to this.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-3}

SEED = 0
# Weight of the direction all embeddings share: cosines well away from 0, as in CLIP features.
SHARED_DIRECTION_WEIGHT = 0.7


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def our_backends(device: torch.device) -> list[str]:
    """Our backends that run natively on `device`, fastest first. Triton runs on the CPU
    only through its interpreter: a correctness tool, not a fast path."""
    return [
        backend
        for backend in monoloss_kernels.available_backends(device)
        if not (device.type == "cpu" and backend == "triton")
    ]


def make_embeddings(num_rows: int, dim: int, gen: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """(N, d) Gaussian embeddings plus one shared direction."""
    emb = torch.randn(num_rows, dim, generator=gen, device=device)
    emb += SHARED_DIRECTION_WEIGHT * torch.randn(1, dim, generator=gen, device=device)
    return emb.to(dtype)


def make_dense_acts(num_rows: int, num_latents: int, gen: torch.Generator, device, dtype=torch.float32):
    """(N, M) ReLU'd Gaussians in `dtype`, drawn in that dtype (no float32 copy of a
    large bfloat16 matrix) and rectified in place."""
    return torch.randn(num_rows, num_latents, generator=gen, device=device, dtype=dtype).relu_()


def make_topk_batch(num_rows, num_latents, k, dim, gen, device):
    """TopK activations with distinct latents per row and ReLU-like values, and CLIP-like
    embeddings. Indices are start + j·step mod M with an odd step and M a power of two,
    so a row's k latents are distinct without an O(M) draw per row."""
    if num_latents & (num_latents - 1):
        raise ValueError(f"make_topk_batch needs num_latents a power of two, got {num_latents}")
    start = torch.randint(0, num_latents, (num_rows, 1), generator=gen, device=device)
    step = 2 * torch.randint(0, num_latents // 2, (num_rows, 1), generator=gen, device=device) + 1
    indices = (start + torch.arange(k, device=device) * step) % num_latents
    values = torch.rand(num_rows, k, generator=gen, device=device)
    emb = make_embeddings(num_rows, dim, gen, device)
    return values, indices, emb


def check_scores(method: str, scores: torch.Tensor, reference: torch.Tensor, dtype: torch.dtype, *,
                 label: str, reference_method: str, hold_baselines: bool = True) -> float:
    """Max |scores - reference| over the latents the reference defines; fails where
    `method` misses the tolerance (ours always; on float32 inputs every method, unless
    not `hold_baselines`), warns otherwise. Ours must also give NaN exactly where the
    reference does. The baselines are compared only where the reference is defined: the
    published algorithm returns a rounding-error number, not NaN, for a latent with one
    nonzero activation; and on TopK latents that fire a few times its float32
    (Σã)² − Σã² cancels, so there (hold_baselines=False) its error is reported, not held."""
    tolerance = TOLERANCE[dtype]
    assert scores.shape == reference.shape, f"{method}: scores of shape {tuple(scores.shape)}, expected " \
        f"{tuple(reference.shape)}"
    scores = scores.double()
    if not method.startswith(OURS_PREFIX):
        defined = reference.isfinite()
        scores, reference = scores[defined], reference[defined]
    if (scores.isnan() != reference.isnan()).any():
        error = math.inf  # NaN on one side only: no finite error describes it
    else:
        error = (scores - reference).abs().nan_to_num(nan=0.0).max().item() if reference.numel() else 0.0
    if method.startswith(OURS_PREFIX) or (dtype == torch.float32 and hold_baselines):
        torch.testing.assert_close(
            scores, reference, rtol=0, atol=tolerance, equal_nan=True,
            msg=lambda m: f"{method} is wrong on {label} (reference: {reference_method}, atol {tolerance}):\n{m}",
        )
    elif error > tolerance:
        warnings.warn(f"{method} on {label} is off by {error:.1e} (> {tolerance:.0e}); timed anyway")
    return error
