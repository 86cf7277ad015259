"""The one validation point: every public entry checks its inputs here, and each
error names the argument, what was expected and what came. Nothing downstream
re-validates."""

import torch
from torch import Tensor

from .stats import CsrActs

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32)
ACTS_FORMS = (
    "a dense (N, M) tensor, the (values, indices) pair torch.topk returns (with num_latents=M), "
    "or a 2-D torch sparse COO or CSR tensor"
)


def _check_tensor(name: str, x, dim: int = 2, dtypes=SUPPORTED_DTYPES) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got {x.dim()}-D with shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        expected = " or ".join(str(t).removeprefix("torch.") for t in dtypes)
        raise TypeError(f"{name} must be {expected}, got {x.dtype}")


def _check_num_latents(num_latents, num_columns: int | None) -> int:
    """num_latents as given, or the number of columns of the input; they must agree."""
    if num_latents is None:
        if num_columns is None:
            raise ValueError(
                "num_latents is required with a (values, indices) pair: pass num_latents=M, "
                "the number of latents of the SAE"
            )
        return num_columns
    if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 0:
        raise TypeError(f"num_latents must be a non-negative int, got {num_latents!r}")
    if num_columns is not None and num_latents != num_columns:
        raise ValueError(f"num_latents={num_latents} but acts has {num_columns} columns (latents)")
    return num_latents


def _check_latent_range(name: str, cols: Tensor, num_latents: int) -> None:
    if cols.numel() == 0:
        return
    lo, hi = (int(x) for x in cols.aminmax())
    if lo < 0 or hi >= num_latents:
        raise ValueError(
            f"{name} must lie in [0, num_latents={num_latents}), got values from {lo} to {hi}"
        )


def _topk_to_csr(pair, num_latents) -> CsrActs:
    if len(pair) != 2:
        raise TypeError(f"acts given as a tuple must be the (values, indices) pair of torch.topk, got {len(pair)} items")
    values, indices = pair
    _check_tensor("acts values", values)
    _check_tensor("acts indices", indices, dtypes=INDEX_DTYPES)
    if values.shape != indices.shape:
        raise ValueError(
            f"acts values and indices must have the same shape (N, k), got {tuple(values.shape)} "
            f"and {tuple(indices.shape)}"
        )
    if values.device != indices.device:
        raise ValueError(f"acts values and indices must be on the same device, got {values.device} and {indices.device}")
    num_latents = _check_num_latents(num_latents, None)
    _check_latent_range("acts indices", indices, num_latents)
    num_rows, k = values.shape
    crow = torch.arange(num_rows + 1, device=values.device, dtype=torch.int64) * k
    return CsrActs(crow, indices.reshape(-1).long(), values.reshape(-1), num_latents)


def _sparse_to_csr(acts: Tensor, num_latents) -> CsrActs:
    if acts.dim() != 2 or acts.dense_dim() != 0:
        raise ValueError(
            f"acts as a sparse tensor must be 2-D (N, M) with scalar values, got shape {tuple(acts.shape)} "
            f"with {acts.dense_dim()} dense dimensions"
        )
    if acts.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"acts must be float32, float16, bfloat16 or float64, got {acts.dtype}")
    num_rows, num_columns = acts.shape
    num_latents = _check_num_latents(num_latents, num_columns)
    if acts.layout == torch.sparse_coo:
        acts = acts.coalesce()  # repeated coordinates add up, as in acts.to_dense()
        rows, cols = acts.indices()
        bounds = torch.arange(num_rows + 1, device=acts.device, dtype=rows.dtype)
        crow = torch.searchsorted(rows, bounds)  # coalesced rows are sorted
        return CsrActs(crow, cols, acts.values(), num_latents)
    crow, cols = acts.crow_indices().long(), acts.col_indices()
    # torch does not check CSR invariants by default, and the kernels index by them.
    if int(crow[0]) != 0 or int(crow[-1]) != cols.shape[0] or bool((crow.diff() < 0).any()):
        raise ValueError(f"acts crow_indices must run from 0 to nnz={cols.shape[0]} without decreasing")
    _check_latent_range("acts col_indices", cols, num_latents)
    return CsrActs(crow, cols.long(), acts.values(), num_latents)


def canonical_acts(acts, num_latents=None) -> Tensor | CsrActs:
    """acts alone in canonical form: any sparse form as `CsrActs`, a dense tensor
    unchanged (its rank, dtype and width against num_latents are checked by
    `validate_acts`, which also checks it against emb)."""
    if isinstance(acts, CsrActs):  # already canonical (built by the SAE modules, say)
        _check_num_latents(num_latents, acts.num_latents)
        return acts
    if isinstance(acts, tuple):
        return _topk_to_csr(acts, num_latents)
    if isinstance(acts, Tensor) and acts.layout in (torch.sparse_coo, torch.sparse_csr):
        return _sparse_to_csr(acts, num_latents)
    if isinstance(acts, Tensor) and acts.layout != torch.strided:
        raise TypeError(f"acts must be {ACTS_FORMS}; got layout {acts.layout} (convert with .to_sparse_csr())")
    if not isinstance(acts, Tensor):
        raise TypeError(f"acts must be {ACTS_FORMS}; got {type(acts).__name__}")
    return acts


def validate_acts(acts, emb, num_latents=None) -> tuple[Tensor | CsrActs, Tensor]:
    """Checks (acts, emb) and returns acts in canonical form: the dense (N, M) tensor
    unchanged, or any sparse form as `CsrActs`; emb unchanged.

    NaN/Inf values are refused after the kernels (`check_stats_finite`); a latent
    stored twice in a row, where the kernels order the entries by latent.
    """
    acts = canonical_acts(acts, num_latents)
    if isinstance(acts, CsrActs):
        _check_tensor("emb", emb)
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
    _check_num_latents(num_latents, acts.shape[1])
    return acts, emb


def validate_dense(acts, emb) -> tuple[Tensor, Tensor]:
    """Checks a dense (acts: N x M, emb: N x d) pair and returns it unchanged.

    NaN/Inf values are refused after the kernels (`check_stats_finite`).
    """
    _check_tensor("acts", acts)
    _check_tensor("emb", emb)
    if acts.shape[0] != emb.shape[0]:
        raise ValueError(
            f"acts and emb must have the same number of rows N: acts is {tuple(acts.shape)} "
            f"(N, M), emb is {tuple(emb.shape)} (N, d)"
        )
    if acts.device != emb.device:
        raise ValueError(f"acts and emb must be on the same device, got acts on {acts.device} and emb on {emb.device}")
    return acts, emb


def check_stats_finite(stats, emb: Tensor) -> None:
    """Refuses NaN/Inf inputs after the kernels, from the small statistics, so that
    acts is read once: its float64 moments are finite iff acts is (|b|² < 1e77 for
    float32 b), and unit_emb_sum iff every emb row has a finite float32 norm."""
    if not bool(torch.isfinite(stats.moments).all()):
        raise ValueError("acts contains NaN or Inf values")
    if not bool(torch.isfinite(stats.unit_emb_sum).all()):
        if not bool(torch.isfinite(emb).all()):
            raise ValueError("emb contains NaN or Inf values")
        raise ValueError(
            "emb has rows whose norm overflows float32; rescale emb (cosine similarity "
            "does not depend on the scale of a row)"
        )
