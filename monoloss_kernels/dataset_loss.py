r"""MonoLoss over a whole dataset, in two streaming passes over a data loader.

The paper also trains on the MonoScore of *all* N samples -- min and max over the
dataset, sums over the dataset -- rather than of a batch. Its code replays the
loader five times (min/max, sums, then three more in the backward). Here two
passes suffice, because the statistics are additive:

1. **Statistics** (no autograd): every batch's `MonoScoreStats` go into a
   `MonoScoreAccumulator`, and each latent's global min and max are tracked with
   how many samples attain them. From the totals G, the loss
   L = 1 - mean MonoScore(G) and its gradient with respect to G (∂L/∂cross,
   ∂L/∂moments, ∂L/∂min, ∂L/∂max) are computed once, in float64.
2. **Gradient** (autograd, one batch at a time): each batch is recomputed and
   back-propagated through the surrogate

       ⟨∂L/∂cross, cross_b⟩ + ⟨∂L/∂moments, moments_b⟩
       + Σ_k w_b[k] (∂L/∂min[k] · min_b[k] + the same for max)

   where cross_b, moments_b are the batch's sums moved onto the accumulator's
   shift, and w_b[k] is the batch's share of the samples tied at latent k's
   global extreme (0 if the batch does not attain it). G is a sum of the
   batches' sums, so ∂L/∂θ = Σ_b ∂surrogate_b/∂θ exactly, the terms through
   each latent's global min and max included; the registered backward of the
   statistics op splits w_b among the batch's own tied samples, as torch.amin
   would over the concatenated dataset.

Memory: the O(d·M) float64 sums plus one batch's graph.
"""

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ._dispatch import stats_function
from ._progress import progress_bar
from ._validate import check_stats_finite, validate_acts
from .accumulator import MonoScoreAccumulator
from .loss import _ties
from .stats import CsrActs, MonoScoreStats, finalize, reshift


