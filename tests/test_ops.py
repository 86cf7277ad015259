"""The ops as the dispatcher sees them: registration, opcheck, torch.compile."""

import os
import shutil

import pytest
import torch

import monoloss_kernels as mk
from monoloss_kernels import _extension
from monoloss_kernels.stats import MonoScoreStats, finalize

from .helpers import BACKEND_DEVICES, DEVICES, make_acts, make_emb, make_topk, seed_of

STATS_OPS = {
    "cpu": torch.ops.monoloss_kernels.monoscore_stats,
    "cuda": torch.ops.monoloss_kernels.monoscore_stats,
    "triton": torch.ops.monoloss_kernels.monoscore_stats_triton,
    "torch": torch.ops.monoloss_kernels.monoscore_stats_torch,
}
CSR_STATS_OPS = {
    "cpu": torch.ops.monoloss_kernels.monoscore_stats_csr,
    "cuda": torch.ops.monoloss_kernels.monoscore_stats_csr,
    "triton": torch.ops.monoloss_kernels.monoscore_stats_csr_triton,
    "torch": torch.ops.monoloss_kernels.monoscore_stats_csr_torch,
}


def test_extension_loaded():
    assert _extension.EXTENSION_ERROR is None, _extension.EXTENSION_ERROR
    assert _extension.has_kernel("CPU")


def _nvcc_available():
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which("nvcc") is not None or os.path.exists(os.path.join(cuda_home, "bin", "nvcc"))


@pytest.mark.skipif(os.environ.get("MONOLOSS_SKIP_CUDA") == "1", reason="CUDA build switched off")
def test_cuda_kernels_built_where_nvcc_exists():
    """A quiet CPU-only build must fail CI: with nvcc and a CUDA torch, every C++ op (the
    statistics, dense and CSR, and their backward) has its CUDA kernel registered."""
    ops = (_extension.STATS_OP, _extension.CSR_STATS_OP, _extension.BACKWARD_OP, _extension.CSR_BACKWARD_OP)
    if torch.version.cuda is None or not _nvcc_available():
        assert not any(_extension.has_kernel("CUDA", op) for op in ops)
        return
    missing = [op for op in ops if not _extension.has_kernel("CUDA", op)]
    assert not missing, f"nvcc and a CUDA torch are present but _C has no CUDA kernel for {missing}"
    assert all(_extension.has_kernel("CPU", op) for op in ops)


@pytest.mark.parametrize(
    "backend, device", [p for p in BACKEND_DEVICES if p[0] in STATS_OPS], ids=lambda x: str(x)
)
def test_opcheck(backend, device):
    test_utils = "ALL"
    if backend == "triton" and device == "cpu":
        # The Triton interpreter runs kernels eagerly and cannot be traced by AOTAutograd;
        # on a GPU the same test runs every check.
        test_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    gen = torch.Generator().manual_seed(4)
    acts = make_acts("negative", 45, 37, gen).float().to(device)
    emb = make_emb("zero_dup", 45, 19, gen).float().to(device)
    torch.library.opcheck(STATS_OPS[backend], (acts, emb), test_utils=test_utils)
    torch.library.opcheck(STATS_OPS[backend], (acts.half(), emb.double()), test_utils=test_utils)


