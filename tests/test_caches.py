"""Activation caches on disk (monoloss_kernels.caches): every format, written here from
random data, scores as `monoscore` does on the same data in memory, a chunk at a time;
bad and truncated files are refused with an error naming the file."""

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import monoloss_kernels as mk
from monoloss_kernels import caches
from monoloss_kernels.caches import CacheFileError
from monoloss_kernels.purity import class_purity

from .helpers import make_acts, make_emb, make_topk

safetensors_numpy = pytest.importorskip("safetensors.numpy")  # pinned in requirements.txt

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

# N = 1031 is prime, so no batch_rows below divides it. Odd M, d.
N, M, D, K = 1031, 37, 19, 5
BATCH_ROWS = [97, 1031, 4096]
# Chunked statistics (float64 running sums of float32 chunk statistics) against one
# `monoscore` call on the same values: both are float32-accurate estimates of the same
# scores, so test_monoscore's float32 bound holds for their difference too.
TOL = 2e-5
# Weighted purity: float64 sums added in a different order.
PURITY_TOL = 1e-6
PART_PREFIX = "imagenet_train_activations_clip_-1_post_mlp_residual"  # as sae-for-vlm names them


# --------------------------------------------------------------------------- data and writers
def make_data(seed: int):
    """(N, M) float32 activations (ReLU and offset-1000 latents, dead, constant and
    single-firing ones) and (N, D) embeddings with zero and duplicated rows."""
    gen = torch.Generator().manual_seed(seed)
    acts = make_acts("mixed_offset", N, M, gen)
    acts[:, :4] = make_acts("dead_constant", N, 4, gen)
    acts[:, 4:7] = make_acts("negative", N, 3, gen)
    return acts.float(), make_emb("zero_dup", N, D, gen).float()


def write_dense(directory: Path, fmt: str, acts: torch.Tensor):
    """Writes acts in `fmt`; returns what open_activations / score_activations take, and the key."""
    if fmt == "npy":
        np.save(directory / "acts.npy", acts.numpy())
        return directory / "acts.npy", None
    if fmt == "pt":
        torch.save(acts.clone(), directory / "acts.pt")
        return directory / "acts.pt", None
    if fmt == "safetensors":
        safetensors_numpy.save_file({"latents": acts.numpy()}, directory / "acts.safetensors")
        return directory / "acts.safetensors", None
    if fmt == "safetensors_key":  # several tensors: the key names the activations
        safetensors_numpy.save_file({"latents": acts.numpy(), "other": np.ones((3, 2), np.float32)},
                                    directory / "acts.safetensors")
        return directory / "acts.safetensors", "latents"
    if fmt.startswith("pt_parts"):
        paths = write_parts(directory / "parts", acts, [0, 400, 401, 777, N])
        if fmt == "pt_parts_dir":
            return directory / "parts", None
        if fmt == "pt_parts_glob":
            return str(directory / "parts" / f"{PART_PREFIX}_part*.pt"), None
        return [str(p) for p in reversed(paths)], None  # a list, in any order
    raise ValueError(fmt)


def write_parts(directory: Path, acts: torch.Tensor, cuts: list[int], first_index: int = 1,
                prefix: str = PART_PREFIX) -> list[Path]:
    """sae-for-vlm's layout: {prefix}_part{i}.pt, i = 1, 2, ..., each a dense (rows, M) tensor."""
    directory.mkdir(exist_ok=True)
    paths = []
    for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
        path = directory / f"{prefix}_part{first_index + i}.pt"
        torch.save(acts[lo:hi].clone(), path)
        paths.append(path)
    return paths


def delphi_entries(latents: torch.Tensor):
    """delphi's COO form of (batches, seq, M) latents: nonzero locations [batch, seq, latent]
    in token order and their values (fp16), as its cache collects them."""
    locations = torch.nonzero(latents.abs() > 1e-5).contiguous()  # nonzero's result may be column-major
    return locations, latents[latents.abs() > 1e-5].half()


def write_delphi(directory: Path, latents: torch.Tensor, bounds: list[int], loc_dtype=np.uint16,
                 tokens: bool = True) -> list[Path]:
    """delphi's split cache: {start}_{end}.safetensors (end inclusive) per latent range, with
    locations [batch, seq, latent - start] and fp16 activations (and the tokens)."""
    directory.mkdir(exist_ok=True)
    locations, values = delphi_entries(latents)
    paths = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        mask = (locations[:, 2] >= start) & (locations[:, 2] < stop)
        loc = locations[mask].numpy().copy()
        loc[:, 2] -= start
        data = {"locations": loc.astype(loc_dtype), "activations": values[mask].numpy()}
        if tokens:
            data["tokens"] = np.arange(latents.shape[0] * latents.shape[1]).reshape(latents.shape[:2])
        path = directory / f"{start}_{stop - 1}.safetensors"
        safetensors_numpy.save_file(data, path)
        paths.append(path)
    return paths


