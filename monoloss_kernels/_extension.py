"""Loads the compiled extension (monoloss_kernels._C), says what it holds and what it
was built with.

Importing _C registers the C++ ops with the dispatcher. If it cannot be loaded (built
against another torch -- `undefined symbol` --, for another Python, a missing shared
library, or not built at all), the package still imports: one `ExtensionLoadWarning`
gives the versions it was built with (setup.py's `_build_info.json`) and the running
ones, and the reinstall command; `backend="auto"` then uses Triton on CUDA tensors and
plain torch on CPU tensors, and asking for "cpu"/"cuda" raises `EXTENSION_ERROR`, the
same text.
"""

import json
import platform
import shlex
import warnings
from pathlib import Path

import torch

from .stats import empty_stats_like

BUILD_INFO_PATH = Path(__file__).with_name("_build_info.json")  # written by setup.py


class ExtensionLoadWarning(RuntimeWarning):
    """monoloss_kernels._C could not be loaded: the C++ "cpu" and "cuda" backends are
    unavailable and backend="auto" falls back to Triton (CUDA tensors) or torch (CPU)."""


def read_build_info(path: Path = BUILD_INFO_PATH) -> tuple[dict | None, str | None]:
    """(the versions the extension was built with, None), or (None, why they are unknown)."""
    try:
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, (f"{path} is missing: the extension was not built by this package's setup.py "
                      "(or by an older one), or not built at all")
    except (OSError, ValueError) as exc:
        return None, f"{path} could not be read ({exc})"


def running_versions() -> dict:
    """The versions this process runs with, under the names setup.py records."""
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


def reinstall_command(force_cuda: bool = False) -> str:
    """The command that rebuilds _C against the running torch. --no-deps: --force-reinstall
    alone would also reinstall torch itself, possibly as another version."""
    prefix = "MONOLOSS_FORCE_CUDA=1 " if force_cuda else ""
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file():  # imported from the source checkout: editable install, or not installed
        return (f"cd {shlex.quote(str(root))} && "
                f"{prefix}pip install --no-build-isolation --force-reinstall --no-deps -e .")
    return f"{prefix}pip install --no-build-isolation --force-reinstall --no-deps . (from the monoloss_kernels source)"


def _versions_line(versions: dict) -> str:
    line = (f"torch {versions.get('torch')}, CUDA {versions.get('cuda')}, Python {versions.get('python')}, "
            f"C++11 ABI {versions.get('cxx11_abi')}")
    if "cuda_kernels" in versions:
        kernels = (f"CUDA kernels for {versions.get('cuda_arch_list')} (nvcc {versions.get('nvcc')})"
                   if versions["cuda_kernels"] else "CPU kernels only")
        line += f"; {kernels}"
    return line


def load_error_message(error: BaseException, build_info: dict | None, build_info_error: str | None) -> str:
    """What failed, built-for vs running versions, what still works, and how to fix it."""
    built = _versions_line(build_info) if build_info is not None else f"unknown ({build_info_error})"
    return (
        f"monoloss_kernels._C (the C++/CUDA kernels) could not be loaded: {type(error).__name__}: {error}\n"
        f"  built with: {built}\n"
        f"  running:    {_versions_line(running_versions())}\n"
        "backend='auto' falls back to Triton on CUDA tensors and plain torch on CPU tensors; "
        "backend='cpu' and backend='cuda' are unavailable. Rebuild against the torch you run:\n"
        f"  {reinstall_command()}"
    )


BUILD_INFO, BUILD_INFO_ERROR = read_build_info()
LOAD_ERROR = None  # the exception raised by importing _C, as text
EXTENSION_ERROR = None  # the full message: raised for backend="cpu"/"cuda", warned once at import
try:
    from . import _C  # noqa: F401  (registers torch.ops.monoloss_kernels.*)
except (ImportError, OSError) as exc:  # OSError: a shared library _C links to is missing
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    EXTENSION_ERROR = load_error_message(exc, BUILD_INFO, BUILD_INFO_ERROR)
    # This module is imported once per process, so this warns once.
    warnings.warn(EXTENSION_ERROR, ExtensionLoadWarning)

STATS_OP = "monoloss_kernels::monoscore_stats"
CSR_STATS_OP = "monoloss_kernels::monoscore_stats_csr"


BACKWARD_OP = "monoloss_kernels::monoscore_stats_backward"
CSR_BACKWARD_OP = "monoloss_kernels::monoscore_stats_csr_backward"
# MonoLoss's CSR statistics with the squared norms at the minimum fused in (CPU).
LOSS_CSR_STATS_OP = "monoloss_kernels::monoloss_stats_csr"
LOSS_CSR_BACKWARD_OP = "monoloss_kernels::monoloss_stats_csr_backward"


