"""Reference implementations: the O(N²) pairwise definition (ground truth for tests
and benchmarks) and the published two-pass linear algorithm (the peer we
benchmark against). Neither is used by `monoscore`."""

import torch
import torch.nn.functional as F
from torch import Tensor


def min_max_normalize(acts: Tensor) -> Tensor:
    """ã = (a - min) / (max - min) per latent (column), NaN for constant latents."""
    act_min = acts.amin(0, keepdim=True)
    act_max = acts.amax(0, keepdim=True)
    return (acts - act_min) / (act_max - act_min)


def cosine_matrix(emb: Tensor) -> Tensor:
    """s[n, m] = cos(emb[n], emb[m]), 0 where either row has zero norm."""
    norm = torch.linalg.vector_norm(emb, dim=1, keepdim=True)
    unit = torch.where(norm > 0, emb / torch.where(norm > 0, norm, 1), 0)
    return unit @ unit.T


@torch.no_grad()
def pairwise_monoscore(acts: Tensor, emb: Tensor, *, block_rows: int = 1024) -> Tensor:
    """MonoScore by its definition, summing over every pair n < m in float64.

    MS[k] = Σ_{n<m} ã[n,k] ã[m,k] s[n,m] / Σ_{n<m} ã[n,k] ã[m,k], NaN where
    the denominator is zero. O(N²·M) time, O(block_rows·N) extra memory.
    Returns (M,) float64.
    """
    acts = acts.double()
    emb = emb.double()
    num_rows, num_latents = acts.shape
    if num_rows < 2:
        return torch.full((num_latents,), float("nan"), dtype=torch.float64, device=acts.device)
    norm_acts = torch.nan_to_num(min_max_normalize(acts), nan=0.0)  # constant latents -> 0
    sims = cosine_matrix(emb)
    index = torch.arange(num_rows, device=acts.device)
    numerator = torch.zeros(num_latents, dtype=torch.float64, device=acts.device)
    denominator = torch.zeros_like(numerator)
    for n0 in range(0, num_rows, block_rows):
        rows = slice(n0, min(n0 + block_rows, num_rows))
        later = (index[None, :] > index[rows, None]).double()  # (B, N): pairs n < m
        weights_left = norm_acts[rows]  # (B, M): ã[n]
        numerator += (weights_left * ((sims[rows] * later) @ norm_acts)).sum(0)
        denominator += (weights_left * (later @ norm_acts)).sum(0)
    safe = torch.where(denominator > 0, denominator, 1.0)
    return torch.where(denominator > 0, numerator / safe, float("nan"))


def published_monoscore(acts: Tensor, emb: Tensor, eps: float = 1e-8) -> Tensor:
    """The published linear-time algorithm (MonoLoss paper code), with the
    denominator Σ_{n<m} ã_n ã_m of the corrected paper.

    Passes: min/max over acts, a normalised copy of acts, Σã and Σã² over that
    copy, then the product p^T ã with the unit embeddings p. Exact when no
    embedding row is zero (it subtracts Σã², not Σ‖p‖²ã²).
    """
    p = F.normalize(emb, p=2, dim=1, eps=eps)
    act_min = acts.min(dim=0, keepdim=True)[0]
    act_max = acts.max(dim=0, keepdim=True)[0]
    a = (acts - act_min) / (act_max - act_min + eps)
    cross = p.T @ a  # (d, M)
    sum_a = a.sum(dim=0)
    sum_a2 = (a * a).sum(dim=0)
    numerator = 0.5 * ((cross * cross).sum(dim=0) - sum_a2)
    denominator = 0.5 * (sum_a * sum_a - sum_a2)
    return numerator / denominator


@torch.no_grad()
def closed_form_monoscore(acts: Tensor, emb: Tensor) -> Tensor:
    """The linear closed form evaluated in float64, each latent's top sample n* (its
    first row at the max, ã = 1) taken out of the sums, V = Σ_{n≠n*} ã ê:

        MS = (ê*·V + ½(‖V‖² − Σ_{n≠n*} ‖ê‖²ã²)) / (S1' + ½(S1'² − Σ_{n≠n*} ã²)),  S1' = Σ_{n≠n*} ã.

    Without that, ½(‖Σ ã ê‖² − Σ‖ê‖²ã²) / ½((Σã)² − Σã²) loses eps64·κ, κ = (Σã)²/((Σã)² − Σã²),
    where one sample carries nearly all of a latent's mass (up to 4e-3 at κ = 5e10). Agrees
    with `pairwise_monoscore` to float64 rounding (tested) and runs in O(N·M·d), so it stands
    in for the pairwise sum at large N. Returns (M,) float64.
    """
    acts = acts.double()
    emb = emb.double()
    num_latents = acts.shape[1]
    if acts.shape[0] < 2:
        return torch.full((num_latents,), float("nan"), dtype=torch.float64, device=acts.device)
    norm_acts = torch.nan_to_num(min_max_normalize(acts), nan=0.0)  # constant latents -> 0
    latents = torch.arange(num_latents, device=acts.device)
    top = norm_acts.argmax(0)  # (M,) the first row at each latent's max
    top_weight = norm_acts[top, latents]  # 1, or 0 for a constant latent
    rest = norm_acts.index_put_((top, latents), torch.zeros_like(top_weight))  # (N, M): ã without n*
    norm = torch.linalg.vector_norm(emb, dim=1, keepdim=True)
    unit = torch.where(norm > 0, emb / torch.where(norm > 0, norm, 1), 0)
    unit_weight = (norm[:, 0] > 0).double()  # ‖ê_n‖²
    rest_cross = unit.T @ rest  # (d, M): V
    sum_rest = rest.sum(0)
    rest_sq = rest * rest
    numerator = (top_weight * (unit[top].T * rest_cross).sum(0)
                 + 0.5 * ((rest_cross * rest_cross).sum(0) - unit_weight @ rest_sq))
    denominator = top_weight * sum_rest + 0.5 * (sum_rest * sum_rest - rest_sq.sum(0))
    # Fewer than two rows above the min: every other ã is 0, and so is the denominator.
    defined = denominator > 0
    return torch.where(defined, numerator / torch.where(defined, denominator, 1.0), float("nan"))