def make_delphi_latents(seed: int, batches: int = 13, seq_len: int = 17, m: int = 41):
    """(batches, seq_len, m) float16-valued latents: ReLU, a signed latent, a dead one, and a
    last sequence with no activation at all (the row count must still include it)."""
    gen = torch.Generator().manual_seed(seed)
    latents = torch.relu(torch.randn(batches, seq_len, m, generator=gen) - 0.3)
    latents[..., 5] = torch.randn(batches, seq_len, generator=gen) * 2 - 0.5  # signed
    latents[..., 7] = 0.0  # dead
    latents[-1] = 0.0
    return latents.half().float()


def file_digests(directory: Path) -> dict:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_scores(got: torch.Tensor, expected: torch.Tensor):
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0, equal_nan=True)


# --------------------------------------------------------------------------- scores equal monoscore
@pytest.mark.parametrize("batch_rows", BATCH_ROWS)
@pytest.mark.parametrize("fmt", ["npy", "pt", "safetensors", "safetensors_key", "pt_parts_dir", "pt_parts_glob",
                                 "pt_parts_list"])
def test_dense_formats_equal_monoscore(tmp_path, fmt, batch_rows):
    acts, emb = make_data(seed=len(fmt) + batch_rows)
    source, key = write_dense(tmp_path, fmt, acts)
    np.save(tmp_path / "emb.npy", emb.numpy())
    before = file_digests(tmp_path)
    result = caches.score_activations(source, tmp_path / "emb.npy", batch_rows=batch_rows, key=key, progress=False)
    assert_scores(result.monoscore, mk.monoscore(acts, emb))
    assert result.num_rows == N and result.purity is None
    assert file_digests(tmp_path) == before


def test_pt_cache_saved_with_requires_grad(tmp_path):
    # torch.save(sae.encode(x), ...) outside no_grad stores requires_grad=True; read as
    # data, or the streaming pass would build one graph across every chunk.
    acts, emb = make_data(2)
    torch.save(acts.clone().requires_grad_(), tmp_path / "acts.pt")
    cache = caches.open_activations(tmp_path / "acts.pt")
    assert not cache.read_rows(0, 10).requires_grad
    result = caches.score_activations(tmp_path / "acts.pt", emb, batch_rows=97, progress=False)
    assert not result.monoscore.requires_grad
    assert_scores(result.monoscore, mk.monoscore(acts, emb))


def make_dominant_sample_data(seed: int = 0):
    """Latents that one sample carries (the others at 1e-3..1e-6 of its value) and
    embeddings sharing a direction: the one-pass form is off by g·eps32·κ there (6e-3
    streamed in chunks of 500, 9e-3 in one), and `monoscore` recomputes them (refine.py)."""
    gen = torch.Generator().manual_seed(seed)
    num_rows, num_latents, dim = 2000, 8, 16
    emb = torch.randn(num_rows, dim, generator=gen) + 3.0
    acts = torch.zeros(num_rows, num_latents)
    for k in range(num_latents):
        rows = torch.randperm(num_rows, generator=gen)[:3]
        acts[rows, k] = torch.tensor([1.0, 10.0 ** -(k % 4 + 3), 10.0 ** -(k % 4 + 3)])
    return acts, emb


@pytest.mark.parametrize("fmt", ["npy", "topk", "tensor"])
@pytest.mark.parametrize("batch_rows", [500, 4096])
def test_latents_one_sample_carries_equal_monoscore(tmp_path, fmt, batch_rows):
    """score_activations refines the ill-conditioned latents in a second pass, so it equals
    monoscore over the whole cache where the accumulator alone keeps the one-pass error."""
    acts, emb = make_dominant_sample_data()
    np.save(tmp_path / "emb.npy", emb.numpy())
    if fmt == "topk":
        top = torch.topk(acts, 2, dim=1)
        np.save(tmp_path / "values.npy", top.values.numpy())
        np.save(tmp_path / "indices.npy", top.indices.numpy())
        source = caches.open_topk(tmp_path / "values.npy", tmp_path / "indices.npy", num_latents=acts.shape[1])
        expected = mk.monoscore(top, emb, num_latents=acts.shape[1])
    else:
        np.save(tmp_path / "acts.npy", acts.numpy())
        source = caches.open_npy(tmp_path / "acts.npy") if fmt == "npy" else caches.DenseCache(caches.TensorRows(acts))
        expected = mk.monoscore(acts, emb)
    emb_source = emb if fmt == "tensor" else tmp_path / "emb.npy"
    result = caches.score_activations(source, emb_source, batch_rows=batch_rows, progress=False)
    assert_scores(result.monoscore, expected)
    torch.testing.assert_close(result.monoscore.double(), mk.reference.pairwise_monoscore(acts.double(), emb.double()),
                               atol=TOL, rtol=0, equal_nan=True)