class _ExtremeTracker:
    """Per latent, the running min and max of the activations and how many samples
    attain each (float64 counts; a TopK pair's implicit zeros count too)."""

    def __init__(self):
        self.extremes = None  # (2, M) float32: min, max
        self.ties = None  # (2, M) float64

    def update(self, acts, act_range: Tensor, num_rows: int) -> None:
        ties = torch.stack([_ties(acts, act_range[0], num_rows), _ties(acts, act_range[1], num_rows)]).double()
        if self.extremes is None:
            self.extremes, self.ties = act_range.clone(), ties
            return
        # Row 0 keeps the smaller value, row 1 the larger: flip the max row's sign.
        sign = torch.tensor([1.0, -1.0], device=act_range.device)[:, None]
        old, new = self.extremes * sign, act_range * sign
        self.ties = torch.where(new < old, ties, torch.where(new == old, self.ties + ties, self.ties))
        self.extremes = torch.where(new < old, act_range, self.extremes)

    def all_reduce(self, group) -> None:
        """Every rank's extremes and tie counts become the global ones (collective)."""
        import torch.distributed as dist

        local = self.extremes.clone()
        dist.all_reduce(self.extremes[0], op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(self.extremes[1], op=dist.ReduceOp.MAX, group=group)
        self.ties = torch.where(local == self.extremes, self.ties, 0.0)
        dist.all_reduce(self.ties, op=dist.ReduceOp.SUM, group=group)


def _batch_stats(model_fn, batch, num_latents: int, backend: str, differentiable_emb: bool):
    acts, emb = _model_outputs(model_fn, batch)
    acts, emb = validate_acts(acts, emb, num_latents)
    if not differentiable_emb:
        emb = emb.detach()
    sparse = isinstance(acts, CsrActs)
    num_rows = acts.num_rows if sparse else acts.shape[0]
    if num_rows == 0:
        return acts, emb, None, 0
    stats = stats_function(backend, emb.device, sparse)(acts, emb)
    check_stats_finite(stats, emb)
    return acts, emb, stats, num_rows


def _model_outputs(model_fn, batch):
    out = model_fn(batch)
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            "model_fn(batch) must return the pair (acts, emb): the batch's latents in any form monoscore "
            f"accepts and its (B, d) embeddings; got {type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple) else "")
        )
    return out


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
            augmentation is not). A mismatch is detected and raised.
        loader: an iterable of batches (a DataLoader), iterated twice.
        num_latents: M.
        scale: multiplies the gradient (e.g. the MonoLoss coefficient); the returned
            loss is not scaled.
        backend: the statistics backend, as in `monoscore`.
        differentiable_emb: also back-propagate into emb.
        distributed: each rank of torch.distributed `group` iterates its own shard;
            the statistics are all-reduced after pass 1, so every rank returns the
            loss of the union of all shards and accumulates the exact gradient for
            its own samples. The full gradient is the SUM over ranks: DDP averages
            gradients, so pass scale=coef * world_size there (or all-reduce
            `.grad` with SUM yourself after calling the model's unwrapped module).
        progress: show progress bars (default: when stderr is a terminal).

    Returns:
        The loss as a float (1.0, with no gradient, when no latent's score is defined).
    """
    if not isinstance(num_latents, int) or isinstance(num_latents, bool) or num_latents < 1:
        raise TypeError(f"num_latents must be a positive int, got {num_latents!r}")

    # Pass 1: the dataset's statistics and each latent's extremes with their tie counts.
    accumulator = None
    extremes = _ExtremeTracker()
    with torch.no_grad():
        for batch in progress_bar(loader, desc="MonoLoss pass 1/2 (statistics)", enabled=progress):
            acts, emb, stats, num_rows = _batch_stats(model_fn, batch, num_latents, backend, differentiable_emb)
            if accumulator is None:
                accumulator = MonoScoreAccumulator(num_latents, emb.shape[1], device=emb.device, backend=backend)
            if stats is None:
                continue
            accumulator._add(stats, num_rows)
            extremes.update(acts, stats.act_range, num_rows)
    if accumulator is None:
        raise ValueError("loader yielded no batches")
    if distributed:
        accumulator.all_reduce(group)
        if extremes.extremes is None:  # this rank's shard is empty
            extremes.extremes = accumulator._sums.act_range.clone()
            extremes.ties = torch.zeros(2, num_latents, dtype=torch.float64, device=accumulator.device)
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
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    grads = {name: grad * scale for name, grad in grads.items()}
    common_shift = totals.shift

    # Pass 2: each batch's exact share of the gradient.
    seen_rows = 0
    seen_ties = torch.zeros_like(extremes.ties)
    for batch in progress_bar(loader, desc="MonoLoss pass 2/2 (gradient)", enabled=progress):
        acts, emb, stats, num_rows = _batch_stats(model_fn, batch, num_latents, backend, differentiable_emb)
        if stats is None:
            continue
        local_range = stats.act_range.detach()
        _check_within(local_range, extremes.extremes)
        moved = reshift(stats, common_shift)
        surrogate = sum((getattr(moved, name) * grad).sum() for name, grad in grads.items() if name != "act_range")
        for side in (0, 1):  # min, max
            attains = local_range[side] == extremes.extremes[side]
            ties = torch.where(attains, _ties(acts, local_range[side], num_rows).double(), 0.0)
            seen_ties[side] += ties
            share = (ties / extremes.ties[side].clamp(min=1)).float()
            extreme = torch.where(attains, stats.act_range[side], 0.0)
            surrogate = surrogate + (share * extreme * grads["act_range"][side]).sum()
        surrogate.backward()
        seen_rows += num_rows
    _check_same_data(seen_rows, seen_ties, accumulator, extremes, distributed, group)
    return float(loss.detach())


def _check_within(local_range: Tensor, extremes: Tensor) -> None:
    if bool((local_range[0] < extremes[0]).any() | (local_range[1] > extremes[1]).any()):
        raise RuntimeError(
            "dataset_monoloss_backward: a batch of pass 2 has activations outside the min/max of pass 1, "
            "so model_fn or the loader gave different values in the two passes (is dropout on, or random "
            "augmentation?). The gradients accumulated so far are not those of one dataset: zero them."
        )


def _check_same_data(seen_rows: int, seen_ties: Tensor, accumulator, extremes, distributed: bool, group) -> None:
    expected_rows = accumulator.num_rows if not distributed else None  # other ranks' rows are not seen here
    ties = seen_ties
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(ties, op=dist.ReduceOp.SUM, group=group)
    if (expected_rows is not None and seen_rows != expected_rows) or not torch.equal(ties, extremes.ties):
        raise RuntimeError(
            "dataset_monoloss_backward: pass 2 saw other samples than pass 1 (row counts or the samples "
            "attaining each latent's min/max differ), so model_fn or the loader is not repeatable. The "
            "gradients accumulated are not those of one dataset: zero them."
        )
