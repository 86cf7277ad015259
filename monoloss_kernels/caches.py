"""Activation caches on disk, scored in a streaming pass with bounded memory.

    from monoloss_kernels.caches import open_activations, score_activations

    result = score_activations("acts.npy", "emb.npy", batch_rows=4096)
    result.monoscore                     # (M,) float32, NaN where undefined

Each format has an opener that returns an `ActivationCache` (rows read on demand,
a chunk at a time; nothing is read at open but headers and shapes):

| opener | files | rows |
|---|---|---|
| `open_npy` | one dense (N, M) `.npy` (memory-mapped) | its rows |
| `open_topk` | TopK values + indices, two (N, k) files, or one `.safetensors` holding `values` and `indices` | their rows |
| `open_safetensors` | one dense 2-D tensor in a `.safetensors` file | its rows |
| `open_pt` | one dense (N, M) tensor saved by `torch.save` (memory-mapped) | its rows |
| `open_pt_parts` | sae-for-vlm's `{prefix}_part{i}.pt` files, each a dense (rows_i, M) tensor | the parts' rows in part order |
| `open_delphi` | delphi's `{start}_{end}.safetensors` latent-range files (COO) | the tokens: row = batch · seq_len + seq |

`open_activations(path)` picks the opener from the path: a directory of
`{start}_{end}.safetensors` (delphi) or of `*_part{i}.pt` (sae-for-vlm) files, a
glob pattern or list of such files, or a single `.npy` (with `indices=`: a TopK
pair), `.pt`/`.pth` or `.safetensors` file (one holding `locations` and
`activations` is delphi's layout). `score_activations` streams a cache and its
embeddings through `MonoScoreAccumulator` (and, with labels, class purity), then, as
`monoscore` does, recomputes the latents that one sample carries from a second pass
over their entries (`refine.py`), which the accumulator alone cannot.

Memory: one chunk of `batch_rows` rows of activations, embeddings and labels at a
time, plus the accumulator's O(d·M) float64 sums; the second pass, where there are
latents to refine, keeps their entries (20 bytes each) and reads the embedding rows
they touch (from the memory map of a `.npy` or `.pt` file, else a copy of the whole
embeddings). Files are memory-mapped (npy,
safetensors, `torch.load(mmap=True)`), so their pages are read on demand and stay
reclaimable page cache; chunked `.pt` files are mapped one part at a time.

A file that cannot be read as documented (truncated, wrong shape or dtype, a
header that does not match the data, a missing part, rows that do not line up
with the embeddings) raises `CacheFileError` (a `ValueError`) naming the file.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._progress import progress_bar
from ._validate import canonical_acts
from .accumulator import MonoScoreAccumulator
from .refine import csr_entries, dense_entries, ill_conditioned_latents
from .stats import CsrActs, MonoScoreStats

# Rows per chunk: a float32 chunk of M = 16384 latents is 256 MiB, and 4096 rows
# keep the statistics kernels at their full matrix-product speed.
DEFAULT_BATCH_ROWS = 4096

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32,
              torch.uint64)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}
_PART_NAME = re.compile(r"^(?P<prefix>.*)_part(?P<index>\d+)\.(?:pt|pth)$")
_DELPHI_NAME = re.compile(r"^(?P<start>\d+)_(?P<end>\d+)\.safetensors$")


class CacheFileError(ValueError):
    """A cache or embedding file that cannot be read as documented; the message names the file."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_dtype(path: str, what: str, dtype: torch.dtype, allowed: tuple) -> None:
    if dtype not in allowed:
        names = ", ".join(_dtype_name(t) for t in allowed)
        raise CacheFileError(f"{path}: {what} must be one of {names}; the file holds {_dtype_name(dtype)}")


# --------------------------------------------------------------------------- row arrays
class RowArray(ABC):
    """A 1-D or 2-D array read by row ranges: `read(start, stop)` returns rows
    [start, stop) as a CPU tensor (a copy or a view of a memory map; never written)."""

    path: str  # the file(s), for messages
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def num_rows(self) -> int:
        return self.shape[0]

    @abstractmethod
    def read(self, start: int, stop: int) -> Tensor: ...

    def read_all(self) -> Tensor:
        """Every row as one CPU tensor: a view of the memory map where the file allows
        (pages read when used, reclaimable), else a copy."""
        return self.read(0, self.num_rows)

    def _check(self, what: str, ndim: int, dtypes: tuple) -> RowArray:
        """Checks rank and dtype for the array's role (`what`); returns self."""
        if len(self.shape) != ndim:
            form = "(N,)" if ndim == 1 else "(N, columns)"
            raise CacheFileError(f"{self.path}: {what} must be {ndim}-D {form}, the file holds shape {self.shape}")
        _check_dtype(self.path, what, self.dtype, dtypes)
        return self


