"""The one validation point: every public entry checks its inputs here, and each
error names the argument, what was expected and what came. Nothing downstream
re-validates."""

import torch
from torch import Tensor

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}"
        )


def validate_dense(acts, emb) -> tuple[Tensor, Tensor]:
    """Checks a dense (acts: N x M, emb: N x d) pair and returns it unchanged.

    NaN/Inf values are refused after the kernels (`check_stats_finite`).
    """
    _check_tensor("acts", acts)
    _check_tensor("emb", emb)
    if acts.shape[0] != emb.shape[0]:
        raise ValueError(
            f"acts and emb must have the same number of rows N: acts is {tuple(acts.shape)} "
            f"(N, M), emb is {tuple(emb.shape)} (N, d)"
        )
    if acts.device != emb.device:
        raise ValueError(f"acts and emb must be on the same device, got acts on {acts.device} and emb on {emb.device}")
    return acts, emb


def check_stats_finite(stats, emb: Tensor) -> None:
    """Refuses NaN/Inf inputs after the kernels, from the small statistics, so that
    acts is read once: its float64 moments are finite iff acts is (|b|² < 1e77 for
    float32 b), and unit_emb_sum iff every emb row has a finite float32 norm."""
    if not bool(torch.isfinite(stats.moments).all()):
        raise ValueError("acts contains NaN or Inf values")
    if not bool(torch.isfinite(stats.unit_emb_sum).all()):
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("emb contains NaN or Inf values")
        raise ValueError(
            "emb has rows whose norm overflows float32; rescale emb (cosine similarity "
            "does not depend on the scale of a row)"
        )
