"""Bad input gets a clear error naming the argument, on every backend; never a crash."""

import re

import pytest
import torch

import monoloss_kernels as mk

from .helpers import make_acts, make_emb


def good_inputs(device="cpu"):
    gen = torch.Generator().manual_seed(1)
    return make_acts("relu", 23, 9, gen).float().to(device), make_emb("plain", 23, 6, gen).float().to(device)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda a, e: (a, e[:-1]), ValueError, r"same number of rows N.*\(23, 9\).*\(22, 6\)"),
        (lambda a, e: (a[0], e), ValueError, r"acts must be 2-D, got 1-D"),
        (lambda a, e: (a, e[None]), ValueError, r"emb must be 2-D, got 3-D"),
        (lambda a, e: (a.int(), e), TypeError, r"acts must be float32.*got torch.int32"),
        (lambda a, e: (a > 0, e), TypeError, r"acts must be float32.*got torch.bool"),
        (lambda a, e: (a, e.to(torch.complex64)), TypeError, r"emb must be float32.*got torch.complex64"),
        (lambda a, e: (a.numpy(), e), TypeError, r"acts must be a dense \(N, M\) tensor, .*; got ndarray"),
        (lambda a, e: (a.to_sparse_csc(), e), TypeError, r"got layout torch.sparse_csc \(convert with .to_sparse_csr\(\)\)"),
        (lambda a, e: (a, e.to("meta")), ValueError, r"same device.*acts on cpu and emb on meta"),
    ],
    ids=["mismatched_n", "acts_rank", "emb_rank", "int", "bool", "complex", "numpy", "sparse_csc", "devices"],
)
def test_bad_inputs_raise(backend_device, make, error, match):
    backend, device = backend_device
    acts, emb = make(*good_inputs())
    if isinstance(acts, torch.Tensor) and acts.device.type == "cpu":
        acts = acts.to(device)
    if emb.device.type == "cpu":
        emb = emb.to(device)
    match = match.replace("acts on cpu", f"acts on {re.escape(str(acts.device))}")
    with pytest.raises(error, match=match):
        mk.monoscore(acts, emb, backend=backend)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["acts", "emb", "acts_first_row"])
def test_non_finite_values_raise(backend_device, bad, where):
    backend, device = backend_device
    acts, emb = good_inputs(device)
    target = emb if where == "emb" else acts
    target[0 if where == "acts_first_row" else 5, 3] = bad
    name = "emb" if where == "emb" else "acts"
    acts0, emb0 = acts.clone(), emb.clone()
    with pytest.raises(ValueError, match=f"{name} contains NaN or Inf"):
        mk.monoscore(acts, emb, backend=backend)
    torch.testing.assert_close(acts, acts0, equal_nan=True)
    torch.testing.assert_close(emb, emb0, equal_nan=True)


@pytest.mark.parametrize("form", ["dense", "csr"])
@pytest.mark.parametrize("scale", [1e-30, 1e20], ids=["tiny", "huge"])
def test_emb_rows_of_any_float32_scale(backend_device, form, scale):
    """Rows at 1e-30 or 1e20 are ordinary rows (the scores do not depend on a row's
    scale), although their squares under- or overflow float32: the norms are taken in
    float64. They used to count as zero rows (error 9e-2) or be refused as overflowing."""
    backend, device = backend_device
    acts, emb = good_inputs(device)
    emb[::2] *= scale  # half the rows: the scale differs between rows, as it may
    inputs = acts.to_sparse_csr() if form == "csr" else acts
    expected = mk.reference.pairwise_monoscore(acts.double(), emb.double())
    torch.testing.assert_close(mk.monoscore(inputs, emb, backend=backend).cpu().double(), expected.cpu(),
                               atol=2e-5, rtol=0, equal_nan=True)


@pytest.mark.parametrize("emb_dtype, scale", [(torch.float32, 1e-42), (torch.float64, 1e-40), (torch.float64, 1e39)],
                         ids=["f32_subnormal", "f64_tiny", "f64_huge"])
def test_emb_rows_without_a_float32_unit_row_raise(backend_device, emb_dtype, scale):
    """A row whose 1/norm is no normal float32 cannot be normalised by the kernels: refused
    as such (it was "overflows float32" also for tiny rows)."""
    backend, device = backend_device
    acts, emb = good_inputs(device)
    emb = emb.to(emb_dtype)
    emb[4] *= scale
    with pytest.raises(ValueError, match=r"emb has rows too large or too small to normalise in float32"):
        mk.monoscore(acts, emb, backend=backend)


@pytest.mark.parametrize("column, values", [(0, 1e38), (1, 3e38)], ids=["sums", "range"])
def test_acts_too_large_for_float32_sums_raise(backend_device, column, values):
    """Finite values whose range (±3e38) or sums (1e38 over 23 rows) overflow the
    kernels' float32: a clear error, not a silent NaN score or "NaN or Inf" for finite input."""
    backend, device = backend_device
    acts, emb = good_inputs(device)
    acts[:, column] = values * torch.linspace(-1 if column else 0.5, 1, acts.shape[0], device=device)
    for loss in (mk.monoscore, mk.monoloss):
        with pytest.raises(ValueError, match=r"acts has values too large for the float32 sums"):
            loss(acts, emb, backend=backend)


def test_csr_values_of_the_wrong_length_raise(backend_device):
    """torch does not check that a CSR tensor holds one value per column index."""
    backend, device = backend_device
    acts, emb = good_inputs(device)
    csr = acts.to_sparse_csr()
    bad = torch.sparse_csr_tensor(csr.crow_indices(), csr.col_indices(), csr.values()[:-1], csr.shape)
    with pytest.raises(ValueError, match=r"acts values must hold one value per col_indices entry"):
        mk.monoscore(bad, emb, backend=backend)


@pytest.mark.parametrize("form", ["dense", "topk"])
@pytest.mark.parametrize("where", ["acts", "emb"])
def test_non_finite_single_row_raises(backend_device, form, where):
    """N = 1 has no pair and no statistics to check; its values are still refused."""
    backend, device = backend_device
    acts, emb = (t[:1].clone() for t in good_inputs(device))
    (emb if where == "emb" else acts)[0, 2] = float("nan")
    inputs = torch.topk(acts, 3, dim=1) if form == "topk" else acts
    if form == "topk" and where == "acts":
        inputs.values[0, 0] = float("nan")
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        mk.monoscore(inputs, emb, num_latents=acts.shape[1], backend=backend)
    with pytest.raises(ValueError, match=f"{where} contains NaN or Inf"):
        mk.monoloss(inputs, emb, num_latents=acts.shape[1], backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'fast'"):
        mk.monoscore(*good_inputs(), backend="fast")


def test_cuda_backend_on_cpu_tensors():
    with pytest.raises(ValueError, match=r"backend='cuda' needs cuda tensors; the inputs are on cpu"):
        mk.monoscore(*good_inputs(), backend="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_and_cuda_inputs_mixed():
    acts, emb = good_inputs()
    with pytest.raises(ValueError, match=r"same device.*acts on cpu and emb on cuda"):
        mk.monoscore(acts, emb.cuda())


def test_cpp_op_checks_are_a_backstop():
    """Direct torch.ops calls skip the Python validation; the C++ checks still refuse."""
    acts, emb = good_inputs()
    with pytest.raises(RuntimeError, match=r"acts has N=23 rows but emb has 22"):
        torch.ops.monoloss_kernels.monoscore_stats(acts, emb[:-1])
    with pytest.raises(RuntimeError, match=r"acts must be floating point"):
        torch.ops.monoloss_kernels.monoscore_stats(acts.long(), emb)
