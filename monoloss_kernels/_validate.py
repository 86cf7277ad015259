"""The one validation point: every public entry checks its inputs here, and each
error names the argument, what was expected and what came. Nothing downstream
re-validates.

Accepted forms of `acts` (N samples x M latents), as the SAE libraries hand them over:

- a dense (N, M) tensor: SAELens `encode(x)`, overcomplete, the MonoLoss repo, openai's
  `encode(x)[0]`, dictionary_learning `encode(x)`;
- a TopK pair of (N, k) tensors, `num_latents=M` required: `torch.topk`'s namedtuple, a
  plain `(values, indices)` tuple or openai's `(indices, values)` order -- the indices
  are the tensor of integer dtype, wherever it sits;
- sparsify's `EncoderOutput(top_acts, top_indices, pre_acts)` and
  `ForwardOutput(sae_out, latent_acts, latent_indices, ...)`, recognised by their
  field names (sparsify need not be installed);
- dictionary_learning's `encode(x, return_topk=True)` 4-tuple `(dense (N, M), top_acts
  (N, k), top_indices (N, k), post_relu (N, M))`: its TopK pair when that pair is exactly
  the dense tensor (the default `use_threshold=False`), else -- `use_threshold=True`, where
  the dense tensor is the thresholded encoding the SAE decodes -- the dense tensor;
- a 2-D torch sparse COO or CSR tensor (SAELens' sparse training output).

Latent indices may have any integer dtype (int64, int32, int16, int8, uint8, uint16,
uint32, uint64); they are converted to int64 before they are range-checked.

Misuse caught with a message that says what was probably meant, where shapes allow:

- emb given as a sparse form (a tuple of tensors, a torch sparse tensor, `CsrActs`):
  acts and emb swapped (the MonoLoss repo's `compute_monosemanticity_loss_batch(x,
  latents)` takes the embeddings first);
- with `num_latents` given (always in `MonoScoreAccumulator.update`), acts whose width
  is not num_latents: if it equals emb's width d, the SAE's input or reconstruction was
  passed instead of its latents (delphi PR #131); if instead emb's width equals
  num_latents, acts and emb are swapped;
- a tuple of floating-point tensors only (an SAE's forward output such as
  dictionary_learning's `(x_hat, features)` or overcomplete's `(pre_codes, codes)`), and
  openai's `(latents, info)`: pass the latents tensor;
- acts or emb with more than two dimensions (per-token latents): flatten both to rows.

Not caught: without num_latents, a dense (N, d) acts and (N, M) emb (swapped, or the
reconstruction for the latents) pass shape checks -- both are valid-looking (N, ·)
matrices, and M = d is possible, so nothing is guessed.
"""

import operator

import torch
from torch import Tensor

from .stats import CsrActs, entry_rows, latent_major_order

# Finite activations the float32 sums of the kernels hold without overflow, with room
# for the shift to the min and the squares `finalize` forms after scaling by the range.
FLOAT32_SUM_LIMIT = torch.finfo(torch.float32).max / 16
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# int64 and int32 first: what torch.topk and most libraries give; delphi caches uint16/uint32.
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
                torch.uint32, torch.uint64)
ACTS_FORMS = (
    "a dense (N, M) tensor, the (values, indices) pair torch.topk returns or another TopK form (openai's "
    "(indices, values), sparsify's EncoderOutput/ForwardOutput, dictionary_learning's encode(x, "
    "return_topk=True) 4-tuple; with num_latents=M), or a 2-D torch sparse COO or CSR tensor"
)
SWAP_HINT = (
    "the order is (acts, emb): latents first, then embeddings (the MonoLoss repo's "
    "compute_monosemanticity_loss_batch(x, latents) takes the embeddings first)"
)
# (values field, indices field) of the named TopK outputs, matched by name so that the
# libraries need not be installed or imported.
TOPK_FIELDS = (
    ("top_acts", "top_indices"),  # sparsify EncoderOutput (SparseCoder.encode)
    ("latent_acts", "latent_indices"),  # sparsify ForwardOutput (SparseCoder.forward)
    ("values", "indices"),  # torch.return_types.topk
)