@pytest.mark.parametrize("emb_format", ["pt", "safetensors", "tensor"])
def test_embedding_sources(tmp_path, emb_format):
    acts, emb = make_data(seed=5)
    np.save(tmp_path / "acts.npy", acts.numpy())
    if emb_format == "pt":
        torch.save(emb.clone(), tmp_path / "emb.pt")
        emb_source = tmp_path / "emb.pt"
    elif emb_format == "safetensors":
        safetensors_numpy.save_file({"emb": emb.numpy()}, tmp_path / "emb.safetensors")
        emb_source = tmp_path / "emb.safetensors"
    else:
        emb_source = emb.clone()
    result = caches.score_activations(tmp_path / "acts.npy", emb_source, batch_rows=97, progress=False)
    assert_scores(result.monoscore, mk.monoscore(acts, emb))
    if emb_format == "tensor":
        assert torch.equal(emb_source, emb)


@pytest.mark.parametrize("index_dtype", [np.uint16, np.int32, np.int64])
@pytest.mark.parametrize("case", ["relu", "negative", "always_on_offset"])
def test_topk_files_equal_monoscore(tmp_path, case, index_dtype):
    gen = torch.Generator().manual_seed(11)
    values, indices = make_topk(case, N, M, K, gen)
    values = values.float()
    emb = make_emb("zero_dup", N, D, gen).float()
    np.save(tmp_path / "values.npy", values.numpy())
    np.save(tmp_path / "indices.npy", indices.numpy().astype(index_dtype))
    cache = caches.open_activations(tmp_path / "values.npy", indices=tmp_path / "indices.npy", num_latents=M)
    assert isinstance(cache, caches.TopKCache) and (cache.num_rows, cache.num_latents) == (N, M)
    result = caches.score_activations(cache, emb, batch_rows=97, progress=False)
    assert_scores(result.monoscore, mk.monoscore((values, indices), emb, num_latents=M))


def test_topk_pair_in_one_safetensors_file(tmp_path):
    """{"values": ..., "indices": ...} in one .safetensors file, passed as both; a file
    with several tensors named otherwise says which names are read."""
    gen = torch.Generator().manual_seed(12)
    values, indices = make_topk("negative", N, M, K, gen)
    values = values.float()
    emb = make_emb("zero_dup", N, D, gen).float()
    pair = tmp_path / "topk.safetensors"
    safetensors_numpy.save_file({"indices": indices.numpy().astype(np.int32), "values": values.numpy()}, pair)
    result = caches.score_activations(caches.open_topk(pair, pair, num_latents=M), emb, batch_rows=97,
                                      progress=False)
    assert_scores(result.monoscore, mk.monoscore((values, indices), emb, num_latents=M))
    safetensors_numpy.save_file({"v": values.numpy(), "i": indices.numpy()}, tmp_path / "named.safetensors")
    with pytest.raises(CacheFileError, match=r"named.safetensors: holds tensors \['i', 'v'\]; a .safetensors file "
                                             r"with several tensors must name them 'values' and 'indices'"):
        caches.open_topk(tmp_path / "named.safetensors", tmp_path / "named.safetensors", num_latents=M)


@pytest.mark.parametrize("loc_dtype", [np.uint16, np.uint32, np.int64])
@pytest.mark.parametrize("batch_rows", [1, 40, 4096])
def test_delphi_cache_equals_monoscore(tmp_path, loc_dtype, batch_rows):
    latents = make_delphi_latents(seed=3)
    batches, seq_len, m = latents.shape
    write_delphi(tmp_path / "layers.3", latents, [0, 10, 25, m], loc_dtype)
    emb = make_emb("zero_dup", batches * seq_len, D, torch.Generator().manual_seed(4)).float()
    before = file_digests(tmp_path)
    result = caches.score_activations(tmp_path / "layers.3", emb, batch_rows=batch_rows, progress=False)
    # Row batch * seq_len + seq is token (batch, seq): the order of latents.reshape(-1, m).
    assert_scores(result.monoscore, mk.monoscore(latents.reshape(-1, m), emb))
    assert file_digests(tmp_path) == before


@pytest.mark.parametrize("how", ["config_json_cache_ctx_len", "config_json", "seq_len_argument"])
def test_delphi_cache_without_tokens(tmp_path, how):
    """Without tokens the sequence length comes from config.json (cache_ctx_len, the field
    of current delphi's CacheConfig; ctx_len in older ones) or seq_len=, and the number of
    rows from the embeddings."""
    latents = make_delphi_latents(seed=6, batches=9, seq_len=11)
    batches, seq_len, m = latents.shape
    write_delphi(tmp_path / "cache", latents, [0, 20, m], tokens=False)
    emb = make_emb("plain", batches * seq_len, D, torch.Generator().manual_seed(7)).float()
    if how.startswith("config_json"):
        field = "cache_ctx_len" if how.endswith("cache_ctx_len") else "ctx_len"
        config = {field: seq_len, "batch_size": 3, "n_tokens": batches * seq_len, "n_splits": 2}
        (tmp_path / "cache" / "config.json").write_text(json.dumps(config))
        result = caches.score_activations(tmp_path / "cache", emb, batch_rows=25, progress=False)
    else:
        result = caches.score_activations(tmp_path / "cache", emb, batch_rows=25, seq_len=seq_len, progress=False)
    assert_scores(result.monoscore, mk.monoscore(latents.reshape(-1, m), emb))


