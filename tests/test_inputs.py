"""The latents of every SAE library, as each hands them over, through the one validation
point: each form gives the scores of its dense equivalent, gradients reach the tensor the
caller passed, and each misuse gets a message that says what was probably meant.

The libraries are not installed: each output form is built by hand, as the library's
source builds it (sparsify's NamedTuples are redefined here with the same field names).
"""

import re
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

import monoloss_kernels as mk
from monoloss_kernels import _validate
from monoloss_kernels.stats import CsrActs

from .helpers import densify, make_emb, make_topk
from .test_loss import LOSS_ATOL, check_grad, reference_loss

# Scores of a sparse form against `monoscore` of its densified matrix: the same statistics
# filled by another kernel (sparse vs dense), each within ~1e-6 of the float64 definition.
FORM_ATOL = 2e-5
N, M, K, D = 37, 29, 5, 11  # odd sizes; M < 256 so that uint8 indices can hold every latent


class EncoderOutput(NamedTuple):  # sparsify.fused_encoder.EncoderOutput (SparseCoder.encode)
    top_acts: Tensor
    top_indices: Tensor
    pre_acts: Tensor


class ForwardOutput(NamedTuple):  # sparsify.sparse_coder.ForwardOutput (SparseCoder.forward)
    sae_out: Tensor
    latent_acts: Tensor
    latent_indices: Tensor
    fvu: Tensor
    auxk_loss: Tensor
    multi_topk_fvu: Tensor


def topk_latents(seed: int, case: str = "relu"):
    """(values (N, K) float32, indices (N, K) int64, emb (N, D) float32), fresh random."""
    gen = torch.Generator().manual_seed(seed)
    values, indices = make_topk(case, N, M, K, gen)
    return values.float(), indices, make_emb("zero_dup", N, D, gen).float()


def library_form(form: str, values: Tensor, indices: Tensor):
    """The same TopK latents as the named library hands them over."""
    dense = densify(values, indices, M)
    if form == "saelens_dense":  # SAELens encode(x): the dense (N, M) latents
        return dense
    if form == "torch_topk":  # torch.return_types.topk, what a TopK layer computes
        top = torch.topk(dense.masked_fill(dense == 0, float("-inf")), K, dim=1)  # the K stored entries, sorted
        assert torch.isfinite(top.values).all()
        return top
    if form == "values_indices":
        return values, indices
    if form == "openai":  # openai/sparse_autoencoder kernels: (indices, values), indices first
        return indices, values
    if form == "sparsify_encode":
        pre_acts = dense + torch.rand(N, M) * (dense == 0)  # post-ReLU acts before selection
        return EncoderOutput(values, indices, pre_acts)
    if form == "sparsify_forward":
        scalar = torch.tensor(0.5)
        return ForwardOutput(torch.randn(N, 7), values, indices, scalar, scalar, scalar)
    if form == "dictionary_learning":  # AutoEncoderTopK.encode(x, return_topk=True), use_threshold=False
        post_relu = dense + torch.rand(N, M) * 0.01 * (dense == 0)
        return dense, values, indices, post_relu
    if form == "saelens_coo":  # SAELens sparse training output
        return dense.to_sparse()
    if form == "csr":
        return dense.to_sparse_csr()
    raise ValueError(form)


FORMS = ["saelens_dense", "torch_topk", "values_indices", "openai", "sparsify_encode", "sparsify_forward",
         "dictionary_learning", "saelens_coo", "csr"]
SPARSE_FORMS = {"torch_topk", "values_indices", "openai", "sparsify_encode", "sparsify_forward",
                "dictionary_learning", "saelens_coo", "csr"}


@pytest.mark.parametrize("case", ["relu", "negative"])
@pytest.mark.parametrize("form", FORMS)
def test_library_form_scores_equal_dense(form, case):
    values, indices, emb = topk_latents(101, case)
    acts = library_form(form, values, indices)
    expected = mk.monoscore(densify(values, indices, M), emb)
    assert torch.isfinite(expected).sum() > M // 2, "most latents must be defined, or the check is thin"
    # sparse forms are canonicalised to CsrActs (the O(nnz·d) path), the dense one is not
    canonical = _validate.canonical_acts(acts, num_latents=M)
    assert isinstance(canonical, CsrActs) == (form in SPARSE_FORMS)
    torch.testing.assert_close(mk.monoscore(acts, emb, num_latents=M), expected, rtol=0, atol=FORM_ATOL,
                               equal_nan=True)
    acc = mk.MonoScoreAccumulator(num_latents=M, dim=D)
    acc.update(acts, emb)
    torch.testing.assert_close(acc.compute(), expected, rtol=0, atol=FORM_ATOL, equal_nan=True)


