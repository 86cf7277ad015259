"""Sparse activations (TopK pairs, COO, CSR) on every backend against the float64
pairwise definition of the densified matrix."""

import numpy as np
import pytest
import torch

import monoloss_kernels as mk
from monoloss_kernels.reference import closed_form_monoscore, pairwise_monoscore

from .helpers import BACKEND_DEVICES, SPARSE_CASES, densify, make_emb, make_topk, seed_of, sparse_form
from .test_monoscore import ATOL, check_scores, run_unchanged

# torch calls sparse CSR "beta" and warns on first use.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

# (N, M, k, d): odd sizes, k from 1 to a third of M.
SPARSE_SHAPES = [(37, 19, 5, 7), (131, 67, 9, 33), (263, 45, 15, 130), (50, 11, 1, 6)]
# always_on_offset stores two always-on latents plus others: it needs k >= 3.
CASE_SHAPES = [(case, shape) for case in SPARSE_CASES for shape in SPARSE_SHAPES
               if case != "always_on_offset" or shape[2] >= 3]
FORMS = ["topk", "coo", "csr"]


def sparse_scores(backend, acts, emb, m):
    return mk.monoscore(acts, emb, num_latents=m if isinstance(acts, tuple) else None, backend=backend)


@pytest.mark.parametrize("case, shape", CASE_SHAPES, ids=lambda x: x if isinstance(x, str) else "x".join(map(str, x)))
@pytest.mark.parametrize("form", FORMS)
def test_sparse_matches_pairwise(backend_device, form, case, shape):
    backend, device = backend_device
    n, m, k, d = shape
    gen = torch.Generator().manual_seed(seed_of(form, case, shape))
    values, indices = make_topk(case, n, m, k, gen)
    values, indices = values.float().to(device), indices.to(device)
    emb = make_emb("zero_dup", n, d, gen).float().to(device)
    acts = sparse_form(form, values, indices, m)
    scores = sparse_scores(backend, acts, emb, m)
    dense = densify(values, indices, m)
    check_scores(scores, dense, emb, torch.float32)
    # The same backend on the dense matrix agrees as closely as both agree with the definition.
    torch.testing.assert_close(scores, mk.monoscore(dense, emb, backend=backend), atol=ATOL[torch.float32],
                               rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_sparse_dtypes(backend_device, dtype):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(17)
    values, indices = make_topk("negative", 97, 31, 7, gen)
    values, indices = values.to(device, dtype), indices.to(device)
    emb = make_emb("plain", 97, 23, gen).to(device, dtype)
    scores = run_unchanged(lambda v, i, e: mk.monoscore((v, i), e, num_latents=31, backend=backend),
                           values, indices, emb)
    check_scores(scores, densify(values, indices, 31), emb, dtype)


def test_topk_namedtuple_and_int32_indices(backend_device):
    """What an SAE hands over: torch.topk's namedtuple (and int32 indices, as some libraries store)."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(19)
    pre_acts = torch.randn(88, 40, generator=gen).to(device)
    emb = make_emb("plain", 88, 16, gen).float().to(device)
    top = torch.topk(pre_acts, 6, dim=1)
    dense = densify(top.values, top.indices, 40)
    scores = mk.monoscore(top, emb, num_latents=40, backend=backend)
    check_scores(scores, dense, emb, torch.float32)
    int32_pair = (top.values, top.indices.int())
    torch.testing.assert_close(mk.monoscore(int32_pair, emb, num_latents=40, backend=backend), scores, equal_nan=True)


def test_sparse_large_n_float32(backend_device):
    """N = 10^5 (+3): long per-latent sums (two latents stored in every row) keep the 2e-5 bound."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(23)
    n, m, k, d = 100_003, 13, 4, 17
    values, indices = make_topk("always_on_offset", n, m, k, gen)
    values, indices = values.float().to(device), indices.to(device)
    emb = make_emb("zero_dup", n, d, gen).float().to(device)
    scores = mk.monoscore((values, indices), emb, num_latents=m, backend=backend)
    check_scores(scores, densify(values, indices, m), emb, torch.float32, reference=closed_form_monoscore)


def test_sparse_edge_cases(backend_device):
    backend, device = backend_device
    gen = torch.Generator().manual_seed(29)
    emb = make_emb("plain", 30, 5, gen).float().to(device)
    # No entry stored at all: every latent is constant 0, so undefined.
    empty = (torch.empty(30, 0, device=device), torch.empty(30, 0, dtype=torch.long, device=device))
    assert mk.monoscore(empty, emb, num_latents=8, backend=backend).isnan().all()
    # M = 0 and N < 2.
    assert mk.monoscore(empty, emb, num_latents=0, backend=backend).shape == (0,)
    one = (torch.ones(1, 2, device=device), torch.tensor([[0, 3]], device=device))
    assert mk.monoscore(one, emb[:1], num_latents=4, backend=backend).isnan().all()
    # d = 0: every cosine is 0.
    values, indices = make_topk("relu", 30, 9, 3, gen)
    values, indices = values.float().to(device), indices.to(device)
    zero_dim = torch.zeros(30, 0, device=device)
    scores = mk.monoscore((values, indices), zero_dim, num_latents=9, backend=backend)
    check_scores(scores, densify(values, indices, 9), zero_dim, torch.float32)


def _good_topk(device="cpu"):
    gen = torch.Generator().manual_seed(31)
    values, indices = make_topk("relu", 20, 12, 3, gen)
    return values.float().to(device), indices.to(device), make_emb("plain", 20, 4, gen).float().to(device)


def test_duplicate_latent_in_a_row_raises(backend_device):
    """Detected where each backend orders the entries by latent."""
    backend, device = backend_device
    values, indices, emb = _good_topk(device)
    indices = indices.clone()
    indices[7, 2] = indices[7, 0]
    with pytest.raises(ValueError, match=rf"acts stores latent {int(indices[7, 0])} twice in row 7"):
        mk.monoscore((values, indices), emb, num_latents=12, backend=backend)
    # A one-row batch, whose scores are undefined without a kernel reading it, is refused too.
    one_row = (values[7:8], indices[7:8])
    with pytest.raises(ValueError, match=rf"acts stores latent {int(indices[7, 0])} twice in row 0"):
        mk.monoscore(one_row, emb[7:8], num_latents=12, backend=backend)
    with pytest.raises(ValueError, match=rf"acts stores latent {int(indices[7, 0])} twice in row 0"):
        mk.monoloss(one_row, emb[7:8], num_latents=12, backend=backend)


def test_num_latents_of_any_integer_type():
    """numpy's integers (e.g. from an SAE config loaded with numpy) count as ints."""
    values, indices, emb = _good_topk()
    expected = mk.monoscore((values, indices), emb, num_latents=12)
    for num_latents in (np.int64(12), np.uint16(12), torch.tensor(12)):
        torch.testing.assert_close(mk.monoscore((values, indices), emb, num_latents=num_latents), expected,
                                   rtol=0, atol=0, equal_nan=True)
    for bad in (12.0, True, np.float32(12), torch.tensor(12.0)):
        with pytest.raises(TypeError, match="num_latents must be a non-negative int"):
            mk.monoscore((values, indices), emb, num_latents=bad)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda v, i, e: ((v, i), e, None), ValueError, r"num_latents is required with a \(values, indices\) pair"),
        (lambda v, i, e: ((v, i.clamp(max=11) + 1), e, 12), ValueError,
         r"acts indices must lie in \[0, num_latents=12\), got values from 1 to 12"),
        (lambda v, i, e: ((v, i - 1), e, 12), ValueError, r"acts indices must lie in \[0, num_latents=12\)"),
        (lambda v, i, e: ((v[:, :2], i), e, 12), ValueError, r"acts values and indices must have the same shape"),
        (lambda v, i, e: ((v, i.float()), e, 12), TypeError, r"acts indices must be int64 or int32"),
        (lambda v, i, e: ((v.int(), i), e, 12), TypeError, r"acts values must be float32"),
        (lambda v, i, e: ((v, i, i), e, 12), TypeError, r"must be the \(values, indices\) pair of torch.topk"),
        (lambda v, i, e: ((v, i), e[:-1], 12), ValueError, r"acts has 20, emb is \(19, 4\)"),
        (lambda v, i, e: ((v, i), e, -3), TypeError, r"num_latents must be a non-negative int"),
        (lambda v, i, e: (densify(v, i, 12).to_sparse(), e, 13), ValueError, r"num_latents=13 but acts has 12 columns"),
        (lambda v, i, e: (densify(v, i, 12).to_sparse_csc(), e, None), TypeError, r"convert with .to_sparse_csr\(\)"),
        (lambda v, i, e: ("acts", e, None), TypeError, r"acts must be a dense \(N, M\) tensor, the \(values, indices\)"),
        (lambda v, i, e: ((v.unsqueeze(0), i.unsqueeze(0)), e, 12), ValueError, r"acts values must be 2-D"),
    ],
    ids=["no-num-latents", "index-too-large", "index-negative", "shape-mismatch", "float-indices", "int-values",
         "three-items", "rows-mismatch", "negative-num-latents", "coo-num-latents", "csc-layout", "not-a-tensor",
         "3d"],
)
def test_bad_sparse_inputs_raise(mutate, error, match):
    acts, emb, num_latents = mutate(*_good_topk())
    with pytest.raises(error, match=match):
        mk.monoscore(acts, emb, num_latents=num_latents)


