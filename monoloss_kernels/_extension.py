"""Loads the compiled extension (monoloss_kernels._C) and says what it holds.

Importing _C registers the C++ ops with the dispatcher. If it cannot be loaded
(not built, or built against another torch), the package still imports: the
Triton and torch backends keep working and asking for "cpu"/"cuda" raises
`EXTENSION_ERROR`.
"""

import torch

from .stats import empty_stats_like

EXTENSION_ERROR = None
try:
    from . import _C  # noqa: F401  (registers torch.ops.monoloss_kernels.*)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    EXTENSION_ERROR = (
        f"monoloss_kernels._C could not be loaded ({exc}). Rebuild it against the torch you run "
        f"(torch {torch.__version__}): pip install --no-build-isolation --force-reinstall ."
    )

STATS_OP = "monoloss_kernels::monoscore_stats"
CSR_STATS_OP = "monoloss_kernels::monoscore_stats_csr"


BACKWARD_OP = "monoloss_kernels::monoscore_stats_backward"
CSR_BACKWARD_OP = "monoloss_kernels::monoscore_stats_csr_backward"


def has_kernel(dispatch_key: str, op: str = STATS_OP) -> bool:
    """True if the C++ `op` has an implementation for `dispatch_key` ("CPU" or "CUDA")."""
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


if EXTENSION_ERROR is None:

    @torch.library.register_fake(STATS_OP)
    def _monoscore_stats_fake(acts, emb):
        return tuple(empty_stats_like(acts, emb))

    @torch.library.register_fake(CSR_STATS_OP)
    def _monoscore_stats_csr_fake(crow_indices, col_indices, values, emb, num_latents):
        return tuple(empty_stats_like(emb, emb, num_latents))

    @torch.library.register_fake(BACKWARD_OP)
    def _monoscore_stats_backward_fake(acts, emb, shift, act_range, grad_cross, grad_moments, grad_range):
        return torch.empty_like(acts, memory_format=torch.contiguous_format)

    @torch.library.register_fake(CSR_BACKWARD_OP)
    def _monoscore_stats_csr_backward_fake(crow_indices, col_indices, values, emb, num_latents, shift, act_range,
                                           grad_cross, grad_moments, grad_range):
        return torch.empty_like(values, memory_format=torch.contiguous_format)