def test_delphi_single_unsplit_file(tmp_path):
    """delphi's unsplit save: one file with full latent indices; num_latents is required."""
    latents = make_delphi_latents(seed=8, m=23)
    batches, seq_len, m = latents.shape
    locations, values = delphi_entries(latents)
    safetensors_numpy.save_file({"locations": locations.numpy(), "activations": values.numpy(),
                                 "tokens": np.zeros((batches, seq_len), np.int64)}, tmp_path / "layers.0.safetensors")
    emb = make_emb("plain", batches * seq_len, D, torch.Generator().manual_seed(9)).float()
    with pytest.raises(CacheFileError, match="layers.0.safetensors.*num_latents"):
        caches.open_activations(tmp_path / "layers.0.safetensors")
    result = caches.score_activations(tmp_path / "layers.0.safetensors", emb, num_latents=m, batch_rows=30,
                                      progress=False)
    assert_scores(result.monoscore, mk.monoscore(latents.reshape(-1, m), emb))


def test_labels_give_class_purity(tmp_path):
    acts, emb = make_data(seed=12)
    labels = torch.randint(0, 7, (N,), generator=torch.Generator().manual_seed(13))
    np.save(tmp_path / "acts.npy", acts.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy().astype(np.int32))
    result = caches.score_activations(tmp_path / "acts.npy", emb, labels=tmp_path / "labels.npy", batch_rows=97,
                                      progress=False)
    assert result.num_classes == 7
    assert_scores(result.monoscore, mk.monoscore(acts, emb))
    torch.testing.assert_close(result.purity, class_purity(acts, labels, num_classes=7), atol=0, rtol=0,
                               equal_nan=True)  # counts: exact
    torch.testing.assert_close(result.weighted_purity, class_purity(acts, labels, num_classes=7, weighted=True),
                               atol=PURITY_TOL, rtol=0, equal_nan=True)


