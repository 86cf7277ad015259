"""MonoLoss: 1 - mean MonoScore over a batch, as a differentiable training objective."""

import torch
from torch import Tensor, nn

from ._dispatch import check_backend, loss_stats_function, stats_function
from ._validate import (check_finite, check_num_latents, check_ranks_stats_finite, check_stats_finite, stats_flags,
                        validate_acts)
from .refine import block_deflated_scores, csr_entry_positions, ill_conditioned_latents, inverse_norms, refine_latents
from .stats import CsrActs, MonoScoreStats, empty_batch_stats, entry_rows, finalize, reshift

REDUCTIONS = ("mean", "none")
# float64 elements recomputed at once in the refined latents' backward: of the (N, latents)
# columns of dense acts, or of the (entries, d) embedding rows of sparse ones; 128 MiB,
# with its few temporaries of the same size.
REFINE_ELEMENTS_PER_BLOCK = 2**24


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
            themselves, NaN where undefined, with gradient where defined). As in
            `monoscore`, latents that one sample carries (κ > refine.KAPPA_MAX,
            monoloss_kernels/refine.py) get their float64 deflated scores instead of the
            one-pass ones, and their gradient is that of a float64 recomputation of
            them (op refine_loss_scores; its backward costs O(N·d) per such latent of
            dense acts, O(d) per stored entry of sparse ones).
            Not with `distributed=True`: the refinement needs every rank's rows, so
            there those latents keep the one-pass form's error, about g·eps32·κ.
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
            A part refused (NaN/Inf, or acts too large) on any rank makes every rank
            raise ValueError, after the same collectives, so ranks stay in step.
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
        local_stats = _local_stats(acts, emb, backend, sparse, num_rows)
        stats, num_rows = _all_reduce_stats(local_stats, acts, emb, num_rows, group)
        # The all-reduced sums are float64 (moved onto the common shift); the scores
        # and the loss are float32 on every path.
        scores = finalize(stats).float() if num_rows >= 2 else None
    elif num_rows >= 2:
        stats, cross_sq_at_min = loss_stats_function(backend, emb.device, sparse, differentiable_emb)(acts, emb)
        check_stats_finite(stats, emb)
        scores = finalize(stats, cross_sq_at_min)
        # Where no latent needs it (most batches), no refinement op: its backward returns
        # a gradient for all of acts (zeros but for the refined latents' entries), which
        # autograd then adds to the statistics' (of dense acts, 10% of a step). Found
        # once here (one device sync) and handed to the op and its backward.
        latents = ill_conditioned_latents(stats)
        if latents.numel() > 0:
            scores = refine_loss(scores, acts, emb, stats.act_range, latents)
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
            check_num_latents(num_latents, None)
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
    """This rank's statistics, not yet checked (`_all_reduce_stats` checks every rank's
    at once); an empty part gives zero sums and an empty range."""
    if num_rows > 0:
        return stats_function(backend, emb.device, sparse)(acts, emb)
    num_latents = acts.num_latents if sparse else acts.shape[1]
    zero = _graph_zero(acts.values if sparse else acts, emb)
    empty = empty_batch_stats(num_latents, emb.shape[1], emb.device)
    return empty._replace(cross=empty.cross + zero, act_range=empty.act_range + zero, moments=empty.moments + zero)


