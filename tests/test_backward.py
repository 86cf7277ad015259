"""The fused backward kernels of the statistics ops (∂L/∂acts, ∂L/∂values), Triton first:
against the formula of monoloss_kernels/_autograd.py evaluated in float64, against the
torch formula and the C++ kernel, and through autograd against the float64 closed form;
dense, TopK and ragged CSR; ties at the min and max, zero-norm embedding rows, dead and
constant latents, offsets; opcheck; the routing of each op's backward."""

import os

import pytest
import torch

import monoloss_kernels  # noqa: F401  (registers the ops)
from monoloss_kernels import _autograd
from monoloss_kernels._dispatch import triton_runs_on
from monoloss_kernels.stats import CsrActs, MonoScoreStats, csr_latent_stats, finalize

from .helpers import DEVICES, densify, float64_acts_grad, make_acts, make_emb, make_topk, seed_of
from .test_loss import LOSS_ATOL, check_grad, reference_loss

# Tolerances, never loosened to pass. "of max": atol = that fraction of the largest |entry|
# of the float64 reference; rtol: of each entry, the rounding of the float32 result to the
# output dtype (round to nearest: 2^-9 for bfloat16, 2^-11 for float16, doubled; under
# TRITON_INTERPRET=1 the interpreter truncates float32 -> bfloat16 (its cast_impl passes
# no rounding mode), an error below one ulp, 2^-7). Measured on the CPU (interpreter,
# "ieee" products), worst case over this file's inputs, in brackets.
#
#   check                                   acts dtype  tolerance                        [measured]
#   kernel vs float64 formula, dense + CSR  float32     atol 2e-6 of max                 [1.5e-7]
#                                           bfloat16    rtol 2^-8 (interpreter 2^-7)     [7.7e-3, interpreter]
#                                           float16     rtol 2^-10                       [4.7e-4]
#   kernel vs C++ kernel and torch formula  float32     atol 2e-6 of max   [those two: 3.6e-7 from float64]
#   loss through the op vs float64 autograd float32     loss 1e-5, gradient 1e-4 of max (test_loss's bounds)
KERNEL_ATOL_OF_MAX = 2e-6
KERNEL_RTOL = {
    torch.float32: 0.0,
    torch.bfloat16: 2.0**-7 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 2.0**-8,
    torch.float16: 2.0**-10,
}

BACKWARD_OP = torch.ops.monoloss_kernels.monoscore_stats_backward_triton
CSR_BACKWARD_OP = torch.ops.monoloss_kernels.monoscore_stats_csr_backward_triton
TRITON_DEVICES = [d for d in DEVICES if triton_runs_on(torch.device(d))]

# Odd shapes: no dimension a multiple of the blocks; d past two d-steps; a tiny one.
DENSE_SHAPES = [(83, 29, 13), (37, 45, 70), (4, 5, 3)]
DENSE_CASES = ["relu", "ties_max", "negative", "offset", "dead_constant"]