def _dtype_names(dtypes) -> str:
    return " or ".join(str(t).removeprefix("torch.") for t in dtypes)


def _describe(x) -> str:
    """What x is, for messages: kind, shape and dtype."""
    if isinstance(x, CsrActs):
        return f"CsrActs with {x.num_rows} rows and {x.num_latents} latents"
    if isinstance(x, Tensor):
        kind = "dense" if x.layout == torch.strided else str(x.layout).removeprefix("torch.")
        return f"a {kind} {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} tensor"
    if isinstance(x, tuple):
        items = ", ".join(
            f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" if isinstance(t, Tensor) else type(t).__name__
            for t in x
        )
        return f"a {type(x).__name__} of {len(x)} ({items})"
    return f"a {type(x).__name__}"


def check_tensor(name: str, x, dim: int = 2, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != dim:
        hint = ""
        if x.dim() > dim == 2:  # per-token latents, (batch, seq, M): one row per token
            hint = "; flatten the leading dimensions into rows, e.g. x.flatten(0, -2), for acts and emb alike"
        raise ValueError(f"{name} must be {dim}-D, got {x.dim()}-D with shape {tuple(x.shape)}{hint}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {_dtype_names(dtypes)}, got {x.dtype}")


def check_num_latents(num_latents, num_columns: int | None, emb_dim: int | None = None) -> int:
    """num_latents as given, or the number of columns of the input; they must agree.
    With emb's width `emb_dim`, a disagreement says what was probably passed instead."""
    if num_latents is None:
        if num_columns is None:
            raise ValueError(
                "num_latents is required with a (values, indices) pair: pass num_latents=M, "
                "the number of latents of the SAE"
            )
        return num_columns
    # Any integer (numpy's, a 0-d integer tensor: operator.index), but no bool or float.
    try:
        index = None if isinstance(num_latents, bool) else operator.index(num_latents)
    except TypeError:
        index = None
    if index is None or index < 0:
        raise TypeError(f"num_latents must be a non-negative int, got {num_latents!r}")
    num_latents = index
    if num_columns is not None and num_latents != num_columns:
        message = f"num_latents={num_latents} but acts has {num_columns} columns (latents)"
        if emb_dim == num_columns:
            message += (
                f", as many as emb (d={emb_dim}): acts looks like the SAE's input or its reconstruction "
                f"(forward() output); pass its latents, encode(x), of width {num_latents}"
            )
        elif emb_dim == num_latents:
            message += f", while emb has {emb_dim} = num_latents columns: acts and emb look swapped; {SWAP_HINT}"
        raise ValueError(message)
    return num_latents


def _check_index_range(name: str, indices: Tensor, bound: int, bound_name: str = "num_latents") -> None:
    """Refuses indices outside [0, bound); bound_name names the bound in the message."""
    if indices.numel() == 0:
        return
    lo, hi = torch.stack(indices.aminmax()).tolist()  # one read from the device, not two
    if lo < 0 or hi >= bound:
        raise ValueError(
            f"{name} must lie in [0, {bound_name}={bound}), got values from {lo} to {hi}"
        )


def _as_int64(indices: Tensor) -> Tensor:
    """int64 indices; uint16/32/64 support few ops besides the copy, so convert first. A uint64
    index of 2^63 or more becomes negative, and the range check refuses it."""
    return indices if indices.dtype == torch.int64 else indices.to(torch.int64)


def _outputs_hint(items) -> str:
    return (
        f"acts given as a tuple must be the (values, indices) pair of torch.topk or another TopK form, got "
        f"{_describe(items)}. If this is an SAE's output, pass its latents tensor: e.g. dictionary_learning's "
        "forward(x, output_features=True) returns (x_hat, features), overcomplete's encode returns "
        "(pre_codes, codes), openai's encode returns (latents, info), the MonoLoss repo's SAE returns "
        "(pre_acts, latents, reconstruction)"
    )


def _order_pair(first: Tensor, second: Tensor) -> tuple[Tensor, Tensor]:
    """(values, indices) of a two-tensor pair in either order: the indices are the integer tensor."""
    first_is_index, second_is_index = first.dtype in INDEX_DTYPES, second.dtype in INDEX_DTYPES
    if second_is_index and not first_is_index:
        return first, second  # torch.topk, sparsify: values first
    if first_is_index and not second_is_index:
        return second, first  # openai kernels: (indices, values)
    if first_is_index:
        raise TypeError(
            f"acts values must be {_dtype_names(SUPPORTED_DTYPES)}, but both tensors of the (values, indices) "
            f"pair have integer dtypes: {_describe((first, second))}"
        )
    if first.is_floating_point() and second.is_floating_point():
        raise TypeError(
            f"acts indices must be {_dtype_names(INDEX_DTYPES)}, but both tensors of the pair are floating "
            f"point. {_outputs_hint((first, second))}"
        )
    raise TypeError(
        f"acts given as a pair needs one floating-point tensor (the values) and one tensor of latent indices "
        f"({_dtype_names(INDEX_DTYPES)}); got {_describe((first, second))}"
    )


def _dictionary_learning_topk(items) -> bool:
    """dictionary_learning's encode(x, return_topk=True): (dense (N, M), top_acts (N, k), top_indices (N, k),
    post_relu (N, M))."""
    if len(items) != 4 or not all(isinstance(t, Tensor) and t.layout == torch.strided and t.dim() == 2
                                  for t in items):
        return False
    dense, top_acts, top_indices, post_relu = items
    return (dense.is_floating_point() and post_relu.is_floating_point() and top_acts.is_floating_point()
            and top_indices.dtype in INDEX_DTYPES and dense.shape == post_relu.shape
            and top_acts.shape == top_indices.shape and top_acts.shape[0] == dense.shape[0])


def _dictionary_learning_choice(items, num_latents, emb_dim):
    """The TopK pair when it is exactly the dense encoding (no threshold: O(N·k·d) instead of
    O(N·M·d)); the dense encoding otherwise (use_threshold=True, the pair is not what the SAE decodes)."""
    dense, top_acts, top_indices, _ = items
    num_latents = check_num_latents(num_latents, dense.shape[1], emb_dim)
    check_tensor("acts", dense)
    if top_acts.device != dense.device or top_indices.device != dense.device:
        return dense
    top_indices = _as_int64(top_indices)
    _check_index_range("acts top_indices", top_indices, num_latents)
    with torch.no_grad():
        same = (bool((dense.gather(1, top_indices) == top_acts).all())
                and bool((dense.count_nonzero(1) == top_acts.count_nonzero(1)).all()))
    return _topk_to_csr(top_acts, top_indices, num_latents) if same else dense


def _topk_to_csr(values: Tensor, indices: Tensor, num_latents) -> CsrActs:
    check_tensor("acts values", values)
    check_tensor("acts indices", indices, dtypes=INDEX_DTYPES)
    if values.shape != indices.shape:
        raise ValueError(
            f"acts values and indices must have the same shape (N, k), got {tuple(values.shape)} "
            f"and {tuple(indices.shape)}"
        )
    if values.device != indices.device:
        raise ValueError(f"acts values and indices must be on the same device, got {values.device} and {indices.device}")
    num_latents = check_num_latents(num_latents, None)
    indices = _as_int64(indices)
    _check_index_range("acts indices", indices, num_latents)
    num_rows, k = values.shape
    crow = torch.arange(num_rows + 1, device=values.device, dtype=torch.int64) * k
    # values.reshape(-1) is a view (or a differentiable copy): gradients reach the caller's tensor.
    return CsrActs(crow, indices.reshape(-1), values.reshape(-1), num_latents)


def _tuple_to_canonical(acts: tuple, num_latents, emb_dim) -> Tensor | CsrActs:
    for values_field, indices_field in TOPK_FIELDS:
        values, indices = getattr(acts, values_field, None), getattr(acts, indices_field, None)
        if isinstance(values, Tensor) and isinstance(indices, Tensor):
            return _topk_to_csr(values, indices, num_latents)
    items = tuple(acts)
    if len(items) == 2 and all(isinstance(t, Tensor) for t in items):
        return _topk_to_csr(*_order_pair(*items), num_latents)
    if _dictionary_learning_topk(items):
        return _dictionary_learning_choice(items, num_latents, emb_dim)
    if items and isinstance(items[0], Tensor) and all(isinstance(t, (Tensor, dict)) for t in items):
        raise TypeError(_outputs_hint(items))
    raise TypeError(
        f"acts given as a tuple must be the (values, indices) pair of torch.topk (either order), sparsify's "
        f"EncoderOutput/ForwardOutput or dictionary_learning's encode(x, return_topk=True); got {_describe(items)}"
    )


def _sparse_to_csr(acts: Tensor, num_latents, emb_dim) -> CsrActs:
    if acts.dim() != 2 or acts.dense_dim() != 0:
        raise ValueError(
            f"acts as a sparse tensor must be 2-D (N, M) with scalar values, got shape {tuple(acts.shape)} "
            f"with {acts.dense_dim()} dense dimensions"
        )
    if acts.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"acts must be {_dtype_names(SUPPORTED_DTYPES)}, got {acts.dtype}")
    num_rows, num_columns = acts.shape
    num_latents = check_num_latents(num_latents, num_columns, emb_dim)
    if acts.layout == torch.sparse_coo:
        # torch does not check COO invariants by default, and coalesce() writes out of
        # bounds on an index outside the shape (a crash, not an error).
        rows, cols = acts._indices()
        _check_index_range("acts row indices", rows, num_rows, bound_name="N")
        _check_index_range("acts column indices", cols, num_latents)
        flagged_coalesced = acts.is_coalesced()
        acts = acts.coalesce()  # repeated coordinates add up, as in acts.to_dense()
        rows, cols = acts.indices()
        # coalesce() returns a tensor built with is_coalesced=True as it is, and torch
        # does not check that flag: unsorted or repeated indices would then pass as rows.
        if flagged_coalesced and bool(((rows * num_columns + cols).diff() <= 0).any()):
            raise ValueError("acts is flagged coalesced (is_coalesced=True) but its indices are not sorted and "
                             "distinct; build it without is_coalesced=True and it is coalesced here")
        bounds = torch.arange(num_rows + 1, device=acts.device, dtype=rows.dtype)
        crow = torch.searchsorted(rows, bounds)  # coalesced rows are sorted
        return CsrActs(crow, cols, acts.values(), num_latents)
    crow, cols = acts.crow_indices().long(), acts.col_indices()
    # torch does not check CSR invariants by default, and the kernels index by them.
    if crow.shape[0] != num_rows + 1:
        raise ValueError(f"acts crow_indices must have N + 1 = {num_rows + 1} entries for shape "
                         f"{tuple(acts.shape)}, got {crow.shape[0]}")
    if int(crow[0]) != 0 or int(crow[-1]) != cols.shape[0] or bool((crow.diff() < 0).any()):
        raise ValueError(f"acts crow_indices must run from 0 to nnz={cols.shape[0]} without decreasing")
    if acts.values().shape != cols.shape:
        raise ValueError(f"acts values must hold one value per col_indices entry ({cols.shape[0]}), "
                         f"got shape {tuple(acts.values().shape)}")
    _check_index_range("acts col_indices", cols, num_latents)
    return CsrActs(crow, cols.long(), acts.values(), num_latents)


