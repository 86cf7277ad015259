"""MonoLoss: 1 - mean MonoScore over a batch, as a differentiable training objective."""

import torch
from torch import Tensor, nn

from ._dispatch import check_backend, loss_stats_function, stats_function
from ._validate import _check_num_latents, check_finite, check_stats_finite, validate_acts
from .stats import CsrActs, MonoScoreStats, empty_batch_stats, finalize, reshift

REDUCTIONS = ("mean", "none")


def monoloss(acts, emb: Tensor, *, reduction: str = "mean", num_latents: int | None = None,
             backend: str = "auto", differentiable_emb: bool = False, group=None,
             distributed: bool = False) -> Tensor:
    r"""MonoLoss of a batch: 1 - (mean MonoScore over the latents whose score is defined),
    with each latent's min and max taken over the batch.

    Differentiable with respect to dense acts and to the values of a (values, indices)
    TopK pair, including through each latent's min and max (ties share the gradient, as
    in torch.amin/amax). The gradient of a TopK pair reaches only its k values per row,
    so the backward costs O(N·k·d). emb is a constant unless `differentiable_emb`.

    Args:
        acts, emb, num_latents, backend: as for `monoscore` (dense, a TopK pair, COO, CSR, or an SAE
            library's output as it comes).
        reduction: "mean" (the loss, a scalar float32) or "none" (the (M,) MonoScores
            themselves, NaN where undefined, with gradient where defined). Both come from
            the one-pass form, which `monoscore` refines for latents that one sample
            carries (monoloss_kernels/refine.py): there they can differ by g·eps32·κ.
        differentiable_emb: also differentiate with respect to emb.
        distributed: each rank of torch.distributed `group` (None: the default group)
            passes its own part of the global batch; the statistics are all-reduced, so
            every rank gets the loss of the global batch (min and max over all ranks)
            and the gradient of that loss for its own samples -- equal to one process
            computing the loss of the concatenated batch. Collective: every rank must
            call it, with the same num_latents and d. Under DistributedDataParallel,
            which averages the parameter gradients over ranks, that gradient is divided
            by world_size: write `coef * world_size * monoloss(...)` to train as one
            process with `coef` would (the full gradient is the sum over ranks; DDP
            averages), as for `dataset_monoloss_backward`'s scale.
        group: a torch.distributed ProcessGroup, only with `distributed=True` (a group
            without it raises ValueError rather than silently giving each rank its
            local loss).

    Returns:
        "mean": a scalar. A batch in which no latent is defined (N < 2, or every latent
        constant) gives 1.0 with zero gradient: no latent carries information.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_group(group, distributed)
    acts, emb = validate_acts(acts, emb, num_latents)
    if not differentiable_emb:
        emb = emb.detach()
    sparse = isinstance(acts, CsrActs)
    stats_function(backend, emb.device, sparse)  # backend= checked on every path, N < 2 included
    num_rows, num_latents = (acts.num_rows, acts.num_latents) if sparse else acts.shape
    values = acts.values if sparse else acts
    if distributed:
        stats = _local_stats(acts, emb, backend, sparse, num_rows)
        stats, num_rows = _all_reduce_stats(stats, acts, num_rows, group)
        # The all-reduced sums are float64 (moved onto the common shift); the scores
        # and the loss are float32 on every path.
        scores = finalize(stats).float() if num_rows >= 2 else None
    elif num_rows >= 2:
        stats, cross_sq_at_min = loss_stats_function(backend, emb.device, sparse, differentiable_emb)(acts, emb)
        check_stats_finite(stats, emb)
        scores = finalize(stats, cross_sq_at_min)
    else:
        check_finite(acts, emb)
        scores = None
    if scores is None:  # N < 2: no pair, every score undefined
        scores = torch.full((num_latents,), float("nan"), device=emb.device) + _graph_zero(values, emb)
    if reduction == "none":
        return scores
    defined = scores.isfinite()
    mean_score = torch.where(defined, scores, 0.0).sum() / defined.sum().clamp(min=1)
    return 1 - mean_score


class MonoLoss(nn.Module):
    """`monoloss` as a module: `MonoLoss(num_latents=M)(acts, emb)`; see `monoloss` for the arguments."""

    def __init__(self, *, reduction: str = "mean", num_latents: int | None = None, backend: str = "auto",
                 differentiable_emb: bool = False, distributed: bool = False, group=None):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        _check_group(group, distributed)
        check_backend(backend)
        if num_latents is not None:
            _check_num_latents(num_latents, None)
        self.reduction = reduction
        self.num_latents = num_latents
        self.backend = backend
        self.differentiable_emb = differentiable_emb
        self.distributed = distributed
        self.group = group

    def forward(self, acts, emb: Tensor) -> Tensor:
        return monoloss(acts, emb, reduction=self.reduction, num_latents=self.num_latents, backend=self.backend,
                        differentiable_emb=self.differentiable_emb, distributed=self.distributed, group=self.group)

    def extra_repr(self) -> str:
        return (f"reduction={self.reduction!r}, num_latents={self.num_latents}, backend={self.backend!r}, "
                f"distributed={self.distributed}")


def _graph_zero(values: Tensor, emb: Tensor) -> Tensor:
    """A 0 that depends on values and emb (emb is detached unless differentiable_emb):
    added to a result that has no pair to depend on, it keeps both inputs in the graph,
    so backward() runs and gives them zero gradients (the inputs are finite: checked)."""
    return 0 * values.sum() + 0 * emb.sum()


def _check_group(group, distributed: bool) -> None:
    """`group` only with distributed=True, and then a ProcessGroup (or None)."""
    if group is None:
        return
    if not distributed:
        raise ValueError(
            "group is given but distributed=False: the loss would be each rank's local one; "
            "pass distributed=True to compute it over the group's global batch"
        )
    import torch.distributed as dist

    if dist.is_available() and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")


def _local_stats(acts, emb: Tensor, backend: str, sparse: bool, num_rows: int) -> MonoScoreStats:
    """This rank's statistics; an empty part gives zero sums and an empty range."""
    if num_rows > 0:
        stats = stats_function(backend, emb.device, sparse)(acts, emb)
        check_stats_finite(stats, emb)
        return stats
    num_latents = acts.num_latents if sparse else acts.shape[1]
    zero = _graph_zero(acts.values if sparse else acts, emb)
    empty = empty_batch_stats(num_latents, emb.shape[1], emb.device)
    return empty._replace(cross=empty.cross + zero, act_range=empty.act_range + zero, moments=empty.moments + zero)