class NpyRows(RowArray):
    """A `.npy` file, memory-mapped (np.load(mmap_mode='r')); each read copies its rows."""

    def __init__(self, path):
        self.path = str(path)
        try:
            self._array = np.load(self.path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise
        except (ValueError, OSError, EOFError) as err:  # truncated data or header, not an .npy file
            raise CacheFileError(f"{self.path}: not a readable .npy file ({err})") from err
        if not isinstance(self._array, np.ndarray):
            raise CacheFileError(f"{self.path}: expected one array in .npy format, got {type(self._array).__name__}")
        native = self._array.dtype.newbyteorder("=")
        try:
            self.dtype = torch.from_numpy(np.empty(0, dtype=native)).dtype
        except TypeError as err:
            raise CacheFileError(f"{self.path}: numpy dtype {self._array.dtype} has no torch equivalent") from err
        self._native = native
        self.shape = tuple(self._array.shape)

    def read(self, start, stop):
        # A writable, native-order, C-contiguous copy of just these rows.
        return torch.from_numpy(self._array[start:stop].astype(self._native, order="C", copy=True))

    def read_all(self):
        if self._array.dtype != self._native:  # byte-swapped: converted, a copy
            return self.read(0, self.num_rows)
        # Copy-on-write, as load_embeddings maps: torch wants a writable array; nothing writes.
        return torch.from_numpy(np.load(self.path, mmap_mode="c", allow_pickle=False))


class SafetensorsRows(RowArray):
    """One tensor of a `.safetensors` file, read by row slices (memory-mapped)."""

    def __init__(self, path, key: str | None = None, *, handle=None, default_key: str | None = None,
                 key_hint: str = "pass key= (--key) to name the activations"):
        """key names the tensor; without it, the file's only tensor, else default_key if the
        file holds it (TopK's "values" and "indices"); key_hint says what to do otherwise."""
        self.path = str(path)
        self._handle = _open_safetensors(self.path) if handle is None else handle
        keys = list(self._handle.keys())
        if key is None:
            if len(keys) == 1:
                key = keys[0]
            elif default_key in keys:
                key = default_key
            else:
                raise CacheFileError(f"{self.path}: holds tensors {keys}; {key_hint}")
        elif key not in keys:
            raise CacheFileError(f"{self.path}: has no tensor {key!r}; it holds {keys}")
        self.key = key
        self._slice = self._handle.get_slice(key)
        self.shape = tuple(self._slice.get_shape())
        self.dtype = _SAFETENSORS_DTYPES.get(self._slice.get_dtype())
        if self.dtype is None:
            raise CacheFileError(f"{self.path}: tensor {key!r} has unsupported dtype {self._slice.get_dtype()}")

    def read(self, start, stop):
        return self._slice[start:stop]


class TorchRows(RowArray):
    """One tensor saved with `torch.save`, loaded with torch.load(mmap=True, weights_only=True):
    reads are views of the memory map."""

    def __init__(self, path):
        self.path = str(path)
        self._tensor = _load_pt(self.path)
        self.shape = tuple(self._tensor.shape)
        self.dtype = self._tensor.dtype

    def read(self, start, stop):
        return self._tensor[start:stop]

    def read_all(self):
        return self._tensor


class TorchPartsRows(RowArray):
    """Row-wise concatenation of 2-D tensors saved in several `.pt` files (sae-for-vlm's
    `*_part{i}.pt`); one part is memory-mapped at a time."""

    def __init__(self, paths: Sequence[str]):
        if not paths:
            raise CacheFileError("no part files given")
        self.paths = [str(p) for p in paths]
        self.path = self.paths[0]
        if len(self.paths) > 1:
            self.path = f"{self.paths[0]} .. {Path(self.paths[-1]).name} ({len(self.paths)} parts)"
        self._offsets = [0]  # first row of each part, then the total
        first = None  # (shape, dtype) of the first part; its tensor is not kept, so one part is mapped at a time
        for part_path in self.paths:
            part = _load_pt(part_path)  # only mapped: reads the header, not the data
            shape, dtype = tuple(part.shape), part.dtype
            del part
            if len(shape) != 2:
                raise CacheFileError(f"{part_path}: a part must be 2-D (rows, M), the file holds shape {shape}")
            if first is None:
                first = shape, dtype
            elif shape[1] != first[0][1] or dtype != first[1]:
                raise CacheFileError(
                    f"{part_path}: holds {_dtype_name(dtype)} {shape}, but {self.paths[0]} holds "
                    f"{_dtype_name(first[1])} {first[0]}; every part needs the same columns and dtype"
                )
            self._offsets.append(self._offsets[-1] + shape[0])
        self.shape = (self._offsets[-1], first[0][1])
        self.dtype = first[1]
        self._current = (-1, None)  # (part index, mapped tensor)

    def _part(self, index: int) -> Tensor:
        if self._current[0] != index:
            self._current = (-1, None)  # drop the previous map before mapping the next part
            self._current = (index, _load_pt(self.paths[index]))
        return self._current[1]

    def read(self, start, stop):
        pieces = []
        index = max(0, np.searchsorted(self._offsets, start, side="right") - 1)
        while start < stop and index < len(self.paths):
            lo, hi = self._offsets[index], self._offsets[index + 1]
            if start < hi:
                # A copy, so that no chunk keeps a part's map alive once the next part is mapped.
                pieces.append(self._part(index)[start - lo:min(stop, hi) - lo].clone())
                start = min(stop, hi)
            index += 1
        if not pieces:
            return torch.empty((0, self.shape[1]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class TensorRows(RowArray):
    """An array already in memory (a tensor or numpy array), read by row slices."""

    def __init__(self, data, name: str = "tensor"):
        tensor = torch.as_tensor(data) if not isinstance(data, Tensor) else data
        self._tensor = tensor.detach().cpu()
        self.path = f"<{name} in memory>"
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    def read(self, start, stop):
        return self._tensor[start:stop]


def _open_safetensors(path: str):
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from err
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return safe_open(path, framework="pt")
    except Exception as err:  # SafetensorError: truncated file, a header that does not match the data
        raise CacheFileError(f"{path}: not a readable safetensors file ({err})") from err


def _load_pt(path: str) -> Tensor:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        obj = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except Exception as err:  # truncated zip, a pickle of something other than tensors, legacy format
        raise CacheFileError(
            f"{path}: not a readable torch.save file of one tensor ({str(err).splitlines()[0]})"
        ) from err
    if not isinstance(obj, Tensor):
        raise CacheFileError(f"{path}: expected one tensor saved with torch.save, got {type(obj).__name__}")
    if obj.layout != torch.strided:
        raise CacheFileError(f"{path}: expected a dense tensor, got layout {obj.layout}")
    # A tensor saved outside no_grad (torch.save(sae.encode(x), ...)) loads with
    # requires_grad=True; cached values are data, and detach keeps the memory map.
    return obj.detach()


def open_rows(source, *, key: str | None = None, default_key: str | None = None,
              key_hint: str = "pass key= (--key) to name the activations") -> RowArray:
    """A `RowArray` over `source`: a `.npy`, `.pt`/`.pth` or `.safetensors` file
    (`key` names the tensor when the file holds several; see `SafetensorsRows` for
    default_key and key_hint), or a tensor / numpy array in memory."""
    if isinstance(source, RowArray):
        return source
    if isinstance(source, (Tensor, np.ndarray)):
        return TensorRows(source)
    path = str(source)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return NpyRows(path)
    if suffix in (".pt", ".pth"):
        return TorchRows(path)
    if suffix == ".safetensors":
        return SafetensorsRows(path, key, default_key=default_key, key_hint=key_hint)
    raise CacheFileError(f"{path}: unknown file type {suffix!r}; expected .npy, .pt/.pth or .safetensors")


def open_embeddings(source, *, key: str | None = None) -> RowArray:
    """Embeddings (N, d), floating point: a `.npy` (memory-mapped), `.pt` or
    `.safetensors` file, or a tensor / array in memory."""
    rows = open_rows(source, key=key, key_hint="pass emb_key= (--emb-key) to name the embeddings")
    return rows._check("embeddings", 2, FLOAT_DTYPES)


def open_labels(source) -> RowArray:
    """Class labels (N,), integers in [0, num_classes): a `.npy` or `.pt` file, or a
    tensor / array in memory."""
    return open_rows(source, key_hint="save the labels alone in a file")._check("labels", 1, INT_DTYPES)


# --------------------------------------------------------------------------- activation caches
class ActivationCache(ABC):
    """Activations of `num_rows` samples over `num_latents` latents, read by row
    ranges. `read_rows(start, stop)` returns rows [start, stop) on the CPU in a form
    `monoscore` and `MonoScoreAccumulator.update` accept (a dense tensor, a
    (values, int64 indices) pair, or `CsrActs`)."""

    path: str  # the file(s), for messages
    num_rows: int
    num_latents: int

    @abstractmethod
    def read_rows(self, start: int, stop: int): ...

    def chunks(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[int, int, object]]:
        """(start, stop, acts) for consecutive chunks of at most batch_rows rows, covering every row once."""
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
            raise TypeError(f"batch_rows must be a positive int, got {batch_rows!r}")
        for start in range(0, self.num_rows, batch_rows):
            stop = min(start + batch_rows, self.num_rows)
            yield start, stop, self.read_rows(start, stop)

    def __repr__(self):
        return f"{type(self).__name__}({self.path}, num_rows={self.num_rows}, num_latents={self.num_latents})"


class DenseCache(ActivationCache):
    """Dense (N, M) activations in one `RowArray`."""

    def __init__(self, rows: RowArray, num_latents: int | None = None):
        self.rows = rows._check("activations", 2, FLOAT_DTYPES)
        self.path = rows.path
        self.num_rows, self.num_latents = rows.shape
        _check_width(self.path, self.num_latents, num_latents)

    def read_rows(self, start, stop):
        return self.rows.read(start, stop)


class TopKCache(ActivationCache):
    """TopK activations: values and indices, two (N, k) `RowArray`s; indices of any
    integer dtype (uint16 ... int64) are read as int64."""

    def __init__(self, values: RowArray, indices: RowArray, num_latents: int):
        self.values = values._check("TopK values", 2, FLOAT_DTYPES)
        self.indices = indices._check("TopK indices", 2, INT_DTYPES)
        self.path = f"{values.path} + {indices.path}"
        if values.shape != indices.shape:
            raise CacheFileError(
                f"TopK values {values.path} hold shape {values.shape} but indices {indices.path} hold "
                f"{indices.shape}; both must be (N, k)"
            )
        if isinstance(num_latents, bool) or not isinstance(num_latents, int) or num_latents < 1:
            raise TypeError(f"num_latents must be a positive int (the SAE width M) for TopK files, got {num_latents!r}")
        self.num_rows = values.shape[0]
        self.num_latents = num_latents

    def read_rows(self, start, stop):
        return self.values.read(start, stop), self.indices.read(start, stop).long()


class _DelphiRange:
    """One `{start}_{end}.safetensors` file of a delphi cache: COO entries of latents
    start..end (inclusive), `locations` (nnz, 3) = [batch, seq, latent - start],
    `activations` (nnz,), in token order as delphi writes them."""

    def __init__(self, path: str, first_latent: int, width: int):
        self.path = path
        self.first_latent = first_latent
        self.width = width
        handle = _open_safetensors(path)
        keys = set(handle.keys())
        if not {"locations", "activations"} <= keys:
            raise CacheFileError(f"{path}: a delphi cache file needs 'locations' and 'activations', it holds {sorted(keys)}")
        self.locations = SafetensorsRows(path, "locations", handle=handle)._check("locations", 2, INT_DTYPES)
        self.activations = SafetensorsRows(path, "activations", handle=handle)._check("activations", 1, FLOAT_DTYPES)
        if self.locations.shape[1] != 3:
            raise CacheFileError(f"{path}: locations must be (nnz, 3) = [batch, seq, latent], got {self.locations.shape}")
        if self.locations.shape[0] != self.activations.shape[0]:
            raise CacheFileError(
                f"{path}: locations has {self.locations.shape[0]} entries but activations has {self.activations.shape[0]}"
            )
        self.nnz = self.locations.shape[0]
        self.tokens_shape = tuple(handle.get_slice("tokens").get_shape()) if "tokens" in keys else None
        self._last_search = (0, 0)  # (row, first entry at or after it): the next chunk starts where this one stopped

    def token(self, entry: int, seq_len: int) -> int:
        batch, seq, _ = self.locations.read(entry, entry + 1)[0].tolist()
        return batch * seq_len + seq

    def first_entry_at(self, row: int, seq_len: int) -> int:
        """The first entry whose token is >= row (binary search: entries are in token order)."""
        last_row, last_entry = self._last_search
        if row == last_row:
            return last_entry
        lo, hi = (last_entry, self.nnz) if row > last_row else (0, last_entry)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.token(mid, seq_len) < row:
                lo = mid + 1
            else:
                hi = mid
        self._last_search = (row, lo)
        return lo


class DelphiCache(ActivationCache):
    """delphi's latent cache: `{start}_{end}.safetensors` files, one per latent range,
    each with COO `locations` (nnz, 3) = [batch, seq, latent − start] (any integer
    dtype) and `activations` (nnz,) (fp16 as delphi writes them).

    Rows are tokens: the token at (batch, seq) is row batch · seq_len + seq, i.e.
    the order of `tokens.reshape(-1)`, and the embeddings must be in that order.
    Entries not stored are activations of 0. The ranges must cover latents
    0 .. M−1 without gaps or overlaps.
    """

    def __init__(self, files: Sequence[tuple[str, int, int]], *, seq_len: int | None = None,
                 num_rows: int | None = None, num_latents: int | None = None):
        ranges = sorted(files, key=lambda f: f[1])
        expected_start = 0
        for path, start, end in ranges:
            if end < start:
                raise CacheFileError(f"{path}: latent range {start}_{end} ends before it starts")
            if start != expected_start:
                if start > expected_start:
                    raise CacheFileError(
                        f"{path}: delphi cache is missing latents {expected_start}..{start - 1} (no file "
                        f"{expected_start}_{start - 1}.safetensors before it)"
                    )
                raise CacheFileError(f"{path}: latent range {start}_{end} overlaps the previous file's")
            expected_start = end + 1
        self.files = [_DelphiRange(path, start, end - start + 1) for path, start, end in ranges]
        self.path = str(Path(ranges[0][0]).parent) if len(ranges) > 1 else ranges[0][0]
        self.num_latents = expected_start
        if num_latents is not None and num_latents != self.num_latents:
            if num_latents > self.num_latents:
                raise CacheFileError(
                    f"{self.path}: the files cover latents 0..{self.num_latents - 1} but num_latents={num_latents}: "
                    f"missing {self.num_latents}_{num_latents - 1}.safetensors"
                )
            raise CacheFileError(f"{self.path}: the files cover {self.num_latents} latents but num_latents={num_latents}")

        tokens_shape = next((f.tokens_shape for f in self.files if f.tokens_shape is not None), None)
        if tokens_shape is not None and len(tokens_shape) != 2:
            raise CacheFileError(f"{self.files[0].path}: tokens must be (batches, seq_len), got shape {tokens_shape}")
        if seq_len is None:
            seq_len = tokens_shape[1] if tokens_shape is not None else _delphi_config_ctx_len(self.files[0].path)
        if seq_len is None:
            raise CacheFileError(
                f"{self.path}: cannot tell the sequence length (no 'tokens' in the files, no config.json with "
                f"cache_ctx_len or ctx_len next to them); pass seq_len= (--seq-len)"
            )
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise TypeError(f"seq_len must be a positive int, got {seq_len!r}")
        if tokens_shape is not None and tokens_shape[1] != seq_len:
            raise CacheFileError(f"{self.files[0].path}: tokens are {tokens_shape} but seq_len={seq_len}")
        self.seq_len = seq_len
        if tokens_shape is not None:  # the tokens tell; num_rows is only the fallback
            num_rows = tokens_shape[0] * seq_len
        if num_rows is None:
            raise CacheFileError(
                f"{self.path}: cannot tell the number of tokens (no 'tokens' in the files); pass num_rows= "
                f"(score_activations takes it from the embeddings)"
            )
        self.num_rows = num_rows
        for f in self.files:  # entries are in token order, so the last one holds the largest token
            if f.nnz and f.token(f.nnz - 1, seq_len) >= num_rows:
                raise CacheFileError(
                    f"{f.path}: its last entry is token {f.token(f.nnz - 1, seq_len)}, beyond the "
                    f"{num_rows} rows (batches × seq_len) of the cache"
                )

    def read_rows(self, start, stop):
        rows, cols, values = [], [], []
        for f in self.files:
            lo, hi = f.first_entry_at(start, self.seq_len), f.first_entry_at(stop, self.seq_len)
            loc = f.locations.read(lo, hi).long()  # (n, 3)
            if loc.numel() and int(loc.min()) < 0:
                raise CacheFileError(f"{f.path}: negative locations in entries {lo}..{hi - 1}")
            if loc.numel() and int(loc[:, 1].max()) >= self.seq_len:
                raise CacheFileError(f"{f.path}: a seq position >= seq_len={self.seq_len} in entries {lo}..{hi - 1}")
            if loc.numel() and int(loc[:, 2].max()) >= f.width:
                raise CacheFileError(
                    f"{f.path}: a latent offset >= {f.width} (the width of range {f.first_latent}_"
                    f"{f.first_latent + f.width - 1}) in entries {lo}..{hi - 1}"
                )
            token = loc[:, 0] * self.seq_len + loc[:, 1]
            # The search assumed token order; these entries prove it (every entry is
            # checked once over a full pass, and the chunks are consecutive).
            if token.numel() and (int(token[0]) < start or int(token[-1]) >= stop or bool((token.diff() < 0).any())):
                raise CacheFileError(
                    f"{f.path}: entries are not in token order (batch, seq) as delphi writes them; "
                    f"sort them by batch · seq_len + seq"
                )
            if stop == self.num_rows and hi != f.nnz:
                raise CacheFileError(f"{f.path}: entries {hi}..{f.nnz - 1} lie outside tokens 0..{self.num_rows - 1}")
            rows.append(token - start)
            cols.append(loc[:, 2] + f.first_latent)
            values.append(f.activations.read(lo, hi))
        rows, cols, values = torch.cat(rows), torch.cat(cols), torch.cat(values)
        order = torch.argsort(rows, stable=True)  # each file is in row order; merge them
        crow = torch.zeros(stop - start + 1, dtype=torch.int64)
        crow[1:] = torch.bincount(rows, minlength=stop - start).cumsum(0)
        return CsrActs(crow, cols[order], values[order], self.num_latents)


def _delphi_config_ctx_len(file_path: str) -> int | None:
    """The sequence length in the config.json delphi saves next to a hookpoint's files:
    `cache_ctx_len` (CacheConfig's field in current delphi), else `ctx_len` (older delphi)."""
    config = Path(file_path).parent / "config.json"
    if not config.is_file():
        return None
    try:
        fields = json.loads(config.read_text())
        value = fields.get("cache_ctx_len", fields.get("ctx_len"))
    except (json.JSONDecodeError, OSError, AttributeError) as err:
        raise CacheFileError(f"{config}: not a readable JSON config ({err})") from err
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _check_width(path: str, width: int, num_latents: int | None) -> None:
    if num_latents is not None and num_latents != width:
        raise CacheFileError(
            f"{path}: holds {width} columns but num_latents={num_latents}; a cache of the SAE's input "
            f"(d_in) instead of its latents has the model's width"
        )


# --------------------------------------------------------------------------- openers
def open_npy(path, *, num_latents: int | None = None) -> DenseCache:
    """Dense (N, M) activations in a `.npy` file, memory-mapped."""
    return DenseCache(NpyRows(_existing(path)), num_latents)


def open_topk(values, indices, *, num_latents: int) -> TopKCache:
    """TopK activations: `values` and `indices` files (each (N, k); `.npy`, `.pt` or
    `.safetensors`), indices of any integer dtype; num_latents = M is required. A
    `.safetensors` file holding several tensors gives its "values" or "indices" one, so
    a pair saved as {"values": ..., "indices": ...} in one file is passed as both."""
    hint = "a .safetensors file with several tensors must name them 'values' and 'indices'"
    return TopKCache(open_rows(_existing(values), default_key="values", key_hint=hint),
                     open_rows(_existing(indices), default_key="indices", key_hint=hint), num_latents)


def open_safetensors(path, *, key: str | None = None, num_latents: int | None = None) -> DenseCache:
    """Dense (N, M) activations: tensor `key` of a `.safetensors` file (or its only tensor)."""
    return DenseCache(SafetensorsRows(_existing(path), key), num_latents)


def open_pt(path, *, num_latents: int | None = None) -> DenseCache:
    """Dense (N, M) activations: one tensor saved with `torch.save`, memory-mapped."""
    return DenseCache(TorchRows(_existing(path)), num_latents)


def open_pt_parts(source, *, num_latents: int | None = None) -> DenseCache:
    """sae-for-vlm's chunked activations: `{prefix}_part{i}.pt` (or `.pth`) files, each a
    dense (rows_i, M) tensor, concatenated in part order (i = 1, 2, ... or 0, 1, ...;
    a missing part is an error). `source`: a directory holding one such prefix, a
    glob pattern, or a list of files."""
    paths = _expand(source)
    groups: dict[str, list[tuple[int, str]]] = {}
    for p in paths:
        match = _PART_NAME.match(Path(p).name)
        if match is None:
            raise CacheFileError(f"{p}: not a part file; expected a name like <prefix>_part<i>.pt")
        groups.setdefault(str(Path(p).parent / match["prefix"]), []).append((int(match["index"]), p))
    if not groups:
        raise CacheFileError(f"{source}: no <prefix>_part<i>.pt files")
    if len(groups) > 1:
        raise CacheFileError(
            f"{source}: holds parts of several caches ({', '.join(sorted(Path(g).name for g in groups))}); "
            f"pass one of them as a glob, e.g. {sorted(groups)[0]}_part*.pt"
        )
    (prefix, parts), = groups.items()
    parts.sort()
    suffix = Path(parts[0][1]).suffix
    first = parts[0][0]
    if first > 1:
        raise CacheFileError(f"{prefix}_part{first - 1}{suffix}: missing (the parts start at part{first})")
    for (index, _), (next_index, _) in zip(parts, parts[1:]):
        if next_index == index:
            raise CacheFileError(f"{prefix}_part{index}: two files for the same part")
        if next_index != index + 1:
            raise CacheFileError(f"{prefix}_part{index + 1}{suffix}: missing (between part{index} and part{next_index})")
    return DenseCache(TorchPartsRows([p for _, p in parts]), num_latents)


def open_delphi(source, *, seq_len: int | None = None, num_rows: int | None = None,
                num_latents: int | None = None) -> DelphiCache:
    """delphi's latent cache (see `DelphiCache`): a hookpoint directory of
    `{start}_{end}.safetensors` files, a glob or list of them, or one file holding
    `locations` and `activations` (named `{start}_{end}` with start 0, or with the
    full latent index in `locations` and num_latents given). seq_len defaults to the
    `tokens` tensor's width, else config.json's cache_ctx_len (or ctx_len); num_rows to the tokens
    (batches × seq_len), else it must be given."""
    paths = _expand(source, pattern="*.safetensors")
    files = []
    for p in paths:
        match = _DELPHI_NAME.match(Path(p).name)
        if match is not None:
            files.append((p, int(match["start"]), int(match["end"])))
        elif len(paths) == 1:  # delphi's unsplit save: full latent indices
            if num_latents is None:
                raise CacheFileError(f"{p}: not named <start>_<end>.safetensors; pass num_latents= (--num-latents)")
            files.append((p, 0, num_latents - 1))
        else:
            raise CacheFileError(f"{p}: not a delphi latent-range file; expected <start>_<end>.safetensors")
    if not files:
        raise CacheFileError(f"{source}: no <start>_<end>.safetensors files")
    if len(files) == 1 and files[0][1] != 0:
        path, start, end = files[0]
        raise CacheFileError(
            f"{path}: holds latents {start}..{end}, one range of a split cache; pass its directory to score every latent"
        )
    return DelphiCache(files, seq_len=seq_len, num_rows=num_rows, num_latents=num_latents)


def _existing(path) -> str:
    path = str(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    return path


def _expand(source, pattern: str = "*") -> list[str]:
    """A directory's files matching pattern, a glob's matches, or a list of files."""
    if isinstance(source, (list, tuple)):
        paths = [_existing(p) for p in source]
    else:
        source = str(source)
        if os.path.isdir(source):
            paths = sorted(p for p in glob.glob(os.path.join(glob.escape(source), pattern)) if os.path.isfile(p))
        elif glob.has_magic(source):
            paths = sorted(glob.glob(source))
            if not paths:
                raise FileNotFoundError(f"no files match {source}")
        else:
            paths = [_existing(source)]
    return paths


def open_activations(source, *, indices=None, num_latents: int | None = None, key: str | None = None,
                     seq_len: int | None = None, num_rows: int | None = None) -> ActivationCache:
    """Opens an activation cache, detecting its format from `source`:

    - a directory: delphi's `{start}_{end}.safetensors` files, or sae-for-vlm's
      `{prefix}_part{i}.pt` files (`open_delphi`, `open_pt_parts`);
    - a glob pattern or a list of paths: the same, from the matching files' names;
    - `.npy`: dense (N, M) (`open_npy`), or with `indices=` the TopK values whose
      indices file that is (`open_topk`; num_latents required);
    - `.pt`/`.pth`: one dense tensor (`open_pt`);
    - `.safetensors`: delphi's layout when it holds `locations` and `activations`,
      else one dense 2-D tensor (`key`, or the only one; `open_safetensors`).

    num_latents, when given, is checked against the files; seq_len and num_rows
    only concern delphi caches (see `open_delphi`). Nothing but headers is read.
    """
    if isinstance(source, ActivationCache):
        return source
    if isinstance(source, (Tensor, np.ndarray)):  # its str() holds '[', and would be taken for a glob
        raise TypeError(
            f"acts_source must be a path, a glob, a list of files or an ActivationCache, got a "
            f"{type(source).__name__} in memory; wrap it as DenseCache(TensorRows(acts)), or call monoscore"
        )
    if indices is not None:
        return open_topk(source, indices, num_latents=num_latents)
    if isinstance(source, (list, tuple)) or os.path.isdir(str(source)) or glob.has_magic(str(source)):
        paths = _expand(source)
        names = [Path(p).name for p in paths]
        if any(_DELPHI_NAME.match(n) for n in names):
            delphi = [p for p in paths if _DELPHI_NAME.match(Path(p).name)]
            return open_delphi(delphi, seq_len=seq_len, num_rows=num_rows, num_latents=num_latents)
        if any(_PART_NAME.match(n) for n in names):
            parts = [p for p in paths if _PART_NAME.match(Path(p).name)]
            return open_pt_parts(parts, num_latents=num_latents)
        subdirs = os.path.isdir(str(source)) and any(entry.is_dir() for entry in os.scandir(str(source)))
        raise CacheFileError(
            f"{source}: no activation cache found; expected delphi's <start>_<end>.safetensors or "
            f"sae-for-vlm's <prefix>_part<i>.pt files"
            + (" (for a delphi cache, pass one hookpoint's directory)" if subdirs else "")
        )
    path = _existing(source)
    suffix = Path(path).suffix.lower()
    if suffix == ".npy":
        return open_npy(path, num_latents=num_latents)
    if suffix in (".pt", ".pth"):
        return open_pt(path, num_latents=num_latents)
    if suffix == ".safetensors":
        keys = set(_open_safetensors(path).keys())
        if {"locations", "activations"} <= keys and key is None:
            return open_delphi(path, seq_len=seq_len, num_rows=num_rows, num_latents=num_latents)
        return open_safetensors(path, key=key, num_latents=num_latents)
    raise CacheFileError(f"{path}: unknown activation file type {suffix!r}; expected .npy, .pt/.pth or .safetensors")


# --------------------------------------------------------------------------- scoring
class CacheScores(NamedTuple):
    """What `score_activations` computed, on the CPU."""

    monoscore: Tensor  # (M,) float32, NaN where undefined
    purity: Tensor | None  # (M,) class purity (with labels), as ClassPurityAccumulator.compute()
    weighted_purity: Tensor | None  # (M,) weighted class purity (with labels)
    num_rows: int
    num_classes: int | None


def _to_device(acts, device: torch.device):
    if isinstance(acts, CsrActs):
        return CsrActs(*(t.to(device) for t in acts[:3]), acts.num_latents)
    if isinstance(acts, tuple):
        return tuple(t.to(device) for t in acts)
    return acts.to(device)


def _num_classes(labels: RowArray, batch_rows: int, num_latents: int) -> int:
    """1 + the largest label, read a chunk at a time; negative labels, and IDs in place of
    class indices (`purity.check_class_indices`), are refused."""
    from .purity import check_class_indices

    largest = -1
    for start in range(0, labels.num_rows, batch_rows):
        chunk = labels.read(start, min(start + batch_rows, labels.num_rows))
        if chunk.numel():
            lo, hi = (int(x) for x in chunk.long().aminmax())  # torch has no min/max for uint16/32/64
            if lo < 0:
                raise CacheFileError(f"{labels.path}: labels must be >= 0, found {lo}")
            largest = max(largest, hi)

    def count_distinct(limit: int) -> int:  # a second pass, only for labels that would need huge sums
        distinct = torch.empty(0, dtype=torch.int64)
        for start in range(0, labels.num_rows, batch_rows):
            chunk = labels.read(start, min(start + batch_rows, labels.num_rows)).long()
            distinct = torch.unique(torch.cat([distinct, chunk]))
            if distinct.numel() >= limit:
                break
        return distinct.numel()

    try:
        check_class_indices(largest + 1, num_latents, count_distinct, labels.path)
    except ValueError as err:
        raise CacheFileError(str(err)) from err
    return largest + 1


def score_activations(acts_source, emb_source, *, num_latents: int | None = None,
                      batch_rows: int = DEFAULT_BATCH_ROWS, device=None, backend: str = "auto",
                      progress: bool | None = None, labels=None, num_classes: int | None = None,
                      key: str | None = None, emb_key: str | None = None,
                      seq_len: int | None = None) -> CacheScores:
    """MonoScore (and class purity with `labels`) of a cache on disk, streamed in chunks:
    one pass for the statistics, and a second over the entries of the latents that one
    sample carries (`refine.ill_conditioned_latents` of the whole cache's statistics),
    recomputed exactly in float64 as `monoscore` recomputes them.

    Args:
        acts_source: an `ActivationCache`, or anything `open_activations` opens
            (a path, a glob, a list of files, a directory).
        emb_source: (N, d) embeddings of the same rows, in the same order: a `.npy`
            (memory-mapped), `.pt` or `.safetensors` file, or a tensor in memory.
        num_latents: M; required for TopK caches, otherwise checked against the files.
        batch_rows: rows per chunk; memory is about batch_rows · (M + d) values of the
            files' dtypes (less for sparse caches) plus the accumulator's d·M float64 sums,
            and in the second pass the refined latents' entries (20 bytes each) and the
            embedding rows they touch (memory-mapped for `.npy`/`.pt`, else all of them).
        device: where the statistics are computed (default CPU); chunks are moved there.
        backend: as in `monoscore`.
        progress: progress bars on stderr, one per pass (None: when stderr is a terminal;
            needs tqdm).
        labels: (N,) integer class labels (file or tensor) for class purity
            (`monoloss_kernels.purity.ClassPurityAccumulator`), computed in the same pass.
        num_classes: the number of classes (default: 1 + the largest label). Labels must be
            class indices 0..C-1: by default, labels that leave most of 0..C-1 unused while
            the (C, M) purity sums would exceed 1 GiB (sample or class IDs) are refused with
            `CacheFileError`; map them to 0..C-1 first.
        key, emb_key: the tensor to read from a `.safetensors` file holding several.
        seq_len: delphi caches only (see `open_delphi`).

    Returns:
        `CacheScores(monoscore, purity, weighted_purity, num_rows, num_classes)`, on the CPU;
        monoscore equals `monoscore` over the whole cache in memory (to float32 rounding:
        the one-pass scores come from float64 running sums of chunk statistics, the
        refined ones from the same float64 recomputation).

    Raises:
        FileNotFoundError for a missing file; `CacheFileError` (a ValueError) naming the
        file for unreadable or inconsistent files (rows of acts, emb and labels differ,
        wrong widths or dtypes, NaN/Inf values, out-of-range indices).
    """
    if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or batch_rows < 1:
        raise TypeError(f"batch_rows must be a positive int, got {batch_rows!r}")
    emb = open_embeddings(emb_source, key=emb_key)
    acts = open_activations(acts_source, num_latents=num_latents, key=key, seq_len=seq_len,
                            num_rows=emb.num_rows)
    if num_latents is not None and acts.num_latents != num_latents:
        _check_width(acts.path, acts.num_latents, num_latents)
    if acts.num_rows != emb.num_rows:
        raise CacheFileError(
            f"activations {acts.path} have {acts.num_rows} rows but embeddings {emb.path} have {emb.num_rows}; "
            f"row n of both must be the same sample"
        )
    purity_acc = label_rows = None
    if labels is not None:
        label_rows = open_labels(labels)
        if label_rows.num_rows != acts.num_rows:
            raise CacheFileError(
                f"labels {label_rows.path} have {label_rows.num_rows} rows but activations {acts.path} have "
                f"{acts.num_rows}"
            )
        if num_classes is None:
            num_classes = _num_classes(label_rows, max(batch_rows, 1 << 16), acts.num_latents)
    acc = MonoScoreAccumulator(acts.num_latents, emb.shape[1], device=device, backend=backend)
    if label_rows is not None:
        from .purity import ClassPurityAccumulator

        purity_acc = ClassPurityAccumulator(acts.num_latents, num_classes, device=acc.device)
    num_chunks = math.ceil(acts.num_rows / batch_rows)
    for start, stop, chunk in progress_bar(acts.chunks(batch_rows), desc="MonoScore", enabled=progress,
                                           total=num_chunks, unit="chunk"):
        chunk = _to_device(chunk, acc.device)
        try:
            acc.update(chunk, emb.read(start, stop).to(acc.device))
            if purity_acc is not None:
                purity_acc.update(chunk, label_rows.read(start, stop).long().to(acc.device))
        except (ValueError, TypeError) as err:
            with_labels = f" and labels {label_rows.path}" if label_rows is not None else ""
            raise CacheFileError(
                f"activations {acts.path} with embeddings {emb.path}{with_labels}, rows {start}..{stop - 1}: {err}"
            ) from err
    scores = acc.compute().cpu()
    if acc.num_rows >= 2:
        scores = _refine_ill_conditioned(scores, acts, emb, acc._sums, batch_rows, progress)
    purity = weighted = None
    if purity_acc is not None:
        purity = purity_acc.compute(weighted=False).cpu()
        weighted = purity_acc.compute(weighted=True).cpu()
    return CacheScores(scores, purity, weighted, acts.num_rows, num_classes)


def _refine_ill_conditioned(scores: Tensor, acts: ActivationCache, emb: RowArray, stats: MonoScoreStats,
                            batch_rows: int, progress: bool | None) -> Tensor:
    """`scores` with the latents that one sample carries (`refine.ill_conditioned_latents`
    of the dataset's statistics) replaced by their exact float64 scores, as `monoscore`
    replaces them: a second pass over the chunks gathers those latents' entries (global
    row, index into the latents, value), then one `deflated_scores` over all of them with
    the dataset's min and max. On the CPU, whatever device the statistics used."""
    latents = ill_conditioned_latents(stats).cpu()
    if latents.numel() == 0:
        return scores
    parts = []
    num_chunks = math.ceil(acts.num_rows / batch_rows)
    for start, _, chunk in progress_bar(acts.chunks(batch_rows), desc="MonoScore refinement", enabled=progress,
                                        total=num_chunks, unit="chunk"):
        chunk = canonical_acts(chunk, acts.num_latents)
        rows, local, values = csr_entries(chunk, latents) if isinstance(chunk, CsrActs) else \
            dense_entries(chunk, latents)
        parts.append((rows + start, local, values.float()))  # float32, as the statistics kernels read them
    rows, local, values = (torch.cat(p) for p in zip(*parts))
    exact = torch.ops.monoloss_kernels.deflated_scores(rows, local, values, stats.act_range.cpu()[:, latents],
                                                       emb.read_all())
    return scores.index_copy(0, latents, exact.to(scores.dtype))
