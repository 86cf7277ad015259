r"""MonoLoss over a whole dataset, in two streaming passes over a data loader.

The paper also trains on the MonoScore of *all* N samples -- min and max over the
dataset, sums over the dataset -- rather than of a batch. Its code replays the
loader five times (min/max, sums, then three more in the backward). Here two
passes suffice, because the statistics are additive:

1. **Statistics** (no autograd): every batch's `MonoScoreStats` go into a
   `MonoScoreAccumulator`, each latent's global min and max are tracked, and so is
   how many samples attain the min. From the totals G, the loss
   L = 1 - mean MonoScore(G) and its gradient with respect to G (∂L/∂cross,
   ∂L/∂moments, ∂L/∂min) are computed once, in float64. (∂L/∂max = 0: the scale
   1/(max - min) cancels.)
2. **Gradient** (one batch at a time): G is the sum of the batches' statistics
   taken at one common shift, so ∂L/∂(batch acts) is the backward of the statistics
   op applied to ∂L/∂G -- the same function autograd calls after `monoloss` -- with
   each entry at its latent's global minimum getting ∂L/∂min / (ties over the whole
   dataset), as torch.amin would over the concatenated dataset. Each batch is
   recomputed with autograd and that gradient back-propagated into the parameters;
   its statistics are not recomputed.

Memory: the O(d·M) float64 sums plus one batch's graph.
"""

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from . import _autograd
from ._progress import progress_bar
from ._dispatch import stats_function
from ._validate import check_stats_finite, validate_acts
from .accumulator import MonoScoreAccumulator
from .loss import extreme_ties
from .stats import CsrActs, finalize


class _ExtremeTracker:
    """Per latent, the running min and max of the activations, and how many samples
    attain the min (float64; a TopK pair's implicit zeros count). The max needs no
    count: the score does not depend on it (the scale 1/(max - min) cancels)."""

    def __init__(self):
        self.extremes = None  # (2, M) float32: min, max
        self.min_ties = None  # (M,) float64

    def update(self, acts, act_range: Tensor, num_rows: int) -> None:
        ties = _count_equal(acts, act_range[0], num_rows)
        if self.extremes is None:
            self.extremes, self.min_ties = act_range.clone(), ties
            return
        old_min, new_min = self.extremes[0], act_range[0]
        self.min_ties = torch.where(new_min < old_min, ties,
                                    torch.where(new_min == old_min, self.min_ties + ties, self.min_ties))
        self.extremes = torch.stack([torch.minimum(old_min, new_min), torch.maximum(self.extremes[1], act_range[1])])

    def all_reduce(self, group) -> None:
        """Every rank's extremes and tie counts become the global ones (collective)."""
        import torch.distributed as dist

        local_min = self.extremes[0].clone()
        dist.all_reduce(self.extremes[0], op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.extremes[1], op=dist.ReduceOp.MAX, group=group)
        self.min_ties = torch.where(local_min == self.extremes[0], self.min_ties, 0.0)
        dist.all_reduce(self.min_ties, op=dist.ReduceOp.SUM, group=group)


def _count_equal(acts, value: Tensor, num_rows: int) -> Tensor:
    """(M,) float64: per latent, the entries of `acts` equal to value[k] (for sparse
    acts, the implicit zeros included)."""
    if isinstance(acts, CsrActs):
        return extreme_ties(acts, value, num_rows).double()
    # Compared straight into float32 and summed as floats: about 3x faster on the CPU than
    # summing a bool mask down its columns; exact up to 2^24 rows per batch. acts as
    # float32, as the kernels read it and as `value` (act_range) holds it: a float64
    # minimum differs from its float32 rounding.
    equal = torch.empty(acts.shape, dtype=torch.float32, device=acts.device)
    return torch.eq(acts.detach().float(), value, out=equal).sum(0).double()


def _model_outputs(model_fn, batch, num_latents: int, differentiable_emb: bool):
    out = model_fn(batch)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "model_fn(batch) must return the pair (acts, emb): the batch's latents in any form monoscore "
            f"accepts and its (B, d) embeddings; got {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple) else "")
        )
    acts, emb = validate_acts(*out, num_latents)
    if not differentiable_emb:
        emb = emb.detach()
    num_rows = acts.num_rows if isinstance(acts, CsrActs) else acts.shape[0]
    return acts, emb, num_rows


