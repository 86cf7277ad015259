"""Full-dataset MonoLoss, one training step's worth of it: our two streaming passes
(`dataset_monoloss_backward`) against the published five-pass method
(`reference.published_dataset_monoloss_backward`, the paper's sae/mono_loss.py), on
the same loader of SAE inputs through the same ReLU SAE encoder, and the bare cost of
one pass of the encoder over the loader (forward only) for scale.

    pytest benchmarks/test_bench_dataset_loss.py --benchmark-only

Before timing, the two methods' gradients are checked against each other once (every
latent fires, so the published mean over all latents equals ours over defined ones).
"""

import pytest
import torch

import monoloss_kernels
from monoloss_kernels.reference import published_dataset_monoloss_backward

from .conftest import PEER, device_name
from .test_bench_monoscore import DEVICE

# (N, batch rows, d = SAE input width, M latents); rounds per method.
CPU_CASE, CPU_ROUNDS = (16384, 2048, 768, 4096), 2
CUDA_CASE, CUDA_ROUNDS = (262144, 8192, 768, 16384), 5
NUM_ROWS, BATCH_ROWS, DIM, NUM_LATENTS = CUDA_CASE if DEVICE.type == "cuda" else CPU_CASE
ROUNDS = CUDA_ROUNDS if DEVICE.type == "cuda" else CPU_ROUNDS
GROUP = f"dataset-monoloss-N{NUM_ROWS}-B{BATCH_ROWS}-M{NUM_LATENTS}-d{DIM}-float32"

OURS = "ours-two-pass"
ENCODER_PASS = "encoder-pass"
# Largest |ours - peer| of the parameter gradient, relative to its largest entry: both
# compute in float32 over the same batches.
GRAD_RTOL_OF_MAX = 1e-3


@pytest.fixture(scope="module")
def setup():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    inputs = torch.randn(NUM_ROWS, DIM, generator=gen, device=DEVICE)
    inputs += 0.7 * torch.randn(1, DIM, generator=gen, device=DEVICE)  # a shared direction, as in CLIP features
    loader = list(inputs.split(BATCH_ROWS))
    encoder = torch.nn.Linear(DIM, NUM_LATENTS, device=DEVICE)
    with torch.no_grad():
        encoder.weight.normal_(generator=gen).mul_(DIM**-0.5)

    def model_fn(x):  # the SAE's latents, and its inputs as the similarity space
        return torch.relu(encoder(x)), x

    return encoder, loader, model_fn


def method_callable(method, encoder, loader, model_fn):
    def step(backward_fn):
        def run():
            encoder.zero_grad(set_to_none=True)
            return backward_fn()
        return run

    if method == OURS:
        return step(lambda: monoloss_kernels.dataset_monoloss_backward(model_fn, loader, num_latents=NUM_LATENTS,
                                                                      progress=False))
    if method == PEER:
        return step(lambda: published_dataset_monoloss_backward(model_fn, loader))
    if method == ENCODER_PASS:
        def encoder_pass():
            with torch.no_grad():
                for x in loader:
                    encoder(x)
        return encoder_pass
    raise ValueError(method)


def test_methods_agree(setup):
    encoder, loader, model_fn = setup
    losses, grads = [], []
    for method in (OURS, PEER):
        losses.append(method_callable(method, encoder, loader, model_fn)())
        grads.append(encoder.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    scale = grads[1].abs().max().item()
    assert scale > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=GRAD_RTOL_OF_MAX * scale)


@pytest.mark.parametrize("method", [OURS, PEER, ENCODER_PASS])
def test_dataset_monoloss_speed(setup, method, measure):
    encoder, loader, model_fn = setup
    measure(
        method_callable(method, encoder, loader, model_fn),
        device=DEVICE,
        group=GROUP,
        method=method,
        rounds=ROUNDS,
        gemm_flops=2 * NUM_ROWS * NUM_LATENTS * DIM,
        extra_info={
            "shape": {"N": NUM_ROWS, "batch_rows": BATCH_ROWS, "M": NUM_LATENTS, "d": DIM},
            "dtype": "float32",
            "device": device_name(DEVICE),
            "passes_over_loader": {OURS: 2, PEER: 5, ENCODER_PASS: 1}[method],
        },
    )