def has_kernel(dispatch_key: str, op: str = STATS_OP) -> bool:
    """True if the C++ `op` has an implementation for `dispatch_key` ("CPU" or "CUDA")."""
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


def release_cpu_buffers() -> int:
    """Frees the CPU memory the C++ kernels keep for reuse; returns how many bytes.

    The kernels take their large buffers (the statistics' (M, d) `cross`, its gradient,
    the dense backward's (N, M) result, the tiles of the sparse kernels) from a pool
    that keeps up to 256 MiB of freed ones: a training loop allocates the same buffers
    every step, and fresh memory costs a page fault per 4 KiB (about 5 ms of a 35 ms
    TopK MonoLoss step at B=4096, M=8192, d=768). Call this when done training to
    give that memory back; 0 without the extension.
    """
    if EXTENSION_ERROR is not None:
        return 0
    return torch.ops.monoloss_kernels.release_pooled_buffers()


# What the CSR kernels' vector width (csrc/cpu/vectorize.h) says of the CPU target they run.
CPU_ISA_OF_VECTOR_WIDTH = {16: "avx512", 8: "avx2", 4: "baseline"}


def cpu_isa() -> str | None:
    """The instruction set the CPU kernels of sparse activations run with: "avx512",
    "avx2" (with FMA) or "baseline", the widest the CPU has unless MONOLOSS_CPU_ISA
    caps it ("avx2" or "baseline"); None without the extension."""
    if EXTENSION_ERROR is not None:
        return None
    return CPU_ISA_OF_VECTOR_WIDTH[torch.ops.monoloss_kernels.cpu_vector_width()]


def build_info() -> dict:
    """How this installation was built and what it can run, for bug reports and checks.

    Returns a dict:
        built_with: the versions setup.py recorded at build time (torch, cuda -- the CUDA
            of that torch, None for a CPU torch --, cuda_kernels, nvcc, cuda_arch_list,
            python, cxx11_abi), or None when `_build_info.json` is missing or unreadable;
        build_info_error: why built_with is None, else None;
        running: torch, cuda, python, cxx11_abi of this process;
        extension_loaded: whether monoloss_kernels._C loaded;
        load_error: the import error of _C ("ImportError: ... undefined symbol ..."), or None;
        kernels: {"cpu": bool, "cuda": bool}, the C++ kernels registered;
        cpu_isa: what `cpu_isa()` gives;
        backends: {"cpu": [...], "cuda": [...]}, what `available_backends` gives per device,
            in order of preference ("cuda": [] without a visible GPU);
        triton_error: why the Triton backend is unavailable, or None;
        reinstall_command: the command that rebuilds _C against the running torch.
    """
    from ._dispatch import TRITON_ERROR, available_backends  # _dispatch imports this module

    return {
        "built_with": None if BUILD_INFO is None else dict(BUILD_INFO),
        "build_info_error": BUILD_INFO_ERROR,
        "running": running_versions(),
        "extension_loaded": EXTENSION_ERROR is None,
        "load_error": LOAD_ERROR,
        "kernels": {"cpu": has_kernel("CPU"), "cuda": has_kernel("CUDA")},
        "cpu_isa": cpu_isa(),
        "backends": {
            "cpu": available_backends(torch.device("cpu")),
            "cuda": available_backends(torch.device("cuda")) if torch.cuda.is_available() else [],
        },
        "triton_error": TRITON_ERROR,
        "reinstall_command": reinstall_command(),
    }


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

    @torch.library.register_fake(LOSS_CSR_STATS_OP)
    def _monoloss_stats_csr_fake(crow_indices, col_indices, values, emb, num_latents):
        cross_sq_at_min = emb.new_empty((num_latents,), dtype=torch.float64)
        entry_order = emb.new_empty((3, values.shape[0]), dtype=torch.int32)
        return (*empty_stats_like(emb, emb, num_latents), cross_sq_at_min, entry_order)

    @torch.library.register_fake(LOSS_CSR_BACKWARD_OP)
    def _monoloss_stats_csr_backward_fake(crow_indices, col_indices, values, emb, num_latents, shift, act_range,
                                          cross, unit_emb_sum, entry_order, grad_cross_sq_at_min, grad_moments,
                                          grad_range):
        return torch.empty_like(values, memory_format=torch.contiguous_format)
