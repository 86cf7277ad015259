"""MonoLoss forward + backward: ours against the published algorithm differentiated by
torch autograd (the peer), its torch.compile version, and the two bare GEMMs every exact
method pays for (ÊᵀA forward, Ê·G backward); dense and TopK activations, and a heavy-tailed
TopK batch whose rare latents are refined.

    pytest benchmarks/test_bench_monoloss.py --benchmark-only [--profile quick|full]

Each method is also measured for what autograd saves for its backward
(`saved_for_backward_mib`, summed over saved_tensors_hooks), the memory a training step
holds between forward and backward.
"""

import pytest
import torch
import torch.nn.functional as F

import monoloss_kernels
from monoloss_kernels._dispatch import stats_function
from monoloss_kernels._validate import validate_acts
from monoloss_kernels.reference import published_monoloss
from monoloss_kernels.refine import ill_conditioned_latents

from .common import DEVICE, OURS_PREFIX, make_embeddings, our_backends
from .conftest import COMPILED_PEER, GEMM, PEER, device_name
from .test_bench_topk import TopKCase, heavy_tailed_topk

NUM_ROWS, NUM_LATENTS, DIM, K = 4096, 8192, 768, 64
# Timed rounds per method; the slowest (the peer, the SAE step) take ~2 s a call on the 2-core CPU.
ROUNDS = {("quick", "cpu"): 3, ("full", "cpu"): 5, ("quick", "cuda"): 10, ("full", "cuda"): 20}
# The loss of float32 inputs: ours and the peer agree to float32 rounding.
LOSS_ATOL = 1e-5

compiled_peer_loss = torch.compile(published_monoloss, dynamic=False)


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    pre_acts = torch.randn(NUM_ROWS, NUM_LATENTS, generator=gen, device=DEVICE)
    emb = make_embeddings(NUM_ROWS, DIM, gen, DEVICE)
    top = torch.topk(pre_acts, K, dim=1)
    return {
        "dense": torch.relu(pre_acts).requires_grad_(),
        "values": top.values.contiguous().requires_grad_(),
        "indices": top.indices,
        "emb": emb,
    }


@pytest.fixture(scope="module")
def rounds(profile) -> int:
    return ROUNDS[(profile, DEVICE.type)]


def methods():
    return [OURS_PREFIX + b for b in our_backends(DEVICE)] + [PEER, COMPILED_PEER, GEMM]


def loss_fn(method, form, batch):
    """A function computing the loss of the batch (its leaf: dense acts or TopK values)."""
    emb = batch["emb"]
    if method.startswith(OURS_PREFIX):
        backend = method.removeprefix(OURS_PREFIX)
        if form == "dense":
            return lambda: monoloss_kernels.monoloss(batch["dense"], emb, backend=backend)
        return lambda: monoloss_kernels.monoloss((batch["values"], batch["indices"]), emb,
                                                 num_latents=NUM_LATENTS, backend=backend)
    peer = published_monoloss if method == PEER else compiled_peer_loss
    if form == "dense":
        return lambda: peer(batch["dense"], emb)
    # The peer reads the densified matrix, built differentiably from the TopK values.
    return lambda: peer(torch.zeros(NUM_ROWS, NUM_LATENTS, device=DEVICE).scatter(
        1, batch["indices"], batch["values"]), emb)