def published_monoloss(acts: Tensor, emb: Tensor) -> Tensor:
    """MonoLoss as the published code forms it: 1 - mean of `published_monoscore` over
    the latents whose score is finite, differentiated by torch autograd (the peer of
    `monoloss` in the benchmarks)."""
    scores = published_monoscore(acts, emb)
    finite = scores.isfinite()
    return 1 - torch.where(finite, scores, 0.0).sum() / finite.sum().clamp(min=1)


def published_dataset_monoloss_backward(model_fn, loader, eps: float = 1e-8) -> float:
    """Full-dataset MonoLoss as the published code trains with it (its `sae/mono_loss.py`),
    the peer of `dataset_monoloss_backward`: five passes over `loader`, each calling
    `model_fn(batch) -> (acts, emb)` with dense acts. Accumulates the gradient of
    1 - mean MonoScore over all latents (scores of undefined latents count as 0) into
    the parameters' `.grad`; returns the loss.

    Forward: (1) per-latent min/max; (2) Σã, Σã², V = Σ p ãᵀ with p the unit rows.
    Backward, which cannot keep the forward's sums: (3) the same sums again; (4) per
    latent S1 = Σ ∂L/∂ã and S2 = Σ ∂L/∂ã·(a - min), and the tie counts at min and
    max; (5) each batch recomputed with autograd and back-propagated with
    ∂L/∂a = ∂L/∂ã / r plus, at tied extremes, the share of ∂L/∂min = -S1/r + S2/r²
    and ∂L/∂max = -S2/r² (r = max - min + eps), where
    ∂L/∂ã = g_W (p·V - ã) + g_Z (Σã - ã) for the score W/Z.
    """

    def batches():
        for batch in loader:
            acts, emb = model_fn(batch)
            yield acts, F.normalize(emb.float(), p=2, dim=1, eps=eps)

    with torch.no_grad():
        act_min = act_max = None
        for acts, _ in batches():  # (1)
            lo, hi = acts.amin(0), acts.amax(0)
            act_min = lo if act_min is None else torch.minimum(act_min, lo)
            act_max = hi if act_max is None else torch.maximum(act_max, hi)
        act_scale = act_max - act_min + eps

        def sums():
            sum_a = sum_a2 = cross = 0
            for acts, unit in batches():
                a = ((acts - act_min) / act_scale).float()
                sum_a, sum_a2, cross = sum_a + a.sum(0), sum_a2 + (a * a).sum(0), cross + unit.T @ a
            return sum_a, sum_a2, cross

        sum_a, sum_a2, cross = sums()  # (2): the forward's loss
        numerator = 0.5 * ((cross * cross).sum(0) - sum_a2)
        denominator = 0.5 * (sum_a * sum_a - sum_a2)
        defined = denominator > 1e-8
        scores = torch.where(defined, numerator / (denominator + 1e-12), 0.0)
        loss = 1 - scores.mean()

        sum_a, sum_a2, cross = sums()  # (3): the backward rebuilds them
        numerator = 0.5 * ((cross * cross).sum(0) - sum_a2)
        denominator = 0.5 * (sum_a * sum_a - sum_a2)
        grad_score = torch.full_like(numerator, -1 / numerator.shape[0])
        grad_num = torch.where(defined, grad_score / (denominator + 1e-12), 0.0)
        grad_den = torch.where(defined, -grad_score * numerator / (denominator**2 + 1e-12), 0.0)

        def grad_normalized(a, unit):  # ∂L/∂ã of a batch
            return grad_num * (unit @ cross - a) + grad_den * (sum_a - a)

        s1 = s2 = min_ties = max_ties = 0
        for acts, unit in batches():  # (4)
            a = ((acts - act_min) / act_scale).float()
            g = grad_normalized(a, unit)
            s1, s2 = s1 + g.sum(0), s2 + (g * (acts - act_min).float()).sum(0)
            min_ties = min_ties + (acts == act_min).sum(0)
            max_ties = max_ties + (acts == act_max).sum(0)
        grad_min = (-s1 / act_scale + s2 / act_scale**2) / min_ties.clamp(min=1)
        grad_max = (-s2 / act_scale**2) / max_ties.clamp(min=1)

    for batch in loader:  # (5)
        acts, emb = model_fn(batch)
        with torch.no_grad():
            unit = F.normalize(emb.float(), p=2, dim=1, eps=eps)
            a = ((acts - act_min) / act_scale).float()
            grad_acts = (grad_normalized(a, unit) / act_scale
                         + (acts == act_min) * grad_min + (acts == act_max) * grad_max)
        acts.backward(grad_acts.to(acts.dtype))
    return float(loss)