def _all_reduce_stats(stats: MonoScoreStats, acts, emb: Tensor, num_rows: int, group):
    """The statistics of the global batch on every rank, differentiable for this rank's part.

    Every rank's part is checked (`stats_flags`) in the same SUM as the sums, and every
    rank raises if any part is refused: a rank raising alone, before the collectives,
    would leave the others failing in gloo or waiting out the NCCL timeout.

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
        ties = extreme_ties(acts, local.detach(), num_rows) * (local.detach() == global_)
        all_ties = ties.clone()
        dist.all_reduce(all_ties, op=dist.ReduceOp.SUM, group=group)
        weight = torch.where(ties > 0, ties / all_ties.clamp(min=1), 0.0)
        local_part = torch.where(ties > 0, local, 0.0)  # no gradient path from a rank without the extreme
        extremes.append(global_ + weight * (local_part - local_part.detach()))
    common_shift = torch.where(global_min.isfinite(), global_min.double(), 0.0)
    moved = reshift(stats, common_shift)
    sums = [moved.cross, moved.unit_emb_sum, moved.moments, moved.counts]
    flat = torch.cat([t.flatten() for t in sums])
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    problems = torch.zeros(world_size, 3, dtype=flat.dtype, device=flat.device)
    if num_rows > 0:
        problems[rank] = (~stats_flags(stats)).to(flat.dtype)
    total = torch.cat([flat.detach(), problems.flatten()])
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    total, problems = total.split([flat.numel(), problems.numel()])
    check_ranks_stats_finite(stats, emb, problems.view(world_size, 3).tolist(), rank)
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


def extreme_ties(acts, extreme: Tensor, num_rows: int) -> Tensor:
    """Per latent, how many of this rank's activations equal `extreme` (float32, as
    act_range): dense entries, or stored values plus the implicit zeros."""
    if not isinstance(acts, CsrActs):
        return (acts.detach().float() == extreme).sum(0).float()
    cols = acts.col_indices
    stored_ties = (acts.values.detach().float() == extreme[cols]).float()
    ties = torch.zeros_like(extreme).index_add_(0, cols, stored_ties)
    stored = torch.zeros_like(extreme).index_add_(0, cols, torch.ones_like(stored_ties))
    return ties + torch.where(extreme == 0, num_rows - stored, 0.0)


# The one-pass closed form cancels for latents that one sample carries (refine.py): their
# scores, and autograd's gradient of them, are off by up to g·eps32·κ (scores outside
# [-1, 1], gradients 1e3 times too large). The loss replaces them as `monoscore` does, by
# their float64 deflated scores, in an op whose backward differentiates a float64
# recomputation of just those latents (`refined_scores_of_columns` for dense acts,
# `refined_scores_of_entries` for sparse ones); the one-pass scores
# keep the gradient of every other latent.
@torch.library.custom_op("monoloss_kernels::refine_loss_scores", mutates_args=())
def refine_loss_scores(scores: Tensor, acts: Tensor, emb: Tensor, act_range: Tensor, latents: Tensor) -> Tensor:
    """(M,) `scores` (the one-pass scores of dense acts (N, M), emb (N, d)) with `latents`
    (int64 indices, the ill-conditioned ones: refine.ill_conditioned_latents; act_range
    (2, M) every latent's min and max) replaced by their float64 deflated scores, rounded
    to scores' dtype. Its backward: the incoming gradient for the other latents goes to
    `scores`; for `latents`, to acts and emb through `refined_scores_of_columns`
    (`refined_scores_of_entries` for `refine_loss_scores_csr`)."""
    return refine_latents(scores, acts, emb, act_range, latents)


@refine_loss_scores.register_fake
def _(scores, acts, emb, act_range, latents):
    return torch.empty_like(scores)


@torch.library.custom_op("monoloss_kernels::refine_loss_scores_csr", mutates_args=())
def refine_loss_scores_csr(scores: Tensor, crow_indices: Tensor, col_indices: Tensor, values: Tensor, emb: Tensor,
                           num_latents: int, act_range: Tensor, latents: Tensor) -> Tensor:
    """`refine_loss_scores` for sparse acts in CSR form (`CsrActs`)."""
    return refine_latents(scores, CsrActs(crow_indices, col_indices, values, num_latents), emb, act_range, latents)


@refine_loss_scores_csr.register_fake
def _(scores, crow_indices, col_indices, values, emb, num_latents, act_range, latents):
    return torch.empty_like(scores)


def refined_scores_of_columns(columns: Tensor, unit: Tensor, unit_weight: Tensor) -> Tensor:
    """(F,) float64 MonoScores of the F latents in the float64 columns (N, F), differentiable
    in columns and unit (N, d) (the unit rows of emb; unit_weight (N,) 1 for a nonzero row,
    0 for a zero one). ã from each column's amin and amax (ties share their gradient as in
    torch.amin/amax), then refine.py's deflated identity with n* the argmax of each column:
    exact for any n*, so its gradient is that of the definition, and nothing cancels at the
    scale of n*. Every column must have max > min."""
    num_rows, num_latents = columns.shape
    lo, hi = columns.amin(0), columns.amax(0)
    weight = (columns - lo) / (hi - lo)  # (N, F) ã
    top = columns.detach().argmax(0)  # (F,) n*
    latent = torch.arange(num_latents, device=columns.device)
    top_weight = weight[top, latent]  # ã* (1, with its gradient)
    kept = torch.ones_like(weight).index_put((top, latent), torch.zeros((), dtype=weight.dtype))
    rest = weight * kept  # ã over n ≠ n*
    rest_emb = rest.T @ unit  # (F, d) V = Σ_{n≠n*} ã ê
    sum_rest, sumsq_rest = rest.sum(0), (rest * rest).sum(0)
    sumsq_unit_rest = unit_weight @ (rest * rest)
    numerator = top_weight * (unit[top] * rest_emb).sum(1) + 0.5 * ((rest_emb * rest_emb).sum(1) - sumsq_unit_rest)
    denominator = top_weight * sum_rest + 0.5 * (sum_rest * sum_rest - sumsq_rest)
    return numerator / denominator


def _unit_rows64(emb: Tensor) -> tuple[Tensor, Tensor]:
    """float64 unit rows of emb (0 for a zero row), differentiable, and their ‖ê‖² (1 or 0)."""
    x = emb.double()
    inv_norm = inverse_norms(x)
    return x * inv_norm[:, None], (inv_norm > 0).double()


def refined_scores_of_entries(rows: Tensor, local: Tensor, values: Tensor, count: Tensor, act_range: Tensor,
                              emb: Tensor, unit_emb_sum: Tensor, num_unit_rows: Tensor) -> Tensor:
    """(F,) float64 MonoScores of F latents from their stored entries (see
    refine.deflated_scores; the rows without one hold 0), differentiable in values and
    emb: refine.block_deflated_scores with each latent's min and max (act_range (2, F),
    float32 as the statistics hold them) made differentiable the way torch.amin/amax
    split a dense column's ties, the implicit zeros' shares going nowhere, as in the
    statistics' backward. O(d) per entry, where densifying the columns costs O(N·d) per
    latent. count (F,): entries per latent; unit_emb_sum (d,), num_unit_rows (): ΣÊ and
    the number of nonzero-norm rows over all N rows."""
    num_rows = emb.shape[0]
    count = count.double()
    x = values.float().double()  # as the kernels read them
    extremes = []
    for extreme in act_range.double():
        at = (x.detach() == extreme[local]).double()
        implicit_ties = torch.where((count < num_rows) & (extreme == 0), num_rows - count, 0.0)
        ties = torch.zeros_like(extreme).index_add(0, local, at) + implicit_ties
        # The exact extreme in value (x - x.detach() is 0); each tie gets 1/ties of its gradient.
        extremes.append(extreme + torch.zeros_like(extreme).index_add(0, local, (x - x.detach()) * at) / ties)
    return block_deflated_scores(rows, local, x, count, torch.stack(extremes), emb, unit_emb_sum, num_unit_rows)


def _refined_backward(grad: Tensor, out: Tensor, emb: Tensor, latents: Tensor, blocks_of, gather, emb_grad: bool):
    """(∂L/∂scores, [(positions, ∂L/∂ those acts entries)], ∂L/∂emb). `blocks_of(latents)`
    splits the latents into blocks recomputed at once; `gather(block)` gives (the block's
    acts entries, scores_of(entries, emb, unit_rows) their (F,) float64 scores, the
    entries' positions in acts), unit_rows(emb) being `_unit_rows64`. torch.func.vjp, not
    autograd: an op's implementation runs below the autograd dispatch key, where
    torch.enable_grad() records nothing."""
    grad_scores = grad.index_fill(0, latents, 0.0)
    grad_emb = torch.zeros_like(emb)
    parts = []
    # Latents whose refined score is NaN (fewer than two rows above the min) get no gradient.
    latents = latents[torch.isfinite(out[latents]) & (grad[latents] != 0)]
    if latents.numel() == 0:
        return grad_scores, parts, grad_emb
    if emb_grad:
        unit_rows = _unit_rows64
    else:
        constant_unit_rows = _unit_rows64(emb)
        unit_rows = lambda e: constant_unit_rows  # noqa: E731
    for block in blocks_of(latents):
        entries, scores_of, positions = gather(block)
        if emb_grad:
            _, vjp = torch.func.vjp(lambda v, e: scores_of(v, e, unit_rows), entries, emb)
            grad_entries, grad_emb_block = vjp(grad[block].double())
            grad_emb += grad_emb_block
        else:
            _, vjp = torch.func.vjp(lambda v: scores_of(v, emb, unit_rows), entries)
            (grad_entries,) = vjp(grad[block].double())
        parts.append((positions, grad_entries))
    return grad_scores, parts, grad_emb


@torch.library.custom_op("monoloss_kernels::refine_loss_scores_backward", mutates_args=())
def refine_loss_scores_backward(grad: Tensor, out: Tensor, acts: Tensor, emb: Tensor, latents: Tensor,
                                emb_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of `refine_loss_scores`: (∂L/∂scores, ∂L/∂acts, ∂L/∂emb (zeros unless
    emb_grad)), given ∂L/∂out and its output out."""
    def blocks_of(latents):
        return latents.split(max(1, REFINE_ELEMENTS_PER_BLOCK // max(1, acts.shape[0])))

    def columns_of(block):
        def scores_of(columns, e, unit_rows):  # values as the kernels read them: float32
            return refined_scores_of_columns(columns.float().double(), *unit_rows(e))
        return acts[:, block], scores_of, block

    grad_scores, parts, grad_emb = _refined_backward(grad, out, emb, latents, blocks_of, columns_of, emb_grad)
    grad_acts = torch.zeros_like(acts)
    for block, grad_block in parts:
        grad_acts[:, block] = grad_block
    return grad_scores, grad_acts, grad_emb


@refine_loss_scores_backward.register_fake
def _(grad, out, acts, emb, latents, emb_grad):
    return torch.empty_like(grad), torch.empty_like(acts), torch.empty_like(emb)


@torch.library.custom_op("monoloss_kernels::refine_loss_scores_csr_backward", mutates_args=())
def refine_loss_scores_csr_backward(grad: Tensor, out: Tensor, crow_indices: Tensor, col_indices: Tensor,
                                    values: Tensor, emb: Tensor, num_latents: int, act_range: Tensor,
                                    latents: Tensor, emb_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of `refine_loss_scores_csr`: (∂L/∂scores, ∂L/∂values, ∂L/∂emb), from
    the refined latents' entries (`refined_scores_of_entries`), in blocks of at most
    REFINE_ELEMENTS_PER_BLOCK / d entries (or one latent)."""
    num_rows = crow_indices.shape[0] - 1
    rows = entry_rows(crow_indices, col_indices.shape[0])
    entries_per_latent = torch.bincount(col_indices, minlength=num_latents)
    max_entries = max(1, REFINE_ELEMENTS_PER_BLOCK // max(1, emb.shape[1]))

    def blocks_of(latents):
        blocks, start, total = [], 0, 0
        for i, n in enumerate(entries_per_latent[latents].tolist()):
            if total + n > max_entries and i > start:
                blocks.append(latents[start:i])
                start, total = i, 0
            total += n
        return blocks + [latents[start:]]

    def entries_of(block):
        keep, block_local = csr_entry_positions(col_indices, num_latents, block)
        block_rows = rows[keep]
        count, block_range = entries_per_latent[block], act_range[:, block]

        def scores_of(entries, e, unit_rows):
            unit, unit_weight = unit_rows(e)
            return refined_scores_of_entries(block_rows, block_local, entries, count, block_range, e,
                                             unit.sum(0), unit_weight.sum())
        return values[keep], scores_of, keep

    grad_scores, parts, grad_emb = _refined_backward(grad, out, emb, latents, blocks_of, entries_of, emb_grad)
    grad_values = torch.zeros_like(values)
    for keep, grad_block in parts:
        grad_values[keep] = grad_block
    return grad_scores, grad_values, grad_emb


@refine_loss_scores_csr_backward.register_fake
def _(grad, out, crow_indices, col_indices, values, emb, num_latents, act_range, latents, emb_grad):
    return torch.empty_like(grad), torch.empty_like(values), torch.empty_like(emb)


def _refine_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], output, *inputs[3:])


def _refine_autograd(ctx, grad):
    scores_in, acts, emb, out, act_range, latents = ctx.saved_tensors
    emb_grad = ctx.needs_input_grad[2]
    grad_scores, grad_acts, grad_emb = torch.ops.monoloss_kernels.refine_loss_scores_backward(
        grad, out, acts, emb, latents, emb_grad)
    return grad_scores, grad_acts, grad_emb if emb_grad else None, None, None


def _refine_csr_setup_context(ctx, inputs, output):
    scores, crow_indices, col_indices, values, emb, num_latents, act_range, latents = inputs
    ctx.num_latents = num_latents
    ctx.save_for_backward(crow_indices, col_indices, values, emb, output, act_range, latents)


def _refine_csr_autograd(ctx, grad):
    crow_indices, col_indices, values, emb, out, act_range, latents = ctx.saved_tensors
    emb_grad = ctx.needs_input_grad[4]
    grad_scores, grad_values, grad_emb = torch.ops.monoloss_kernels.refine_loss_scores_csr_backward(
        grad, out, crow_indices, col_indices, values, emb, ctx.num_latents, act_range, latents, emb_grad)
    return grad_scores, None, None, grad_values, grad_emb if emb_grad else None, None, None, None


torch.library.register_autograd("monoloss_kernels::refine_loss_scores", _refine_autograd,
                                setup_context=_refine_setup_context)
torch.library.register_autograd("monoloss_kernels::refine_loss_scores_csr", _refine_csr_autograd,
                                setup_context=_refine_csr_setup_context)


def refine_loss(scores: Tensor, acts, emb: Tensor, act_range: Tensor, latents: Tensor) -> Tensor:
    """`scores` = finalize(stats) of (acts, emb) with `latents` (the ill-conditioned ones;
    act_range the statistics') refined by the ops above: differentiable in scores, acts
    (or its values) and emb."""
    if isinstance(acts, CsrActs):
        return torch.ops.monoloss_kernels.refine_loss_scores_csr(
            scores, acts.crow_indices, acts.col_indices, acts.values, emb, acts.num_latents, act_range.detach(),
            latents)
    return torch.ops.monoloss_kernels.refine_loss_scores(scores, acts, emb, act_range.detach(), latents)