def canonical_acts(acts, num_latents=None, *, emb_dim: int | None = None) -> Tensor | CsrActs:
    """acts alone in canonical form: any sparse form (see the module docstring for the
    accepted forms) as `CsrActs`, a dense tensor unchanged (its rank, dtype and width against
    num_latents are checked by `validate_acts`, which also checks it against emb).

    `emb_dim`, emb's width where known, lets a wrong width say what was probably passed.
    """
    if isinstance(acts, CsrActs):  # already canonical (built by the SAE modules, say)
        check_num_latents(num_latents, acts.num_latents, emb_dim)
        return acts
    if isinstance(acts, tuple):
        return _tuple_to_canonical(acts, num_latents, emb_dim)
    if isinstance(acts, Tensor) and acts.layout in (torch.sparse_coo, torch.sparse_csr):
        return _sparse_to_csr(acts, num_latents, emb_dim)
    if isinstance(acts, Tensor) and acts.layout != torch.strided:
        raise TypeError(f"acts must be {ACTS_FORMS}; got layout {acts.layout} (convert with .to_sparse_csr())")
    if not isinstance(acts, Tensor):
        raise TypeError(f"acts must be {ACTS_FORMS}; got {type(acts).__name__}")
    return acts


def _check_emb(emb, acts) -> None:
    """emb must be a dense (N, d) tensor; a sparse form there means acts and emb were swapped."""
    looks_sparse = (
        isinstance(emb, CsrActs)
        or (isinstance(emb, Tensor) and emb.layout != torch.strided)
        or (isinstance(emb, tuple) and any(isinstance(t, Tensor) for t in emb))
    )
    if looks_sparse:
        raise TypeError(
            f"emb must be the dense (N, d) embeddings tensor, got {_describe(emb)}, which looks like sparse "
            f"latents, with acts {_describe(acts)}: acts and emb look swapped; {SWAP_HINT}"
        )
    check_tensor("emb", emb)