def dense_acts(case: str, n: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """float64 activations; "ties_max" clips ReLU latents so that several samples tie at
    the maximum as well as at the minimum 0; "relu" and "dead_constant" tie at 0."""
    if case == "ties_max":
        return make_acts("relu", n, m, gen).clamp(max=0.8)
    return make_acts(case, n, m, gen)


def random_grads(dim: int, m: int, gen: torch.Generator, device):
    """∂L/∂cross (d, M) float32, ∂L/∂moments (4, M) float64, ∂L/∂act_range (2, M) float32:
    random, with the moment terms scaled to the size of Ê·G's entries."""
    grad_cross = torch.randn(dim, m, generator=gen)
    grad_moments = torch.randn(4, m, generator=gen, dtype=torch.float64) * 0.3
    grad_range = torch.randn(2, m, generator=gen)
    return grad_cross.to(device), grad_moments.to(device), grad_range.to(device)


def dense_inputs(case, shape, dtype, device, seed):
    n, m, d = shape
    gen = torch.Generator().manual_seed(seed)
    acts = dense_acts(case, n, m, gen).to(dtype)
    emb = make_emb("zero_dup", n, d, gen).float()
    shift = acts[0].float()  # the GPU kernels' shift: the first row
    act_range = torch.stack([acts.amin(0), acts.amax(0)]).float()
    grads = random_grads(d, m, gen, "cpu")
    return tuple(t.to(device) for t in (acts, emb, shift, act_range, *grads))


def assert_close_to_reference(got, expected, dtype):
    assert got.dtype == dtype and got.shape == expected.shape
    scale = expected.abs().max().item()
    assert scale > 0, "the reference must not vanish, or the check is empty"
    torch.testing.assert_close(got.cpu().double(), expected.cpu(), rtol=KERNEL_RTOL[dtype],
                               atol=KERNEL_ATOL_OF_MAX * scale)


def assert_unchanged(inputs, copies):
    for x, copy in zip(inputs, copies):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, copy), "an input was modified"


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", DENSE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_backward_matches_float64_acts_grad(device, dtype, shape, case):
    inputs = dense_inputs(case, shape, dtype, device, seed=seed_of(case, shape))
    copies = [x.clone() for x in inputs]
    got = BACKWARD_OP(*inputs)
    assert_unchanged(inputs, copies)
    assert got.is_contiguous()
    assert_close_to_reference(got, float64_acts_grad(*inputs), dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_backward_matches_cpp_and_torch_formula(device, case):
    """The same numbers as the other float32 implementations of the same formula."""
    acts, emb, shift, act_range, grad_cross, grad_moments, grad_range = inputs = dense_inputs(
        case, (83, 29, 13), torch.float32, device, seed=7
    )
    got = BACKWARD_OP(*inputs)
    expected = float64_acts_grad(*inputs)
    for kernel in ("cpp", "torch"):
        other, _ = _autograd.dense_stats_grads(
            acts, emb, shift, act_range, grad_cross, None, grad_range, grad_moments, acts_grad=True,
            emb_grad=False, acts_grad_kernel=kernel,
        )
        torch.testing.assert_close(got, other, rtol=0, atol=KERNEL_ATOL_OF_MAX * expected.abs().max().item())


def test_dense_backward_strided_inputs():
    """Transposed acts, a column slice of emb and a transposed ∂L/∂cross: strides are read."""
    if not TRITON_DEVICES:
        pytest.skip("Triton runs neither on a GPU nor in the interpreter here")
    acts, emb, shift, act_range, grad_cross, grad_moments, grad_range = dense_inputs(
        "negative", (41, 23, 19), torch.float32, TRITON_DEVICES[0], seed=11
    )
    strided = (acts.T.contiguous().T, torch.cat([emb, emb], dim=1)[:, 19:], shift, act_range,
               grad_cross.T.contiguous().T, grad_moments, grad_range)
    assert not strided[0].is_contiguous() and not strided[1].is_contiguous()
    assert_close_to_reference(BACKWARD_OP(*strided), float64_acts_grad(*strided), torch.float32)


CSR_FORMS = ["topk", "ragged"]
SPARSE_CASES = ["relu", "negative", "always_on_offset", "empty_rows"]


def csr_inputs(form, case, dtype, device, seed, n=97, m=31, k=6, d=17):
    """A CSR batch (TopK, or ragged: rows with 0..k entries) with shift and act_range from
    the sparse statistics (`csr_latent_stats`, which every sparse backend shares)."""
    gen = torch.Generator().manual_seed(seed)
    values, indices = make_topk(case, n, m, k, gen)
    if form == "ragged":  # row n keeps its first (n mod (k + 1)) entries; the always-on ones stay
        keep = torch.arange(k)[None, :] < (torch.arange(n) % (k + 1))[:, None]
        keep[:, :2] |= case == "always_on_offset"
        counts = keep.sum(1)
        values, cols = values[keep], indices[keep]
    else:
        counts = torch.full((n,), k)
        values, cols = values.flatten(), indices.flatten()
    crow = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    values = values.to(dtype)
    emb = make_emb("zero_dup", n, d, gen).float()
    stats, _, _, _ = csr_latent_stats(CsrActs(crow, cols, values, m), emb)
    grads = random_grads(d, m, gen, "cpu")
    tensors = (crow, cols, values, emb)
    rest = (stats.shift, stats.act_range, *grads)
    return tuple(t.to(device) for t in tensors) + (m,) + tuple(t.to(device) for t in rest)


def csr_float64_acts_grad(crow, cols, values, emb, m, shift, act_range, grad_cross, grad_moments, grad_range):
    """∂L/∂values (nnz,) float64: the dense formula at the stored entries, whose ties
    include the implicit zeros."""
    crow, cols, values, emb = (t.cpu() for t in (crow, cols, values, emb))
    rows = torch.repeat_interleave(torch.arange(emb.shape[0]), crow.diff())
    dense = torch.zeros(emb.shape[0], m, dtype=values.dtype).index_put_((rows, cols), values)
    grad = float64_acts_grad(dense, emb, *(t.cpu() for t in (shift, act_range, grad_cross, grad_moments, grad_range)))
    return grad[rows, cols]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("form", CSR_FORMS)
@pytest.mark.parametrize("case", SPARSE_CASES)
def test_csr_backward_matches_float64_acts_grad(device, dtype, form, case):
    inputs = csr_inputs(form, case, dtype, device, seed=seed_of(case, form))
    copies = [x.clone() if isinstance(x, torch.Tensor) else x for x in inputs]
    got = CSR_BACKWARD_OP(*inputs)
    assert_unchanged(inputs, copies)
    assert_close_to_reference(got, csr_float64_acts_grad(*inputs), dtype)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("form", CSR_FORMS)
def test_csr_backward_matches_cpp_and_torch_formula(device, form):
    crow, cols, values, emb, m, shift, act_range, grad_cross, grad_moments, grad_range = inputs = csr_inputs(
        form, "negative", torch.float32, device, seed=13
    )
    got = CSR_BACKWARD_OP(*inputs)
    expected = csr_float64_acts_grad(*inputs)
    for kernel in ("cpp", "torch"):
        other, _ = _autograd.csr_stats_grads(
            crow, cols, values, emb, m, shift, act_range, grad_cross, None, grad_range, grad_moments,
            values_grad=True, emb_grad=False, acts_grad_kernel=kernel,
        )
        torch.testing.assert_close(got, other, rtol=0, atol=KERNEL_ATOL_OF_MAX * expected.abs().max().item())


def test_csr_backward_edge_cases():
    """No stored entry; d = 0 (every row has zero norm: the moment and tie terms only)."""
    if not TRITON_DEVICES:
        pytest.skip("Triton runs neither on a GPU nor in the interpreter here")
    device = TRITON_DEVICES[0]
    crow, cols, values, emb, m, *rest = csr_inputs("topk", "negative", torch.float32, device, seed=17)
    empty = CSR_BACKWARD_OP(torch.zeros_like(crow), cols[:0], values[:0], emb, m, *rest)
    assert empty.shape == (0,) and empty.dtype == torch.float32
    no_dims = (crow, cols, values, emb[:, :0], m, rest[0], rest[1], rest[2][:0], *rest[3:])
    assert_close_to_reference(CSR_BACKWARD_OP(*no_dims), csr_float64_acts_grad(*no_dims), torch.float32)
    dense_no_dims = dense_inputs("relu", (29, 11, 5), torch.float32, device, seed=19)
    dense_no_dims = (dense_no_dims[0], dense_no_dims[1][:, :0], *dense_no_dims[2:4], dense_no_dims[4][:0],
                     *dense_no_dims[5:])
    assert_close_to_reference(BACKWARD_OP(*dense_no_dims), float64_acts_grad(*dense_no_dims), torch.float32)


# Through autograd: the Triton statistics ops' registered backward (now these kernels)
# against torch autograd of the float64 closed form.
def monoloss_of(stats) -> torch.Tensor:
    """1 - the mean score over the defined latents, as mk.monoloss computes it."""
    scores = finalize(MonoScoreStats(*stats))
    return 1 - torch.where(scores.isfinite(), scores, 0.0).sum() / scores.isfinite().sum().clamp(min=1)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("case", ["ties_max", "offset", "dead_constant"])
def test_dense_loss_gradient_through_triton_ops(device, case):
    gen = torch.Generator().manual_seed(seed_of(case))
    acts = dense_acts(case, 57, 37, gen).float()
    emb = make_emb("zero_dup", 57, 35, gen).float()
    ref_acts = acts.double().requires_grad_()
    expected = reference_loss(ref_acts, emb)
    expected.backward()
    ours = acts.to(device).requires_grad_()
    loss = monoloss_of(torch.ops.monoloss_kernels.monoscore_stats_triton(ours, emb.to(device)))
    loss.backward()
    assert abs(loss.item() - expected.item()) <= LOSS_ATOL
    check_grad(ours.grad.cpu(), ref_acts.grad)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("form", CSR_FORMS)
def test_csr_loss_gradient_through_triton_ops(device, form):
    crow, cols, values, emb, m, *_ = csr_inputs(form, "negative", torch.float32, "cpu", seed=23)
    rows = torch.repeat_interleave(torch.arange(emb.shape[0]), crow.diff())
    ref_values = values.double().requires_grad_()
    dense = torch.zeros(emb.shape[0], m, dtype=torch.float64).index_put((rows, cols), ref_values)
    expected = reference_loss(dense, emb)
    expected.backward()
    ours = values.to(device).requires_grad_()
    loss = monoloss_of(torch.ops.monoloss_kernels.monoscore_stats_csr_triton(
        crow.to(device), cols.to(device), ours, emb.to(device), m
    ))
    loss.backward()
    assert abs(loss.item() - expected.item()) <= LOSS_ATOL
    check_grad(ours.grad.cpu(), ref_values.grad)


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_opcheck(device):
    # The interpreter runs kernels eagerly and cannot be traced by AOTAutograd; on a GPU every check runs.
    test_utils = "ALL" if device == "cuda" else ("test_schema", "test_autograd_registration", "test_faketensor")
    acts, emb, *rest = dense_inputs("negative", (45, 37, 19), torch.float32, device, seed=29)
    torch.library.opcheck(BACKWARD_OP, (acts, emb, *rest), test_utils=test_utils)
    torch.library.opcheck(BACKWARD_OP, (acts.half(), emb.double(), *rest), test_utils=test_utils)
    crow, cols, values, emb, m, *rest = csr_inputs("ragged", "always_on_offset", torch.float32, device, seed=31)
    torch.library.opcheck(CSR_BACKWARD_OP, (crow, cols, values, emb, m, *rest), test_utils=test_utils)
    torch.library.opcheck(CSR_BACKWARD_OP, (crow, cols, values.bfloat16(), emb.double(), m, *rest),
                          test_utils=test_utils)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter cannot be traced by torch.compile")
def test_compile_fullgraph():
    inputs = dense_inputs("relu", (53, 29, 17), torch.float32, "cuda", seed=37)
    compiled = torch.compile(BACKWARD_OP, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), BACKWARD_OP(*inputs))
    csr = csr_inputs("ragged", "relu", torch.float32, "cuda", seed=41)
    torch.testing.assert_close(torch.compile(CSR_BACKWARD_OP, fullgraph=True)(*csr), CSR_BACKWARD_OP(*csr))


