"""Full-dataset MonoLoss in two passes (`dataset_monoloss_backward`) against autograd of
the float64 closed form on the concatenated dataset: the loss and every parameter
gradient, for dense and TopK latents, several batchings, ties at the min and max,
dead latents, and a dataset split over processes."""

import pytest
import torch

import monoloss_kernels as mk

from .helpers import BACKEND_DEVICES, backend_id, densify, free_port, make_emb
from .test_loss import reference_loss

# The bounds: the loss within 1e-6 relative; parameter gradients within 1e-5 of
# their largest entry.
LOSS_RTOL = 1e-6
GRAD_RTOL_OF_MAX = 1e-5

NUM_ROWS, INPUT_DIM, NUM_LATENTS, EMB_DIM, TOPK = 97, 11, 13, 7, 4
DEAD_LATENT = 0


class Encoder(torch.nn.Module):
    """A small SAE encoder: ReLU latents (dense) or the top k pre-activations (TopK)."""

    def __init__(self, gen: torch.Generator, topk: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(INPUT_DIM, NUM_LATENTS, generator=gen) / INPUT_DIM**0.5)
        bias = 0.1 * torch.randn(NUM_LATENTS, generator=gen)
        bias[DEAD_LATENT] = -100.0  # never fires: its score is undefined and it is left out of the mean
        self.bias = torch.nn.Parameter(bias)
        self.topk = topk

    def forward(self, x: torch.Tensor):
        pre = x @ self.weight + self.bias
        if self.topk:
            return torch.topk(pre, TOPK, dim=1)
        return torch.relu(pre)  # many samples tie at the minimum 0


