"""MonoScoreAccumulator: any batching, merging, all_reduce across processes and a
checkpoint round trip all equal one `monoscore` call over the concatenation."""

import io
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import monoloss_kernels as mk
from monoloss_kernels.reference import pairwise_monoscore

from .helpers import densify, free_port, make_acts, make_emb, make_topk
from .test_monoscore import ATOL

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

N, M, K, D = 301, 37, 6, 23


def make_data(seed: int):
    """Dense activations whose latents are a mix of the adversarial cases (offset 1000,
    signed, ReLU, always-on TopK latents), their TopK-sparse part, and embeddings."""
    gen = torch.Generator().manual_seed(seed)
    values, indices = make_topk("always_on_offset", N, M, K, gen)
    dense = densify(values, indices, M)
    dense[:, -6:] = make_acts("mixed_offset", N, 6, gen)  # dense latents next to the sparse ones
    dense[:, -9:-6] = make_acts("negative", N, 3, gen)
    emb = make_emb("zero_dup", N, D, gen)
    return dense.float(), emb.float()


def as_form(dense_rows: torch.Tensor, form: str):
    """A batch of rows in the given input form (same values)."""
    if form == "dense":
        return dense_rows
    if form == "coo":
        return dense_rows.to_sparse()
    return dense_rows.to_sparse_csr()


def random_batches(num_rows: int, gen: torch.Generator) -> list[slice]:
    """Random cut points, including empty and one-row batches."""
    cuts = torch.randint(0, num_rows + 1, (torch.randint(2, 9, (), generator=gen).item(),), generator=gen)
    bounds = [0, *sorted(cuts.tolist()), num_rows, num_rows]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_any_batching_equals_one_shot(backend_device, seed):
    backend, device = backend_device
    dense, emb = make_data(seed)
    dense, emb = dense.to(device), emb.to(device)
    gen = torch.Generator().manual_seed(100 + seed)
    acc = mk.MonoScoreAccumulator(M, D, device=device, backend=backend)
    forms = ["dense", "coo", "csr"]
    for i, rows in enumerate(random_batches(N, gen)):
        acc.update(as_form(dense[rows], forms[(i + seed) % 3]), emb[rows])
    assert acc.num_rows == N
    expected = pairwise_monoscore(dense, emb)
    torch.testing.assert_close(acc.compute().double(), expected, atol=ATOL[torch.float32], rtol=0, equal_nan=True)
    torch.testing.assert_close(acc.compute(), mk.monoscore(dense, emb, backend=backend),
                               atol=ATOL[torch.float32], rtol=0, equal_nan=True)
    assert torch.isfinite(expected).float().mean() > 0.5


