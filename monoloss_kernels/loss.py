"""MonoLoss: 1 - mean MonoScore over a batch, as a differentiable training objective."""

import torch
from torch import Tensor, nn

from ._dispatch import stats_function
from ._validate import check_stats_finite, validate_acts
from .stats import CsrActs, finalize

REDUCTIONS = ("mean", "none")


def monoloss(acts, emb: Tensor, *, reduction: str = "mean", num_latents: int | None = None,
             backend: str = "auto", differentiable_emb: bool = False) -> Tensor:
    r"""MonoLoss of a batch: 1 - (mean MonoScore over the latents whose score is defined),
    with each latent's min and max taken over the batch.

    Differentiable with respect to dense acts and to the values of a (values, indices)
    TopK pair, including through each latent's min and max (ties share the gradient, as
    in torch.amin/amax). The gradient of a TopK pair reaches only its k values per row,
    so the backward costs O(N·k·d). emb is a constant unless `differentiable_emb`.

    Args:
        acts, emb, num_latents, backend: as for `monoscore` (dense, a TopK pair, COO or CSR).
        reduction: "mean" (the loss, a scalar float32) or "none" (the (M,) MonoScores
            themselves, NaN where undefined, with gradient where defined).
        differentiable_emb: also differentiate with respect to emb.

    Returns:
        "mean": a scalar. A batch in which no latent is defined (N < 2, or every latent
        constant) gives 1.0 with zero gradient: no latent carries information.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    acts, emb = validate_acts(acts, emb, num_latents)
    if not differentiable_emb:
        emb = emb.detach()
    sparse = isinstance(acts, CsrActs)
    num_rows, num_latents = (acts.num_rows, acts.num_latents) if sparse else acts.shape
    if num_rows < 2:
        scores = torch.full((num_latents,), float("nan"), device=emb.device)
        # Keep the graph connected, so backward() runs and gives zero gradients.
        values = acts.values if sparse else acts
        scores = scores + 0 * values.sum()
    else:
        stats = stats_function(backend, emb.device, sparse)(acts, emb)
        check_stats_finite(stats, emb)
        scores = finalize(stats)
    if reduction == "none":
        return scores
    defined = scores.isfinite()
    mean_score = torch.where(defined, scores, 0.0).sum() / defined.sum().clamp(min=1)
    return 1 - mean_score


class MonoLoss(nn.Module):
    """`monoloss` as a module: `MonoLoss(num_latents=M)(acts, emb)`; see `monoloss` for the arguments."""

    def __init__(self, *, reduction: str = "mean", num_latents: int | None = None, backend: str = "auto",
                 differentiable_emb: bool = False):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.num_latents = num_latents
        self.backend = backend
        self.differentiable_emb = differentiable_emb

    def forward(self, acts, emb: Tensor) -> Tensor:
        return monoloss(acts, emb, reduction=self.reduction, num_latents=self.num_latents, backend=self.backend,
                        differentiable_emb=self.differentiable_emb)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, num_latents={self.num_latents}, backend={self.backend!r}"