def validate_acts(acts, emb, num_latents=None) -> tuple[Tensor | CsrActs, Tensor]:
    """Checks (acts, emb) and returns acts in canonical form: the dense (N, M) tensor
    unchanged, or any sparse form as `CsrActs`; emb unchanged. Accepted forms and the
    misuse caught: see the module docstring.

    NaN/Inf values are refused after the kernels (`check_stats_finite`); a latent
    stored twice in a row, where the kernels order the entries by latent.
    """
    _check_emb(emb, acts)
    acts = canonical_acts(acts, num_latents, emb_dim=emb.shape[1])
    if isinstance(acts, CsrActs):
        if acts.num_rows != emb.shape[0]:
            raise ValueError(
                f"acts and emb must have the same number of rows N: acts has {acts.num_rows}, "
                f"emb is {tuple(emb.shape)} (N, d)"
            )
        if acts.values.device != emb.device:
            raise ValueError(
                f"acts and emb must be on the same device, got acts on {acts.values.device} and emb on {emb.device}"
            )
        return acts, emb
    acts, emb = validate_dense(acts, emb)
    check_num_latents(num_latents, acts.shape[1], emb.shape[1])
    return acts, emb


def validate_dense(acts, emb) -> tuple[Tensor, Tensor]:
    """Checks a dense (acts: N x M, emb: N x d) pair and returns it unchanged.

    NaN/Inf values are refused after the kernels (`check_stats_finite`).
    """
    check_tensor("acts", acts)
    check_tensor("emb", emb)
    if acts.shape[0] != emb.shape[0]:
        raise ValueError(
            f"acts and emb must have the same number of rows N: acts is {tuple(acts.shape)} "
            f"(N, M), emb is {tuple(emb.shape)} (N, d)"
        )
    if acts.device != emb.device:
        raise ValueError(f"acts and emb must be on the same device, got acts on {acts.device} and emb on {emb.device}")
    return acts, emb


