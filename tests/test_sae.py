"""The SAE modules: each variant trains with MonoLoss added, and the MonoLoss term is
the one `monoloss` computes on its latents (sparse form for TopK and BatchTopK)."""

import pytest
import torch

import monoloss_kernels as mk
from monoloss_kernels.sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE

D_IN, M, K, B = 24, 64, 4, 96

VARIANTS = {
    "topk": lambda **kw: TopKSAE(D_IN, M, K, **kw),
    "batchtopk": lambda **kw: BatchTopKSAE(D_IN, M, K, **kw),
    "jumprelu": lambda **kw: JumpReLUSAE(D_IN, M, initial_threshold=0.05, bandwidth=0.05, **kw),
    "relu": lambda **kw: ReLUSAE(D_IN, M, l1_coef=1e-3, **kw),
}


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, D_IN, generator=gen) * 3
    labels = torch.randint(0, 6, (B,), generator=gen)
    return centers[labels] + torch.randn(B, D_IN, generator=gen)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mono_term_is_monoloss_of_the_latents(variant):
    torch.manual_seed(0)
    sae = VARIANTS[variant](mono_coef=0.1)
    x = batch()
    out = sae(x)
    assert out.acts.shape == (B, M) and out.reconstruction.shape == (B, D_IN)
    expected = mk.monoloss(out.acts.detach(), x)
    torch.testing.assert_close(out.mono_loss.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, out.recon_loss + out.sparsity_loss + 0.1 * out.mono_loss)
    if variant in ("topk", "batchtopk"):
        assert (out.acts > 0).sum().item() <= K * B


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_steps_reduce_the_loss(variant):
    torch.manual_seed(1)
    sae = VARIANTS[variant](mono_coef=0.05)
    x = batch(1)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        out = sae(x)
        optimizer.zero_grad()
        out.loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in sae.parameters())
        optimizer.step()
        first = out.loss.item() if first is None else first
    assert out.loss.item() < first
    assert sae.W_enc.grad.abs().sum() > 0


def test_mono_coef_zero_skips_the_term():
    sae = TopKSAE(D_IN, M, K)
    out = sae(batch())
    assert out.mono_loss.item() == 0.0


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"x must be \(B, d_in=24\), got shape \(5, 7\)"):
        TopKSAE(D_IN, M, K)(torch.rand(5, 7))


