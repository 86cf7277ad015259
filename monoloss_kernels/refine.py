r"""Exact scores for the latents the one-pass closed form cannot resolve in float32.

With ã the min-max normalised activations of a latent, S1 = Σã, S2 = Σã² and U = Σ ã Ê,

    MS = (‖U‖² - Σ ã² ‖ê‖²) / (S1² - S2).

Both differences cancel when one sample carries nearly all of the latent's mass (its ã
is 1; if every other ã is small, S1² ≈ S2): a latent firing twice, the second time at
1e-4 of the first, is such a case at any N. The kernels hold `cross` (U up to the shift)
in float32, so the error of the score is about g·eps32·κ, with the condition number

    κ = S1² / (S1² - S2)  (1 for mass spread over many samples, ≈ 1/(2x) for the pair above)

and g growing with the number of float32 additions that follow the top sample's in one
accumulation (each rounds at its scale: g ~ sqrt(rows per float32 sum / d), more where
the embeddings share a direction), while the pairwise definition has no such
cancellation. `monoscore` therefore recomputes the latents with κ > KAPPA_MAX from the
inputs, in float64 and with the top sample n* taken out of the sums ("deflated"),
V = Σ_{n≠n*} ã_n ê_n:

    numerator   = ê*·V + ½(‖V‖² - Σ_{n≠n*} ã² ‖ê‖²)
    denominator = S1' + ½(S1'² - Σ_{n≠n*} ã²),   S1' = Σ_{n≠n*} ã,

in which nothing cancels at the scale of the top sample. It works from the latents'
nonzero entries (a dense input's columns are gathered first): O(d) per entry and per
latent, in the op `deflated_scores` (a C++ kernel on the CPU, torch elsewhere). Latents
whose mass is spread (κ near 1, as in most batches) cost nothing; in a TopK batch with
Zipf-distributed latent frequencies and heavy-tailed values (N = M = 16384, k = 32,
d = 512), 46% of the latents qualify: `monoscore` takes 138 ms against 95 ms for the
one-pass scores, the op 20 ms of it, 206 ms with its torch implementation (2-core Intel
Xeon; README, Accuracy). MonoLoss refines the same latents (`loss.refine_loss_scores`,
its backward a float64 recomputation of them), except with distributed=True, where the
other ranks' rows are not at hand; the streaming accumulator has no inputs left to go
back to (`caches.score_activations` makes a second pass over its files): those keep
the g·eps32·κ error.
"""

import torch
from torch import Tensor

from .stats import DEN_RTOL, CsrActs, MonoScoreStats, entry_rows, score_terms

# Recompute latents whose κ exceeds this. g measured on the CPU paths: at most 24 dense and
# 5.5 sparse in `benchmarks/measure_accuracy.py --ill-conditioned` (results/cpu-AMD-EPYC/
# ill_conditioned.txt), and 40 in an earlier draw of the same dense cases (4099 rows, d = 5,
# embeddings sharing a direction). With g <= 40 the error below the threshold stays under
# 40·eps32·2 = 1e-5, inside the 2e-5 bound.
KAPPA_MAX = 2.0
# Entries (values of the refined latents) gathered at once: bounds the (entries, d) float64
# block of embedding rows to 64 MiB at d = 1024.
ENTRIES_PER_BLOCK = 8192
# Latents whose sums are formed together: a (latents, d) float64 block of 1 MiB at d = 512.
LATENTS_PER_BLOCK = 256
# Dense columns gathered at once, as (N, columns) elements.
DENSE_ELEMENTS_PER_BLOCK = 2**24


def ill_conditioned_latents(stats: MonoScoreStats) -> Tensor:
    """Indices (int64) of the latents to recompute: κ = S1²/(S1² - S2) above KAPPA_MAX,
    or a denominator taken for 0 although the latent is not constant. The latter are
    mostly latents that fire once (the exact score is NaN too), but where the kernel
    summed its moments in float32 (Triton's dense kernel) a rest mass below eps32 of the
    top sample also reads as 0."""
    act_min, act_max = stats.act_range[0], stats.act_range[1]
    _, sum_a, _, _, denominator, defined = score_terms(stats.moments, stats.act_range, stats.shift, stats.counts,
                                                        DEN_RTOL)
    kappa = sum_a * sum_a / torch.where(defined, denominator, 1.0)
    return ((act_max > act_min) & (~defined | (kappa > KAPPA_MAX))).nonzero().squeeze(1)