def check_finite(acts: Tensor | CsrActs, emb: Tensor) -> None:
    """Refuses NaN/Inf inputs by reading them, and a latent stored twice in the row:
    for batches of N < 2 rows, which the kernels (that check both) do not read."""
    if isinstance(acts, CsrActs):  # for its duplicate check
        latent_major_order(acts, entry_rows(acts.crow_indices, acts.col_indices.shape[0]))
    values = acts.values if isinstance(acts, CsrActs) else acts
    if not bool(torch.isfinite(values).all()):
        raise ValueError("acts contains NaN or Inf values")
    if not bool(torch.isfinite(emb).all()):
        raise ValueError("emb contains NaN or Inf values")


def stats_flags(stats) -> Tensor:
    """What `check_stats_finite` checks, as a (3,) bool tensor and without a host sync:
    [acts fit the float32 sums, acts finite, every emb row has a float32 unit row]."""
    act_min, act_max = stats.act_range.double()
    act_span, sumsq = act_max - act_min, stats.moments[1]
    # Non-finite values (an Inf in acts) are left to the NaN/Inf flag.
    too_large = (torch.isfinite(act_span) & (act_span > FLOAT32_SUM_LIMIT)) | (
        torch.isfinite(sumsq) & (torch.sqrt(stats.counts[0] * sumsq) > FLOAT32_SUM_LIMIT))
    return torch.stack([~too_large.any(), torch.isfinite(stats.moments).all(),
                        torch.isfinite(stats.unit_emb_sum).all()])