@pytest.mark.parametrize(
    "backend, device", [p for p in BACKEND_DEVICES if p[0] in STATS_OPS], ids=lambda x: str(x)
)
def test_compile_fullgraph(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter cannot be traced by torch.compile; tested on GPUs")
    gen = torch.Generator().manual_seed(6)
    acts = make_acts("relu", 53, 29, gen).float().to(device)
    emb = make_emb("plain", 53, 17, gen).float().to(device)
    op = STATS_OPS[backend]

    @torch.compile(fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    def scores(a, e):
        return finalize(MonoScoreStats(*op(a, e)))

    torch.testing.assert_close(scores(acts, emb), mk.monoscore(acts, emb, backend=backend), equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_fake_shapes(device):
    acts = torch.empty(11, 7, device="meta")
    emb = torch.empty(11, 5, device="meta", dtype=torch.bfloat16)
    for op in {id(o): o for o in STATS_OPS.values()}.values():
        out = MonoScoreStats(*op(acts, emb))
        assert out.cross.shape == (5, 7) and out.cross.dtype == torch.float32
        assert out.unit_emb_sum.shape == (5,) and out.unit_emb_sum.dtype == torch.float64
        assert out.shift.shape == (7,) and out.act_range.shape == (2, 7)
        assert out.moments.shape == (4, 7) and out.moments.dtype == torch.float64
        assert out.counts.shape == (2,)


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES, ids=lambda x: str(x))
def test_opcheck_csr(backend, device):
    """Schema, fake tensors and the registered backward (values and emb require grad)."""
    from .helpers import make_topk

    gen = torch.Generator().manual_seed(8)
    values, indices = make_topk("always_on_offset", 41, 23, 5, gen)
    emb = make_emb("zero_dup", 41, 13, gen).float().to(device).requires_grad_()
    crow = torch.arange(42, device=device) * 5
    values = values.flatten().float().to(device).requires_grad_()
    args = (crow, indices.flatten().to(device), values, emb, 23)
    # The Triton interpreter and the custom ops holding a host sync cannot be traced by AOTAutograd.
    test_utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(CSR_STATS_OPS[backend], args, test_utils=test_utils)
    half_args = (*args[:2], values.detach().half(), emb.detach().double(), 23)
    torch.library.opcheck(CSR_STATS_OPS[backend], half_args, test_utils=test_utils)


def test_fake_shapes_csr():
    crow = torch.empty(12, device="meta", dtype=torch.long)
    cols = torch.empty(30, device="meta", dtype=torch.long)
    for op in {id(o): o for o in CSR_STATS_OPS.values()}.values():
        out = MonoScoreStats(*op(crow, cols, torch.empty(30, device="meta"), torch.empty(11, 5, device="meta"), 7))
        assert out.cross.shape == (5, 7) and out.cross.stride() == (1, 5)  # an (M, d) buffer, transposed
        assert out.unit_emb_sum.shape == (5,) and out.moments.shape == (4, 7) and out.act_range.shape == (2, 7)


def test_pooled_cpu_buffers_are_reused_and_overwritten():
    """The C++ CPU kernels take their large outputs from a pool of freed buffers
    (csrc/cpu/buffer_pool.h, at least 1 MiB): the loss and its gradient are the same
    when the pool hands back buffers filled with NaN, and the pool keeps buffers."""
    gen = torch.Generator().manual_seed(seed_of("pooled buffers"))
    n, m, k, d = 2051, 1031, 7, 263  # cross (m, d) float32: 1.03 MiB
    values, indices = make_topk("relu", n, m, k, gen)
    values = values.float().requires_grad_()
    emb = make_emb("plain", n, d, gen).float()

    def loss_and_grad():
        values.grad = None
        loss = mk.monoloss((values, indices), emb, num_latents=m, backend="cpu")
        loss.backward()
        return loss.detach(), values.grad.clone()

    expected = loss_and_grad()
    assert mk.release_cpu_buffers() > 0
    # Poison: pooled outputs of both kernels that return one, filled with NaN and freed.
    crow = torch.arange(n + 1) * k
    cross = torch.ops.monoloss_kernels.monoscore_stats_csr(crow, indices.flatten(), values.detach().flatten(), emb,
                                                           m)[0]
    grad_cross = torch.ops.monoloss_kernels.shifted_sq_norms_backward(
        torch.ones(m, dtype=torch.float64), cross, torch.zeros(d), torch.zeros(m))[0]
    cross.fill_(float("nan"))
    grad_cross.fill_(float("nan"))
    del cross, grad_cross
    for ours, ref in zip(loss_and_grad(), expected):
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    assert mk.release_cpu_buffers() >= 2 * m * d * 4
