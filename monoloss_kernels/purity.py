"""Class purity of SAE latents: the label-based measure the MonoLoss paper reports
next to MonoScore.

For activations a[n, k] (N samples × M latents) and class labels y[n] ∈ {0, …, C−1}:

    count[c, k]  = #{ n : y[n] = c and a[n, k] > 0 }          samples of class c the latent fires on
    weight[c, k] = Σ_{n : y[n] = c} max(a[n, k], 0)            their activation mass

    binary purity    P[k] = max_c count[c, k]  / Σ_c count[c, k]
    weighted purity  W[k] = max_c weight[c, k] / Σ_c weight[c, k]

NaN for a latent that never fires (no a[n, k] > 0). The dominant class of a latent is
the argmax (the lowest class index among ties); `dominant_classes` returns it.

Where the definitions come from. The MonoLoss paper (Nasiri-Sarvi et al., arXiv
2602.12403, abstract) defines class purity as "the fraction of a latent's activating
images belonging to its dominant class", and its repository's README
(AtlasAnalyticsLab/MonoLoss, "MonoLoss increases purity in all 12 settings for both
binary purity and weighted purity") names the two variants. The repository's code
(checked at the stored versions of sae/*.py, finetuning/*.py, loss.py, train*.py) does
not contain the purity computation, so the formulas above are our reading of those
sentences: "binary" counts each activating image once, "weighted" counts it with its
activation value, and each variant takes its own dominant class.

Signed activations: only a > 0 counts as firing and only the positive part weighs. The
paper's SAEs (TopK, BatchTopK, JumpReLU) give non-negative latents, where this is the
plain definition; for signed inputs (raw neurons, pre-activations) a negative value
means "not firing", as for a ReLU, and is neither counted nor weighted.

Memory is O(M·C) whatever N is: the accumulator keeps `count` (int64) and `weight`
(float64) and adds each batch with `index_add_`; sparse inputs touch only their
stored entries (unstored entries are 0, i.e. not firing).
"""

import torch
from torch import Tensor

from ._validate import canonical_acts, check_num_latents, check_tensor
from .stats import CsrActs, entry_rows

STATE_VERSION = 1
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
# Dense batches are added in row chunks of at most this many elements, so that the
# float64/int64 temporaries stay ~32 MiB whatever the batch size.
DENSE_CHUNK_ELEMENTS = 1 << 22
# Labels that would need (C, M) sums (int64 counts + float64 weights, 16 bytes an entry)
# larger than this while using fewer than half of 0..C-1 are taken for sample or class IDs
# rather than class indices, and refused before anything is allocated. Below it, ID-like
# labels cost little and purity, which depends only on which samples share a label, is right.
ID_LABELS_MAX_BYTES = 1 << 30


def check_class_indices(num_classes: int, num_latents: int, count_distinct, source: str) -> None:
    """Refuses labels that are IDs, not class indices 0..C-1 (see ID_LABELS_MAX_BYTES).

    count_distinct(limit) returns the number of distinct labels, or any number >= limit
    once that many are found (so a stream of labels can stop early). Raises ValueError
    naming `source`."""
    sums_bytes = 16 * num_classes * num_latents
    if sums_bytes <= ID_LABELS_MAX_BYTES:
        return
    limit = (num_classes + 1) // 2
    distinct = count_distinct(limit)
    if distinct >= limit:
        return
    raise ValueError(
        f"{source}: labels must be class indices 0..C-1; the largest is {num_classes - 1} but only {distinct} "
        f"distinct values occur, and per-class sums for {num_classes} classes would take {sums_bytes / 2**30:.3g} "
        f"GiB; map them to 0..{distinct - 1} first (np.unique(labels, return_inverse=True)[1])"
    )


def class_purity(acts, labels: Tensor, *, num_classes: int | None = None, num_latents: int | None = None,
                 weighted: bool = False) -> Tensor:
    """(M,) float32 class purity of every latent (module docstring); NaN where a latent never fires.

    Args:
        acts: (N, M) activations in any form `monoscore` accepts: a dense tensor, the
            (values, indices) pair `torch.topk` returns (with num_latents=M), a 2-D torch
            sparse COO or CSR tensor. float32, float16, bfloat16 or float64.
        labels: (N,) integer class labels in [0, num_classes), on the device of acts.
        num_classes: C; defaults to labels.max() + 1. Then labels that leave most of
            0..C-1 unused while the (C, M) sums would exceed 1 GiB are refused as IDs
            rather than class indices (ValueError): map them to 0..C-1 first.
        num_latents: M; required with a (values, indices) pair.
        weighted: False for binary purity (counts), True for weighted purity (activation mass).
    """
    acts = canonical_acts(acts, num_latents)
    if isinstance(acts, CsrActs):
        num_latents, device = acts.num_latents, acts.values.device
    else:
        check_tensor("acts", acts)
        num_latents, device = check_num_latents(num_latents, acts.shape[1]), acts.device
    _check_labels(labels, device)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
        check_class_indices(num_classes, num_latents, lambda limit: torch.unique(labels).numel(), "labels")
    accumulator = ClassPurityAccumulator(num_latents, num_classes, device=device)
    accumulator.update(acts, labels)
    return accumulator.compute(weighted=weighted)


