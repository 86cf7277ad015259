"""The C++ backward ops (monoscore_stats_backward, monoscore_stats_csr_backward) on every
device they are built for, called directly, against the formula of _autograd.py written
out in float64: odd shapes, offsets, zero-norm rows, ties at the min and max, strided
acts, every float dtype of acts. (tests/test_loss.py checks them through monoloss.)"""

import pytest
import torch

from monoloss_kernels import _autograd, _extension
from monoloss_kernels.stats import MonoScoreStats

from .helpers import DEVICES, float64_acts_grad, make_acts, make_emb, make_topk, seed_of

# Each entry within TOL[dtype] * (the largest entry of the reference gradient). float32:
# the kernels' float32 arithmetic (measured on the CPU kernel: <= 6e-7 on these cases);
# half/bfloat16: the output is rounded to acts' dtype, half an ulp of the largest entry
# (2^-11, 2^-8 of an entry), plus the float32 part.
TOL = {torch.float32: 2e-6, torch.float64: 2e-6, torch.float16: 6e-4, torch.bfloat16: 4e-3}

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (N, M, d): odd and small, one row (every entry is its latent's min and max), and one
# spanning several blocks of the CUDA kernels along rows and latents.
SHAPES = [(83, 29, 13), (1, 5, 3), (1025, 300, 97)]
DENSE_CASES = ["relu", "offset", "ties"]
CSR_CASES = ["relu", "negative", "always_on_offset", "empty_rows", "variable_rows"]


def kernel_devices(op: str) -> list[str]:
    sparse = op == _extension.CSR_BACKWARD_OP
    return [d for d in DEVICES if _autograd._acts_grad_op("cpp", torch.device(d), sparse) is not None]


def dense_acts(case: str, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    if case == "ties":  # ReLU zeros tie at the min; the max repeated in one latent
        acts = make_acts("relu", n, m, gen)
        acts[n // 2, 0] = acts[0, 0] = acts[:, 0].max() + 1
        return acts
    return make_acts(case, n, m, gen)


def incoming_grads(n_latents: int, dim: int, gen: torch.Generator):
    """Random ∂L/∂cross (float32), ∂L/∂moments (float64), ∂L/∂act_range (float32), as
    autograd passes them."""
    grad_cross = torch.randn(dim, n_latents, generator=gen)
    grad_moments = torch.randn(4, n_latents, generator=gen, dtype=torch.float64) * 0.1
    grad_range = torch.randn(2, n_latents, generator=gen)
    return grad_cross, grad_moments, grad_range


def check(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == dtype and got.shape == expected.shape and torch.isfinite(got).all()
    scale = expected.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(got.cpu().double(), expected, rtol=0, atol=TOL[dtype] * scale)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", DENSE_CASES)
@pytest.mark.parametrize("device", kernel_devices(_extension.BACKWARD_OP))
def test_dense_backward_op(device, case, shape, dtype, layout):
    n, m, d = shape
    gen = torch.Generator().manual_seed(seed_of(case, shape))
    # Values float32 holds: the kernels compute in float32 (as the statistics are), so
    # float64 acts are read rounded to float32, by design.
    acts = dense_acts(case, n, m, gen).float().to(dtype)
    emb = make_emb("zero_dup" if n > 3 else "plain", n, d, gen).float()
    shift = acts[0].float()  # as the CUDA forward: any shift gives the same scores
    act_range = torch.stack([acts.amin(0), acts.amax(0)]).float()
    grads = incoming_grads(m, d, gen)
    expected = float64_acts_grad(acts, emb, shift, act_range, *grads)

    dev_acts = acts.to(device)
    if layout == "transposed":  # column-major acts: the kernels read them through strides
        dev_acts = dev_acts.t().contiguous().t()
    inputs = [dev_acts, emb.to(device), shift.to(device), act_range.to(device), *(g.to(device) for g in grads)]
    copies = [t.clone() for t in inputs]
    got = torch.ops.monoloss_kernels.monoscore_stats_backward(*inputs)
    check(got, expected, dtype)
    for t, copy in zip(inputs, copies):
        assert torch.equal(t, copy)


def csr_inputs(case: str, n: int, m: int, gen: torch.Generator):
    """(crow, cols, values) in float64 and the dense (n, m) matrix they stand for."""
    if case == "variable_rows":  # rows of any length, some empty, as a CSR tensor from dense latents
        dense = torch.relu(torch.randn(n, m, generator=gen, dtype=torch.float64) - 0.8)
        dense[1::3] = 0.0
        dense[0, m // 2] = 1.5  # at least one stored entry
        csr = dense.to_sparse_csr()
        return csr.crow_indices(), csr.col_indices(), csr.values(), dense
    k = min(6, m)
    values, indices = make_topk(case, n, m, k, gen)
    dense = torch.zeros(n, m, dtype=torch.float64).scatter_(1, indices, values)
    return torch.arange(n + 1) * k, indices.flatten(), values.flatten(), dense


# always_on_offset stores two always-on latents next to k - 2 others: it needs M >= 8.
CSR_CASE_SHAPES = [(case, shape) for case in CSR_CASES for shape in SHAPES
                   if case != "always_on_offset" or shape[1] >= 8]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case, shape", CSR_CASE_SHAPES, ids=str)
@pytest.mark.parametrize("device", kernel_devices(_extension.CSR_BACKWARD_OP))
def test_csr_backward_op(device, case, shape, dtype):
    """The gradient of each stored value equals the dense gradient at its position, the
    implicit zeros counting among the ties at a latent's min or max."""
    n, m, d = shape
    gen = torch.Generator().manual_seed(seed_of(case, shape))
    crow, cols, values, dense = csr_inputs(case, n, m, gen)
    values = values.float().to(dtype)  # values float32 holds, as for dense acts
    dense = dense.float().to(dtype)  # the same rounding as the stored values
    emb = make_emb("zero_dup" if n > 3 else "plain", n, d, gen).float()
    stored = torch.bincount(cols, minlength=m)
    # As the forward: 0 where a latent has an implicit zero, else its minimum.
    shift = torch.where(stored < n, 0.0, dense.amin(0).float())
    act_range = torch.stack([dense.amin(0), dense.amax(0)]).float()
    grads = incoming_grads(m, d, gen)
    rows = torch.repeat_interleave(torch.arange(n), crow.diff())
    expected = float64_acts_grad(dense, emb, shift, act_range, *grads)[rows, cols]

    inputs = [crow.to(device), cols.to(device), values.to(device), emb.to(device), m, shift.to(device),
              act_range.to(device), *(g.to(device) for g in grads)]
    copies = [t.clone() if isinstance(t, torch.Tensor) else t for t in inputs]
    got = torch.ops.monoloss_kernels.monoscore_stats_csr_backward(*inputs)
    check(got, expected, dtype)
    for t, copy in zip(inputs, copies):
        assert not isinstance(t, torch.Tensor) or torch.equal(t, copy)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dense_backward_ignores_tf32():
    """TF32 switched on for the user's matmuls does not reach the backward's GEMM."""
    if _autograd._acts_grad_op("cpp", torch.device("cuda"), sparse=False) is None:
        pytest.skip("no CUDA backward kernel for this GPU")
    gen = torch.Generator().manual_seed(3)
    n, m, d = 517, 301, 768  # a long reduction, where TF32's 1e-3 rounding shows
    acts = make_acts("relu", n, m, gen).float()
    emb = make_emb("plain", n, d, gen).float()
    shift, act_range = acts[0].clone(), torch.stack([acts.amin(0), acts.amax(0)])
    grads = incoming_grads(m, d, gen)
    expected = float64_acts_grad(acts, emb, shift, act_range, *grads)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for float32 matmuls
    try:
        # That TF32 is on: a plain float32 matmul of the same sizes loses float32 accuracy.
        plain = (emb.cuda() @ grads[0].cuda()).cpu().double()
        exact = emb.double() @ grads[0].double()
        tf32_on = (plain - exact).abs().max() > 1e-5 * exact.abs().max()
        got = torch.ops.monoloss_kernels.monoscore_stats_backward(
            *(t.cuda() for t in (acts, emb, shift, act_range, *grads))
        )
    finally:
        torch.set_float32_matmul_precision(before)
    check(got, expected, torch.float32)
    if not tf32_on:
        pytest.skip("set_float32_matmul_precision('high') did not make cuBLAS use TF32 here")


def test_empty_inputs():
    """No latents (dense) and no stored entries (CSR) give empty gradients."""
    for device in kernel_devices(_extension.BACKWARD_OP):
        acts, emb = torch.rand(4, 0, device=device), torch.rand(4, 3, device=device)
        zeros = [torch.zeros(s, device=device) for s in ((0,), (2, 0), (3, 0), (4, 0), (2, 0))]
        got = torch.ops.monoloss_kernels.monoscore_stats_backward(acts, emb, *zeros)
        assert got.shape == (4, 0)
    for device in kernel_devices(_extension.CSR_BACKWARD_OP):
        crow = torch.zeros(5, dtype=torch.long, device=device)
        cols = torch.zeros(0, dtype=torch.long, device=device)
        values, emb = torch.zeros(0, device=device), torch.rand(4, 3, device=device)
        grads = [torch.zeros(s, device=device) for s in ((7,), (2, 7), (3, 7), (4, 7), (2, 7))]
        got = torch.ops.monoloss_kernels.monoscore_stats_csr_backward(crow, cols, values, emb, 7, *grads)
        assert got.shape == (0,)


@pytest.mark.parametrize("device", kernel_devices(_extension.BACKWARD_OP))
def test_opcheck_backward_ops(device):
    gen = torch.Generator().manual_seed(5)
    acts = make_acts("negative", 37, 11, gen).float().to(device)
    emb = make_emb("zero_dup", 37, 7, gen).float().to(device)
    shift, act_range = acts[0].clone(), torch.stack([acts.amin(0), acts.amax(0)])
    grads = [g.to(device) for g in incoming_grads(11, 7, gen)]
    test_utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.monoloss_kernels.monoscore_stats_backward,
                          (acts, emb, shift, act_range, *grads), test_utils=test_utils)
    torch.library.opcheck(torch.ops.monoloss_kernels.monoscore_stats_backward,
                          (acts.bfloat16(), emb, shift, act_range, *grads), test_utils=test_utils)
    values, indices = make_topk("negative", 37, 11, 3, gen)
    crow = (torch.arange(38) * 3).to(device)
    args = (crow, indices.flatten().to(device), values.flatten().float().to(device), emb, 11, torch.zeros_like(shift),
            act_range, *grads)
    torch.library.opcheck(torch.ops.monoloss_kernels.monoscore_stats_csr_backward, args, test_utils=test_utils)


# The CPU CSR kernels walk the entries by blocks of 8192 rows (csrc/cpu/csr_tiles.h,
# kBlockRows): N spans three, with enough entries for a parallel sort.
CSR_KERNEL_ROWS = 16384 + 517


@pytest.mark.parametrize("device", kernel_devices(_extension.CSR_BACKWARD_OP))
@pytest.mark.parametrize("grad_layout", ["d_major", "latent_major"])
def test_csr_backward_kernel_matches_the_torch_formula(device, grad_layout):
    """Ragged rows (some empty) over two row blocks, ties at the min and max (with the
    implicit zeros), zero-norm embedding rows; the gradient of cross in either layout
    finalize may hand it over in."""
    gen = torch.Generator().manual_seed(67)
    n, m, d = CSR_KERNEL_ROWS, 41, 35
    mask = torch.rand(n, m, generator=gen) < 0.08
    mask[:, 7] = True  # stored in every row: shift = its min
    dense = torch.randn(n, m, generator=gen) * mask
    dense[:, 7] += 1000
    dense[5, 3], dense[9, 3] = -2.0, -2.0  # tied minimum
    mask[5, 3] = mask[9, 3] = True
    csr = (dense * mask).to_sparse_csr()
    crow, cols, values = csr.crow_indices(), csr.col_indices(), csr.values().float()
    emb = make_emb("zero_dup", n, d, gen).float()
    stats = MonoScoreStats(*torch.ops.monoloss_kernels.monoscore_stats_csr_torch(crow, cols, values, emb, m))
    grad_cross = torch.randn(d, m, generator=gen)
    if grad_layout == "latent_major":
        grad_cross = grad_cross.T.contiguous().T
    grad_moments = torch.randn(4, m, generator=gen, dtype=torch.float64)
    grad_range = torch.randn(2, m, generator=gen, dtype=torch.float64)
    args = [t.to(device) for t in (crow, cols, values, emb)]
    ours, _ = _autograd.csr_stats_grads(
        *args, m, stats.shift.to(device), stats.act_range.to(device), grad_cross.to(device), None,
        grad_range.to(device), grad_moments.to(device), values_grad=True, emb_grad=False, acts_grad_kernel="cpp",
    )
    expected, _ = _autograd.csr_stats_grads(
        crow, cols, values.double(), emb.double(), m, stats.shift.double(), stats.act_range, grad_cross.double(),
        None, grad_range, grad_moments, values_grad=True, emb_grad=False, acts_grad_kernel="torch",
    )
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours.cpu().double(), expected, rtol=0, atol=TOL[torch.float32] * scale)


def near_tie_inputs(gen: torch.Generator):
    """float64 acts with entries 1e-12 apart (equal in float32) at a latent's min and at
    another's max, dense and as a TopK pair with the same stored values."""
    acts = torch.rand(9, 3, generator=gen, dtype=torch.float64) + 1
    acts[0, 0], acts[1, 0] = 1.0, 1.0 + 1e-12  # the min of latent 0
    acts[2, 1], acts[3, 1] = 2.5, 2.5 - 1e-12  # the max of latent 1
    emb = make_emb("plain", 9, 4, gen).float()
    return acts, emb


@pytest.mark.parametrize("form", ["dense", "topk"])
def test_backends_agree_on_float64_near_ties(form):
    """Every backend shares a min's (max's) gradient among the entries equal to it in
    float32, as the statistics saw them: the gradient of the definition at acts rounded
    to float32. (The torch formula compared in float64 and gave all of it to the exact
    minimum: -0.29/0.17 where the C++ kernels gave -0.17/0.04.)"""
    from .helpers import BACKEND_DEVICES, densify
    from .test_loss import check_grad, reference_loss

    import monoloss_kernels as mk

    acts, emb = near_tie_inputs(torch.Generator().manual_seed(seed_of("near ties", form)))
    seen = acts.float().double().requires_grad_()  # what the kernels saw: two exact ties
    reference_loss(seen, emb).backward()
    indices = torch.arange(3).expand(9, 3)
    for backend, device in BACKEND_DEVICES:
        ours = acts.clone().to(device).requires_grad_()
        inputs = ours if form == "dense" else (ours, indices.to(device))
        mk.monoloss(inputs, emb.to(device), num_latents=3, backend=backend).backward()
        grad = ours.grad.cpu() if form == "dense" else densify(ours.grad.cpu(), indices, 3)
        check_grad(grad, seen.grad)