def dataset_monoloss_backward(
    model_fn: Callable, loader: Iterable, *, num_latents: int, scale: float = 1.0, backend: str = "auto",
    differentiable_emb: bool = False, distributed: bool = False, group=None, progress: bool | None = None,
) -> float:
    """Back-propagates MonoLoss over a whole dataset -- 1 - mean MonoScore of all the
    loader's samples, min and max over all of them -- into the parameters `model_fn`
    uses, in two passes over `loader`; returns the loss. Gradients accumulate into
    `.grad` as `loss.backward()` would (zero them first as usual).

        optimizer.zero_grad()
        mono = dataset_monoloss_backward(lambda x: (sae.encode(x), x), loader,
                                         num_latents=M, scale=mono_coef)
        optimizer.step()

    Args:
        model_fn: batch -> (acts, emb): the batch's latents (dense (B, M), a TopK
            (values, indices) pair, COO or CSR; differentiable in the parameters) and
            its (B, d) embeddings. Called once per batch in each pass, so it must give
            the same values both times: deterministic (dropout off), with the loader
            yielding the same samples (shuffling the order is fine; random
            augmentation is not). A mismatch that changes the number of rows, puts an
            activation below pass 1's minimum (for sparse acts, an implicit 0 too) or
            changes which samples attain a latent's minimum raises RuntimeError; other changes (acts rescaled, other
            embeddings) are not detected and give wrong gradients.
        loader: an iterable of batches (a DataLoader), iterated twice.
        num_latents: M.
        scale: multiplies the gradient (e.g. the MonoLoss coefficient); the returned
            loss is not scaled.
        backend: the statistics backend, as in `monoscore`; its backward kernel computes
            each batch's gradient in pass 2.
        differentiable_emb: also back-propagate into emb.
        distributed: each rank of torch.distributed `group` iterates its own shard;
            the statistics are all-reduced after pass 1, so every rank returns the
            loss of the union of all shards and accumulates the exact gradient for
            its own samples. The full gradient is the SUM over ranks: DDP averages
            gradients, so pass scale=coef * world_size there (or all-reduce
            `.grad` with SUM yourself after calling the model's unwrapped module).
            Collective: every rank must call it, with a loader that yields at least
            one batch (an empty one will do). An error on any rank (a refused
            batch, a model that changed between the passes, an empty loader) stops
            every rank at the end of that pass: that rank raises its error, the
            others a RuntimeError naming it, after the same collectives, so no rank
            is left waiting. (A DDP-wrapped model's own all-reduces in backward are
            outside this: a rank that raises in pass 2 leaves the others waiting
            in DDP's reducer.)
        progress: show progress bars (default: when stderr is a terminal).

    Returns:
        The loss as a float (1.0, with no gradient, when no latent's score is defined).
    """
    if not isinstance(num_latents, int) or isinstance(num_latents, bool) or num_latents < 1:
        raise TypeError(f"num_latents must be a positive int, got {num_latents!r}")

    # Pass 1: the dataset's statistics, each latent's extremes, and the ties at its minimum.
    accumulator = None
    extremes = _ExtremeTracker()
    with _stop_with_every_rank(distributed, group, "pass 1 (statistics)"), torch.no_grad():
        for batch in progress_bar(loader, desc="MonoLoss pass 1/2 (statistics)", enabled=progress):
            acts, emb, num_rows = _model_outputs(model_fn, batch, num_latents, differentiable_emb)
            if accumulator is None:
                accumulator = MonoScoreAccumulator(num_latents, emb.shape[1], device=emb.device, backend=backend)
            accumulator._check_batch(acts, emb)
            if num_rows == 0:
                continue
            stats = stats_function(backend, emb.device, isinstance(acts, CsrActs))(acts, emb)
            check_stats_finite(stats, emb)
            accumulator._add(stats, num_rows)
            extremes.update(acts, stats.act_range, num_rows)
        if accumulator is None:
            raise ValueError("loader yielded no batches")
    if distributed:
        accumulator.all_reduce(group)
        if extremes.extremes is None:  # this rank's shard has no rows
            extremes.extremes = accumulator._sums.act_range.clone()
            extremes.min_ties = torch.zeros(num_latents, dtype=torch.float64, device=accumulator.device)
        extremes.all_reduce(group)
    if accumulator.num_rows < 2:
        return 1.0

    # The loss of the whole dataset and its gradient with respect to the statistics (float64).
    totals = accumulator._sums
    leaves = {name: getattr(totals, name).clone().requires_grad_() for name in ("cross", "moments", "act_range")}
    if differentiable_emb:
        leaves["unit_emb_sum"] = totals.unit_emb_sum.clone().requires_grad_()
    scores = finalize(totals._replace(**leaves))
    defined = scores.isfinite()
    if not bool(defined.any()):
        return 1.0
    loss = 1 - torch.where(defined, scores, 0.0).sum() / defined.sum()
    grads = dict(zip(leaves, (scale * g for g in torch.autograd.grad(loss, list(leaves.values())))))
    assert grads["act_range"][1].count_nonzero() == 0, "the score depends on the max: count its ties too"
    global_min = extremes.extremes[0]
    # Each entry at latent k's global minimum gets grad_min[k] / (its ties over the dataset).
    min_share = grads["act_range"][0] / extremes.min_ties.clamp(min=1)
    shift = totals.shift.float()  # float32 values, held in float64

    # Pass 2: each batch's exact share of the gradient, from the registered backward of
    # the statistics op evaluated at the dataset's statistics (no forward recomputed).
    seen_rows = 0
    seen_min_ties = torch.zeros_like(extremes.min_ties)
    with _stop_with_every_rank(distributed, group, "pass 2 (gradient)",
                               after=" The gradients accumulated so far are not those of one dataset: zero them."):
        for batch in progress_bar(loader, desc="MonoLoss pass 2/2 (gradient)", enabled=progress):
            acts, emb, num_rows = _model_outputs(model_fn, batch, num_latents, differentiable_emb)
            accumulator._check_batch(acts, emb)
            if num_rows == 0:
                continue
            sparse = isinstance(acts, CsrActs)
            values = acts.values if sparse else acts
            # In float32, as global_min holds it (rounding keeps the order, so the column minimum may come first).
            if sparse:
                below = values.detach().float() < global_min[acts.col_indices]
                # A latent stored in fewer than all rows has an implicit 0 in this batch: below a
                # positive pass-1 minimum too (an entry that disappeared between the passes).
                stored = torch.zeros(num_latents, dtype=torch.int64, device=values.device)
                stored.index_add_(0, acts.col_indices, torch.ones_like(acts.col_indices))
                below = torch.cat([below, (stored < num_rows) & (global_min > 0)])
            else:  # a column minimum reads acts faster than an elementwise comparison
                below = values.detach().amin(0).float() < global_min
            if bool(below.any()):
                raise RuntimeError(
                    "dataset_monoloss_backward: a batch of pass 2 has activations below the minimum of pass 1, so "
                    "model_fn or the loader gave different values in the two passes (is dropout on, or random "
                    "augmentation?). The gradients accumulated so far are not those of one dataset: zero them."
                )
            ties = _count_equal(acts, global_min, num_rows)
            seen_min_ties += ties
            # The backward shares grad_range among the batch's own ties: give it this batch's part.
            grad_range = torch.stack([(min_share * ties).float(), torch.zeros_like(global_min)])
            wanted = (values.requires_grad, emb.requires_grad)
            common = dict(grad_cross=grads["cross"], grad_unit_emb_sum=grads.get("unit_emb_sum"),
                          grad_range=grad_range, grad_moments=grads["moments"],
                          acts_grad_kernel=_autograd.acts_grad_kernel_of(backend, emb.device))
            if sparse:
                grad_values, grad_emb = _autograd.csr_stats_grads(
                    acts.crow_indices, acts.col_indices, values.detach(), emb.detach(), num_latents, shift,
                    extremes.extremes, values_grad=wanted[0], emb_grad=wanted[1], **common)
            else:
                grad_values, grad_emb = _autograd.dense_stats_grads(
                    values.detach(), emb.detach(), shift, extremes.extremes, acts_grad=wanted[0],
                    emb_grad=wanted[1], **common)
            outputs = [(t, g) for t, g in ((values, grad_values), (emb, grad_emb)) if g is not None]
            if not outputs:
                raise ValueError(
                    "model_fn's acts do not require grad: nothing to back-propagate (call it outside "
                    "torch.no_grad, with parameters that require grad)"
                )
            torch.autograd.backward([t for t, _ in outputs], [g for _, g in outputs])
            seen_rows += num_rows
    _check_same_data(seen_rows, seen_min_ties, accumulator, extremes, distributed, group)
    return float(loss.detach())


