"""MonoLoss and its gradients on every backend, dense and TopK, against torch autograd
of the float64 closed form; gradcheck of the registered backward in float64."""

import pytest
import torch

import monoloss_kernels as mk
from monoloss_kernels import _autograd, _extension
from monoloss_kernels.refine import ill_conditioned_latents
from monoloss_kernels.stats import MonoScoreStats, finalize

from .helpers import DEVICES, densify, free_port, make_acts, make_emb, make_topk, seed_of

# The float32 bounds: the loss within 1e-5, the gradient within 1e-4 of its largest entry.
LOSS_ATOL = 1e-5
GRAD_RTOL_OF_MAX = 1e-4

DENSE_CASES = ["relu", "negative", "offset", "mixed_offset", "dead_constant"]
TOPK_CASES = ["relu", "negative", "always_on_offset", "empty_rows"]


def reference_scores(acts: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """The float64 closed form, written so that autograd differentiates it (min and max
    included; constant latents masked before the division, so their gradient is 0)."""
    a, e = acts.double(), emb.double()
    lo, hi = a.amin(0), a.amax(0)
    live = hi > lo
    scaled = (a - lo) / torch.where(live, hi - lo, 1.0)
    norm = e.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, e / torch.where(norm > 0, norm, 1.0), 0.0)
    unit_weight = (norm[:, 0] > 0).double()
    cross = unit.T @ scaled
    numerator = (cross * cross).sum(0) - unit_weight @ (scaled * scaled)
    sum_a = scaled.sum(0)
    denominator = sum_a * sum_a - (scaled * scaled).sum(0)
    defined = live & (denominator > 1e-12 * sum_a * sum_a)
    return torch.where(defined, numerator / torch.where(defined, denominator, 1.0), float("nan"))


def reference_loss(acts, emb):
    scores = reference_scores(acts, emb)
    defined = scores.isfinite()
    return 1 - torch.where(defined, scores, 0.0).sum() / defined.sum().clamp(min=1)


def check_grad(grad, expected):
    assert grad.shape == expected.shape and torch.isfinite(grad).all()
    scale = expected.abs().max()
    assert scale > 0, "the reference gradient must not vanish, or the check is empty"
    torch.testing.assert_close(grad.double(), expected, rtol=0, atol=GRAD_RTOL_OF_MAX * scale.item())


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_loss_and_gradient(backend_device, case):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(seed_of(case))
    acts = make_acts(case, 83, 29, gen).float()
    emb = make_emb("zero_dup", 83, 13, gen).float()
    ref_acts = acts.double().requires_grad_()
    expected = reference_loss(ref_acts, emb)
    expected.backward()

    ours_acts = acts.to(device).requires_grad_()
    loss = mk.monoloss(ours_acts, emb.to(device), backend=backend)
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - expected.item()) <= LOSS_ATOL
    check_grad(ours_acts.grad.cpu(), ref_acts.grad)