def test_label_ids_instead_of_class_indices(tmp_path, monkeypatch):
    """Labels that are IDs (1 + the largest would be the number of classes) are refused
    before (C, M) sums of many GiB are allocated; small or dense label sets are scored."""
    from monoloss_kernels import purity

    acts, emb = make_data(seed=16)
    np.save(tmp_path / "acts.npy", acts.numpy())
    ids = np.random.default_rng(17).choice([1_000_000_000_003, 2_000_000_000_017, 3_000_000_000_001], N)
    np.save(tmp_path / "ids.npy", ids)
    with pytest.raises(CacheFileError, match=r"ids.npy: labels must be class indices 0..C-1; the largest is "
                                             r"3000000000001 but only 3 distinct values occur"):
        caches.score_activations(tmp_path / "acts.npy", emb, labels=tmp_path / "ids.npy", batch_rows=97,
                                 progress=False)
    # Below the memory limit, ID-like labels cost little and purity (which samples share a
    # label) is right; above it, labels that use most of 0..C-1 are class indices.
    sparse = np.where(ids == ids.min(), 3, 900).astype(np.int64)
    np.save(tmp_path / "sparse.npy", sparse)
    result = caches.score_activations(tmp_path / "acts.npy", emb, labels=tmp_path / "sparse.npy", progress=False)
    assert result.num_classes == 901
    torch.testing.assert_close(result.purity, class_purity(acts, torch.from_numpy(sparse // 900)), atol=0, rtol=0,
                               equal_nan=True)
    monkeypatch.setattr(purity, "ID_LABELS_MAX_BYTES", 0)
    dense_labels = np.arange(N) % 6
    np.save(tmp_path / "dense.npy", dense_labels)
    result = caches.score_activations(tmp_path / "acts.npy", emb, labels=tmp_path / "dense.npy", batch_rows=97,
                                      progress=False)
    assert result.num_classes == 6
    with pytest.raises(CacheFileError, match="sparse.npy: labels must be class indices"):
        caches.score_activations(tmp_path / "acts.npy", emb, labels=tmp_path / "sparse.npy", progress=False)


@pytest.mark.parametrize("label_dtype", [np.uint16, np.uint32, np.uint64])
def test_unsigned_labels(tmp_path, label_dtype):
    """Unsigned label files, which torch reads but cannot take the min or max of."""
    acts, emb = make_data(seed=14)
    labels = torch.randint(0, 5, (N,), generator=torch.Generator().manual_seed(15))
    np.save(tmp_path / "acts.npy", acts.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy().astype(label_dtype))
    result = caches.score_activations(tmp_path / "acts.npy", emb, labels=tmp_path / "labels.npy", batch_rows=97,
                                      progress=False)
    assert result.num_classes == 5
    torch.testing.assert_close(result.purity, class_purity(acts, labels, num_classes=5), atol=0, rtol=0,
                               equal_nan=True)


def test_every_backend_and_device(tmp_path, backend_device):
    """Chunks (dense, CSR from delphi files) and labels are moved to the accumulator's device."""
    backend, device = backend_device
    latents = make_delphi_latents(seed=30, batches=7, seq_len=13)
    batches, seq_len, m = latents.shape
    write_delphi(tmp_path / "delphi", latents, [0, 15, m])
    np.save(tmp_path / "dense.npy", latents.reshape(-1, m).numpy())
    emb = make_emb("zero_dup", batches * seq_len, D, torch.Generator().manual_seed(31)).float()
    labels = torch.randint(0, 3, (batches * seq_len,), generator=torch.Generator().manual_seed(32))
    expected = mk.monoscore(latents.reshape(-1, m), emb)
    for source in [tmp_path / "delphi", tmp_path / "dense.npy"]:
        result = caches.score_activations(source, emb, labels=labels, batch_rows=40, device=device, backend=backend,
                                          progress=False)
        assert result.monoscore.device.type == "cpu"
        assert_scores(result.monoscore, expected)
        torch.testing.assert_close(result.purity, class_purity(latents.reshape(-1, m), labels, num_classes=3),
                                   atol=0, rtol=0, equal_nan=True)


# --------------------------------------------------------------------------- detection
def test_open_activations_detects_each_format(tmp_path):
    acts, _ = make_data(seed=14)
    expected = {}
    for fmt in ["npy", "pt", "safetensors", "pt_parts_dir", "pt_parts_glob", "pt_parts_list"]:
        sub = tmp_path / fmt
        sub.mkdir()
        expected[fmt] = write_dense(sub, fmt, acts)[0]
    latents = make_delphi_latents(seed=15)
    write_delphi(tmp_path / "delphi", latents, [0, 30, latents.shape[2]])
    (tmp_path / "delphi" / "config.json").write_text("{}")  # other files beside the cache are ignored
    for fmt, source in expected.items():
        cache = caches.open_activations(source)
        assert isinstance(cache, caches.DenseCache) and (cache.num_rows, cache.num_latents) == (N, M), fmt
    assert isinstance(caches.open_activations(tmp_path / "pt_parts_dir" / "parts").rows, caches.TorchPartsRows)
    assert isinstance(caches.open_activations(tmp_path / "npy" / "acts.npy").rows, caches.NpyRows)
    delphi = caches.open_activations(tmp_path / "delphi")
    assert isinstance(delphi, caches.DelphiCache)
    assert (delphi.num_rows, delphi.num_latents, delphi.seq_len) == (13 * 17, latents.shape[2], 17)
    assert isinstance(caches.open_activations(str(tmp_path / "delphi" / "*.safetensors")), caches.DelphiCache)
    assert isinstance(caches.open_activations(tmp_path / "delphi" / "0_29.safetensors"), caches.DelphiCache)


# --------------------------------------------------------------------------- bounded memory
@pytest.mark.parametrize("fmt", ["npy", "pt_parts_dir", "safetensors", "delphi"])
def test_chunks_never_exceed_batch_rows(tmp_path, fmt, monkeypatch):
    """Every batch handed to the accumulator has at most batch_rows rows, and together they
    cover each row once, in order."""
    if fmt == "delphi":
        latents = make_delphi_latents(seed=16)
        write_delphi(tmp_path / "delphi", latents, [0, 30, latents.shape[2]])
        source, num_rows = tmp_path / "delphi", latents.shape[0] * latents.shape[1]
    else:
        acts, _ = make_data(seed=16)
        source, _ = write_dense(tmp_path, fmt, acts)
        num_rows = N
    emb = make_emb("plain", num_rows, D, torch.Generator().manual_seed(17)).float()
    seen = []
    real_update = mk.MonoScoreAccumulator.update

    def recording_update(self, batch, batch_emb, **kwargs):
        seen.append(batch_emb.shape[0])
        return real_update(self, batch, batch_emb, **kwargs)

    monkeypatch.setattr(mk.MonoScoreAccumulator, "update", recording_update)
    caches.score_activations(source, emb, batch_rows=50, progress=False)
    assert max(seen) <= 50 and sum(seen) == num_rows


MEMORY_CHILD = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    import monoloss_kernels as mk
    from monoloss_kernels import caches

    def data_bytes():  # the address space RLIMIT_DATA counts: heap, anonymous and private writable maps
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024

    source, emb_path, mapped_bytes, slack_bytes, batch_rows, file_bytes = sys.argv[1:7]
    num_latents, dim = int(sys.argv[8]), int(sys.argv[9])
    # Threads, their allocator arenas and the kernel's buffers up before measuring, at a batch's
    # shape: a smaller warm-up left a 16-core machine (torch 2.11) short of the 48 MiB slack.
    mk.monoscore(torch.rand(int(batch_rows), num_latents), torch.rand(int(batch_rows), dim))
    limit = data_bytes() + int(mapped_bytes) + int(slack_bytes)  # set before any cache file is opened
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))
    cache = caches.open_activations(source)  # kept open: its map stays counted for the control below
    result = caches.score_activations(cache, emb_path, batch_rows=int(batch_rows), progress=False)
    torch.save(result.monoscore, sys.argv[7])
    try:  # the control: a copy of the whole file on top of what the format maps does not fit
        np.ones(int(file_bytes), dtype=np.uint8)
        print("control allocation fitted")
    except MemoryError:
        print("control refused")
