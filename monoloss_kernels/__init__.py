"""monoloss_kernels: exact MonoScore (and MonoLoss) for sparse-autoencoder latents,
in fused C++/CUDA and Triton kernels.

    import monoloss_kernels as mk
    scores = mk.monoscore(acts, emb)   # (N, M) activations, (N, d) embeddings -> (M,)
    scores = mk.monoscore(torch.topk(pre_acts, k), emb, num_latents=M)   # TopK latents, O(N·k·d)

    acc = mk.MonoScoreAccumulator(num_latents=M, dim=d)   # any number of rows, one pass
    for acts, emb in batches:
        acc.update(acts, emb)
    scores = acc.compute()
"""

from . import _autograd, reference, sae
from ._dispatch import BACKENDS, available_backends
from ._extension import ExtensionLoadWarning, build_info, release_cpu_buffers
from .accumulator import MonoScoreAccumulator
from .dataset_loss import dataset_monoloss_backward
from .loss import MonoLoss, monoloss
from .monoscore import monoscore
from .purity import ClassPurityAccumulator, class_purity
from .stats import MonoScoreStats, finalize

__all__ = [
    "BACKENDS",
    "ClassPurityAccumulator",
    "ExtensionLoadWarning",
    "MonoLoss",
    "MonoScoreAccumulator",
    "MonoScoreStats",
    "available_backends",
    "build_info",
    "class_purity",
    "dataset_monoloss_backward",
    "finalize",
    "monoloss",
    "monoscore",
    "reference",
    "release_cpu_buffers",
    "sae",
]
__version__ = "0.1.0"

# Submodules with heavy optional dependencies, imported on first attribute access:
# `import monoloss_kernels` must not import open_clip.
_LAZY_SUBMODULES = ("embeddings",)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_autograd.register()
