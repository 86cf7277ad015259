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