def refine_ill_conditioned(scores: Tensor, acts: Tensor | CsrActs, emb: Tensor, stats: MonoScoreStats) -> Tensor:
    """`scores` (from `finalize(stats)`) with the ill-conditioned latents replaced by
    their exact float64 scores, rounded to scores' dtype; a new tensor, inputs unchanged
    (`scores` itself where no latent is ill-conditioned)."""
    latents = ill_conditioned_latents(stats)
    if latents.numel() == 0:
        return scores
    return refine_latents(scores, acts, emb, stats.act_range, latents)


def refine_latents(scores: Tensor, acts: Tensor | CsrActs, emb: Tensor, act_range: Tensor, latents: Tensor) -> Tensor:
    """`scores` with `latents` (int64 indices, act_range (2, M) their min and max among
    all) replaced by their exact float64 scores, rounded to scores' dtype; a new tensor."""
    entries = csr_entries(acts, latents) if isinstance(acts, CsrActs) else dense_entries(acts, latents)
    exact = torch.ops.monoloss_kernels.deflated_scores(*entries, act_range[:, latents], emb.detach())
    return scores.index_copy(0, latents, exact.to(scores.dtype))


def csr_entry_positions(col_indices: Tensor, num_latents: int, latents: Tensor) -> tuple[Tensor, Tensor]:
    """(positions among the stored entries, index into `latents`) of the entries of `latents`."""
    local_of = torch.full((num_latents,), -1, device=latents.device, dtype=torch.int64)
    local_of[latents] = torch.arange(latents.numel(), device=latents.device)
    local = local_of.index_select(0, col_indices)  # a third of the time of advanced indexing on the CPU
    keep = (local >= 0).nonzero().squeeze(1)
    return keep, local[keep]