def test_library_forms_leave_inputs_unchanged():
    values, indices, emb = topk_latents(102)
    for form in FORMS:
        acts = library_form(form, values.clone(), indices.clone())
        tensors = [t for t in (acts if isinstance(acts, tuple) else (acts,))]
        before = [t.clone() for t in tensors]
        mk.monoscore(acts, emb, num_latents=M)
        for t, t0 in zip(tensors, before):
            assert t.dtype == t0.dtype and t.layout == t0.layout
            torch.testing.assert_close(t.to_dense() if t.layout != torch.strided else t,
                                       t0.to_dense() if t0.layout != torch.strided else t0, rtol=0, atol=0)


def test_dictionary_learning_with_threshold_takes_the_dense_encoding():
    """encode(x, return_topk=True, use_threshold=True) returns the thresholded dense encoding
    (what the SAE decodes) with the top-k pair of the un-thresholded acts: the dense one counts."""
    gen = torch.Generator().manual_seed(103)
    post_relu = torch.relu(torch.randn(N, M, generator=gen))
    threshold = post_relu[post_relu > 0].median()
    dense = post_relu * (post_relu > threshold)  # some rows keep more than K latents, some fewer
    top = post_relu.topk(K, dim=1, sorted=False)
    emb = make_emb("plain", N, D, gen).float()
    assert not torch.equal(densify(top.values, top.indices, M), dense), "the two encodings must differ"
    canonical = _validate.canonical_acts((dense, top.values, top.indices, post_relu), num_latents=M)
    assert canonical is dense
    torch.testing.assert_close(mk.monoscore((dense, top.values, top.indices, post_relu), emb), mk.monoscore(dense, emb),
                               rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("order", ["values_first", "indices_first"])
@pytest.mark.parametrize("index_dtype", _validate.INDEX_DTYPES, ids=str)
def test_every_integer_index_dtype(index_dtype, order):
    values, indices, emb = topk_latents(104)
    narrow = indices.to(index_dtype)
    assert torch.equal(narrow.to(torch.int64), indices)
    pair = (values, narrow) if order == "values_first" else (narrow, values)
    scores = mk.monoscore(pair, emb, num_latents=M)
    # the same int64 entries after conversion: the same kernel call, bit for bit
    torch.testing.assert_close(scores, mk.monoscore((values, indices), emb, num_latents=M), rtol=0, atol=0,
                               equal_nan=True)
    torch.testing.assert_close(scores, mk.monoscore(densify(values, indices, M), emb), rtol=0, atol=FORM_ATOL,
                               equal_nan=True)
    assert narrow.dtype == index_dtype  # the caller's tensor is not converted in place


@pytest.mark.parametrize("index_dtype", [torch.uint16, torch.uint32, torch.uint64, torch.int16], ids=str)
def test_out_of_range_index_of_narrow_dtype(index_dtype):
    values, indices, emb = topk_latents(105)
    bad = indices.clone()
    bad[4, 1] = M  # one past the last latent
    match = rf"acts indices must lie in \[0, num_latents={M}\), got values from \d+ to {M}"
    with pytest.raises(ValueError, match=match):
        mk.monoscore((values, bad.to(index_dtype)), emb, num_latents=M)


def test_uint64_index_beyond_int64_is_refused():
    values, indices, emb = topk_latents(106)
    bad = indices.to(torch.uint64)
    bad.view(torch.int64)[2, 0] = 5 - 2**63  # the bits of 2**63 + 5 (older torch refuses that Python int)
    with pytest.raises(ValueError, match=rf"acts indices must lie in \[0, num_latents={M}\), got values from -"):
        mk.monoscore((values, bad), emb, num_latents=M)


@pytest.mark.parametrize("form", ["openai", "sparsify_encode", "sparsify_forward", "torch_topk_reordered",
                                  "dictionary_learning"])
def test_gradient_reaches_the_callers_values(form):
    """MonoLoss of a reordered or named TopK form back-propagates into the values tensor
    the caller holds, equal to the gradient of the float64 closed form on the densified matrix."""
    values, indices, emb = topk_latents(107, "negative")
    leaf = values.clone().requires_grad_()
    if form == "openai":
        acts = (indices.int(), leaf)
    elif form == "sparsify_encode":
        acts = EncoderOutput(leaf, indices, torch.zeros(N, M))
    elif form == "sparsify_forward":
        scalar = torch.tensor(0.0)
        acts = ForwardOutput(torch.zeros(N, 3), leaf, indices, scalar, scalar, scalar)
    elif form == "torch_topk_reordered":
        acts = torch.return_types.topk((leaf, indices.to(torch.uint16)))
    else:
        acts = (densify(leaf, indices, M), leaf, indices, densify(leaf, indices, M).detach())
    ref_values = values.double().requires_grad_()
    expected = reference_loss(densify(ref_values, indices, M), emb)
    expected.backward()
    loss = mk.monoloss(acts, emb, num_latents=M)
    loss.backward()
    assert abs(loss.item() - expected.item()) <= LOSS_ATOL
    assert leaf.grad is not None, "the gradient must reach the values tensor the caller passed"
    check_grad(leaf.grad, ref_values.grad)


def test_monoloss_module_accepts_library_forms():
    values, indices, emb = topk_latents(108)
    criterion = mk.MonoLoss(num_latents=M)
    expected = criterion(densify(values, indices, M), emb)
    for form in ["openai", "sparsify_encode", "dictionary_learning", "torch_topk"]:
        torch.testing.assert_close(criterion(library_form(form, values, indices), emb), expected, rtol=0,
                                   atol=LOSS_ATOL)


# --- misuse: what was probably meant --------------------------------------------------------------

def _misuse_inputs():
    values, indices, emb = topk_latents(109)
    latents = densify(values, indices, M)
    reconstruction = torch.randn(N, D)  # the SAE's output, of the input's width d
    return latents, values, indices, emb, reconstruction


WIDTH_MESSAGE = (rf"num_latents={M} but acts has {D} columns \(latents\), as many as emb \(d={D}\): acts looks like "
                 rf"the SAE's input or its reconstruction \(forward\(\) output\); pass its latents, encode\(x\), of "
                 rf"width {M}")
SWAP_MESSAGE = r"acts and emb look swapped; the order is \(acts, emb\): latents first, then embeddings"
ENTRIES = ["monoscore", "monoloss", "accumulator"]


def call_entry(entry: str, acts, emb: Tensor) -> None:
    """acts and emb through one public entry, with num_latents=M."""
    if entry == "monoscore":
        mk.monoscore(acts, emb, num_latents=M)
    elif entry == "monoloss":
        mk.monoloss(acts, emb, num_latents=M)
    else:
        mk.MonoScoreAccumulator(num_latents=M, dim=D).update(acts, emb)


@pytest.mark.parametrize("entry", ENTRIES)
def test_reconstruction_instead_of_latents(entry):
    """delphi PR #131: the SAE's forward() output cached instead of its encode() latents."""
    _, _, _, emb, reconstruction = _misuse_inputs()
    with pytest.raises(ValueError, match=WIDTH_MESSAGE):
        call_entry(entry, reconstruction, emb)


def test_reconstruction_as_sparse_tensor():
    _, _, _, emb, reconstruction = _misuse_inputs()
    with pytest.raises(ValueError, match=WIDTH_MESSAGE):
        mk.monoscore(reconstruction.to_sparse_csr(), emb, num_latents=M)


@pytest.mark.parametrize("entry", ENTRIES)
def test_dense_arguments_swapped(entry):
    """The MonoLoss repo's compute_monosemanticity_loss_batch(x, latents) order."""
    latents, _, _, emb, _ = _misuse_inputs()
    match = (rf"num_latents={M} but acts has {D} columns \(latents\), while emb has {M} = num_latents columns: "
             + SWAP_MESSAGE)
    with pytest.raises(ValueError, match=match):
        call_entry(entry, emb, latents)


@pytest.mark.parametrize("form", ["values_indices", "openai", "sparsify_encode", "saelens_coo", "csr", "csr_acts"])
def test_sparse_latents_passed_as_emb(form):
    latents, values, indices, emb, _ = _misuse_inputs()
    sparse = (CsrActs(torch.arange(N + 1) * K, indices.reshape(-1), values.reshape(-1), M) if form == "csr_acts"
              else library_form(form, values, indices))
    match = (r"emb must be the dense \(N, d\) embeddings tensor, got .*, which looks like sparse latents, with acts "
             rf"a dense \({N}, {D}\) float32 tensor: " + SWAP_MESSAGE)
    for entry in ENTRIES:
        with pytest.raises(TypeError, match=match):
            call_entry(entry, emb, sparse)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda lat, v, i, e, r: (lat, {"mu": 0.0, "std": 1.0}),
         r"openai's encode returns \(latents, info\)"),
        (lambda lat, v, i, e, r: (r, lat),
         r"acts indices must be int64 or int32 or int16 or int8 or uint8 or uint16 or uint32 or uint64, but both "
         r"tensors of the pair are floating point.*dictionary_learning's forward\(x, output_features=True\) returns "
         r"\(x_hat, features\)"),
        (lambda lat, v, i, e, r: (lat + 0.1, lat),
         r"overcomplete's encode returns \(pre_codes, codes\)"),
        (lambda lat, v, i, e, r: (lat + 0.1, lat, r),
         rf"got a tuple of 3 \(\({N}, {M}\) float32, \({N}, {M}\) float32, \({N}, {D}\) float32\)\. If this is an "
         r"SAE's output, pass its latents tensor.*"
         r"the MonoLoss repo's SAE returns \(pre_acts, latents, reconstruction\)"),
        (lambda lat, v, i, e, r: (i, i.int()),
         r"acts values must be float32 or float16 or bfloat16 or float64, but both tensors of the \(values, indices\) "
         r"pair have integer dtypes"),
        (lambda lat, v, i, e, r: (v, i > 2),
         r"acts given as a pair needs one floating-point tensor \(the values\) and one tensor of latent indices"),
        (lambda lat, v, i, e, r: ("values", "indices"),
         r"acts given as a tuple must be the \(values, indices\) pair of torch.topk \(either order\)"),
    ],
    ids=["openai_encode_info", "forward_output_features", "overcomplete_encode", "monoloss_repo_forward",
         "two_index_tensors", "bool_indices", "not_tensors"],
)
def test_sae_outputs_that_are_not_latents(make, match):
    latents, values, indices, emb, reconstruction = _misuse_inputs()
    with pytest.raises(TypeError, match=match):
        mk.monoscore(make(latents, values, indices, emb, reconstruction), emb, num_latents=M)


