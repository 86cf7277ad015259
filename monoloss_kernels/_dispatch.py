"""The one dispatch point: maps `backend=` to the function that fills `MonoScoreStats`.

Where the compiled extension did not load (`_extension.EXTENSION_ERROR`), "auto" picks
Triton for CUDA tensors and torch for CPU tensors, and "cpu"/"cuda" raise that error."""

import os
from typing import Callable

import torch
from torch import Tensor

from . import _extension
from .stats import CsrActs, MonoScoreStats

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")

try:
    from .ops.triton_monoscore_stats import triton_stats
    from .ops.triton_monoscore_stats_csr import triton_csr_stats

    TRITON_ERROR = None
except ImportError as exc:  # triton is optional (e.g. macOS, Windows)
    triton_stats = triton_csr_stats = None
    TRITON_ERROR = f"backend='triton' needs the triton package ({exc}); pip install triton"


def _cpp_stats(acts: Tensor, emb: Tensor) -> MonoScoreStats:
    return MonoScoreStats(*torch.ops.monoloss_kernels.monoscore_stats(acts, emb))


def _cpp_csr_stats(acts: CsrActs, emb: Tensor) -> MonoScoreStats:
    return MonoScoreStats(*torch.ops.monoloss_kernels.monoscore_stats_csr(
        acts.crow_indices, acts.col_indices, acts.values, emb, acts.num_latents
    ))


def _cpp_csr_loss_stats(acts: CsrActs, emb: Tensor) -> tuple[MonoScoreStats, Tensor]:
    # The sorted entries (the last output) are for the op's backward only, saved by autograd.
    *stats, cross_sq_at_min, _entry_order = torch.ops.monoloss_kernels.monoloss_stats_csr(
        acts.crow_indices, acts.col_indices, acts.values, emb, acts.num_latents
    )
    return MonoScoreStats(*stats), cross_sq_at_min


def _torch_stats(acts: Tensor, emb: Tensor) -> MonoScoreStats:
    return MonoScoreStats(*torch.ops.monoloss_kernels.monoscore_stats_torch(acts, emb))


def _torch_csr_stats(acts: CsrActs, emb: Tensor) -> MonoScoreStats:
    return MonoScoreStats(*torch.ops.monoloss_kernels.monoscore_stats_csr_torch(
        acts.crow_indices, acts.col_indices, acts.values, emb, acts.num_latents
    ))


def triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str) -> list[str]:
    """The backends that can run on tensors on `device` (a torch.device or a name such
    as "cuda"), in order of preference: "auto" takes the first (README, Use, says why
    Triton comes before CUDA on GPUs)."""
    device = torch.device(device)
    names = []
    if device.type == "cuda":
        if triton_stats is not None:
            names.append("triton")
        if _extension.has_kernel("CUDA"):
            names.append("cuda")
    elif device.type == "cpu":
        if _extension.has_kernel("CPU"):
            names.append("cpu")
        if triton_stats is not None and triton_runs_on(device):
            names.append("triton")
    names.append("torch")
    return names


def check_backend(backend) -> None:
    """Refuses a `backend=` that is none of BACKENDS; for callers that check it before
    the inputs' device is known (module constructors)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def stats_function(backend: str, device: torch.device, sparse: bool = False) -> Callable[..., MonoScoreStats]:
    """The statistics implementation for `backend` on `device`, taking (acts, emb) with
    acts dense or (`sparse`) a `CsrActs`; clear error if unavailable."""
    check_backend(backend)
    if backend == "auto":
        backend = available_backends(device)[0]
    if backend == "torch":
        return _torch_csr_stats if sparse else _torch_stats
    if backend == "triton":
        if triton_stats is None:
            raise RuntimeError(TRITON_ERROR)
        if not triton_runs_on(device):
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                f"the inputs are on {device}"
            )
        return triton_csr_stats if sparse else triton_stats
    # "cpu" / "cuda": the same dispatcher op, whose kernel is chosen by the inputs' device.
    if device.type != backend:
        raise ValueError(f"backend={backend!r} needs {backend} tensors; the inputs are on {device}")
    if _extension.EXTENSION_ERROR is not None:
        raise RuntimeError(_extension.EXTENSION_ERROR)
    if not _extension.has_kernel(backend.upper()):
        built = _extension.BUILD_INFO
        how = f" (built with torch {built.get('torch')}, CUDA {built.get('cuda')})" if built else ""
        raise RuntimeError(
            f"monoloss_kernels was built without {backend.upper()} kernels{how}. Rebuild where nvcc and a "
            "CUDA build of torch are present:\n"
            f"  {_extension.reinstall_command(force_cuda=True)}"
        )
    return _cpp_csr_stats if sparse else _cpp_stats


def loss_stats_function(backend: str, device: torch.device, sparse: bool,
                        emb_grad: bool) -> Callable[..., tuple[MonoScoreStats, Tensor | None]]:
    """For MonoLoss: a function of (acts, emb) giving (statistics, cross_sq_at_min or None),
    cross_sq_at_min being the squared norms `finalize` needs, where the kernel computes
    them itself.

    The C++ CPU kernel for sparse activations does (`monoloss_stats_csr`): it sums each
    squared norm as it finishes the latent's column of cross, and its backward forms
    ∂L/∂cross from cross as it reads it, where `shifted_sq_norms`'s backward would write
    the whole (d, M) gradient for the statistics' backward to read back (about 4 ms of a
    30 ms step at B=4096, M=8192, k=64, d=768 on the 2-core dev CPU); the backward also
    reuses the forward's sort of the entries. It gives no gradient for emb: with
    `emb_grad`, the statistics op and finalize's squared norms.
    """
    stats_of = stats_function(backend, device, sparse)
    if (stats_of is _cpp_csr_stats and device.type == "cpu" and not emb_grad
            and _extension.has_kernel("CPU", _extension.LOSS_CSR_STATS_OP)):
        return _cpp_csr_loss_stats
    return lambda acts, emb: (stats_of(acts, emb), None)
