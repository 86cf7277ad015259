"""Shared test helpers: the (backend, device) pairs to test, and random inputs,
including the adversarial cases every backend must get right. Never zeros:
every case draws fresh random values from the given generator."""

import socket
import zlib

import torch

import monoloss_kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# (backend, device) pairs this machine can run: every backend on every device it supports.
# (tests/conftest.py has set TRITON_INTERPRET=1 on machines without a GPU.)
BACKEND_DEVICES = [
    (backend, device)
    for device in DEVICES
    for backend in monoloss_kernels.available_backends(torch.device(device))
]


def seed_of(*parts) -> int:
    """A seed named by its test case: the same in every process (unlike hash() of a str,
    which Python randomises per process), so a failure reproduces."""
    return zlib.crc32(repr(parts).encode())


def backend_id(pair):
    return f"{pair[0]}-{pair[1]}"


def make_acts(case: str, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """(n, m) float64 activations of the named kind."""
    x = torch.randn(n, m, generator=gen, dtype=torch.float64)
    if case == "relu":  # ReLU-sparse, as SAE latents
        return torch.relu(x)
    if case == "negative":  # signed activations (JumpReLU pre-acts, raw neurons)
        return x * 3 - 1
    if case == "offset":  # values far from 0: cancellation in the shift by min
        return 1000 + x
    if case == "mixed_offset":  # far-from-0 latents next to ReLU ones
        acts = torch.relu(x)
        acts[:, ::3] = 1000 + x[:, ::3]
        return acts
    if case == "dead_constant":  # dead, constant and single-firing latents next to live ones
        acts = torch.relu(x)
        acts[:, 0] = 0.0  # dead
        if m > 1:
            acts[:, 1] = 2.5  # constant
        if m > 2:
            acts[:, 2] = 0.0  # exactly one sample fires: denominator 0
            acts[n // 2, 2] = 1.7
        if m > 3:
            acts[:, 3] = 0.0  # exactly two samples fire: one pair
            acts[1, 3], acts[n - 1, 3] = 0.4, 2.0
        return acts
    if case == "dominant":  # one sample carries nearly all of a latent's mass
        return dominant_latents(x, gen)
    raise ValueError(case)


def dominant_latents(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, m) activations in which each latent has one top sample and the rest of its
    mass (after min-max normalisation) is 10^0.5 ... 10^-7 across the latents: the
    closed form's condition number (Σã)²/((Σã)² - Σã²) runs from ~1.1 to ~10^7, on both
    sides of the recomputation threshold (refine.py).
    Three kinds by column: ReLU-sparse rest, a latent at 1000 + its pattern (no zero,
    min far from 0), and a rest of small negative values beside exact zeros."""
    n, m = x.shape
    rest_mass = 10.0 ** -torch.linspace(-0.5, 7, m, dtype=torch.float64)  # (m,)
    rest = torch.relu(x)
    rest = rest / rest.sum(0).clamp(min=1e-300) * rest_mass
    top = torch.randint(0, n, (m,), generator=gen)
    acts = rest.clone()
    acts[:, 1::3] += 1000  # min = 1000: no implicit zero, all far from 0
    acts[:, 2::3] = -rest[:, 2::3] / n  # min < 0, zeros at ã = -min / range
    acts[top, torch.arange(m)] = acts.max(0).values + 1
    return acts


def make_emb(case: str, n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """(n, d) float64 embeddings; "zero_dup" adds zero-norm and duplicated rows."""
    emb = torch.randn(n, d, generator=gen, dtype=torch.float64)
    # A shared direction, as in CLIP features, makes cosines (and scores) large.
    emb += 0.7 * torch.randn(1, d, generator=gen, dtype=torch.float64)
    if case == "zero_dup":
        emb[::5] = 0.0
        emb[1::7] = emb[3]
    return emb


SPARSE_CASES = ["relu", "negative", "always_on_offset", "empty_rows", "dominant"]


def make_topk(case: str, n: int, m: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A (values, indices) pair of shape (n, k), float64 values, distinct indices per row.

    "relu": positive values; "negative": signed values (implicit zeros sit inside
    the range); "always_on_offset": latents 0 and 1 are stored in every row with
    values 1000 + noise, so their minimum is far from 0; "empty_rows": as relu
    with explicit zeros in some rows (still stored entries).
    """
    indices = torch.rand(n, m, generator=gen).argsort(dim=1)[:, :k]
    values = torch.rand(n, k, generator=gen, dtype=torch.float64) + 0.05
    if case == "negative":
        values = torch.randn(n, k, generator=gen, dtype=torch.float64) * 3 - 1
    elif case == "always_on_offset":
        rest = 2 + torch.rand(n, m - 2, generator=gen).argsort(dim=1)[:, : k - 2]
        indices = torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.ones(n, 1, dtype=torch.long), rest], dim=1)
        values[:, :2] = 1000 + torch.randn(n, 2, generator=gen, dtype=torch.float64)
    elif case == "empty_rows":
        values[::4] = 0.0
    elif case == "dominant":
        latent_scale = 10.0 ** -torch.linspace(-0.5, 7, m, dtype=torch.float64) * m / (n * k)  # (m,)
        values = values * latent_scale[indices]
        values = torch.where(indices % 3 == 2, -values / n, values)
        first = torch.full((m,), n * k).scatter_reduce_(0, indices.flatten(), torch.arange(n * k), "amin")
        stored = first < n * k
        values.view(-1)[first[stored]] = 1.0
    elif case != "relu":
        raise ValueError(case)
    return values, indices


def densify(values: torch.Tensor, indices: torch.Tensor, m: int) -> torch.Tensor:
    """The (n, m) dense matrix of a (values, indices) pair; entries not stored are 0."""
    return torch.zeros(values.shape[0], m, dtype=values.dtype, device=values.device).scatter_(1, indices, values)


def sparse_form(form: str, values: torch.Tensor, indices: torch.Tensor, m: int):
    """The same activations as "topk" (a plain tuple), "coo" or "csr"."""
    if form == "topk":
        return values, indices
    dense = densify(values, indices, m)
    return dense.to_sparse() if form == "coo" else dense.to_sparse_csr()


def free_port() -> int:
    """A free TCP port on localhost, for a torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def float64_acts_grad(acts, emb, shift, act_range, grad_cross, grad_moments, grad_range) -> torch.Tensor:
    """∂L/∂acts (N, M) in float64 by the formula of monoloss_kernels/_autograd.py, the
    reference for every backward kernel. Ties are the entries equal to act_range as
    float32, the precision the statistics hold it in (as every kernel compares)."""
    a, e = acts.double(), emb.double()
    norm = e.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, e / torch.where(norm > 0, norm, 1.0), 0.0)
    zero_row = (norm == 0).double()
    b = a - shift.double()
    g = grad_moments.double()
    grad = unit @ grad_cross.double() + g[0] + 2 * b * g[1] + zero_row * (g[2] + 2 * b * g[3])
    for extreme, g_extreme in zip(act_range.float(), grad_range.double()):
        tied = (acts.float() == extreme).double()
        grad += tied * g_extreme / tied.sum(0).clamp(min=1)
    return grad