# The caller's float32 matmul precision, each as a user would set it, and how the test
# puts the default back: "high" is TF32 on cuBLAS, "medium" also bf16 on oneDNN (AMX CPUs).
REDUCED_MATMUL_PRECISIONS = {
    "legacy-high": (lambda: torch.set_float32_matmul_precision("high"),
                    lambda: torch.set_float32_matmul_precision("highest")),
    "legacy-medium": (lambda: torch.set_float32_matmul_precision("medium"),
                      lambda: torch.set_float32_matmul_precision("highest")),
    "fp32_precision": (lambda: (setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
                                setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16")),
                       lambda: (setattr(torch.backends.cuda.matmul, "fp32_precision", "none"),
                                setattr(torch.backends.mkldnn.matmul, "fp32_precision", "none"))),
}


@pytest.mark.parametrize("setting", REDUCED_MATMUL_PRECISIONS)
def test_caller_matmul_precision_does_not_reach_the_products(backend_device, setting):
    """A training script's set_float32_matmul_precision("high"/"medium") (or fp32_precision
    "tf32"/"bf16") must not turn our float32 products into TF32/bf16 ones: scores within
    2e-5 of the pairwise definition, loss and gradient within the float32 bounds; the
    caller's settings are the same afterwards. (On this project's AMX CPU, "medium" put
    the cpu backend's scores 8e-5 off before the products were guarded.)"""
    from monoloss_kernels.reference import pairwise_monoscore

    backend, device = backend_device
    gen = torch.Generator().manual_seed(seed_of("matmul precision", setting))
    acts = make_acts("relu", 301, 67, gen).float()
    emb = make_emb("plain", 301, 33, gen).float() + 0.3
    ref_acts = acts.double().requires_grad_()
    expected_loss = reference_loss(ref_acts, emb)
    expected_loss.backward()
    expected_scores = pairwise_monoscore(acts.double(), emb.double())
    reduce_precision, restore_default = REDUCED_MATMUL_PRECISIONS[setting]
    reduce_precision()
    try:
        settings = (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision)
        scores = mk.monoscore(acts.to(device), emb.to(device), backend=backend)
        ours_acts = acts.to(device).requires_grad_()
        loss = mk.monoloss(ours_acts, emb.to(device), backend=backend)
        loss.backward()
        assert (torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision) == settings
    finally:
        restore_default()
    torch.testing.assert_close(scores.double().cpu(), expected_scores, atol=2e-5, rtol=0, equal_nan=True)
    assert abs(loss.item() - expected_loss.item()) <= LOSS_ATOL
    check_grad(ours_acts.grad.cpu(), ref_acts.grad)


@pytest.mark.parametrize("case", TOPK_CASES)
def test_topk_loss_and_gradient(backend_device, case):
    """The gradient reaches the k stored values of each row, and equals the dense
    gradient there (implicit zeros at a latent's min or max share its gradient)."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(seed_of(case))
    values, indices = make_topk(case, 97, 31, 6, gen)
    values = values.float()
    emb = make_emb("zero_dup", 97, 17, gen).float()
    ref_values = values.double().requires_grad_()
    expected = reference_loss(densify(ref_values, indices, 31), emb)
    expected.backward()

    ours = values.to(device).requires_grad_()
    loss = mk.monoloss((ours, indices.to(device)), emb.to(device), num_latents=31, backend=backend)
    loss.backward()
    assert abs(loss.item() - expected.item()) <= LOSS_ATOL
    check_grad(ours.grad.cpu(), ref_values.grad)


requires_extension = pytest.mark.skipif(_extension.EXTENSION_ERROR is not None,
                                        reason="the C++ extension did not load (its tests run wherever it is built)")


@requires_extension
@pytest.mark.parametrize("case", ["negative", "always_on_offset", "empty_rows"])
def test_fused_cpu_topk_loss_over_row_blocks_and_tiles(case):
    """The CPU TopK loss runs monoloss_stats_csr (squared norms fused into the cross
    pass, ∂L/∂cross formed in the backward) over two 8192-row blocks and a partial
    64-dim tile: with implicit zeros inside a latent's range ("negative": the minimum
    lies below the shift 0), latents stored in every row (shift = min), stored zeros
    tied with the implicit ones ("empty_rows"), ties at a signed minimum, and zero-norm
    rows; against the float64 closed form."""
    from monoloss_kernels._dispatch import _cpp_csr_loss_stats, loss_stats_function

    assert _extension.has_kernel("CPU", _extension.LOSS_CSR_STATS_OP)
    assert loss_stats_function("auto", torch.device("cpu"), sparse=True, emb_grad=False) is _cpp_csr_loss_stats
    gen = torch.Generator().manual_seed(seed_of(case) + 3)
    n, m, k, d = 8200, 37, 5, 70
    values, indices = make_topk(case, n, m, k, gen)
    values = values.float()
    stored = indices == 2  # latent 2: its values below their median tie at its minimum
    values[stored] = torch.where(values[stored] < values[stored].median(), values[stored].min(), values[stored])
    # Zero-mean embeddings (and zero rows): make_emb's shared direction makes ‖ΣÊ‖ ~ N,
    # and moving the sums from shift 0 to a minimum far below it ("negative") then
    # cancels in float32 on every path (1.0-1.4e-4 of the largest gradient at this N).
    emb = torch.randn(n, d, generator=gen)
    emb[::5] = 0.0
    ref_values = values.double().requires_grad_()
    expected = reference_loss(densify(ref_values, indices, m), emb)
    expected.backward()
    ours = values.clone().requires_grad_()
    loss = mk.monoloss((ours, indices), emb, num_latents=m, backend="cpu")
    loss.backward()
    assert abs(loss.item() - expected.item()) <= LOSS_ATOL
    check_grad(ours.grad, ref_values.grad)
    # The fused squared norms equal finalize's shifted_sq_norms of the same statistics.
    crow = torch.arange(n + 1) * k
    *stats, cross_sq_at_min, entry_order = torch.ops.monoloss_kernels.monoloss_stats_csr(crow, indices.flatten(),
                                                                                         values.flatten(), emb, m)
    stats = MonoScoreStats(*stats)
    # The kept order: per 8192-row block, the block's entries by latent, rows ascending.
    rows = torch.repeat_interleave(torch.arange(n), k)
    for row0 in (0, 8192):
        e0, e1 = row0 * k, min(n, row0 + 8192) * k
        block_rows, source, latents = entry_order[:, e0:e1].long()
        keys = indices.flatten()[e0:e1] * n + rows[e0:e1]
        assert torch.equal(source, keys.argsort())
        assert torch.equal(block_rows + row0, rows[e0:e1][source]) and torch.equal(latents, indices.flatten()[e0:e1][source])
    act_min, act_max = stats.act_range
    delta = (act_min.double() - stats.shift.double()).float()
    scale = torch.where(act_max > act_min, act_max - act_min, 1.0)
    expected_sq = torch.ops.monoloss_kernels.shifted_sq_norms(stats.cross, stats.unit_emb_sum.float(), delta, scale)
    torch.testing.assert_close(cross_sq_at_min, expected_sq, rtol=0, atol=1e-6 * expected_sq.abs().max().item())


@requires_extension
def test_fused_cpu_loss_stats_op():
    """monoloss_stats_csr: schema, fake tensors, the registered backward (opcheck); its
    backward op; a gradient through cross; and the gradient it refuses (for emb, which
    the loss takes through monoscore_stats_csr instead)."""
    gen = torch.Generator().manual_seed(67)
    values, indices = make_topk("negative", 41, 23, 5, gen)
    emb = make_emb("zero_dup", 41, 13, gen).float()
    crow, cols = torch.arange(42) * 5, indices.flatten()
    values = values.flatten().float().requires_grad_()
    op = torch.ops.monoloss_kernels.monoloss_stats_csr
    test_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, (crow, cols, values, emb, 23), test_utils=test_utils)
    torch.library.opcheck(op, (crow, cols, values.detach().half(), emb.double(), 23), test_utils=test_utils)
    out = op(crow, cols, values.detach(), emb, 23)
    gradients = (torch.randn(23, dtype=torch.float64), torch.randn(4, 23, dtype=torch.float64), torch.randn(2, 23))
    backward_args = (crow, cols, values.detach(), emb, 23, out[2], out[3], out[0], out[1], out[7], *gradients)
    torch.library.opcheck(torch.ops.monoloss_kernels.monoloss_stats_csr_backward, backward_args,
                          test_utils=test_utils)
    # An entry order that is not the forward's is refused (the kernel indexes with it).
    bad_order = out[7].clone()
    bad_order[2, 0] = 23  # a latent out of range
    with pytest.raises(ValueError, match="entry_order is not a valid order of these entries"):
        torch.ops.monoloss_kernels.monoloss_stats_csr_backward(*backward_args[:9], bad_order, *gradients)
    with pytest.raises(ValueError, match="entry_order must be the"):
        torch.ops.monoloss_kernels.monoloss_stats_csr_backward(*backward_args[:9], bad_order[:2], *gradients)
    # A gradient reaching cross itself (a second pass) and the moments, as the statistics op's.
    weights = torch.randn(13, 23), torch.randn(4, 23, dtype=torch.float64)
    grads = []
    for stats_op in (op, torch.ops.monoloss_kernels.monoscore_stats_csr):
        leaf = values.detach().clone().requires_grad_()
        stats = MonoScoreStats(*stats_op(crow, cols, leaf, emb, 23)[:6])
        ((stats.cross * weights[0]).sum() + (stats.moments * weights[1]).sum()).backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(*grads)
    with pytest.raises(RuntimeError, match="for emb use monoscore_stats_csr"):
        op(crow, cols, values, emb.clone().requires_grad_(), 23)[6].sum().backward()


def test_emb_gradient(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(41)
    acts = make_acts("negative", 71, 19, gen).float()
    emb = make_emb("zero_dup", 71, 9, gen).float()
    ref_emb = emb.double().requires_grad_()
    reference_loss(acts, ref_emb).backward()
    ours = emb.to(device).requires_grad_()
    mk.monoloss(acts.to(device), ours, backend=backend, differentiable_emb=True).backward()
    check_grad(ours.grad.cpu(), ref_emb.grad)
    # TopK: the same through the sparse backward.
    values, indices = make_topk("negative", 71, 19, 4, gen)
    ref_emb.grad = None
    reference_loss(densify(values, indices, 19), ref_emb).backward()
    ours.grad = None
    pair = (values.float().to(device), indices.to(device))
    mk.monoloss(pair, ours, num_latents=19, backend=backend, differentiable_emb=True).backward()
    check_grad(ours.grad.cpu(), ref_emb.grad)


def test_emb_is_constant_by_default():
    gen = torch.Generator().manual_seed(43)
    acts = make_acts("relu", 40, 7, gen).float().requires_grad_()
    emb = make_emb("plain", 40, 5, gen).float().requires_grad_()
    mk.monoloss(acts, emb).backward()
    assert acts.grad is not None and emb.grad is None


def test_reduction_none_and_module(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(47)
    acts = make_acts("dead_constant", 60, 11, gen).float().to(device).requires_grad_()
    emb = make_emb("plain", 60, 6, gen).float().to(device)
    scores = mk.monoloss(acts, emb, reduction="none", backend=backend)
    torch.testing.assert_close(scores, mk.monoscore(acts.detach(), emb, backend=backend), equal_nan=True)
    assert scores[:3].isnan().all() and scores[3:].isfinite().all()
    scores[3:].sum().backward()
    assert torch.isfinite(acts.grad).all() and acts.grad[:, 0].eq(0).all()  # the dead latent gets nothing
    module = mk.MonoLoss(backend=backend)
    torch.testing.assert_close(module(acts, emb), 1 - scores[3:].mean())
    assert "backend" in repr(module)


@pytest.mark.parametrize("make", [
    lambda: (torch.rand(1, 6), torch.rand(1, 4)),  # one sample: no pair
    lambda: (torch.full((9, 6), 2.5), torch.rand(9, 4)),  # every latent constant
], ids=["one-row", "all-constant"])
@pytest.mark.parametrize("grads", ["acts", "emb", "both"])
def test_no_defined_latent_gives_one_and_zero_gradient(make, grads):
    """Zero gradients reach every input that asks for one, emb included (differentiable_emb)
    and also when acts needs none (a one-row batch once raised 'does not require grad')."""
    acts, emb = make()
    acts.requires_grad_(grads != "emb")
    emb.requires_grad_(grads != "acts")
    loss = mk.monoloss(acts, emb, differentiable_emb=grads != "acts")
    loss.backward()
    assert loss.item() == 1.0
    for x in (acts, emb):
        assert x.grad is not None if x.requires_grad else x.grad is None
        assert x.grad is None or x.grad.eq(0).all()


def test_bad_input_raises():
    acts, emb = torch.rand(10, 4), torch.rand(10, 3)
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'none'\), got 'sum'"):
        mk.monoloss(acts, emb, reduction="sum")
    with pytest.raises(ValueError, match="reduction must be one of"):
        mk.MonoLoss(reduction="sum")
    bad = acts.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="acts contains NaN or Inf"):
        mk.monoloss(bad.requires_grad_(), emb)


def test_backend_and_num_latents_checked_on_every_path():
    """backend= is checked before the N < 2 shortcut (it was accepted there), and by the
    module's constructor, as num_latents is; the errors are those of the other paths."""
    one_row, emb = torch.rand(1, 4), torch.rand(1, 3)
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'bogus'"):
        mk.monoloss(one_row, emb, backend="bogus")
    with pytest.raises(ValueError, match=r"backend=.cuda. needs cuda tensors; the inputs are on cpu"):
        mk.monoloss(one_row, emb, backend="cuda")
    with pytest.raises(ValueError, match=r"backend must be one of .*, got 'bogus'"):
        mk.MonoLoss(backend="bogus")
    with pytest.raises(TypeError, match="num_latents must be a non-negative int, got -3"):
        mk.MonoLoss(num_latents=-3)