def test_fake_shapes():
    acts = torch.empty(11, 7, device="meta", dtype=torch.bfloat16)
    emb = torch.empty(11, 5, device="meta")
    per_latent = [torch.empty(shape, device="meta") for shape in [(7,), (2, 7), (5, 7), (4, 7), (2, 7)]]
    out = BACKWARD_OP(acts, emb, *per_latent)
    assert out.shape == (11, 7) and out.dtype == torch.bfloat16
    crow = torch.empty(12, device="meta", dtype=torch.long)
    cols = torch.empty(30, device="meta", dtype=torch.long)
    out = CSR_BACKWARD_OP(crow, cols, torch.empty(30, device="meta", dtype=torch.float16), emb, 7, *per_latent)
    assert out.shape == (30,) and out.dtype == torch.float16


def test_each_backend_backward_uses_its_kernel():
    """The registered backward of each statistics op picks its own backend's kernel where
    it runs on the device, else the torch formula (None)."""
    cpu = torch.device("cpu")
    for sparse, cpp_op, triton_op in ((False, "monoscore_stats_backward", BACKWARD_OP),
                                      (True, "monoscore_stats_csr_backward", CSR_BACKWARD_OP)):
        assert _autograd._acts_grad_op("torch", cpu, sparse) is None
        assert _autograd._acts_grad_op("triton", cpu, sparse) == (triton_op if triton_runs_on(cpu) else None)
        if monoloss_kernels._extension.has_kernel("CPU", f"monoloss_kernels::{cpp_op}"):
            assert _autograd._acts_grad_op("cpp", cpu, sparse) == getattr(torch.ops.monoloss_kernels, cpp_op)
    assert _autograd.DENSE_STATS_OPS["monoloss_kernels::monoscore_stats_triton"] == "triton"
    assert _autograd.CSR_STATS_OPS["monoloss_kernels::monoscore_stats_csr_triton"] == "triton"
    assert _autograd.acts_grad_kernel_of("triton", cpu) == "triton"
    assert _autograd.acts_grad_kernel_of("torch", cpu) == "torch"
    with pytest.raises(ValueError, match="acts_grad_kernel must be one of"):
        _autograd._acts_grad_op("cuda", cpu, False)