def csr_entries(acts: CsrActs, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, index into `latents`, value) of the stored entries of `latents`."""
    keep, local = csr_entry_positions(acts.col_indices, acts.num_latents, latents)
    return entry_rows(acts.crow_indices, acts.col_indices.shape[0])[keep], local, acts.values.detach()[keep]


def dense_entries(acts: Tensor, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The nonzero entries of acts[:, latents] as (row, index into `latents`, value): the
    zeros are left implicit, as in a sparse input, for an ill-conditioned latent is
    usually one that fires rarely."""
    step = max(1, DENSE_ELEMENTS_PER_BLOCK // max(1, acts.shape[0]))
    parts = []
    for c0 in range(0, latents.numel(), step):
        columns = acts.detach()[:, latents[c0 : c0 + step]]  # (N, columns)
        rows, local = columns.nonzero(as_tuple=True)
        parts.append((rows, local + c0, columns[rows, local]))
    return tuple(torch.cat(p) for p in zip(*parts))


def inverse_norms(emb_rows: Tensor) -> Tensor:
    """float64 1/‖row‖ of float64 rows, 0 for zero rows (so that their unit row is 0)."""
    norm = torch.linalg.vector_norm(emb_rows, dim=1)
    nonzero = norm > 0
    # 1 / a safe norm: a NaN in the branch not taken would still reach the gradient
    # where this is differentiated (MonoLoss's backward).
    return torch.where(nonzero, 1.0 / torch.where(nonzero, norm, 1.0), 0.0)


@torch.library.custom_op("monoloss_kernels::deflated_scores", mutates_args=())
def deflated_scores(rows: Tensor, local: Tensor, values: Tensor, act_range: Tensor, emb: Tensor) -> Tensor:
    """(F,) float64 MonoScores of F latents given by their entries: entry e is activation
    values[e] of latent local[e] (int64, in [0, F)) in row rows[e] (int64, in [0, N));
    every other row of a latent holds 0, and a latent has at most one entry per row.
    act_range: (2, F) min and max of each latent over all N rows (the zeros included),
    max > min. emb: (N, d). Values are taken as float32, as the kernels read them, so
    the result is the exact score of what the kernels saw; NaN where fewer than two
    rows sit above the min.

    `torch_deflated_scores` serves every device; the extension registers a CPU kernel
    (csrc/cpu/deflated_scores_cpu.cpp) that replaces it: one pass per latent over its
    entries instead of ~30 torch ops per block of latents.
    """
    return torch_deflated_scores(rows, local, values, act_range, emb)


@deflated_scores.register_fake
def _(rows, local, values, act_range, emb):
    return emb.new_empty((act_range.shape[1],), dtype=torch.float64)


def torch_deflated_scores(rows: Tensor, local: Tensor, values: Tensor, act_range: Tensor, emb: Tensor) -> Tensor:
    """`deflated_scores` in plain torch, for every device (see there for the arguments):
    `block_deflated_scores` over blocks of LATENTS_PER_BLOCK latents, the entries grouped
    by latent first, so that each block's (latents, d) sums stay in cache. The rows
    without an entry share one ã = -min/range; where that is not 0 for some latent, they
    enter through ΣÊ, formed here in float64 (one pass over emb): a float32 ΣÊ, as the
    statistics hold it, would cost eps32·N where those rows carry the max."""
    num_rows, dim = emb.shape
    num_latents = act_range.shape[1]
    order = torch.argsort(local, stable=True)
    rows, local, values = rows[order], local[order], values[order]
    count = torch.bincount(local, minlength=num_latents)
    unit_emb_sum = torch.zeros(dim, device=emb.device, dtype=torch.float64)
    num_unit_rows = torch.zeros((), device=emb.device, dtype=torch.float64)
    if bool(((count < num_rows) & (act_range[0] != 0)).any()):
        for n0 in range(0, num_rows, ENTRIES_PER_BLOCK):
            x = emb[n0 : n0 + ENTRIES_PER_BLOCK].double()
            inv_norm = inverse_norms(x)
            unit_emb_sum += inv_norm @ x
            num_unit_rows += (inv_norm > 0).sum()
    starts = [0] + count.cumsum(0).tolist()
    parts = []
    for f0 in range(0, num_latents, LATENTS_PER_BLOCK):
        f1 = min(f0 + LATENTS_PER_BLOCK, num_latents)
        e = slice(starts[f0], starts[f1])
        parts.append(block_deflated_scores(rows[e], local[e] - f0, values[e], count[f0:f1], act_range[:, f0:f1],
                                           emb, unit_emb_sum, num_unit_rows))
    return torch.cat(parts) if parts else act_range.new_empty(0, dtype=torch.float64)


def block_deflated_scores(rows: Tensor, local: Tensor, values: Tensor, count: Tensor, act_range: Tensor,
                          emb: Tensor, unit_emb_sum: Tensor, num_unit_rows: Tensor) -> Tensor:
    """`deflated_scores` of a block of latents (see there): count (F,) their numbers of
    entries; unit_emb_sum (d,) and num_unit_rows () the float64 ΣÊ and number of
    nonzero-norm rows over all N rows (0 where no latent's rows without an entry carry
    weight). O(d) per entry and latent; the module docstring has the formula."""
    num_rows, dim = emb.shape
    num_latents = act_range.shape[1]
    device = emb.device
    f64 = dict(device=device, dtype=torch.float64)
    lo, hi = act_range.double()
    span = hi - lo
    weight = (values.float().double() - lo[local]) / span[local]  # (E,) ã of each entry
    num_entries = local.shape[0]
    count = count.double()

    # n*, a row at the max (ã = 1 exactly), taken out of the sums: the first entry
    # there; where the max is an implicit 0, the one row without an entry if there is
    # only one (its index from the sum of the entries' rows, a latent having at most
    # one entry per row). Several rows without an entry at the max need no n*: they
    # put at least 2 into the denominator, which is then well conditioned in float64.
    entry_ids = torch.arange(num_entries, device=device)
    at_max = weight == 1.0
    top = torch.full((num_latents,), num_entries, device=device, dtype=torch.int64)
    top.scatter_reduce_(0, local[at_max], entry_ids[at_max], "amin")
    deflated = top < num_entries  # (F,) n* is an entry
    implicit_top = ~deflated & (count == num_rows - 1) & (hi == 0)  # (F,) n* is the row without an entry
    missing_row = num_rows * (num_rows - 1) // 2 - torch.zeros(num_latents, device=device, dtype=torch.int64) \
        .index_add_(0, local, rows)
    top_row = torch.where(deflated, rows[top.clamp(max=num_entries - 1)], missing_row.clamp(0, num_rows - 1))
    has_top = (deflated | implicit_top).double()
    # ã* (1, or 0 where no n*), as the weight it is, so that its gradient is right where
    # this function is differentiated (MonoLoss's backward).
    t = torch.where(deflated, weight[top.clamp(max=num_entries - 1)], torch.where(implicit_top, -lo / span, 0.0))
    kept = torch.ones(num_entries, **f64).index_fill_(0, top[deflated], 0.0)  # 0 for an n* entry
    # ã of a row without an entry (an activation of 0). A latent with such rows has
    # min <= 0 <= max, so |ã - ã_implicit| <= 1 below; one without them (or whose only
    # one is n*) gets 0, not -min/range, which for a latent at 1000 + x would cancel.
    implicit = torch.where((count < num_rows) & ~implicit_top, -lo / span, 0.0)  # (F,)
    num_implicit = torch.where(implicit_top, 0.0, num_rows - count)  # rows without an entry, n* not counted
    is_unit = []  # ‖ê‖² of each entry's row: 1, or 0 for a zero row

    # V = Σ_{n≠n*} ã ê: every row other than n* at ã_implicit, plus the entries' excess
    # (ã - ã_implicit) ê, summed here with the unit rows formed in float64 on the fly.
    # Out of place, here and below: MonoLoss's backward differentiates this function
    # with torch.func.vjp (loss.refined_scores_of_entries), which refuses writes of
    # tracked values into tensors made here.
    rest = torch.zeros(num_latents, dim, **f64)
    for e0 in range(0, num_entries, ENTRIES_PER_BLOCK):
        e = slice(e0, e0 + ENTRIES_PER_BLOCK)
        x = emb[rows[e]].double()
        inv_norm = inverse_norms(x)
        is_unit.append((inv_norm > 0).double())
        lat = local[e]
        rest = rest.index_add(0, lat, x * ((weight[e] - implicit[lat]) * kept[e] * inv_norm)[:, None])
    is_unit = torch.cat(is_unit) if is_unit else weight.new_zeros(0)
    top_x = emb[top_row].double()
    top_unit = top_x * (inverse_norms(top_x) * has_top)[:, None]  # (F, d) ê*, 0 where no n*
    top_is_unit = (top_unit != 0).any(1).double()
    rest = rest + torch.outer(implicit, unit_emb_sum) - top_unit * implicit[:, None]

    # The moments over the rows other than n*: entries, then the rows without an entry.
    w, k = weight * kept, kept * is_unit
    sum_w, sum_w2, sum_w2_unit, entry_units = torch.zeros(4, num_latents, **f64).index_add(
        1, local, torch.stack([w, w * weight, w * weight * is_unit, k]))
    implicit_units = num_unit_rows - entry_units - top_is_unit  # nonzero-norm rows without an entry
    sum_rest = sum_w + implicit * num_implicit  # S1' = Σ_{n≠n*} ã
    sumsq_rest = sum_w2 + implicit * implicit * num_implicit
    sumsq_unit_rest = sum_w2_unit + implicit * implicit * implicit_units
    numerator = t * torch.linalg.vecdot(top_unit, rest) + 0.5 * (torch.linalg.vecdot(rest, rest) - sumsq_unit_rest)
    denominator = t * sum_rest + 0.5 * (sum_rest * sum_rest - sumsq_rest)
    # 0 exactly where fewer than two rows sit above the min (then so is the numerator).
    return torch.where(denominator > 0, numerator / denominator, float("nan"))