@pytest.mark.parametrize("variant", VARIANTS)
def test_latents_are_the_forward_latents_in_monoloss_form(variant):
    """`latents(x)` densifies to the forward's acts, and scores as they do."""
    torch.manual_seed(2)
    sae = VARIANTS[variant]()
    x = batch(2)
    dense = sae(x).acts.detach()
    latents = sae.latents(x)
    torch.testing.assert_close(mk.monoscore(latents, x, num_latents=M), mk.monoscore(dense, x),
                               atol=2e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("make, error, message", [
    (lambda: TopKSAE(D_IN, M, M + 1), ValueError, r"k must satisfy 1 <= k <= num_latents = 64, got 65"),
    (lambda: TopKSAE(D_IN, M, -1), ValueError, r"k must satisfy 1 <= k <= num_latents = 64, got -1"),
    (lambda: TopKSAE(D_IN, M, 2.5), TypeError, r"k must be an int, got 2.5"),
    (lambda: BatchTopKSAE(D_IN, M, M + 1), ValueError, r"k must satisfy 1 <= k <= num_latents = 64, got 65"),
    (lambda: TopKSAE(D_IN, M, K, mono_coef="a"), TypeError, r"mono_coef must be a real number, got 'a'"),
    (lambda: TopKSAE(D_IN, M, K, mono_coef=float("nan")), ValueError, r"mono_coef must be a finite number >= 0"),
    (lambda: TopKSAE(D_IN, M, K, backend="bogus"), ValueError, r"backend must be one of .*, got 'bogus'"),
    (lambda: ReLUSAE(0, M), ValueError, r"d_in must satisfy 1 <= d_in, got 0"),
    (lambda: ReLUSAE(D_IN, M, l1_coef=-1.0), ValueError, r"l1_coef must be a finite number >= 0, got -1.0"),
    (lambda: JumpReLUSAE(D_IN, M, bandwidth=0.0), ValueError, r"bandwidth must be a finite number > 0, got 0.0"),
    (lambda: JumpReLUSAE(D_IN, M, initial_threshold=-1.0), ValueError, r"initial_threshold must be a finite number > 0"),
], ids=["topk-k-over-M", "topk-k-negative", "topk-k-float", "batchtopk-k-over-M", "mono_coef-str", "mono_coef-nan",
        "backend", "d_in", "l1_coef", "bandwidth", "initial_threshold"])
def test_bad_arguments_raise_at_construction(make, error, message):
    """Each argument is checked in __init__, by name (k > M failed at the first forward
    with torch's 'selected index k out of range'; backend='bogus' was accepted)."""
    with pytest.raises(error, match=message):
        make()


@pytest.mark.parametrize("variant", VARIANTS)
def test_x_of_another_dtype_raises(variant):
    """x must be in the parameters' dtype (float64 x failed inside the matmul with a
    dtype mismatch); a float64 SAE takes float64 x."""
    sae = VARIANTS[variant](mono_coef=0.1)
    x = batch().double()
    with pytest.raises(TypeError, match=r"x must be torch.float32, the dtype of the SAE's parameters, got torch.float64"):
        sae(x)
    out = sae.double()(x)
    assert out.acts.dtype == torch.float64 and torch.isfinite(out.loss)


def test_jumprelu_gradients_are_the_straight_through_estimator():
    """JumpReLU's estimator (Rajamanoharan et al. 2024), with the sigmoid's density
    K(u) = σ(u)(1 - σ(u)) as kernel: ∂Σacts/∂pre = H(pre - θ) and ∂L0/∂pre = 0 (the
    surrogate reached pre: [117, 118, 1] and a nonzero L0 gradient at these values);
    ∂acts/∂θ = -θ K(u)/ε and ∂L0/∂θ = -l0_coef K(u)/ε, u = (pre - θ)/ε, computed by hand."""
    import math

    theta, eps, l0_coef = 0.5, 1e-3, 2.0
    sae = JumpReLUSAE(4, 3, bandwidth=eps, initial_threshold=theta, l0_coef=l0_coef)
    pre = torch.tensor([[0.4995, 0.5005, 2.0]], dtype=torch.float64, requires_grad=True)  # below, above, far above θ
    sae.double()
    acts, _, l0 = sae.activate(pre)
    assert acts.tolist() == [[0.0, 0.5005, 2.0]]
    grad_pre, grad_log_theta = torch.autograd.grad(acts.sum(), (pre, sae.log_threshold), retain_graph=True)
    l0_grad_pre, l0_grad_log_theta = torch.autograd.grad(l0, (pre, sae.log_threshold), allow_unused=True)

    def kernel(p, t):
        sig = 1 / (1 + math.exp(-(p - t) / eps))
        return sig * (1 - sig)

    # θ = exp(log θ) (0.5 to float32 rounding of its log): ∂/∂log θ = θ ∂/∂θ
    pairs = list(zip(pre[0].tolist(), sae.log_threshold.detach().exp().tolist()))
    expected_acts_log_theta = [t * -t * kernel(p, t) / eps for p, t in pairs]
    expected_l0_log_theta = [t * -l0_coef * kernel(p, t) / eps for p, t in pairs]
    torch.testing.assert_close(grad_pre, torch.tensor([[0.0, 1.0, 1.0]], dtype=torch.float64), rtol=0, atol=1e-12)
    assert l0_grad_pre is None or l0_grad_pre.abs().max() == 0
    torch.testing.assert_close(grad_log_theta, torch.tensor(expected_acts_log_theta, dtype=torch.float64))
    torch.testing.assert_close(l0_grad_log_theta, torch.tensor(expected_l0_log_theta, dtype=torch.float64))
