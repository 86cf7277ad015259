"""Sparse autoencoders with MonoLoss built in: TopK, BatchTopK, JumpReLU and ReLU+L1.

    sae = TopKSAE(d_in=768, num_latents=8192, k=64, mono_coef=3e-4)
    out = sae(x)                 # x: (B, d_in) embeddings, e.g. CLIP features
    out.loss.backward()          # reconstruction + sparsity + mono_coef · MonoLoss

As in the MonoLoss paper, the MonoLoss term scores the latents against the SAE's own
input embeddings (pass `emb=` to score them against another similarity space). TopK and
BatchTopK hand their latents to `monoloss` in sparse form, so the term costs O(B·k·d).
"""

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ._dispatch import check_backend
from .loss import monoloss
from .stats import CsrActs


def _check_int(name: str, value, low: int, high: int | None = None, high_name: str = "") -> None:
    """value an int (not a bool) in [low, high]; the error names the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" <= {high_name} = {high}" if high_name else f" <= {high}"
        raise ValueError(f"{name} must satisfy {low} <= {name}{upper}, got {value}")


def _check_coef(name: str, value, positive: bool = False) -> None:
    """value a finite real number, >= 0 (> 0 with `positive`); the error names the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


class SAEOutput(NamedTuple):
    reconstruction: Tensor  # (B, d_in)
    acts: Tensor  # (B, M) dense latent activations
    loss: Tensor  # recon_loss + sparsity_loss + mono_coef · mono_loss
    recon_loss: Tensor  # mean squared error, summed over d_in
    sparsity_loss: Tensor  # the variant's sparsity penalty (0 for TopK and BatchTopK)
    mono_loss: Tensor  # MonoLoss of the latents (unweighted; 0 when mono_coef == 0)


class SparseAutoencoder(nn.Module):
    """x -> acts = activation(W_enc (x - b_dec) + b_enc) -> W_dec acts + b_dec.

    Subclasses define `activate(pre_acts) -> (dense acts, acts for monoloss, sparsity loss)`.
    The arguments are checked here (TypeError/ValueError naming each); `forward` takes x in
    the parameters' dtype (float32 unless the module was cast), and refuses others rather
    than casting them.
    """

    def __init__(self, d_in: int, num_latents: int, *, mono_coef: float = 0.0, backend: str = "auto"):
        super().__init__()
        _check_int("d_in", d_in, 1)
        _check_int("num_latents", num_latents, 1)
        _check_coef("mono_coef", mono_coef)
        check_backend(backend)
        self.d_in, self.num_latents = d_in, num_latents
        self.mono_coef, self.backend = mono_coef, backend
        self.W_enc = nn.Parameter(torch.empty(d_in, num_latents))
        nn.init.kaiming_uniform_(self.W_enc, a=5**0.5)
        self.W_dec = nn.Parameter(self.W_enc.detach().T.clone())  # tied at initialisation
        self.b_enc = nn.Parameter(torch.zeros(num_latents))
        self.b_dec = nn.Parameter(torch.zeros(d_in))

    def encode_pre(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre_acts: Tensor):
        raise NotImplementedError

    def latents(self, x: Tensor):
        """The latents of x (B, d_in) in the form `monoloss` reads cheapest: a TopK
        (values, indices) pair, `CsrActs` for BatchTopK, a dense (B, M) tensor otherwise."""
        return self.activate(self.encode_pre(x))[1]

    def forward(self, x: Tensor, emb: Tensor | None = None) -> SAEOutput:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a (B, d_in={self.d_in}) tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"x must be (B, d_in={self.d_in}), got shape {tuple(x.shape)}")
        if x.dtype != self.W_enc.dtype:
            raise TypeError(
                f"x must be {self.W_enc.dtype}, the dtype of the SAE's parameters, got {x.dtype}: "
                f"cast x (x.to({self.W_enc.dtype})) or the SAE (sae.to({x.dtype}))"
            )
        acts, mono_acts, sparsity_loss = self.activate(self.encode_pre(x))
        reconstruction = acts @ self.W_dec + self.b_dec
        recon_loss = (reconstruction - x).pow(2).sum(1).mean()
        mono_loss = torch.zeros((), device=x.device)
        if self.mono_coef:
            mono_loss = monoloss(mono_acts, x if emb is None else emb, num_latents=self.num_latents,
                                 backend=self.backend)
        loss = recon_loss + sparsity_loss + self.mono_coef * mono_loss
        return SAEOutput(reconstruction, acts, loss, recon_loss, sparsity_loss, mono_loss)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, num_latents={self.num_latents}, mono_coef={self.mono_coef}"