def make_dataset(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(NUM_ROWS, INPUT_DIM, generator=gen)
    # Repeated samples, far out: they attain several latents' maxima together (ties at the max).
    x[[3, 40, 90]] = 4 * x[3]
    emb = make_emb("zero_dup", NUM_ROWS, EMB_DIM, gen).float()
    return x, emb


def batches(x: torch.Tensor, emb: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch_size], emb[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def expected_loss_and_grads(model: Encoder, x: torch.Tensor, emb: torch.Tensor):
    """Autograd of the float64 closed form over the whole dataset at once."""
    model.zero_grad()
    out = model(x)
    acts = densify(out.values, out.indices, NUM_LATENTS) if model.topk else out
    loss = reference_loss(acts, emb)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def check_grads(grads, expected):
    for grad, want in zip(grads, expected):
        scale = want.abs().max().item()
        assert scale > 0, "the reference gradient must not vanish, or the check is empty"
        torch.testing.assert_close(grad, want, rtol=0, atol=GRAD_RTOL_OF_MAX * scale)


@pytest.mark.parametrize("backend_device", BACKEND_DEVICES, ids=backend_id)
@pytest.mark.parametrize("topk", [False, True], ids=["dense", "topk"])
@pytest.mark.parametrize("batch_size", [10, 32, NUM_ROWS])
def test_equals_autograd_on_the_concatenated_dataset(backend_device, topk, batch_size):
    backend, device = backend_device
    model = Encoder(torch.Generator().manual_seed(5), topk).to(device)
    x, emb = (t.to(device) for t in make_dataset(seed=7))
    acts = model(x)
    if not topk:  # the case this test exists for: ties at both extremes, spread over batches
        assert (acts[:, 1:] == 0).sum(0).min() > 1
        assert ((acts == acts.amax(0)).sum(0) > 1).any()
    expected_loss, expected_grads = expected_loss_and_grads(model, x, emb)
    x_before, emb_before = x.clone(), emb.clone()

    model.zero_grad()
    loss = mk.dataset_monoloss_backward(
        lambda batch: (model(batch[0]), batch[1]), batches(x, emb, batch_size),
        num_latents=NUM_LATENTS, backend=backend,
    )
    assert loss == pytest.approx(expected_loss, rel=LOSS_RTOL)
    check_grads([p.grad for p in model.parameters()], expected_grads)
    assert torch.equal(x, x_before) and torch.equal(emb, emb_before)


@pytest.mark.parametrize("offset", [0.7, 0.1], ids=["min_rounds_down", "min_rounds_up"])
def test_float64_acts_whose_minimum_is_not_a_float32(offset):
    """float64 latents tied at a minimum that float32 cannot hold (0.7 rounds down, 0.1
    up): the kernels and act_range see the float32 rounding, so the ties and the pass-2
    range check must compare in float32 too, or the gradient through the min is lost
    (0.7) or the batch is refused as changed (0.1)."""
    model = Encoder(torch.Generator().manual_seed(61), topk=False).double()
    floor = torch.nn.Parameter(torch.tensor(offset, dtype=torch.float64))  # the tied minimum, learned
    params = [*model.parameters(), floor]
    x, emb = make_dataset(seed=67)
    x = x.double()

    def floored(inputs):
        return torch.maximum(model(inputs), floor)  # many samples at the floor, the gradient of the min reaching it

    assert float(torch.tensor(offset, dtype=torch.float32)) != offset
    expected_loss = reference_loss(floored(x), emb)
    expected = torch.autograd.grad(expected_loss, params)
    loss = mk.dataset_monoloss_backward(lambda b: (floored(b[0]), b[1]), batches(x, emb, 25),
                                        num_latents=NUM_LATENTS)
    assert loss == pytest.approx(expected_loss.item(), rel=LOSS_RTOL)
    check_grads([p.grad for p in params], expected)


def test_scale_and_accumulation_into_grad():
    model = Encoder(torch.Generator().manual_seed(11), topk=False)
    x, emb = make_dataset(seed=13)
    _, expected = expected_loss_and_grads(model, x, emb)
    # Gradients accumulate, as after an earlier loss.backward() (of the same size, so that
    # subtracting them back loses no precision).
    earlier = [torch.full_like(g, 1e-3) for g in expected]
    for p, g in zip(model.parameters(), earlier):
        p.grad = g.clone()
    mk.dataset_monoloss_backward(lambda b: (model(b[0]), b[1]), batches(x, emb, 16), num_latents=NUM_LATENTS,
                                 scale=0.25)
    check_grads([p.grad - g for p, g in zip(model.parameters(), earlier)], [0.25 * g for g in expected])


def test_differentiable_emb():
    """emb from a learned projection: its parameters get the gradient through emb too."""
    gen = torch.Generator().manual_seed(17)
    model = Encoder(gen, topk=False)
    projection = torch.nn.Parameter(torch.randn(INPUT_DIM, EMB_DIM, generator=gen))
    x, _ = make_dataset(seed=19)
    params = [*model.parameters(), projection]

    loss = reference_loss(model(x), x @ projection)
    expected = torch.autograd.grad(loss, params)
    for p in params:
        p.grad = None
    value = mk.dataset_monoloss_backward(lambda b: (model(b), b @ projection), x.split(20), num_latents=NUM_LATENTS,
                                         differentiable_emb=True)
    assert value == pytest.approx(loss.item(), rel=LOSS_RTOL)
    check_grads([p.grad for p in params], expected)


def test_no_defined_latent_gives_one_and_no_gradient():
    model = Encoder(torch.Generator().manual_seed(23), topk=False)
    x, emb = make_dataset(seed=29)
    loss = mk.dataset_monoloss_backward(lambda b: (model(b[0]), b[1]), [(x[:1], emb[:1])], num_latents=NUM_LATENTS)
    assert loss == 1.0
    assert all(p.grad is None for p in model.parameters())


def test_a_model_that_changes_between_passes_is_refused():
    model = Encoder(torch.Generator().manual_seed(31), topk=False)
    x, emb = make_dataset(seed=37)
    noise = torch.Generator().manual_seed(41)

    def dropout_like(batch):  # different values in each pass
        return torch.relu(model(batch[0]) + torch.rand(1, generator=noise)), batch[1]

    with pytest.raises(RuntimeError, match="different values in the two passes|other samples than pass 1"):
        mk.dataset_monoloss_backward(dropout_like, batches(x, emb, 25), num_latents=NUM_LATENTS)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks are implicitly disabled")
def test_sparse_entry_that_disappears_in_pass_2_is_refused():
    """A latent stored in every row of pass 1 (minimum > 0) that loses an entry in pass 2 has
    an implicit 0 there, below pass 1's minimum: refused like a stored value below it, even
    when the ties at the minima stay the same."""
    gen = torch.Generator().manual_seed(47)
    dense = torch.nn.Parameter(torch.rand(40, 4, generator=gen) + 1.0)  # every latent stored in every row
    emb = make_emb("plain", 40, 4, gen).float()
    calls = {"n": 0}

    def model_fn(rows):
        calls["n"] += 1
        latents = dense[rows]
        keep = torch.ones_like(latents, dtype=torch.bool)
        if calls["n"] > 2:  # pass 2: row 5 no longer stores latent 0
            keep[rows == 5, 0] = False
        r, c = keep.nonzero(as_tuple=True)
        return torch.sparse_coo_tensor(torch.stack([r, c]), latents[r, c], latents.shape), emb[rows]

    with pytest.raises(RuntimeError, match="below the minimum of pass 1"):
        mk.dataset_monoloss_backward(model_fn, [torch.arange(0, 20), torch.arange(20, 40)], num_latents=4,
                                     progress=False)


def test_bad_input_raises():
    model = Encoder(torch.Generator().manual_seed(43), topk=False)
    x, emb = make_dataset(seed=47)
    with pytest.raises(ValueError, match="loader yielded no batches"):
        mk.dataset_monoloss_backward(lambda b: (model(b[0]), b[1]), [], num_latents=NUM_LATENTS)
    with pytest.raises(TypeError, match=r"model_fn\(batch\) must return the pair \(acts, emb\)"):
        mk.dataset_monoloss_backward(lambda b: model(b[0]), batches(x, emb, 50), num_latents=NUM_LATENTS)
    with pytest.raises(TypeError, match="num_latents must be a positive int"):
        mk.dataset_monoloss_backward(lambda b: (model(b[0]), b[1]), batches(x, emb, 50), num_latents=0)
    widths = iter([EMB_DIM, EMB_DIM - 1])  # the second batch's embeddings are narrower
    with pytest.raises(ValueError, match=f"emb has dimension {EMB_DIM - 1} but the accumulator was built for "
                                         f"dim={EMB_DIM}"):
        mk.dataset_monoloss_backward(lambda b: (model(b[0]), b[1][:, :next(widths)]), batches(x, emb, 50),
                                     num_latents=NUM_LATENTS)
    with pytest.raises(ValueError, match="emb contains NaN"):
        bad = emb.clone()
        bad[60, 2] = float("nan")
        mk.dataset_monoloss_backward(lambda b: (model(b[0]), b[1]), batches(x, bad, 50), num_latents=NUM_LATENTS)


def _distributed_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = Encoder(torch.Generator().manual_seed(53), topk=True)  # the same weights on every rank
        x, emb = make_dataset(seed=59)
        shard = slice(*[(0, 30), (30, NUM_ROWS)][rank])  # uneven shards
        loss = mk.dataset_monoloss_backward(lambda b: (model(b[0]), b[1]), batches(x[shard], emb[shard], 16),
                                            num_latents=NUM_LATENTS, distributed=True)
        torch.save({"loss": loss, "grads": [p.grad for p in model.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_equals_one_process_on_the_union(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_distributed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    model = Encoder(torch.Generator().manual_seed(53), topk=True)
    expected_loss, expected_grads = expected_loss_and_grads(model, *make_dataset(seed=59))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        assert result["loss"] == pytest.approx(expected_loss, rel=LOSS_RTOL)
    check_grads([sum(grads) for grads in zip(*(r["grads"] for r in results))], expected_grads)


def _distributed_failure_worker(rank: int, world_size: int, port: int) -> None:
    import datetime
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A rank left waiting in a collective fails the test after 60 s instead of gloo's 30 min.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        model = Encoder(torch.Generator().manual_seed(61), topk=False)
        x, emb = make_dataset(seed=67)
        shard = slice(*[(0, 30), (30, NUM_ROWS)][rank])
        x, emb = x[shard], emb[shard]

        def run(model_fn, loader):
            return mk.dataset_monoloss_backward(model_fn, loader, num_latents=NUM_LATENTS, distributed=True,
                                                progress=False)

        def model_fn(batch):
            return model(batch[0]), batch[1]

        def others(failing: int) -> str:
            return rf"rank\(s\) \[{failing}\] of the group raised in"

        # Pass 1: a batch refused on rank 1.
        bad_emb = emb.clone()
        if rank == 1:
            bad_emb[7, 1] = float("nan")
        with pytest.raises(ValueError if rank == 1 else RuntimeError,
                           match="emb contains NaN" if rank == 1 else others(1) + r" pass 1 \(statistics\)"):
            run(model_fn, batches(x, bad_emb, 16))
        # Pass 1: rank 0's loader yields nothing.
        with pytest.raises(ValueError if rank == 0 else RuntimeError,
                           match="loader yielded no batches" if rank == 0 else others(0)):
            run(model_fn, [] if rank == 0 else batches(x, emb, 16))
        # Pass 2: rank 1's model gives other values than in pass 1.
        loader, calls = batches(x, emb, 16), {"n": 0}

        def changing_model_fn(batch):
            calls["n"] += 1
            acts = model(batch[0])
            return (acts - 1.0 if rank == 1 and calls["n"] > len(loader) else acts), batch[1]

        with pytest.raises(RuntimeError, match="below the minimum of pass 1" if rank == 1
                           else others(1) + r" pass 2 \(gradient\)"):
            run(changing_model_fn, loader)
        # The ranks are still in step: a good call meets the same collectives on both.
        model.zero_grad()
        assert 0.0 < run(model_fn, batches(x, emb, 16)) < 1.0
    finally:
        dist.destroy_process_group()


def test_distributed_error_on_one_rank_raises_on_every_rank():
    import torch.multiprocessing as mp

    mp.start_processes(_distributed_failure_worker, args=(2, free_port()), nprocs=2, join=True,
                       start_method="spawn")


def test_published_five_pass_peer_agrees_where_every_latent_is_defined():
    """The benchmark's peer (the paper's method) computes the same gradient when no latent
    is dead (its mean runs over every latent) and no embedding row is zero."""
    from monoloss_kernels.reference import published_dataset_monoloss_backward

    gen = torch.Generator().manual_seed(71)
    model = Encoder(gen, topk=False)
    with torch.no_grad():
        model.bias[DEAD_LATENT] = 0.0  # every latent fires
    x, _ = make_dataset(seed=73)
    emb = make_emb("plain", NUM_ROWS, EMB_DIM, gen).float()
    expected_loss, expected = expected_loss_and_grads(model, x, emb)
    model.zero_grad()
    loss = published_dataset_monoloss_backward(lambda b: (model(b[0]), b[1]), batches(x, emb, 20))
    # The peer adds eps = 1e-8 to max - min and to the denominators, and sums in float32.
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for grad, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(grad, want, rtol=0, atol=1e-4 * want.abs().max().item())