def test_group_needs_distributed():
    """group= alone would give each rank its local loss: refused, as is a group that is
    no ProcessGroup (the real group is passed in test_distributed_equals_concatenated_batch)."""
    acts, emb = torch.rand(10, 4), torch.rand(10, 3)
    with pytest.raises(ValueError, match="group is given but distributed=False"):
        mk.monoloss(acts, emb, group=object())
    with pytest.raises(ValueError, match="group is given but distributed=False"):
        mk.MonoLoss(group=object())
    with pytest.raises(TypeError, match="group must be a torch.distributed ProcessGroup or None, got str"):
        mk.monoloss(acts, emb, group="world", distributed=True)


# gradcheck needs a float64 forward; the kernels accumulate cross in float32. So the
# registered backward is attached to a float64 statistics op defined here, and
# gradcheck compares it with finite differences of that op.
@torch.library.custom_op("monoloss_tests::stats_float64", mutates_args=())
def _stats_float64(acts: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                    torch.Tensor, torch.Tensor, torch.Tensor]:
    inv_norm = torch.where(emb.norm(dim=1) > 0, 1 / emb.norm(dim=1), 0.0)
    unit = emb * inv_norm[:, None]
    shift = acts[0].float()
    b = acts - shift.double()
    zero = (inv_norm == 0)[:, None]
    moments = torch.stack([b.sum(0), (b * b).sum(0), (b * zero).sum(0), (b * b * zero).sum(0)])
    counts = torch.tensor([float(acts.shape[0]), float((inv_norm > 0).sum())], dtype=torch.float64)
    return unit.T @ b, unit.sum(0), shift, torch.stack([acts.amin(0), acts.amax(0)]), moments, counts


