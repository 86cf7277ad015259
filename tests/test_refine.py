"""The recomputation of ill-conditioned latents (monoloss_kernels/refine.py): the op
`deflated_scores` (the extension's CPU kernel where built, else the torch
implementation) and `torch_deflated_scores`, each against the float64 pairwise
definition. monoscore's use of it runs on every backend in test_monoscore.py and
test_sparse.py ("dominant" cases)."""

import pytest
import torch

from monoloss_kernels import _extension
from monoloss_kernels.reference import pairwise_monoscore
from monoloss_kernels.refine import torch_deflated_scores

from .helpers import DEVICES, dominant_latents, make_emb, seed_of

# Absolute tolerance of the float64 scores against the float64 pairwise definition of
# the same values: nothing cancels in the deflated form, so both stay at float64
# rounding (measured: at most 1.3e-15 apart in these tests, κ up to 10^7), where the
# one-pass float32 form is off by up to ~10^-1.
ATOL_F64 = 1e-12
# The C++ kernel against the torch implementation: the same float64 formula, summed in
# another order.
ATOL_SAME_FORMULA = 1e-13

IMPLEMENTATIONS = {
    "op": lambda *args: torch.ops.monoloss_kernels.deflated_scores(*args),
    "torch": torch_deflated_scores,
}


def entries_of(acts: torch.Tensor):
    """(rows, local, values, act_range) of a dense (N, F) matrix: its nonzero entries in
    row-major order, and each latent's min and max over all rows (the zeros included)."""
    rows, local = acts.nonzero(as_tuple=True)
    return rows, local, acts[rows, local], torch.stack(torch.aminmax(acts, dim=0))