def test_per_token_latents_must_be_flattened():
    """LM SAEs give (batch, seq, M) latents and sparsify (batch, seq, k) pairs: one row per token."""
    latents, values, indices, emb, _ = _misuse_inputs()
    hint = r"flatten the leading dimensions into rows, e.g. x.flatten\(0, -2\), for acts and emb alike"
    with pytest.raises(ValueError, match=rf"acts must be 2-D, got 3-D with shape \(1, {N}, {M}\); " + hint):
        mk.monoscore(latents[None], emb)
    with pytest.raises(ValueError, match=rf"acts values must be 2-D, got 3-D with shape \(1, {N}, {K}\); " + hint):
        mk.monoscore(EncoderOutput(values[None], indices[None], latents[None]), emb, num_latents=M)
    with pytest.raises(ValueError, match=r"emb must be 2-D, got 3-D.*" + hint):
        mk.monoscore(latents, emb[None])
    # flattened as the message says, the scores are those of the 2-D inputs
    torch.testing.assert_close(mk.monoscore(latents[None].flatten(0, -2), emb), mk.monoscore(latents, emb),
                               rtol=0, atol=0, equal_nan=True)


def test_width_mismatch_without_a_known_cause_stays_plain():
    """acts of a third width: no guess about what it was."""
    latents, _, _, emb, _ = _misuse_inputs()
    with pytest.raises(ValueError, match=re.escape(f"num_latents={M + 3} but acts has {M} columns (latents)") + "$"):
        mk.monoscore(latents, emb, num_latents=M + 3)