class TopKSAE(SparseAutoencoder):
    """Keeps the k largest pre-activations of each sample (after ReLU); 1 <= k <= num_latents."""

    def __init__(self, d_in: int, num_latents: int, k: int, **kwargs):
        super().__init__(d_in, num_latents, **kwargs)
        _check_int("k", k, 1, num_latents, "num_latents")
        self.k = k

    def activate(self, pre_acts):
        top = torch.topk(pre_acts, self.k, dim=1)
        values = torch.relu(top.values)
        acts = torch.zeros_like(pre_acts).scatter(1, top.indices, values)
        return acts, (values, top.indices), torch.zeros((), device=pre_acts.device)


class BatchTopKSAE(SparseAutoencoder):
    """Keeps the k·B largest pre-activations of the whole batch (after ReLU): k per
    sample on average, more for samples that need them; 1 <= k <= num_latents."""

    def __init__(self, d_in: int, num_latents: int, k: int, **kwargs):
        super().__init__(d_in, num_latents, **kwargs)
        _check_int("k", k, 1, num_latents, "num_latents")
        self.k = k

    def activate(self, pre_acts):
        batch, num_latents = pre_acts.shape
        top = torch.topk(torch.relu(pre_acts).flatten(), self.k * batch)
        flat_index = top.indices.sort().values  # row-major: rows ascending, as CSR wants
        values = torch.relu(pre_acts.flatten()[flat_index])
        rows, cols = flat_index // num_latents, flat_index % num_latents
        acts = torch.zeros_like(pre_acts).index_put((rows, cols), values)
        crow = torch.searchsorted(rows, torch.arange(batch + 1, device=pre_acts.device))
        return acts, CsrActs(crow, cols, values, num_latents), torch.zeros((), device=pre_acts.device)


class JumpReLUSAE(SparseAutoencoder):
    """acts = pre · H(pre - θ) with a learned per-latent threshold θ and an L0 penalty
    Σ H(pre - θ), trained as JumpReLU (Rajamanoharan et al. 2024): ∂acts/∂pre = H(pre - θ)
    and the L0 term sends nothing to pre; only θ gets pseudo-derivatives,
    ∂acts/∂θ = -θ·K((pre - θ)/ε)/ε and ∂H/∂θ = -K((pre - θ)/ε)/ε, with ε = `bandwidth`
    and K the density of the logistic sigmoid (the paper's rectangle kernel, smoothed).
    The forward uses the exact step."""

    def __init__(self, d_in: int, num_latents: int, *, l0_coef: float = 1e-3, bandwidth: float = 1e-3,
                 initial_threshold: float = 1e-3, **kwargs):
        super().__init__(d_in, num_latents, **kwargs)
        _check_coef("l0_coef", l0_coef)
        _check_coef("bandwidth", bandwidth, positive=True)
        _check_coef("initial_threshold", initial_threshold, positive=True)  # its log is the parameter
        self.l0_coef, self.bandwidth = l0_coef, bandwidth
        self.log_threshold = nn.Parameter(torch.full((num_latents,), math.log(initial_threshold)))

    def activate(self, pre_acts):
        threshold = self.log_threshold.exp()
        step = (pre_acts > threshold).to(pre_acts.dtype)
        # pre detached: the surrogate's slope (up to 1/ε² at the threshold) must reach θ
        # only; through pre it would add pre·K/ε to the straight-through H(pre - θ).
        surrogate = torch.sigmoid((pre_acts.detach() - threshold) / self.bandwidth)
        jump = surrogate - surrogate.detach()  # 0; ∂/∂θ = -K((pre - θ)/ε)/ε
        acts = pre_acts * step + threshold.detach() * jump  # the jump at θ is of height θ
        return acts, acts, self.l0_coef * (step + jump).sum(1).mean()


class ReLUSAE(SparseAutoencoder):
    """acts = ReLU(pre) with an L1 penalty weighted by the decoder row norms."""

    def __init__(self, d_in: int, num_latents: int, *, l1_coef: float = 5.0, **kwargs):
        super().__init__(d_in, num_latents, **kwargs)
        _check_coef("l1_coef", l1_coef)
        self.l1_coef = l1_coef

    def activate(self, pre_acts):
        acts = torch.relu(pre_acts)
        penalty = (acts * self.W_dec.norm(dim=1)).sum(1).mean()
        return acts, acts, self.l1_coef * penalty