def saved_for_backward_mib(loss) -> float:
    """MiB of the tensors autograd saves for the backward (each storage counted once;
    the inputs themselves included, as a training step keeps them anyway)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss()
    return total / 2**20


@pytest.mark.parametrize("form", ["dense", "topk"])
@pytest.mark.parametrize("method", methods())
def test_monoloss_speed(batch, form, method, measure, rounds):
    leaf = batch["dense"] if form == "dense" else batch["values"]
    group = (f"monoloss-{form}-B{NUM_ROWS}-M{NUM_LATENTS}" + (f"-k{K}" if form == "topk" else "")
             + f"-d{DIM}-float32-fwd+bwd")
    extra_info = {"shape": {"N": NUM_ROWS, "M": NUM_LATENTS, "d": DIM, **({"k": K} if form == "topk" else {})},
                  "dtype": "float32", "device": device_name(DEVICE)}
    if method == GEMM:
        dense = batch["dense"].detach()
        unit_emb = F.normalize(batch["emb"], dim=1)
        grad_cross = torch.randn(DIM, NUM_LATENTS, device=DEVICE)

        def step():  # ÊᵀA (forward) and Ê·G (backward)
            unit_emb.T @ dense
            unit_emb @ grad_cross
    else:
        loss = loss_fn(method, form, batch)

        def step():
            leaf.grad = None
            loss().backward()

        reference = published_monoloss(batch["dense"].detach().double(), batch["emb"].double()) if form == "dense" \
            else None
        value = loss().item()
        if reference is not None:
            extra_info["max_abs_error"] = abs(value - reference.item())
            assert extra_info["max_abs_error"] <= LOSS_ATOL or method in (PEER, COMPILED_PEER)
        extra_info["saved_for_backward_mib"] = saved_for_backward_mib(loss)
    measure(step, device=DEVICE, group=group, method=method, rounds=rounds,
            gemm_flops=4 * NUM_ROWS * NUM_LATENTS * DIM, extra_info=extra_info)


@pytest.mark.parametrize("method", [OURS_PREFIX + b for b in our_backends(DEVICE)
                                    if not (DEVICE.type == "cpu" and b == "torch")] + [PEER])
def test_monoloss_heavy_tailed(method, measure, rounds):
    """TopK MonoLoss forward + backward on a batch like a trained SAE's (Zipf latent
    frequencies, values Exp(1)^3: test_bench_topk.heavy_tailed_topk), where many rare
    latents are carried by one sample: ours refines them (refine_loss_scores, its
    backward from their entries), the peer's one-pass float32 form does not. Reports the
    refined latents and each method's loss error against the float64 closed form."""
    case = TopKCase(NUM_ROWS, NUM_LATENTS, K, DIM, rounds=0, gemm_rounds=0, peer_rounds=0, pairwise=False)
    values, indices, emb = heavy_tailed_topk(case, torch.Generator(device=DEVICE).manual_seed(0))
    values.requires_grad_()
    batch = {"values": values, "indices": indices, "emb": emb}
    loss = loss_fn(method, "topk", batch)

    def step():
        values.grad = None
        loss().backward()

    dense = torch.zeros(NUM_ROWS, NUM_LATENTS, device=DEVICE).scatter(1, indices, values.detach())
    reference = published_monoloss(dense.double(), emb.double()).item()
    pair, unit_emb = validate_acts((values.detach(), indices), emb, NUM_LATENTS)
    refined = ill_conditioned_latents(stats_function("auto", DEVICE, True)(pair, unit_emb)).numel()
    extra_info = {"shape": {"N": NUM_ROWS, "M": NUM_LATENTS, "d": DIM, "k": K}, "dtype": "float32",
                  "device": device_name(DEVICE), "refined_latents": refined,
                  "max_abs_error": abs(loss().item() - reference)}
    if method.startswith(OURS_PREFIX):
        assert extra_info["max_abs_error"] <= LOSS_ATOL
    measure(step, device=DEVICE, group=f"monoloss-heavy-tailed-B{NUM_ROWS}-M{NUM_LATENTS}-k{K}-d{DIM}-float32-fwd+bwd",
            method=method, rounds=rounds, gemm_flops=4 * NUM_ROWS * NUM_LATENTS * DIM, extra_info=extra_info)


SAE_K = 64
SAE_MONO_COEF = 3e-4


@pytest.mark.parametrize("mono_coef", [0.0, SAE_MONO_COEF], ids=["without-monoloss", "with-monoloss"])
def test_batchtopk_sae_step(batch, mono_coef, measure, rounds):
    """One BatchTopK SAE training step (B=4096, d=768, M=8192, k=64): forward, backward
    and an Adam update, with and without the MonoLoss term (the paper's coefficient).
    The overhead is the ratio of the two medians (reported in the table as / GEMM is
    not meaningful here; compare the two rows)."""
    from monoloss_kernels.sae import BatchTopKSAE

    torch.manual_seed(0)
    sae = BatchTopKSAE(DIM, NUM_LATENTS, SAE_K, mono_coef=mono_coef).to(DEVICE)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = batch["emb"]

    def step():
        out = sae(x)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    method = "sae-step-with-monoloss" if mono_coef else "sae-step"
    measure(step, device=DEVICE, group=f"batchtopk-sae-step-B{NUM_ROWS}-M{NUM_LATENTS}-k{SAE_K}-d{DIM}",
            method=method, rounds=rounds, gemm_flops=6 * NUM_ROWS * NUM_LATENTS * DIM,
            extra_info={"mono_coef": mono_coef, "device": device_name(DEVICE)})