""")


@pytest.mark.parametrize("fmt", ["npy", "pt_parts_dir", "safetensors"])
def test_peak_memory_is_one_chunk(tmp_path, fmt):
    """Scores a 192 MiB cache in a process whose data segment (RLIMIT_DATA: heap, anonymous
    and private writable mappings) may grow by at most 48 MiB over its start, plus the one
    file mapping the format needs at a time (safetensors and torch.load(mmap=True) map
    privately, which counts; numpy's read-only map does not). Reading the whole cache into
    memory would need 192 MiB more: the control allocation of that size is refused."""
    num_rows, num_latents, dim, batch_rows = 49152, 1024, 32, 2048  # 192 MiB of float32
    slack = 48 << 20
    rng = np.random.default_rng(18)
    acts = np.lib.format.open_memmap(tmp_path / "acts.npy", mode="w+", dtype=np.float32,
                                     shape=(num_rows, num_latents))
    for start in range(0, num_rows, 4096):
        acts[start:start + 4096] = np.maximum(rng.standard_normal((4096, num_latents), dtype=np.float32), 0)
    acts.flush()
    emb = rng.standard_normal((num_rows, dim), dtype=np.float32)
    np.save(tmp_path / "emb.npy", emb)
    file_bytes = num_rows * num_latents * 4
    if fmt == "npy":
        source, mapped = tmp_path / "acts.npy", 0
    elif fmt == "safetensors":
        safetensors_numpy.save_file({"acts": np.asarray(acts)}, tmp_path / "acts.safetensors")
        source, mapped = tmp_path / "acts.safetensors", file_bytes
    else:
        cuts = [0, 20000, 40000, num_rows]
        for i, (lo, hi) in enumerate(zip(cuts[:-1], cuts[1:])):
            torch.save(torch.from_numpy(np.array(acts[lo:hi])), tmp_path / f"{PART_PREFIX}_part{i + 1}.pt")
        source, mapped = tmp_path, 20000 * num_latents * 4 + (1 << 20)  # one part at a time
    expected = mk.monoscore(torch.from_numpy(np.asarray(acts)), torch.from_numpy(emb))
    del acts
    out = tmp_path / "scores.pt"
    child = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(source), str(tmp_path / "emb.npy"), str(mapped), str(slack),
         str(batch_rows), str(file_bytes), str(out), str(num_latents), str(dim)],
        capture_output=True, text=True, timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert "control refused" in child.stdout
    assert_scores(torch.load(out), expected)


# --------------------------------------------------------------------------- bad files
def test_tensor_in_memory_refused_with_what_to_do():
    # str(tensor) holds '[' and was taken for a glob: "no files match tensor([[...".
    acts, emb = make_data(seed=19)
    for source in (acts, acts.numpy()):
        with pytest.raises(TypeError, match=r"acts_source must be a path, .* wrap it as DenseCache\(TensorRows"):
            caches.score_activations(source, emb)


def test_missing_files(tmp_path):
    _, emb = make_data(seed=19)
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        caches.score_activations(tmp_path / "nope.npy", emb)
    np.save(tmp_path / "acts.npy", np.ones((N, M), np.float32))
    with pytest.raises(FileNotFoundError, match="emb.npy"):
        caches.score_activations(tmp_path / "acts.npy", tmp_path / "emb.npy")
    with pytest.raises(FileNotFoundError, match=r"part\*"):
        caches.open_activations(str(tmp_path / "x_part*.pt"))
    with pytest.raises(CacheFileError, match="no activation cache found"):
        caches.open_activations(tmp_path)  # a directory without a cache


def truncate(path: Path, keep: int) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    return path


def test_truncated_and_malformed_files(tmp_path):
    acts, emb = make_data(seed=20)
    np.save(tmp_path / "a.npy", acts.numpy())
    torch.save(acts.clone(), tmp_path / "a.pt")
    safetensors_numpy.save_file({"x": acts.numpy()}, tmp_path / "a.safetensors")
    (tmp_path / "header.npy").write_bytes((tmp_path / "a.npy").read_bytes()[:40])
    cases = {
        "npy data": truncate(tmp_path / "a.npy", -100),
        "npy header": tmp_path / "header.npy",
        "pt": truncate(tmp_path / "a.pt", -200),
        "safetensors": truncate(tmp_path / "a.safetensors", -8),
    }
    (tmp_path / "text.pt").write_text("not a checkpoint")
    cases["pt not a zip"] = tmp_path / "text.pt"
    torch.save({"acts": acts}, tmp_path / "dict.pt")
    cases["pt holds a dict"] = tmp_path / "dict.pt"
    for path in cases.values():
        with pytest.raises(CacheFileError, match=rf"{path.name}: not a readable|{path.name}: expected one tensor"):
            caches.open_activations(path)


def test_safetensors_header_that_lies(tmp_path):
    """A header whose shape disagrees with its data offsets, or whose length runs past the file."""
    acts, _ = make_data(seed=21)
    safetensors_numpy.save_file({"x": acts.numpy()}, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    header["x"]["shape"] = [N + 10, M]
    new_header = json.dumps(header).encode()
    (tmp_path / "shape.safetensors").write_bytes(len(new_header).to_bytes(8, "little") + new_header
                                                 + data[8 + header_len:])
    (tmp_path / "length.safetensors").write_bytes((10**9).to_bytes(8, "little") + data[8:])
    for name in ["shape.safetensors", "length.safetensors"]:
        with pytest.raises(CacheFileError, match=f"{name}: not a readable safetensors file"):
            caches.open_activations(tmp_path / name)


def test_wrong_shapes_and_dtypes(tmp_path):
    acts, emb = make_data(seed=22)
    np.save(tmp_path / "one_d.npy", acts[:, 0].numpy())
    np.save(tmp_path / "ints.npy", acts.numpy().astype(np.int32))
    np.save(tmp_path / "acts.npy", acts.numpy())
    np.save(tmp_path / "emb_ints.npy", emb.numpy().astype(np.int64))
    np.save(tmp_path / "emb_3d.npy", emb.numpy().reshape(N, D, 1))
    safetensors_numpy.save_file({"a": acts.numpy(), "b": acts.numpy()}, tmp_path / "two.safetensors")
    with pytest.raises(CacheFileError, match=r"one_d.npy: activations must be 2-D"):
        caches.open_activations(tmp_path / "one_d.npy")
    with pytest.raises(CacheFileError, match=r"ints.npy: activations must be one of float32.*holds int32"):
        caches.open_activations(tmp_path / "ints.npy")
    with pytest.raises(CacheFileError, match=r"emb_ints.npy: embeddings must be one of"):
        caches.score_activations(tmp_path / "acts.npy", tmp_path / "emb_ints.npy")
    with pytest.raises(CacheFileError, match=r"emb_3d.npy: embeddings must be 2-D"):
        caches.score_activations(tmp_path / "acts.npy", tmp_path / "emb_3d.npy")
    with pytest.raises(CacheFileError, match=r"two.safetensors: holds tensors \['a', 'b'\]; pass key="):
        caches.open_activations(tmp_path / "two.safetensors")
    with pytest.raises(CacheFileError, match=r"two.safetensors: holds tensors \['a', 'b'\]; pass emb_key= "
                                             r"\(--emb-key\) to name the embeddings"):
        caches.score_activations(tmp_path / "acts.npy", tmp_path / "two.safetensors")
    with pytest.raises(CacheFileError, match=r"two.safetensors: has no tensor 'c'"):
        caches.open_activations(tmp_path / "two.safetensors", key="c")
    with pytest.raises(CacheFileError, match=rf"acts.npy: holds {M} columns but num_latents=768"):
        caches.open_activations(tmp_path / "acts.npy", num_latents=768)


def test_mismatched_rows(tmp_path):
    acts, emb = make_data(seed=23)
    np.save(tmp_path / "acts.npy", acts.numpy())
    np.save(tmp_path / "emb.npy", emb[:-1].numpy())
    np.save(tmp_path / "labels.npy", np.zeros(N + 1, np.int64))
    with pytest.raises(CacheFileError, match=rf"acts.npy have {N} rows but embeddings .*emb.npy have {N - 1}"):
        caches.score_activations(tmp_path / "acts.npy", tmp_path / "emb.npy")
    with pytest.raises(CacheFileError, match=rf"labels .*labels.npy have {N + 1} rows but activations"):
        caches.score_activations(tmp_path / "acts.npy", emb, labels=tmp_path / "labels.npy")
    np.save(tmp_path / "labels.npy", np.full(N, -1, np.int64))
    with pytest.raises(CacheFileError, match=r"labels.npy: labels must be >= 0"):
        caches.score_activations(tmp_path / "acts.npy", emb, labels=tmp_path / "labels.npy")


def test_bad_values_name_the_file_and_rows(tmp_path):
    acts, emb = make_data(seed=24)
    acts[500, 3] = float("nan")
    np.save(tmp_path / "acts.npy", acts.numpy())
    with pytest.raises(CacheFileError, match=r"acts.npy with embeddings .* rows 485..581: acts contains NaN"):
        caches.score_activations(tmp_path / "acts.npy", emb, batch_rows=97)
    values, indices = make_topk("relu", N, M, K, torch.Generator().manual_seed(25))
    indices[700, 2] = M  # out of range
    np.save(tmp_path / "values.npy", values.float().numpy())
    np.save(tmp_path / "indices.npy", indices.numpy())
    with pytest.raises(CacheFileError, match=r"values.npy \+ .*indices.npy .* rows 679..775: .*num_latents=37"):
        caches.score_activations(caches.open_topk(tmp_path / "values.npy", tmp_path / "indices.npy", num_latents=M),
                                 emb, batch_rows=97)
    np.save(tmp_path / "indices.npy", indices[:, :-1].numpy())
    with pytest.raises(CacheFileError, match=r"values.npy hold shape \(1031, 5\) but indices .* hold \(1031, 4\)"):
        caches.open_topk(tmp_path / "values.npy", tmp_path / "indices.npy", num_latents=M)


def test_chunked_pt_bad_parts(tmp_path):
    acts, _ = make_data(seed=26)
    paths = write_parts(tmp_path / "gap", acts, [0, 300, 600, N])
    paths[1].unlink()
    with pytest.raises(CacheFileError, match=rf"{PART_PREFIX}_part2.pt: missing \(between part1 and part3\)"):
        caches.open_activations(tmp_path / "gap")
    write_parts(tmp_path / "start", acts, [0, 300, N], first_index=2)
    with pytest.raises(CacheFileError, match=rf"{PART_PREFIX}_part1.pt: missing"):
        caches.open_activations(tmp_path / "start")
    write_parts(tmp_path / "two", acts, [0, 300, N])
    write_parts(tmp_path / "two", acts, [0, 300, N], prefix="imagenet_val_activations")
    with pytest.raises(CacheFileError, match="parts of several caches"):
        caches.open_activations(tmp_path / "two")
    paths = write_parts(tmp_path / "width", acts, [0, 300, N])
    torch.save(acts[300:, :-1].clone(), paths[1])
    with pytest.raises(CacheFileError, match=rf"{paths[1].name}: holds float32 \(731, 36\).*same columns"):
        caches.open_activations(tmp_path / "width")
    paths = write_parts(tmp_path / "trunc", acts, [0, 300, N])
    truncate(paths[1], -300)
    with pytest.raises(CacheFileError, match=rf"{paths[1].name}: not a readable torch.save file"):
        caches.open_activations(tmp_path / "trunc")


def test_delphi_bad_caches(tmp_path):
    latents = make_delphi_latents(seed=27)
    m = latents.shape[2]
    emb = torch.randn(latents.shape[0] * latents.shape[1], D, generator=torch.Generator().manual_seed(28))

    paths = write_delphi(tmp_path / "gap", latents, [0, 10, 25, m])
    paths[1].unlink()
    with pytest.raises(CacheFileError, match=r"25_40.safetensors: delphi cache is missing latents 10..24"):
        caches.open_activations(tmp_path / "gap")

    paths = write_delphi(tmp_path / "one", latents, [0, 10, 25, m])
    with pytest.raises(CacheFileError, match=r"10_24.safetensors: holds latents 10..24, one range"):
        caches.open_activations(paths[1])

    write_delphi(tmp_path / "unsorted", latents, [0, 25, m])
    path = tmp_path / "unsorted" / "0_24.safetensors"
    with safetensors_numpy.safe_open(path, "np") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
    order = np.random.default_rng(29).permutation(data["locations"].shape[0])
    data["locations"], data["activations"] = data["locations"][order], data["activations"][order]
    safetensors_numpy.save_file(data, path)
    with pytest.raises(CacheFileError, match=r"0_24.safetensors: entries are not in token order"):
        caches.score_activations(tmp_path / "unsorted", emb, batch_rows=50)

    write_delphi(tmp_path / "width", latents, [0, 25, m])
    path = tmp_path / "width" / "25_40.safetensors"
    with safetensors_numpy.safe_open(path, "np") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
    data["locations"][3, 2] = 16  # range 25..40 has 16 latents: offsets 0..15
    safetensors_numpy.save_file(data, path)
    with pytest.raises(CacheFileError, match=r"25_40.safetensors: a latent offset >= 16"):
        caches.score_activations(tmp_path / "width", emb, batch_rows=50)

    write_delphi(tmp_path / "beyond", latents, [0, m], tokens=False)
    with pytest.raises(CacheFileError, match=r"0_40.safetensors: its last entry is token 20\d, beyond the 187 rows"):
        caches.open_delphi(tmp_path / "beyond", seq_len=17, num_rows=187)  # 11 of the 13 sequences

    write_delphi(tmp_path / "notokens", latents, [0, m], tokens=False)
    with pytest.raises(CacheFileError, match=r"notokens/0_40.safetensors: cannot tell the sequence length.*--seq-len"):
        caches.open_activations(tmp_path / "notokens")
    with pytest.raises(CacheFileError, match=r"notokens/0_40.safetensors: cannot tell the number of tokens"):
        caches.open_activations(tmp_path / "notokens", seq_len=17)

    write_delphi(tmp_path / "rows", latents, [0, m])  # tokens: 13 x 17 = 221 rows
    with pytest.raises(CacheFileError, match=r"activations .*rows.*0_40.safetensors have 221 rows but embeddings"):
        caches.score_activations(tmp_path / "rows", emb[:-1])

    write_delphi(tmp_path / "truncated", latents, [0, 25, m])
    truncate(tmp_path / "truncated" / "25_40.safetensors", -10)
    with pytest.raises(CacheFileError, match=r"25_40.safetensors: not a readable safetensors file"):
        caches.open_activations(tmp_path / "truncated")