def ill_conditioned_acts(n: int, f: int, gen: torch.Generator) -> torch.Tensor:
    """(n, f) float32 activations: the dominant latents (κ from ~1.1 to ~10^7, a latent
    at 1000 + x with no zero, one with a negative min beside exact zeros), then four
    more latents: the max an implicit zero (every entry negative), two entries tied at
    the max, a single entry (undefined: NaN), and every row stored at 1000 + x."""
    x = torch.randn(n, f - 4, generator=gen, dtype=torch.float64)
    acts = dominant_latents(x, gen)
    extra = torch.zeros(n, 4, dtype=torch.float64)
    some = torch.randperm(n, generator=gen)[: n // 3]
    extra[some, 0] = -torch.rand(some.numel(), generator=gen, dtype=torch.float64) - 0.01
    extra[some, 1] = torch.rand(some.numel(), generator=gen, dtype=torch.float64) * 1e-5
    extra[some[:2], 1] = 2.0  # the tie: the first of them is taken out
    extra[some[0], 2] = 0.7
    extra[:, 3] = 1000 + torch.rand(n, generator=gen, dtype=torch.float64)
    return torch.cat([acts, extra], dim=1).float()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("emb_case", ["plain", "zero_dup"])
@pytest.mark.parametrize("shape", [(97, 23, 13), (263, 41, 130)], ids=lambda s: "x".join(map(str, s)))
def test_deflated_scores_match_pairwise(implementation, emb_case, shape, device):
    n, f, d = shape
    gen = torch.Generator().manual_seed(seed_of("deflated", emb_case, shape))
    acts = ill_conditioned_acts(n, f, gen)
    emb = make_emb(emb_case, n, d, gen).float()
    if emb_case == "zero_dup":  # the top sample of latent 0 on a zero-norm row
        emb[acts[:, 0].argmax()] = 0.0
    inputs = tuple(t.to(device) for t in (*entries_of(acts), emb))
    before = [t.clone() for t in inputs]
    scores = IMPLEMENTATIONS[implementation](*inputs)
    for t, t0 in zip(inputs, before):
        torch.testing.assert_close(t, t0, rtol=0, atol=0)
    expected = pairwise_monoscore(acts.double(), emb.double())
    assert scores.dtype == torch.float64 and scores.shape == (f,) and scores.device.type == device
    torch.testing.assert_close(scores.cpu(), expected, atol=ATOL_F64, rtol=0, equal_nan=True)
    # Not vacuous: most latents are defined. The undefined ones are the single entry and
    # the latents at 1000 + x whose rest rounds to 1000 in float32.
    assert scores[f - 2].isnan() and scores.isfinite().sum() >= f // 2


@pytest.mark.parametrize("emb_dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_deflated_scores_any_emb_dtype_and_strides(emb_dtype):
    """Embeddings in every dtype, column-major; float64 values count as their float32
    rounding (what the statistics kernels read)."""
    gen = torch.Generator().manual_seed(seed_of("deflated dtypes", emb_dtype))
    acts = ill_conditioned_acts(61, 15, gen)
    emb = make_emb("plain", 61, 9, gen).to(emb_dtype).T.contiguous().T
    rows, local, values, act_range = entries_of(acts)
    expected = pairwise_monoscore(acts.double(), emb.double())
    for implementation in IMPLEMENTATIONS.values():
        scores = implementation(rows, local, values.double(), act_range, emb)
        torch.testing.assert_close(scores, expected, atol=ATOL_F64, rtol=0, equal_nan=True)


def test_deflated_scores_kernel_equals_torch_and_ignores_entry_order():
    """The CPU kernel (registered wherever the extension is built) against the torch
    implementation on a batch large enough to split across threads, with the entries
    shuffled (n* stays the first entry at the max, which a tie can move: the shuffled
    input has no ties); bitwise the same for one thread and two."""
    assert _extension.has_kernel("CPU", "monoloss_kernels::deflated_scores") == (_extension.EXTENSION_ERROR is None)
    gen = torch.Generator().manual_seed(seed_of("deflated threads"))
    acts = ill_conditioned_acts(1031, 203, gen)[:, :-3]  # without the tie
    emb = make_emb("zero_dup", 1031, 67, gen).float()
    rows, local, values, act_range = entries_of(acts)
    order = torch.randperm(rows.numel(), generator=gen)
    shuffled = (rows[order], local[order], values[order], act_range, emb)
    expected = torch_deflated_scores(rows, local, values, act_range, emb)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = torch.ops.monoloss_kernels.deflated_scores(*shuffled)
        torch.set_num_threads(2)
        two_threads = torch.ops.monoloss_kernels.deflated_scores(*shuffled)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one_thread, expected, atol=ATOL_SAME_FORMULA, rtol=0, equal_nan=True)
    assert torch.equal(one_thread.nan_to_num(), two_threads.nan_to_num())
    assert expected.isfinite().sum() > 100  # not vacuous
    # opcheck compares outputs without equal_nan: the defined latents only.
    torch.library.opcheck(torch.ops.monoloss_kernels.deflated_scores.default,
                          (*entries_of(acts[:, expected.isfinite()]), emb))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_deflated_scores_max_at_the_one_row_without_an_entry(implementation):
    """Latents whose max is an implicit 0 in a single row, every other row holding an
    entry near the min: that row is n*. Taken out as an entry is (from the sum of the
    entries' rows), nothing cancels; formed as ΣÊ minus the N - 1 entries' rows, V lost
    ~N·eps64 against a rest mass of 1e-7 (error 2e-5 at N = 2000). A latent with
    only that row above its min is undefined: NaN, where the kernel divided 0 by 0."""
    n, d = 2003, 11
    gen = torch.Generator().manual_seed(seed_of("deflated implicit max"))
    acts = torch.full((n, 4), -1.0, dtype=torch.float64)
    acts[:, 1] += 2**-24 * torch.randint(0, 3, (n,), generator=gen)  # float32 ulps: the mass at the min
    acts[n // 3, 2] = -1.0 + 2**-23  # one float32 ulp above the min
    acts[:, 3] = -1.0 + 1e-3 * torch.rand(n, generator=gen, dtype=torch.float64)
    for latent, row in enumerate([5, n - 1, 0, n // 2]):
        acts[row, latent] = 0.0  # the max, not stored
    acts = acts.float()
    emb = make_emb("zero_dup", n, d, gen).float()
    emb[n // 2] = 0.0  # latent 3's n* on a zero-norm row
    rows, local, values, act_range = entries_of(acts)
    assert rows.numel() == 4 * (n - 1)
    scores = IMPLEMENTATIONS[implementation](rows, local, values, act_range, emb)
    expected = pairwise_monoscore(acts.double(), emb.double())
    assert expected[0].isnan() and expected[1:].isfinite().all()
    torch.testing.assert_close(scores, expected, atol=ATOL_F64, rtol=0, equal_nan=True)


def test_deflated_scores_without_entries():
    emb = torch.randn(5, 3, generator=torch.Generator().manual_seed(3))
    none = torch.empty(0, dtype=torch.int64)
    for implementation in IMPLEMENTATIONS.values():
        assert implementation(none, none, torch.empty(0), torch.empty(2, 0), emb).shape == (0,)


def test_deflated_scores_kernel_refuses_bad_input():
    if _extension.EXTENSION_ERROR is not None:
        pytest.skip("these checks are the C++ kernel's (the torch implementation indexes with the same tensors)")
    gen = torch.Generator().manual_seed(5)
    acts = ill_conditioned_acts(31, 9, gen)
    rows, local, values, act_range = entries_of(acts)
    emb = torch.randn(31, 4, generator=gen)
    op = torch.ops.monoloss_kernels.deflated_scores
    with pytest.raises(RuntimeError, match=r"deflated_scores: local holds 9, outside \[0, 9\)"):
        op(rows, torch.where(local == 3, 9, local), values, act_range, emb)
    with pytest.raises(RuntimeError, match=r"deflated_scores: rows holds -1, outside \[0, 31\)"):
        op(torch.where(rows == 0, -1, rows), local, values, act_range, emb)
    with pytest.raises(RuntimeError, match="rows, local and values must be 1-D of one length"):
        op(rows, local, values[1:], act_range, emb)
    with pytest.raises(RuntimeError, match=r"act_range must have shape \(2, F\)"):
        op(rows, local, values, act_range[0], emb)
    with pytest.raises(RuntimeError, match="rows and local must be int64"):
        op(rows.int(), local, values, act_range, emb)