class ClassPurityAccumulator:
    """Streams class purity over batches; `compute()` equals one `class_purity` call
    over the concatenation of every batch seen (here or merged).

        acc = ClassPurityAccumulator(num_latents=M, num_classes=C)
        for acts, labels in loader:          # dense (B, M), TopK pairs, COO or CSR; labels (B,)
            acc.update(acts, labels)
        binary, weighted = acc.compute(), acc.compute(weighted=True)    # (M,) float32

    Memory: `counts` (C, M) int64 and `weights` (C, M) float64, O(M·C) whatever N is.

    Args:
        num_latents: M.
        num_classes: C; labels must lie in [0, C).
        device: where the sums live and batches must come from (default: CPU).
    """

    def __init__(self, num_latents: int, num_classes: int, *, device=None):
        for name, value in (("num_latents", num_latents), ("num_classes", num_classes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TypeError(f"{name} must be a non-negative int, got {value!r}")
        self.num_latents = num_latents
        self.num_classes = num_classes
        self.device = torch.empty(0, device="cpu" if device is None else device).device
        self.reset()

    def reset(self) -> None:
        """Forgets every batch seen."""
        self.num_rows = 0
        self.counts = torch.zeros(self.num_classes, self.num_latents, dtype=torch.int64, device=self.device)
        self.weights = torch.zeros(self.num_classes, self.num_latents, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, acts, labels: Tensor, *, num_latents: int | None = None) -> None:
        """Adds a batch: acts (B, M) in any form `class_purity` accepts (num_latents
        defaults to the accumulator's for a (values, indices) pair), labels (B,).
        Acts that require grad are read as constants (no graph through the sums)."""
        acts = canonical_acts(acts, self.num_latents if num_latents is None else num_latents)
        if isinstance(acts, CsrActs):
            num_rows, batch_latents, device = acts.num_rows, acts.num_latents, acts.values.device
        else:
            check_tensor("acts", acts)
            (num_rows, batch_latents), device = acts.shape, acts.device
        if batch_latents != self.num_latents:
            raise ValueError(f"acts has {batch_latents} latents but the accumulator was built for {self.num_latents}")
        if device != self.device:
            raise ValueError(f"acts is on {device} but the accumulator lives on {self.device}")
        _check_labels(labels, self.device, num_rows, self.num_classes)
        if isinstance(acts, CsrActs):
            self._add_sparse(acts, labels)
        else:
            self._add_dense(acts, labels)
        self.num_rows += num_rows

    def merge(self, other: "ClassPurityAccumulator") -> "ClassPurityAccumulator":
        """Adds everything `other` has seen (other is unchanged); returns self."""
        if not isinstance(other, ClassPurityAccumulator):
            raise TypeError(f"other must be a ClassPurityAccumulator, got {type(other).__name__}")
        if (other.num_latents, other.num_classes) != (self.num_latents, self.num_classes):
            raise ValueError(
                f"cannot merge an accumulator of (num_latents={other.num_latents}, num_classes={other.num_classes}) "
                f"into one of (num_latents={self.num_latents}, num_classes={self.num_classes})"
            )
        self.counts += other.counts.to(self.device)
        self.weights += other.weights.to(self.device)
        self.num_rows += other.num_rows
        return self

    def compute(self, weighted: bool = False) -> Tensor:
        """(M,) float32 binary (or weighted) purity; NaN for latents that never fired."""
        sums = self.weights if weighted else self.counts.double()
        total = sums.sum(0)
        purity = sums.amax(0) / total if self.num_classes else total
        return torch.where(total > 0, purity, float("nan")).float()

    def dominant_classes(self, weighted: bool = False) -> Tensor:
        """(M,) int64 class with the most firing samples (or activation mass); −1 for latents that never fired."""
        sums = self.weights if weighted else self.counts
        if self.num_classes == 0:
            return torch.full((self.num_latents,), -1, dtype=torch.int64, device=self.device)
        return torch.where(sums.sum(0) > 0, sums.argmax(0), -1)

    def state_dict(self) -> dict:
        """The running counts and weights, and sizes, for torch.save / checkpoints."""
        return {
            "version": STATE_VERSION, "num_latents": self.num_latents, "num_classes": self.num_classes,
            "num_rows": self.num_rows, "counts": self.counts.clone(), "weights": self.weights.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores `state_dict()` output (sizes must match this accumulator)."""
        missing = {"version", "num_latents", "num_classes", "num_rows", "counts", "weights"} - set(state)
        if missing:
            raise KeyError(f"state is missing {sorted(missing)}; pass the dict state_dict() returned")
        if state["version"] != STATE_VERSION:
            raise ValueError(f"state has version {state['version']}, this accumulator reads version {STATE_VERSION}")
        if (state["num_latents"], state["num_classes"]) != (self.num_latents, self.num_classes):
            raise ValueError(
                f"state is for (num_latents={state['num_latents']}, num_classes={state['num_classes']}), this "
                f"accumulator is for (num_latents={self.num_latents}, num_classes={self.num_classes})"
            )
        shape = (self.num_classes, self.num_latents)
        for name, dtype in (("counts", torch.int64), ("weights", torch.float64)):
            got = state[name]
            if not isinstance(got, Tensor) or got.dtype != dtype or tuple(got.shape) != shape:
                described = f"{got.dtype} {tuple(got.shape)}" if isinstance(got, Tensor) else type(got).__name__
                raise ValueError(f"state[{name!r}] is {described}, expected {dtype} {shape}")
        self.counts = state["counts"].to(self.device, copy=True)
        self.weights = state["weights"].to(self.device, copy=True)
        self.num_rows = int(state["num_rows"])

    def _add_dense(self, acts: Tensor, labels: Tensor) -> None:
        chunk_rows = max(1, DENSE_CHUNK_ELEMENTS // max(1, self.num_latents))
        starts = range(0, acts.shape[0], chunk_rows)
        # Checked before anything is added, so that a refused batch leaves the sums as they were.
        if not all(bool(torch.isfinite(acts[start:start + chunk_rows]).all()) for start in starts):
            raise ValueError("acts contains NaN or Inf values")
        labels = labels.long()
        for start in starts:
            chunk, chunk_labels = acts[start:start + chunk_rows], labels[start:start + chunk_rows]
            self.counts.index_add_(0, chunk_labels, (chunk > 0).long())
            # Not clamp_: for float64 acts .double() is the caller's tensor itself.
            self.weights.index_add_(0, chunk_labels, chunk.double().clamp(min=0))

    def _add_sparse(self, acts: CsrActs, labels: Tensor) -> None:
        values = acts.values
        if not bool(torch.isfinite(values).all()):
            raise ValueError("acts contains NaN or Inf values")
        rows = entry_rows(acts.crow_indices, acts.col_indices.shape[0])
        # A latent stored twice in one row would count that sample twice; monoscore refuses it too.
        entry_keys = rows * self.num_latents + acts.col_indices
        if entry_keys.numel() and torch.unique(entry_keys).numel() != entry_keys.numel():
            repeated = entry_keys.sort().values
            first = repeated[1:][repeated[1:] == repeated[:-1]][0]
            raise ValueError(
                f"acts stores latent {int(first % self.num_latents)} more than once in row "
                f"{int(first // self.num_latents)}; each latent may appear at most once per row"
            )
        # Index into the (C, M) sums viewed flat: class-major, as the dense path adds rows of class c.
        flat_index = labels.long()[rows] * self.num_latents + acts.col_indices
        self.counts.view(-1).index_add_(0, flat_index, (values > 0).long())
        self.weights.view(-1).index_add_(0, flat_index, values.double().clamp(min=0))


def _check_labels(labels, device, num_rows: int | None = None, num_classes: int | None = None) -> None:
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"labels must be an integer tensor (int64, int32, int16, int8 or uint8), got {labels.dtype}")
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {tuple(labels.shape)}")
    if num_rows is not None and labels.shape[0] != num_rows:
        raise ValueError(f"labels has {labels.shape[0]} entries but acts has {num_rows} rows")
    if labels.device != device:
        raise ValueError(f"labels must be on the device of acts ({device}), got {labels.device}")
    if labels.numel() == 0:
        return
    lo, hi = (int(x) for x in labels.aminmax())
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        expected = "be non-negative" if num_classes is None else f"lie in [0, num_classes={num_classes})"
        raise ValueError(f"labels must {expected}, got values from {lo} to {hi}")