def test_topk_batches_take_the_accumulators_num_latents(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(5)
    values, indices = make_topk("negative", N, M, K, gen)
    values, indices = values.float().to(device), indices.to(device)
    emb = make_emb("plain", N, D, gen).float().to(device)
    acc = mk.MonoScoreAccumulator(M, D, device=device, backend=backend)
    for rows in (slice(0, 100), slice(100, N)):
        acc.update((values[rows], indices[rows]), emb[rows])
    torch.testing.assert_close(acc.compute().double(), pairwise_monoscore(densify(values, indices, M), emb),
                               atol=ATOL[torch.float32], rtol=0, equal_nan=True)


def test_merge_equals_one_shot():
    dense, emb = make_data(3)
    parts = [mk.MonoScoreAccumulator(M, D) for _ in range(3)]
    parts[0].update(dense[:120], emb[:120])
    parts[1].update(as_form(dense[120:], "csr"), emb[120:])  # parts[2] sees nothing
    merged = mk.MonoScoreAccumulator(M, D).merge(parts[2]).merge(parts[1]).merge(parts[0])
    torch.testing.assert_close(merged.compute().double(), pairwise_monoscore(dense, emb),
                               atol=ATOL[torch.float32], rtol=0, equal_nan=True)
    # merge leaves the other accumulator as it was
    torch.testing.assert_close(parts[1].compute(), mk.monoscore(dense[120:], emb[120:]), equal_nan=True)


def test_state_dict_round_trip_then_continue():
    dense, emb = make_data(4)
    acc = mk.MonoScoreAccumulator(M, D)
    acc.update(dense[:150], emb[:150])
    buffer = io.BytesIO()
    torch.save(acc.state_dict(), buffer)
    buffer.seek(0)
    resumed = mk.MonoScoreAccumulator(M, D)
    resumed.load_state_dict(torch.load(buffer))
    resumed.update(as_form(dense[150:], "coo"), emb[150:])
    acc.update(as_form(dense[150:], "coo"), emb[150:])
    torch.testing.assert_close(resumed.compute(), acc.compute(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(resumed.compute().double(), pairwise_monoscore(dense, emb),
                               atol=ATOL[torch.float32], rtol=0, equal_nan=True)


@pytest.mark.parametrize("form", ["dense", "topk", "coo"])
def test_inputs_that_require_grad_leave_no_graph(form):
    # An SAE's latents require grad; a graph through the running sums would keep every
    # batch alive, so memory would grow with N.
    dense, emb = make_data(8)
    weight = torch.ones(M, requires_grad=True)
    emb = emb.clone().requires_grad_()
    acc = mk.MonoScoreAccumulator(M, D)
    for rows in (slice(0, 100), slice(100, 200), slice(200, N)):
        latents = dense[rows] * weight  # requires grad, as an SAE's output
        if form == "topk":
            top = torch.topk(latents, K, dim=1)
            batch = (top.values, top.indices)
        else:
            batch = latents.to_sparse() if form == "coo" else latents
        acc.update(batch, emb[rows])
    assert not any(t.requires_grad for t in acc.state_dict().values() if isinstance(t, torch.Tensor))
    assert not acc.compute().requires_grad
    assert not mk.MonoScoreAccumulator(M, D).merge(acc).compute().requires_grad


def test_fewer_than_two_rows_and_reset():
    acc = mk.MonoScoreAccumulator(M, D)
    assert acc.compute().isnan().all()
    dense, emb = make_data(6)
    acc.update(dense[:1], emb[:1])
    assert acc.compute().isnan().all()
    acc.update(dense[1:], emb[1:])
    assert acc.compute().isfinite().any()
    acc.reset()
    assert acc.num_rows == 0 and acc.compute().isnan().all()


def test_bad_use_raises():
    dense, emb = make_data(7)
    acc = mk.MonoScoreAccumulator(M, D)
    with pytest.raises(ValueError, match=rf"num_latents={M} but acts has {M + 1} columns"):
        acc.update(torch.rand(4, M + 1), torch.rand(4, D))
    with pytest.raises(ValueError, match=rf"emb has dimension {D + 1} but the accumulator was built for dim={D}"):
        acc.update(dense[:4], torch.rand(4, D + 1))
    with pytest.raises(ValueError, match="the batch is on meta but the accumulator lives on cpu"):
        acc.update(dense[:4].to("meta"), emb[:4].to("meta"))
    with pytest.raises(ValueError, match="cannot merge an accumulator of"):
        acc.merge(mk.MonoScoreAccumulator(M, D + 1))
    with pytest.raises(TypeError, match="num_latents must be a non-negative int"):
        mk.MonoScoreAccumulator(-1, D)
    state = acc.state_dict()
    with pytest.raises(ValueError, match=r"state is for \(num_latents=37, dim=23\)"):
        mk.MonoScoreAccumulator(M, D + 1).load_state_dict(state)
    del state["cross"]
    with pytest.raises(KeyError, match=r"state is missing \['cross'\]"):
        acc.load_state_dict(state)


def _all_reduce_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        dense, emb = make_data(8)
        # Uneven shards; with three ranks the last one sees no rows at all.
        bounds = [0, 200, N] if world_size == 2 else [0, 90, N, N]
        rows = slice(bounds[rank], bounds[rank + 1])
        acc = mk.MonoScoreAccumulator(M, D)
        acc.update(as_form(dense[rows], "csr" if rank == 1 else "dense"), emb[rows])
        acc.all_reduce()
        torch.save({"scores": acc.compute(), "num_rows": acc.num_rows}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_across_processes(world_size, tmp_path):
    mp.start_processes(_all_reduce_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size,
                       join=True, start_method="spawn")
    dense, emb = make_data(8)
    expected = pairwise_monoscore(dense, emb)
    for rank in range(world_size):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["num_rows"] == N
        torch.testing.assert_close(result["scores"].double(), expected, atol=ATOL[torch.float32], rtol=0,
                                   equal_nan=True)