torch.library.register_autograd("monoloss_tests::stats_float64", _autograd.dense_stats_backward_torch,
                                setup_context=_autograd.dense_setup_context)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(53)
    acts = make_acts("negative", 23, 5, gen).requires_grad_()
    # No zero rows: a finite difference would turn one into a unit vector (not differentiable there).
    emb = make_emb("plain", 23, 4, gen).requires_grad_()

    def loss(a, e):
        scores = finalize(MonoScoreStats(*torch.ops.monoloss_tests.stats_float64(a, e)))
        return torch.where(scores.isfinite(), scores, 0.0).sum()

    assert torch.autograd.gradcheck(loss, (acts, emb), eps=1e-6, atol=1e-6, rtol=1e-4)


@torch.library.custom_op("monoloss_tests::stats_csr_float64", mutates_args=())
def _stats_csr_float64(crow_indices: torch.Tensor, col_indices: torch.Tensor, values: torch.Tensor,
                       emb: torch.Tensor, num_latents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = torch.repeat_interleave(torch.arange(emb.shape[0]), crow_indices.diff())
    dense = torch.zeros(emb.shape[0], num_latents, dtype=values.dtype).index_put_((rows, col_indices), values)
    stats = list(_stats_float64(dense, emb))
    # Shift 0 (any shift is valid; the sparse backward reads b = value - shift).
    shift = torch.zeros(num_latents)
    zero = (emb.norm(dim=1) == 0)[:, None]
    stats[0] = (emb * torch.where(zero, 0.0, 1 / emb.norm(dim=1, keepdim=True))).T @ dense
    stats[2] = shift
    stats[4] = torch.stack([dense.sum(0), (dense * dense).sum(0), (dense * zero).sum(0), (dense * dense * zero).sum(0)])
    return tuple(stats)


torch.library.register_autograd("monoloss_tests::stats_csr_float64", _autograd.csr_stats_backward_torch,
                                setup_context=_autograd.csr_setup_context)


def test_gradcheck_float64_topk():
    gen = torch.Generator().manual_seed(59)
    values, indices = make_topk("negative", 21, 7, 3, gen)
    values.requires_grad_()
    emb = make_emb("plain", 21, 4, gen).requires_grad_()
    crow = torch.arange(22) * 3

    def loss(v, e):
        stats = torch.ops.monoloss_tests.stats_csr_float64(crow, indices.flatten(), v.flatten(), e, 7)
        scores = finalize(MonoScoreStats(*stats))
        return torch.where(scores.isfinite(), scores, 0.0).sum()

    assert torch.autograd.gradcheck(loss, (values, emb), eps=1e-6, atol=1e-6, rtol=1e-4)


def _torch_shifted_sq_norms_function():
    """shifted_sq_norms as differentiable torch functions: the implementation the op
    runs on devices without a kernel of the extension (and on the CPU without _C)."""
    from monoloss_kernels.stats import torch_shifted_sq_norms, torch_shifted_sq_norms_backward

    class TorchShiftedSqNorms(torch.autograd.Function):
        @staticmethod
        def forward(ctx, cross, unit_emb_sum, delta, scale):
            ctx.save_for_backward(cross, unit_emb_sum, delta)
            return torch_shifted_sq_norms(cross, unit_emb_sum, delta, scale)

        @staticmethod
        def backward(ctx, grad):
            return *torch_shifted_sq_norms_backward(grad, *ctx.saved_tensors), None

    return TorchShiftedSqNorms.apply


@pytest.mark.parametrize("implementation", ["op", "torch"])
@pytest.mark.parametrize("layout", ["d_major", "latent_major"])
def test_shifted_sq_norms_and_gradient(layout, implementation):
    """finalize's ‖cross - ΣÊ δ‖² op (on the CPU the extension's kernel) and its torch
    implementation, in either storage order of cross, against the plain formula in
    float64, values and gradients (through every input but scale)."""
    from monoloss_kernels.stats import shifted_sq_norms

    if implementation == "op":
        for op in ("shifted_sq_norms", "shifted_sq_norms_backward"):  # the kernels under test, if built
            assert _extension.has_kernel("CPU", f"monoloss_kernels::{op}") == (_extension.EXTENSION_ERROR is None)
    function = shifted_sq_norms if implementation == "op" else _torch_shifted_sq_norms_function()
    gen = torch.Generator().manual_seed(71)
    d, m = 37, 3001  # d not a multiple of the C++ lanes; more than one torch chunk in either order
    cross = torch.randn(d, m, generator=gen, dtype=torch.float64) * 50
    if layout == "latent_major":
        cross = cross.T.contiguous().T
    unit_emb_sum = torch.randn(d, generator=gen, dtype=torch.float64) * 10
    delta = torch.randn(m, generator=gen, dtype=torch.float64)
    scale = torch.rand(m, generator=gen, dtype=torch.float64) + 0.5
    inputs = [t.clone().requires_grad_() for t in (cross, unit_emb_sum, delta)]
    weights = torch.randn(m, generator=gen, dtype=torch.float64)
    values = function(*inputs, scale)
    (values * weights).sum().backward()
    leaves = [t.clone().requires_grad_() for t in (cross, unit_emb_sum, delta)]
    expected = (leaves[0] - leaves[1][:, None] * leaves[2][None, :]).square().sum(0)
    (expected * weights).sum().backward()
    torch.testing.assert_close(values, expected.detach())
    assert inputs[0].grad.stride() == cross.stride()  # in cross's storage order
    for ours, ref in zip(inputs, leaves):
        torch.testing.assert_close(ours.grad, ref.grad)
    # float32 (every kernel's cross; on the CPU the op's vectorised clones): values and
    # gradients within 1e-5 of the largest float64 one (float32 rounding of 37 terms).
    inputs32 = [t.float().requires_grad_() for t in (cross, unit_emb_sum, delta)]
    values32 = function(*inputs32, scale.float())
    (values32 * weights).sum().backward()
    torch.testing.assert_close(values32, expected.detach(), rtol=0, atol=1e-5 * expected.abs().max().item())
    for ours, ref in zip(inputs32, leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, rtol=0, atol=1e-5 * ref.grad.abs().max().item())
    if implementation == "op":
        args = (cross.float(), unit_emb_sum.float(), delta.float())
        torch.library.opcheck(torch.ops.monoloss_kernels.shifted_sq_norms.default, (*args, scale.float()))
        torch.library.opcheck(torch.ops.monoloss_kernels.shifted_sq_norms_backward.default, (weights, *args))


def _ddp_batch():
    gen = torch.Generator().manual_seed(61)
    acts = make_acts("mixed_offset", 90, 13, gen).float()
    acts[:, 4] = torch.relu(acts[:, 4] - 0.5)  # many ties at the minimum 0, spread over ranks
    values, indices = make_topk("negative", 90, 13, 4, gen)
    emb = make_emb("zero_dup", 90, 7, gen).float()
    return acts, values.float(), indices, emb


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        acts, values, indices, emb = _ddp_batch()
        rows = slice(*[(0, 30), (30, 90)][rank])  # uneven parts
        part = acts[rows].clone().requires_grad_()
        loss = mk.monoloss(part, emb[rows], distributed=True, group=dist.group.WORLD)  # a real ProcessGroup
        loss.backward()
        with pytest.raises(ValueError, match="group is given but distributed=False"):
            mk.monoloss(part, emb[rows], group=dist.group.WORLD)
        # A rank with no rows, emb the only input with a gradient: a zero one (shape (0, d)).
        rows_or_none = slice(0, 0) if rank == 0 else slice(None)
        emb_part = emb[rows_or_none].clone().requires_grad_()
        mk.monoloss(acts[rows_or_none], emb_part, differentiable_emb=True, distributed=True).backward()
        assert emb_part.grad is not None and emb_part.grad.shape == emb_part.shape
        assert rank != 0 or emb_part.grad.numel() == 0
        part_values = values[rows].clone().requires_grad_()
        topk_loss = mk.monoloss((part_values, indices[rows]), emb[rows], num_latents=13, distributed=True)
        topk_loss.backward()
        # A part refused on one rank is refused on every rank, after the same collectives:
        # the failing rank with its own message, the others naming it (no rank left
        # waiting; the next call below still meets the same collectives on every rank).
        nan_acts = acts[rows].clone()
        if rank == 1:
            nan_acts[3, 5] = float("nan")
        expected = "acts contains NaN or Inf" if rank == 1 else r"acts with NaN or Inf values on rank\(s\) \[1\]"
        with pytest.raises(ValueError, match=expected):
            mk.monoloss(nan_acts, emb[rows], distributed=True)
        huge_emb = emb[rows].clone()
        if rank == 0:
            huge_emb[2] = float("inf")
        expected = "emb contains NaN or Inf" if rank == 0 else r"emb with NaN or Inf values .* on rank\(s\) \[0\]"
        with pytest.raises(ValueError, match=expected):
            mk.monoloss((values[rows], indices[rows]), huge_emb, num_latents=13, distributed=True)
        big_values = values[rows] * (1e37 if rank == 1 else 1.0)
        expected = "too large for the float32 sums" if rank == 1 else r"acts too large .* on rank\(s\) \[1\]"
        with pytest.raises(ValueError, match=expected):
            mk.monoloss((big_values, indices[rows]), emb[rows], num_latents=13, distributed=True)
        scores = mk.monoloss(acts[rows], emb[rows], distributed=True, reduction="none")
        torch.save({"loss": loss.detach(), "grad": part.grad, "topk_loss": topk_loss.detach(),
                    "topk_grad": part_values.grad, "scores": scores}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_equals_concatenated_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_ddp_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    acts, values, indices, emb = _ddp_batch()
    full = acts.clone().requires_grad_()
    loss = mk.monoloss(full, emb)
    loss.backward()
    full_values = values.clone().requires_grad_()
    topk_loss = mk.monoloss((full_values, indices), emb, num_latents=13)
    topk_loss.backward()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for result in results:
        # float32, as without distributed=True (the all-reduced sums are float64)
        assert result["loss"].dtype == result["topk_loss"].dtype == result["scores"].dtype == torch.float32
        assert abs(result["loss"].item() - loss.item()) <= LOSS_ATOL
        assert abs(result["topk_loss"].item() - topk_loss.item()) <= LOSS_ATOL
    check_grad(torch.cat([r["grad"] for r in results]), full.grad.double())
    check_grad(torch.cat([r["topk_grad"] for r in results]), full_values.grad.double())


def test_autocast_bfloat16():
    """Under autocast the SAE's latents come out bfloat16; the loss and gradient follow
    (the kernels upcast on load), within bfloat16's precision of the float32 result."""
    gen = torch.Generator().manual_seed(67)
    x = make_emb("plain", 64, 16, gen).float()
    weight = (torch.randn(16, 40, generator=gen) * 0.3).requires_grad_()

    def loss():
        return mk.monoloss(torch.relu(x @ weight), x)

    expected = loss()
    (expected_grad,) = torch.autograd.grad(expected, weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        acts = torch.relu(x @ weight)
        assert acts.dtype == torch.bfloat16
        got = mk.monoloss(acts, x)
    (grad,) = torch.autograd.grad(got, weight)
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert abs(got.item() - expected.item()) < 2e-2
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=5e-2 * expected_grad.abs().max().item())


def test_torch_compile_of_a_training_step():
    """monoloss inside a compiled step (graph breaks at its validation, which reads
    values on the host) gives the eager loss and gradients."""
    gen = torch.Generator().manual_seed(71)
    x = make_emb("plain", 50, 12, gen).float()
    weight = (torch.randn(12, 30, generator=gen) * 0.3).requires_grad_()

    def step(w):
        top = torch.topk(x @ w, 5, dim=1)
        return mk.monoloss((torch.relu(top.values), top.indices), x, num_latents=30)

    eager = step(weight)
    (eager_grad,) = torch.autograd.grad(eager, weight)
    compiled = torch.compile(step, backend="aot_eager")(weight)
    (compiled_grad,) = torch.autograd.grad(compiled, weight)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def _finalize_inputs(act_dtype: torch.dtype):
    """finalize_scores' inputs from a small float64 batch: defined latents, one constant
    and one with a single value above its minimum (both undefined), zero-norm rows;
    act_range and shift in `act_dtype` (float32 from every kernel, float64 from reshift)."""
    from monoloss_kernels.stats import torch_shifted_sq_norms

    gen = torch.Generator().manual_seed(83)
    acts = make_acts("mixed_offset", 41, 9, gen).double()
    acts[:, 2] = 3.0
    acts[:, 5] = -1.0
    acts[7, 5] = 2.0
    emb = make_emb("zero_dup", 41, 6, gen).double()
    stats = MonoScoreStats(*torch.ops.monoloss_kernels.monoscore_stats_torch(acts, emb))
    delta = stats.act_range[0].double() - stats.shift.double()
    scale = torch.where(stats.act_range[1] > stats.act_range[0], stats.act_range[1] - stats.act_range[0], 1.0)
    cross_sq = torch_shifted_sq_norms(stats.cross.double(), stats.unit_emb_sum, delta, scale.double())
    return stats.moments, stats.act_range.to(act_dtype), stats.shift.to(act_dtype), stats.counts, cross_sq


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("act_dtype", [torch.float32, torch.float64])
def test_finalize_scores_op_and_gradient(act_dtype, device):
    """finalize's score op pair (the extension's CPU and CUDA kernels) against the torch
    implementation, and that implementation's backward against autograd of its own
    forward; zero gradients where a score is undefined, each gradient in its input's
    dtype; opcheck of both ops."""
    from monoloss_kernels.stats import DEN_RTOL, torch_finalize_scores, torch_finalize_scores_backward

    dispatch_key = "CUDA" if device == "cuda" else "CPU"
    for op in ("finalize_scores", "finalize_scores_backward"):  # the kernels under test, if built
        assert _extension.has_kernel(dispatch_key, f"monoloss_kernels::{op}") == (_extension.EXTENSION_ERROR is None)
    inputs = tuple(t.to(device) for t in _finalize_inputs(act_dtype))
    for out_dtype in (torch.float32, torch.float64):
        scores = torch.ops.monoloss_kernels.finalize_scores(*inputs, DEN_RTOL, out_dtype)
        expected = torch_finalize_scores(*inputs, DEN_RTOL, out_dtype)
        assert scores.dtype == out_dtype
        torch.testing.assert_close(scores, expected, equal_nan=True)
    assert scores[[2, 5]].isnan().all() and scores.isfinite().sum() == 7  # the undefined two, not vacuous
    grad_scores = torch.randn(9, generator=torch.Generator().manual_seed(84), dtype=torch.float64).to(device)
    grads = torch.ops.monoloss_kernels.finalize_scores_backward(grad_scores, *inputs, DEN_RTOL)
    expected_grads = torch_finalize_scores_backward(grad_scores, *inputs, DEN_RTOL)
    leaves = [inputs[i].clone().requires_grad_() for i in (0, 1, 2, 4)]
    reference = torch_finalize_scores(leaves[0], leaves[1], leaves[2], inputs[3], leaves[3], DEN_RTOL, torch.float64)
    torch.where(reference.isfinite(), reference * grad_scores, 0.0).sum().backward()
    for ours, torch_formula, leaf in zip(grads, expected_grads, leaves):
        assert ours.dtype == leaf.dtype
        torch.testing.assert_close(ours, torch_formula)
        torch.testing.assert_close(torch_formula, leaf.grad.to(torch_formula.dtype))
    for grad in grads:
        assert (grad[..., [2, 5]] == 0).all()
    assert (grads[1][1] == 0).all()  # the max gets no gradient
    # opcheck compares outputs without equal_nan: the defined latents only.
    defined = [0, 1, 3, 4, 6, 7, 8]
    moments, act_range, shift, counts, cross_sq = inputs
    checked = (moments[:, defined], act_range[:, defined], shift[defined], counts, cross_sq[defined])
    torch.library.opcheck(torch.ops.monoloss_kernels.finalize_scores.default, (*checked, DEN_RTOL, torch.float32))
    torch.library.opcheck(torch.ops.monoloss_kernels.finalize_scores_backward.default,
                          (grad_scores[defined].float(), *checked, DEN_RTOL))


def test_finalize_scores_op_refuses_bad_shapes():
    from monoloss_kernels.stats import DEN_RTOL

    if _extension.EXTENSION_ERROR is not None:
        pytest.skip("the shape checks are the C++ kernels'")
    moments, act_range, shift, counts, cross_sq = _finalize_inputs(torch.float32)
    with pytest.raises(RuntimeError, match=r"finalize_scores: act_range must have shape \(2, 9\)"):
        torch.ops.monoloss_kernels.finalize_scores(moments, act_range[:, :8], shift, counts, cross_sq, DEN_RTOL,
                                                   torch.float32)
    with pytest.raises(RuntimeError, match=r"finalize_scores_backward: grad_scores must have shape \(9,\)"):
        torch.ops.monoloss_kernels.finalize_scores_backward(torch.ones(8), moments, act_range, shift, counts,
                                                            cross_sq, DEN_RTOL)


@pytest.mark.parametrize("form", ["dense", "topk"])
def test_dominant_latents_loss_and_gradient(backend_device, form):
    """Latents that one sample carries (κ to 1e7, refine.py): the loss replaces their
    one-pass scores with the float64 deflated ones and differentiates a float64
    recomputation of them, so the loss and gradient are within the float32 bounds of the
    definition (the one-pass form gave scores outside [-1, 1], loss 0.36 off, gradients
    5.7e9 against 1.4e7)."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(seed_of("dominant", form))
    if form == "dense":
        acts = make_acts("dominant", 64, 24, gen).float()
        ref_acts = acts.double().requires_grad_()
        ref_dense, inputs = ref_acts, None
    else:
        values, indices = make_topk("dominant", 97, 31, 6, gen)
        acts = values.float()
        ref_acts = acts.double().requires_grad_()
        ref_dense = densify(ref_acts, indices, 31)
    emb = make_emb("plain", acts.shape[0], 8, gen).float()
    expected = reference_loss(ref_dense, emb)
    expected.backward()
    expected_scores = reference_scores(ref_dense.detach(), emb)

    ours = acts.to(device).requires_grad_()
    inputs = ours if form == "dense" else (ours, indices.to(device))
    num_latents = None if form == "dense" else 31
    scores = mk.monoloss(inputs, emb.to(device), num_latents=num_latents, backend=backend, reduction="none")
    torch.testing.assert_close(scores.detach().cpu().double(), expected_scores, atol=2e-5, rtol=0, equal_nan=True)
    loss = mk.monoloss(inputs, emb.to(device), num_latents=num_latents, backend=backend)
    loss.backward()
    assert abs(loss.item() - expected.item()) <= LOSS_ATOL
    check_grad(ours.grad.cpu(), ref_acts.grad)


@pytest.mark.parametrize("differentiable_emb", [False, True], ids=["acts", "acts_and_emb"])
def test_sparse_refined_gradient_from_entries(backend_device, differentiable_emb):
    """A TopK batch's refined latents are differentiated from their entries
    (loss.refined_scores_of_entries, O(d) per entry; densifying their columns took 5 s of
    a 4096-row heavy-tailed batch): against autograd of the float64 closed form on the
    densified matrix, with refine's hard cases (test_refine.ill_conditioned_acts: κ to
    10^7, ties at the max, a max that is an implicit zero), a max at the one row without
    an entry, and stored zeros (k above every row's nonzeros) tied with the implicit ones."""
    from .test_refine import ill_conditioned_acts

    backend, device = backend_device
    gen = torch.Generator().manual_seed(seed_of("sparse refined gradient", differentiable_emb))
    n, f = 89, 27
    one_row_at_max = torch.full((n, 1), -1.0, dtype=torch.float64)
    one_row_at_max += 2**-24 * torch.randint(0, 3, (n, 1), generator=gen)
    one_row_at_max[7] = 0.0
    acts = torch.cat([ill_conditioned_acts(n, f - 1, gen), one_row_at_max.float()], dim=1)
    k = int((acts != 0).sum(1).max()) + 2
    indices = acts.abs().topk(k, dim=1).indices
    values = acts.gather(1, indices)
    emb = make_emb("zero_dup", n, 7, gen).float()
    ref_values, ref_emb = values.double().requires_grad_(), emb.double().requires_grad_(differentiable_emb)
    expected = reference_loss(densify(ref_values, indices, f), ref_emb)
    expected.backward()

    leaf, leaf_emb = values.to(device).requires_grad_(), emb.to(device).requires_grad_(differentiable_emb)
    loss = mk.monoloss((leaf, indices.to(device)), leaf_emb, num_latents=f, backend=backend,
                       differentiable_emb=differentiable_emb)
    loss.backward()
    assert abs(loss.item() - expected.item()) <= LOSS_ATOL
    check_grad(leaf.grad.cpu(), ref_values.grad)
    if differentiable_emb:
        check_grad(leaf_emb.grad.cpu(), ref_emb.grad)


def test_one_dominant_sample_emb_gradient():
    """A latent at 1.0 in one row and below 1e-5 in five others (κ ~ 1e5): the emb
    gradient too (differentiable_emb) is that of the definition."""
    gen = torch.Generator().manual_seed(73)
    acts = torch.zeros(256, 2)
    acts[:, 1] = torch.relu(torch.randn(256, generator=gen))
    acts[0, 0] = 1.0
    acts[1:6, 0] = 1e-5 * torch.rand(5, generator=gen)
    emb = torch.randn(256, 16, generator=gen)
    ref_acts, ref_emb = acts.double().requires_grad_(), emb.double().requires_grad_()
    reference_loss(ref_acts, ref_emb).backward()
    ours_acts, ours_emb = acts.clone().requires_grad_(), emb.clone().requires_grad_()
    mk.monoloss(ours_acts, ours_emb, differentiable_emb=True).backward()
    check_grad(ours_acts.grad, ref_acts.grad)
    check_grad(ours_emb.grad, ref_emb.grad)


def _refine_op_inputs():
    from monoloss_kernels._dispatch import stats_function

    gen = torch.Generator().manual_seed(79)
    # Latents 7 and 10, at 1000 + a rest below float32 resolution, are constant (NaN
    # scores, which opcheck's comparisons would not take as equal): left out.
    acts = make_acts("dominant", 40, 12, gen).float()[:, [0, 1, 2, 3, 4, 5, 6, 8, 9, 11]]
    emb = make_emb("plain", 40, 6, gen).float()
    stats = stats_function("torch", emb.device)(acts, emb)
    latents = ill_conditioned_latents(stats)
    assert latents.numel() > 0  # the op's refinement is exercised, not only its pass-through
    return finalize(stats).detach(), acts, emb, (stats.act_range, latents)


def test_opcheck_refine_loss_scores():
    scores, acts, emb, rest = _refine_op_inputs()
    torch.library.opcheck(torch.ops.monoloss_kernels.refine_loss_scores.default,
                          (scores.requires_grad_(), acts.requires_grad_(), emb, *rest))
    csr = acts.to_sparse_csr()
    # Copies, not the CSR tensor's views: torch 2.11's aot_dispatch_dynamic check fakifies a
    # view's base and cannot fakify a sparse one (H200 run 8); the op takes plain tensors.
    crow, cols, values = (t.clone() for t in (csr.crow_indices(), csr.col_indices(), csr.values()))
    args = (scores, crow, cols, values.requires_grad_(), emb, 10, *rest)
    torch.library.opcheck(torch.ops.monoloss_kernels.refine_loss_scores_csr.default, args)


def test_refine_loss_scores_compiles_fullgraph():
    """The refinement is opaque to torch.compile (its data-dependent gathers of the latents'
    entries run inside the op and its backward op): one graph, the eager values and gradients."""
    scores, acts, emb, rest = _refine_op_inputs()

    def loss(s, a):
        return torch.ops.monoloss_kernels.refine_loss_scores(s, a, emb, *rest).nansum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        s, a = scores.clone().requires_grad_(), acts.clone().requires_grad_()
        value = fn(s, a)
        results.append((value, *torch.autograd.grad(value, (s, a))))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager)