def _all_reduce_stats(stats: MonoScoreStats, acts, num_rows: int, group):
    """The statistics of the global batch on every rank, differentiable for this rank's part.

    Sums: every rank moves its sums onto the global minimum (a common shift), then a SUM
    whose backward is the identity: each rank's loss is the global loss, and the
    gradient of the global sum with respect to this rank's part is 1. Min and max: the
    gradient reaches this rank's elements tied with the global extreme, each getting
    the share torch.amin/amax would give it over the concatenated batch (local ties /
    global ties; the registered backward splits the share among the local ties).
    """
    import torch.distributed as dist

    local_min, local_max = stats.act_range[0], stats.act_range[1]
    global_min, global_max = local_min.detach().clone(), local_max.detach().clone()
    dist.all_reduce(global_min, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    extremes = []
    for local, global_, in ((local_min, global_min), (local_max, global_max)):
        ties = _ties(acts, local.detach(), num_rows) * (local.detach() == global_)
        all_ties = ties.clone()
        dist.all_reduce(all_ties, op=dist.ReduceOp.SUM, group=group)
        weight = torch.where(ties > 0, ties / all_ties.clamp(min=1), 0.0)
        local_part = torch.where(ties > 0, local, 0.0)  # no gradient path from a rank without the extreme
        extremes.append(global_ + weight * (local_part - local_part.detach()))
    common_shift = torch.where(global_min.isfinite(), global_min.double(), 0.0)
    moved = reshift(stats, common_shift)
    sums = [moved.cross, moved.unit_emb_sum, moved.moments, moved.counts]
    flat = torch.cat([t.flatten() for t in sums])
    total = flat.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    flat = flat + (total - flat.detach())  # forward: the global sum; backward: identity
    cross, unit_emb_sum, moments, counts = flat.split([t.numel() for t in sums])
    num_latents = stats.shift.shape[0]
    global_stats = MonoScoreStats(
        cross=cross.view(-1, num_latents),
        unit_emb_sum=unit_emb_sum,
        shift=common_shift,
        act_range=torch.stack(extremes),
        moments=moments.view(4, num_latents),
        counts=counts,
    )
    return global_stats, int(counts[0].detach())


def _ties(acts, extreme: Tensor, num_rows: int) -> Tensor:
    """Per latent, how many of this rank's activations equal `extreme` (float32, as
    act_range): dense entries, or stored values plus the implicit zeros."""
    if not isinstance(acts, CsrActs):
        return (acts.detach().float() == extreme).sum(0).float()
    cols = acts.col_indices
    stored_ties = (acts.values.detach().float() == extreme[cols]).float()
    ties = torch.zeros_like(extreme).index_add_(0, cols, stored_ties)
    stored = torch.zeros_like(extreme).index_add_(0, cols, torch.ones_like(stored_ties))
    return ties + torch.where(extreme == 0, num_rows - stored, 0.0)
