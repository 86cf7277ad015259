"""MonoScore over data that never fits in memory at once: one pass, any batching,
any number of processes.

The statistics of disjoint row sets add up once they share a per-latent shift
(see `stats.py`), so the accumulator keeps one running `MonoScoreStats` in
float64 and moves each batch onto its shift before adding it. Every shift a
backend picks lies within a few ranges of the latent's values, so the move
(cross - δ·Σê) never cancels more than a few bits; `compute` then shifts the
sums to the global minimum exactly as a single `monoscore` call would.
Memory is O(d·M + M) whatever the number of rows.
"""

import torch
from torch import Tensor

from ._dispatch import stats_function
from ._validate import check_stats_finite, validate_acts
from .stats import CsrActs, MonoScoreStats, empty_batch_stats, finalize, reshift, reshift_moments

STATE_VERSION = 1


class MonoScoreAccumulator:
    """Streams MonoScore over batches of samples; `compute()` equals one `monoscore`
    call over the concatenation of every batch seen (here, merged or all-reduced), except
    for latents that one sample carries (κ = S1²/(S1² − S2) > refine.KAPPA_MAX, e.g. a
    latent whose second-largest value is 1e-4 of its largest): `monoscore` recomputes
    those from its inputs (monoloss_kernels/refine.py), while the accumulator, whose
    batches are gone, keeps the one-pass form's error of about g·eps32·κ there (g grows
    with the rows per float32 sum; 6e-3 measured for such latents over 2000 rows in
    batches of 500, embeddings sharing a direction). `caches.score_activations` (and the
    CLI), which still have the files, recompute them in a second pass over the chunks;
    with a loader of your own, gather those latents' entries the same way
    (`refine.ill_conditioned_latents` of the final statistics, then `deflated_scores`).

        acc = MonoScoreAccumulator(num_latents=M, dim=d, device="cuda")
        for acts, emb in loader:   # dense (B, M), a TopK (values, indices) pair, COO or CSR
            acc.update(acts, emb)
        scores = acc.compute()     # (M,) float32, NaN where undefined

    Args:
        num_latents: M, the number of latents.
        dim: d, the embedding dimension.
        device: where the running sums live and batches must come from (default: CPU).
        backend: the statistics backend used by `update`, as in `monoscore`.
    """

    def __init__(self, num_latents: int, dim: int, *, device=None, backend: str = "auto"):
        for name, value in (("num_latents", num_latents), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"{name} must be a non-negative int, got {value!r}")
        self.num_latents = num_latents
        self.dim = dim
        # Resolved through an empty tensor, so that "cuda" becomes "cuda:0" as tensors report it.
        self.device = torch.empty(0, device="cpu" if device is None else device).device
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        """Forgets every batch seen."""
        self.num_rows = 0  # host copy of counts[0]: no device sync to know whether anything was seen
        self._sums = empty_batch_stats(self.num_latents, self.dim, self.device, cross_dtype=torch.float64)

    @torch.no_grad()
    def update(self, acts, emb: Tensor, *, num_latents: int | None = None) -> None:
        """Adds a batch: acts in any form `monoscore` accepts (num_latents defaults to
        the accumulator's for a (values, indices) pair), emb (B, d). Inputs that require
        grad are read as constants: the running sums carry no autograd graph."""
        # no_grad: an SAE's latents usually require grad, and a graph through the running
        # sums would keep every batch alive (memory growing with N instead of O(d·M)).
        acts, emb = validate_acts(acts, emb, self.num_latents if num_latents is None else num_latents)
        sparse = isinstance(acts, CsrActs)
        num_rows = acts.num_rows if sparse else acts.shape[0]
        self._check_batch(acts, emb)
        if num_rows == 0:
            return
        stats = stats_function(self.backend, self.device, sparse)(acts, emb)
        check_stats_finite(stats, emb)
        self._add(stats, num_rows)

    def _check_batch(self, acts, emb: Tensor) -> None:
        """Refuses a validated batch (acts canonical, see `validate_acts`) whose number of
        latents, embedding width or device is not the accumulator's."""
        num_latents = acts.num_latents if isinstance(acts, CsrActs) else acts.shape[1]
        if num_latents != self.num_latents:
            raise ValueError(f"acts has {num_latents} latents but the accumulator was built for {self.num_latents}")
        if emb.shape[1] != self.dim:
            raise ValueError(f"emb has dimension {emb.shape[1]} but the accumulator was built for dim={self.dim}")
        if emb.device != self.device:
            raise ValueError(f"the batch is on {emb.device} but the accumulator lives on {self.device}")

    def merge(self, other: "MonoScoreAccumulator") -> "MonoScoreAccumulator":
        """Adds everything `other` has seen (other is unchanged); returns self."""
        if not isinstance(other, MonoScoreAccumulator):
            raise TypeError(f"other must be a MonoScoreAccumulator, got {type(other).__name__}")
        if (other.num_latents, other.dim) != (self.num_latents, self.dim):
            raise ValueError(
                f"cannot merge an accumulator of (num_latents={other.num_latents}, dim={other.dim}) into one of "
                f"(num_latents={self.num_latents}, dim={self.dim})"
            )
        if other.num_rows > 0:
            self._add(MonoScoreStats(*(t.to(self.device) for t in other._sums)), other.num_rows)
        return self

    def all_reduce(self, group=None) -> "MonoScoreAccumulator":
        """Combines the accumulators of every rank of `group` (torch.distributed),
        so that each rank's `compute()` returns the scores over all ranks' data.

        Collective: every rank must call it. Three reductions: MIN of the
        minima, MAX of the maxima, then one SUM of every sum after each rank has
        moved its sums onto the global minimum as a common shift. Returns self.
        """
        import torch.distributed as dist

        sums = self._sums
        act_min, act_max = sums.act_range[0].clone(), sums.act_range[1].clone()
        dist.all_reduce(act_min, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(act_max, op=dist.ReduceOp.MAX, group=group)
        # No rank saw a row: the minima are +inf; keep shift 0 (every sum is 0).
        common_shift = torch.where(act_min.isfinite(), act_min.double(), 0.0)
        if self.num_rows > 0:
            sums = reshift(sums, common_shift)
        flat = torch.cat([sums.cross.flatten(), sums.unit_emb_sum, sums.moments.flatten(), sums.counts])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        cross, unit_emb_sum, moments, counts = flat.split(
            [self.dim * self.num_latents, self.dim, 4 * self.num_latents, 2]
        )
        self._sums = MonoScoreStats(
            cross=cross.view(self.dim, self.num_latents),
            unit_emb_sum=unit_emb_sum,
            shift=common_shift,
            act_range=torch.stack([act_min, act_max]),
            moments=moments.view(4, self.num_latents),
            counts=counts,
        )
        self.num_rows = int(counts[0])
        return self

    def compute(self) -> Tensor:
        """(M,) float32 MonoScore of every row seen; NaN where undefined (all NaN below 2 rows).
        The one-pass form: see the class docstring for the latents one sample carries."""
        if self.num_rows < 2:
            return torch.full((self.num_latents,), float("nan"), device=self.device)
        return finalize(self._sums).float()

    def state_dict(self) -> dict:
        """The running sums (float64 tensors) and sizes, for torch.save / checkpoints."""
        state = {name: tensor.clone() for name, tensor in self._sums._asdict().items()}
        state.update(version=STATE_VERSION, num_latents=self.num_latents, dim=self.dim, num_rows=self.num_rows)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()` output (sizes must match this accumulator)."""
        missing = {"version", "num_latents", "dim", "num_rows", *MonoScoreStats._fields} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}; pass the dict state_dict() returned")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"state has version {state['version']}, this accumulator reads version {STATE_VERSION}")
        if (state["num_latents"], state["dim"]) != (self.num_latents, self.dim):
            raise ValueError(
                f"state is for (num_latents={state['num_latents']}, dim={state['dim']}), this accumulator is for "
                f"(num_latents={self.num_latents}, dim={self.dim})"
            )
        sums = MonoScoreStats(*(state[name].to(self.device) for name in MonoScoreStats._fields))
        for name, want, got in zip(MonoScoreStats._fields, self._sums, sums):
            if got.shape != want.shape or got.dtype != want.dtype:
                raise ValueError(
                    f"state[{name!r}] is {got.dtype} {tuple(got.shape)}, expected {want.dtype} {tuple(want.shape)}"
                )
        self._sums = MonoScoreStats(*(t.clone() for t in sums))
        self.num_rows = int(state["num_rows"])

    def _add(self, stats: MonoScoreStats, num_rows: int) -> None:
        """Adds statistics of new rows, moved onto the running shift (float64)."""
        if self.num_rows == 0:  # adopt the batch's shift; copies, so nothing aliases the caller's tensors
            self._sums = MonoScoreStats(*(
                t.to(torch.float32 if name == "act_range" else torch.float64, copy=True).contiguous()
                for name, t in stats._asdict().items()
            ))
        else:
            sums = self._sums
            # reshift(stats, sums.shift), written into the running sums without a float64 copy of cross.
            delta = sums.shift - stats.shift.double()
            sums.cross.add_(stats.cross).addr_(stats.unit_emb_sum, delta, alpha=-1)
            self._sums = MonoScoreStats(
                cross=sums.cross,
                unit_emb_sum=sums.unit_emb_sum.add_(stats.unit_emb_sum),
                shift=sums.shift,
                act_range=torch.stack([
                    torch.minimum(sums.act_range[0], stats.act_range[0]),
                    torch.maximum(sums.act_range[1], stats.act_range[1]),
                ]),
                moments=sums.moments.add_(reshift_moments(stats.moments, stats.counts, delta)),
                counts=sums.counts.add_(stats.counts),
            )
        self.num_rows += num_rows
