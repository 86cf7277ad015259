"""monoloss_kernels: exact MonoScore (and MonoLoss) for sparse-autoencoder latents,
in fused C++/CUDA and Triton kernels.

    import monoloss_kernels as mk
    scores = mk.monoscore(acts, emb)   # (N, M) activations, (N, d) embeddings -> (M,)
"""

from . import reference
from ._dispatch import BACKENDS, available_backends
from .monoscore import monoscore
from .stats import MonoScoreStats, finalize

__all__ = ["BACKENDS", "MonoScoreStats", "available_backends", "finalize", "monoscore", "reference"]
__version__ = "0.1.0"