@contextlib.contextmanager
def _stop_with_every_rank(distributed: bool, group, stage: str, after: str = ""):
    """Under distributed=True, an exception raised in the block on one rank reaches
    every rank: one all-reduce after the block (which every rank reaches, the failing
    one by leaving the block early) tells each rank which ranks failed; the failing
    ones re-raise their own error, the others raise RuntimeError naming them. Without
    it a lone failing rank would leave the others waiting in the next collective."""
    error = None
    try:
        yield
    except Exception as e:  # not BaseException: an interrupt ends the process anyway
        if not distributed:
            raise
        error = e
    if not distributed:
        return
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    failed = torch.zeros(dist.get_world_size(group), device=device)
    failed[dist.get_rank(group)] = error is not None
    dist.all_reduce(failed, op=dist.ReduceOp.SUM, group=group)
    if error is not None:
        raise error
    ranks = failed.nonzero().flatten().tolist()
    if ranks:
        raise RuntimeError(
            f"dataset_monoloss_backward: rank(s) {ranks} of the group raised in {stage} (see that rank's error); "
            f"this rank stops too, so that the ranks stay in step.{after}"
        )


def _check_same_data(seen_rows: int, seen_min_ties: Tensor, accumulator, extremes, distributed: bool, group) -> None:
    expected_rows = accumulator.num_rows if not distributed else None  # other ranks' rows are not seen here
    ties = seen_min_ties
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(ties, op=dist.ReduceOp.SUM, group=group)
    if (expected_rows is not None and seen_rows != expected_rows) or not torch.equal(ties, extremes.min_ties):
        raise RuntimeError(
            "dataset_monoloss_backward: pass 2 saw other samples than pass 1 (row counts or the samples "
            "attaining each latent's min/max differ), so model_fn or the loader is not repeatable. The "
            "gradients accumulated are not those of one dataset: zero them."
        )