def test_non_finite_sparse_values_raise(backend_device):
    backend, device = backend_device
    values, indices, emb = _good_topk(device)
    values = values.clone()
    values[3, 1] = float("inf")
    with pytest.raises(ValueError, match="acts contains NaN or Inf"):
        mk.monoscore((values, indices), emb, num_latents=12, backend=backend)


def test_uncoalesced_coo_adds_up(backend_device):
    """Repeated COO coordinates mean their sum (torch's to_dense), not a duplicate."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(37)
    values, indices = make_topk("relu", 40, 10, 3, gen)
    values, indices = values.float().to(device), indices.to(device)
    emb = make_emb("plain", 40, 6, gen).float().to(device)
    rows = torch.arange(40, device=device).repeat_interleave(3)
    coords = torch.stack([torch.cat([rows, rows]), torch.cat([indices.flatten(), indices.flatten()])])
    halves = torch.cat([values.flatten(), values.flatten()]) / 2
    coo = torch.sparse_coo_tensor(coords, halves, (40, 10), check_invariants=True)
    check_scores(mk.monoscore(coo, emb, backend=backend), densify(values, indices, 10), emb, torch.float32)


def test_coo_falsely_flagged_coalesced_raises():
    """torch trusts is_coalesced=True without looking, and coalesce() then leaves the
    indices as they are: unsorted ones are refused as such, not misread as rows."""
    gen = torch.Generator().manual_seed(41)
    values, indices = make_topk("relu", 40, 10, 3, gen)
    rows = torch.arange(40).repeat_interleave(3)
    shuffle = torch.randperm(rows.numel(), generator=gen)
    coords = torch.stack([rows, indices.flatten()])[:, shuffle]
    bad = torch.sparse_coo_tensor(coords, values.flatten()[shuffle].float(), (40, 10), is_coalesced=True)
    with pytest.raises(ValueError, match=r"acts is flagged coalesced \(is_coalesced=True\) but its indices are not "
                                         r"sorted and distinct"):
        mk.monoscore(bad, make_emb("plain", 40, 6, gen).float())


def test_malformed_csr_raises():
    """torch builds CSR tensors without checking them; monoscore checks the row offsets."""
    values, indices, emb = _good_topk()
    csr = densify(values, indices, 12).to_sparse_csr()
    crow = csr.crow_indices().clone()
    crow[5] = crow[7]  # row 5 would end before it starts
    bad = torch.sparse_csr_tensor(crow, csr.col_indices(), csr.values(), csr.shape)
    with pytest.raises(ValueError, match=r"acts crow_indices must run from 0 to nnz=60 without decreasing"):
        mk.monoscore(bad, emb)


@pytest.mark.parametrize("coords, match", [
    ([[0, 1, 2], [-1, 1, 2]], r"acts column indices must lie in \[0, num_latents=4\), got values from -1 to 2"),
    ([[0, 1, 2], [1, 4, 2]], r"acts column indices must lie in \[0, num_latents=4\), got values from 1 to 4"),
    ([[0, 7, 2], [1, 1, 2]], r"acts row indices must lie in \[0, N=3\), got values from 0 to 7"),
], ids=["negative_column", "column_past_m", "row_past_n"])
def test_malformed_coo_raises(coords, match):
    """torch builds COO tensors without checking their indices, and coalescing one with an
    index outside its shape writes out of bounds: every consumer of sparse acts refuses it
    first, before it is coalesced."""
    bad = torch.sparse_coo_tensor(coords, [1.0, 2.0, 3.0], (3, 4))
    emb = torch.randn(3, 5)
    for consume in (lambda: mk.monoscore(bad, emb), lambda: mk.monoloss(bad, emb),
                    lambda: mk.class_purity(bad, torch.tensor([0, 1, 1])),
                    lambda: mk.MonoScoreAccumulator(4, 5).update(bad, emb)):
        with pytest.raises(ValueError, match=match):
            consume()


def test_csr_with_too_few_row_offsets_raises():
    short = torch.sparse_csr_tensor(torch.tensor([0, 1, 2]), torch.tensor([0, 1]), torch.tensor([1.0, 2.0]), (5, 3))
    with pytest.raises(ValueError, match=r"acts crow_indices must have N \+ 1 = 6 entries for shape \(5, 3\), got 3"):
        mk.monoscore(short, torch.randn(5, 2))


def test_recomputed_latent_whose_max_is_an_implicit_zero(backend_device):
    """A latent stored in every row but one, all stored values negative and nearly all at
    the min: its max is the one implicit 0 and its score rests on a few light pairs (κ
    about 10^4), the case in which monoscore's recomputation (refine.py) keeps every row
    in its sums instead of taking a stored top entry out. Next to it, a latent carried by
    one stored entry, and an ordinary one."""
    backend, device = backend_device
    gen = torch.Generator().manual_seed(seed_of("implicit_max"))
    n, d = 53, 9
    values = torch.full((n, 3), -1.0, dtype=torch.float64)
    values[:5, 0] = -1.0 + 1e-4 * torch.rand(5, generator=gen, dtype=torch.float64)  # light, above the min
    values[:, 1] = 1e-5 * torch.rand(n, generator=gen, dtype=torch.float64)
    values[7, 1] = 1.0  # one entry carries latent 1
    values[:, 2] = torch.rand(n, generator=gen, dtype=torch.float64)
    indices = torch.tensor([0, 1, 2]).repeat(n, 1)
    keep = torch.ones(n, 3, dtype=torch.bool)
    keep[11, 0] = False  # latent 0's only implicit zero: its max
    dense = densify(values, indices, 3) * keep
    csr = dense.float().to_sparse_csr()
    emb = make_emb("zero_dup", n, d, gen).float()
    scores = mk.monoscore(csr.to(device), emb.to(device), backend=backend)
    check_scores(scores, dense.float().to(device), emb.to(device), torch.float32)


ISA_ORDER = ("baseline", "avx2", "avx512")


@pytest.mark.skipif(mk._extension.EXTENSION_ERROR is not None, reason="the C++ extension did not load")
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_cpu_sparse_kernels_at_a_narrower_isa(isa):
    """The CSR kernels are templates on the vector width, one per target
    (csrc/cpu/vectorize.h), and the CPU picks the widest it has: MONOLOSS_CPU_ISA runs
    a narrower one, and the sparse and TopK-loss tests pass with it too (against the
    float64 pairwise definition and the float64 closed form, as here)."""
    import os
    import subprocess
    import sys

    native = mk._extension.cpu_isa()
    if ISA_ORDER.index(isa) >= ISA_ORDER.index(native):
        pytest.skip(f"this CPU's widest is {native}: the other tests run {native}")
    env = {**os.environ, "MONOLOSS_CPU_ISA": isa}
    shown = subprocess.run([sys.executable, "-c", "import monoloss_kernels as mk; print(mk.build_info()['cpu_isa'])"],
                           env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == isa
    tests = ["tests/test_sparse.py", "tests/test_backward.py", "tests/test_loss.py::test_topk_loss_and_gradient",
             "tests/test_loss.py::test_fused_cpu_topk_loss_over_row_blocks_and_tiles"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                             "-k", "not triton and not narrower_isa"],
                            env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