def check_stats_finite(stats, emb: Tensor) -> None:
    """Refuses NaN/Inf inputs after the kernels, from the small statistics, so that
    acts is read once: its float64 moments are finite iff acts is (|b|² < 1e77 for
    float32 b), and unit_emb_sum iff every emb row has a float32 unit row (`row_inv_norm`).
    Also refuses finite acts too large for the kernels' float32 sums: a latent's range,
    or the bound sqrt(N·Σb²) on its entries of Σ Ê b, above FLOAT32_SUM_LIMIT."""
    # The flags in one read: on a GPU each read waits for the queued work.
    fits, acts_finite, emb_finite = stats_flags(stats).tolist()
    if not fits:
        raise ValueError(
            f"acts has values too large for the float32 sums (a latent's range or sums above "
            f"{FLOAT32_SUM_LIMIT:.1e}); rescale acts (MonoScore does not depend on a positive scale of a latent)"
        )
    if not acts_finite:
        raise ValueError("acts contains NaN or Inf values")
    if not emb_finite:
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("emb contains NaN or Inf values")
        raise ValueError(
            "emb has rows too large or too small to normalise in float32 (norm above ~8.5e37 "
            "or below ~2.9e-39); rescale emb (cosine similarity does not depend on the scale of a row)"
        )


# What each `stats_flags` flag refuses, as a rank's batch names it to the other ranks.
STATS_FLAG_PROBLEMS = ("acts too large for the float32 sums", "acts with NaN or Inf values",
                       "emb with NaN or Inf values or rows too large or too small to normalise in float32")


def check_ranks_stats_finite(stats, emb: Tensor, problems: list[list[float]], rank: int) -> None:
    """Under distributed=True, every rank refuses the global batch when any rank's part
    is refused: `problems[r][i]` is nonzero where rank r's `stats_flags` flag i failed
    (all-reduced, so every rank holds the same table and raises after the same
    collectives, none left waiting). The failing rank raises `check_stats_finite`'s
    message; the others name the ranks and what their parts hold."""
    if not any(any(row) for row in problems):
        return
    if any(problems[rank]):
        check_stats_finite(stats, emb)
    found = "; ".join(f"{what} on rank(s) {[r for r, row in enumerate(problems) if row[i]]}"
                      for i, what in enumerate(STATS_FLAG_PROBLEMS) if any(row[i] for row in problems))
    raise ValueError(f"the global batch is refused: another rank's part has {found} (ranks of the group)")