def test_bad_shapes_raise():
    if not TRITON_DEVICES:
        pytest.skip("Triton runs neither on a GPU nor in the interpreter here")
    acts, emb, shift, act_range, grad_cross, grad_moments, grad_range = dense_inputs(
        "relu", (9, 4, 3), torch.float32, TRITON_DEVICES[0], seed=43
    )
    with pytest.raises(ValueError, match=r"grad_cross must have shape \(3, 4\), got \(4, 3\)"):
        BACKWARD_OP(acts, emb, shift, act_range, grad_cross.T, grad_moments, grad_range)
    with pytest.raises(ValueError, match="must share N"):
        BACKWARD_OP(acts[1:], emb, shift, act_range, grad_cross, grad_moments, grad_range)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the ops themselves run the GPU configuration")
def test_gpu_block_sizes_under_the_interpreter():
    """The GPU configuration's tiles and masks (with "ieee" products, which the interpreter
    evaluates), on shapes that leave partial tiles in every dimension."""
    from monoloss_kernels.ops import triton_monoscore_stats_backward as backward

    if not backward.INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    config = backward.GPU_CONFIG._replace(dot_precision="ieee", ties_rows_per_program=64)
    inputs = dense_inputs("ties_max", (150, 70, 40), torch.float32, "cpu", seed=47)
    assert_close_to_reference(backward.dense_backward_with_config(*inputs, config), float64_acts_grad(*inputs),
                              torch.float32)
    inputs = csr_inputs("ragged", "negative", torch.float32, "cpu", seed=53, d=150)
    assert_close_to_reference(backward.csr_backward_with_config(*inputs, config), csr_float64_acts_grad(*inputs),
                              torch.float32)
