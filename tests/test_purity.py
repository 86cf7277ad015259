"""Class purity (binary and weighted) against a brute-force NumPy count, for every
acts form, in one call and streamed over uneven batches."""

import numpy as np
import pytest
import torch

from monoloss_kernels import ClassPurityAccumulator, class_purity
from monoloss_kernels.stats import CsrActs

from .helpers import DEVICES, seed_of

# Tolerances. Counts are exact integers, so binary purity matches the reference to
# float32 rounding of the ratio; weighted purity sums in float64 and rounds once.
RTOL = {"binary": 1e-6, "weighted": 1e-6}
ATOL = {"binary": 1e-7, "weighted": 1e-7}

# (N, M, C): odd sizes, fewer rows than latents, one row, more classes than rows.
SHAPES = [(37, 23, 5), (101, 7, 3), (1, 5, 2), (6, 11, 9)]
FORMS = ["dense", "topk_int64", "topk_int32", "coo", "csr", "csr_acts"]
CASES = ["relu", "signed", "dead"]


def brute_force_purity(dense: np.ndarray, labels: np.ndarray, num_classes: int, weighted: bool):
    """Purity and dominant class of every latent by explicit loops (float64)."""
    num_rows, num_latents = dense.shape
    purity = np.full(num_latents, np.nan)
    dominant = np.full(num_latents, -1)
    for k in range(num_latents):
        per_class = np.zeros(num_classes)
        for n in range(num_rows):
            if dense[n, k] > 0:
                per_class[labels[n]] += dense[n, k] if weighted else 1.0
        if per_class.sum() > 0:
            purity[k] = per_class.max() / per_class.sum()
            dominant[k] = int(np.argmax(per_class))
    return purity, dominant


def make_case(case: str, n: int, m: int, c: int, gen: torch.Generator):
    """(acts float64 (n, m), labels int64 (n,)); fresh random values, never zeros."""
    acts = torch.randn(n, m, generator=gen, dtype=torch.float64)
    if case == "relu":
        acts = torch.relu(acts)
    elif case == "signed":
        acts = acts * 2 - 0.5
    elif case == "dead":  # a dead latent, a latent that is never positive, one that fires once
        acts = torch.relu(acts)
        acts[:, 0] = 0.0
        if m > 1:
            acts[:, 1] = -acts[:, 1].abs() - 0.1
        if m > 2:
            acts[:, 2] = 0.0
            acts[n // 2, 2] = 1.3
    labels = torch.randint(0, c, (n,), generator=gen)
    return acts, labels


def to_form(form: str, acts: torch.Tensor, k: int):
    """acts in the given input form, and its dense equivalent (float64) for the reference."""
    if form == "dense":
        return acts.float(), acts.float().double()
    if form.startswith("topk"):
        top = torch.topk(acts.float(), k, dim=1)
        indices = top.indices.to(torch.int32 if form == "topk_int32" else torch.int64)
        dense = torch.zeros_like(acts.float()).scatter(1, top.indices, top.values)
        return (top.values, indices), dense.double()
    dense = acts.float() * (torch.rand(acts.shape, generator=torch.Generator().manual_seed(3)) < 0.6)
    if form == "coo":
        return dense.to_sparse_coo(), dense.double()
    sparse = dense.to_sparse_csr()
    if form == "csr":
        return sparse, dense.double()
    return CsrActs(sparse.crow_indices(), sparse.col_indices(), sparse.values(), acts.shape[1]), dense.double()


def to_device(x, device):
    """An input in any form (tuples, CsrActs, sparse tensors) moved to device."""
    if isinstance(x, CsrActs):
        return CsrActs(*(to_device(t, device) for t in x[:3]), x.num_latents)
    if isinstance(x, tuple):
        return tuple(to_device(t, device) for t in x)
    return x.to(device)


def snapshot(x):
    """A deep copy of an input in any form (tuples, CsrActs, sparse tensors)."""
    if isinstance(x, tuple):
        return tuple(snapshot(t) for t in x)
    if not isinstance(x, torch.Tensor):
        return x
    return x.to_dense().clone() if x.layout != torch.strided else x.clone()


def assert_same(a, b):
    if isinstance(a, tuple):
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("weighted", [False, True], ids=["binary", "weighted"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_brute_force(shape, form, case, weighted, device):
    n, m, c = shape
    gen = torch.Generator().manual_seed(seed_of(shape, form, case))
    acts, labels = make_case(case, n, m, c, gen)
    given, dense = to_form(form, acts, k=max(1, m // 3))
    given, labels_on_device = to_device(given, device), labels.to(device)
    before, labels_before = snapshot(given), labels_on_device.clone()
    num_latents = m if form.startswith("topk") else None
    got = class_purity(given, labels_on_device, num_classes=c, num_latents=num_latents, weighted=weighted)
    want, _ = brute_force_purity(dense.numpy(), labels.numpy(), c, weighted)
    kind = "weighted" if weighted else "binary"
    assert got.dtype == torch.float32 and got.shape == (m,) and got.device.type == device
    torch.testing.assert_close(got.cpu(), torch.from_numpy(want).float(), rtol=RTOL[kind], atol=ATOL[kind],
                               equal_nan=True)
    assert_same(snapshot(given), before)
    assert torch.equal(labels_on_device, labels_before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_against_rounded_values(dtype):
    gen = torch.Generator().manual_seed(11)
    acts, labels = make_case("signed", 53, 19, 4, gen)
    acts = acts.to(dtype)
    for weighted in (False, True):
        got = class_purity(acts, labels, num_classes=4, weighted=weighted)
        want, _ = brute_force_purity(acts.double().numpy(), labels.numpy(), 4, weighted)
        kind = "weighted" if weighted else "binary"
        torch.testing.assert_close(got, torch.from_numpy(want).float(), rtol=RTOL[kind], atol=ATOL[kind],
                                   equal_nan=True)


@pytest.mark.parametrize("weighted", [False, True], ids=["binary", "weighted"])
def test_float64_input_unchanged(weighted):
    # .double() of a float64 tensor is the tensor itself: an in-place clamp there zeroed
    # the caller's negative activations.
    acts, labels = make_case("signed", 29, 7, 3, torch.Generator().manual_seed(12))
    before = acts.clone()
    class_purity(acts, labels, num_classes=3, weighted=weighted)
    assert torch.equal(acts, before)
    accumulator = ClassPurityAccumulator(7, 3)
    accumulator.update(acts, labels)
    assert torch.equal(acts, before)


@pytest.mark.parametrize("form", ["dense", "topk_int64", "coo"])
def test_acts_that_require_grad_leave_no_graph(form):
    # A graph through the running sums would keep every batch alive (memory growing with N).
    acts, labels = make_case("relu", 37, 11, 3, torch.Generator().manual_seed(13))
    given, _ = to_form(form, acts, k=4)
    if form.startswith("topk"):
        given = (given[0].requires_grad_(), given[1])
    else:
        given = given.requires_grad_()
    accumulator = ClassPurityAccumulator(11, 3)
    accumulator.update(given, labels, num_latents=11)
    accumulator.update(given, labels, num_latents=11)
    assert not accumulator.counts.requires_grad and not accumulator.weights.requires_grad
    assert not accumulator.compute(weighted=True).requires_grad
    assert not class_purity(given, labels, num_latents=11, weighted=True).requires_grad


def test_dead_latents_are_nan_and_live_ones_are_not():
    gen = torch.Generator().manual_seed(5)
    acts, labels = make_case("dead", 29, 8, 3, gen)
    for weighted in (False, True):
        purity = class_purity(acts, labels, num_classes=3, weighted=weighted)
        assert purity[0].isnan() and purity[1].isnan()  # never positive: dead, and negative-only
        assert purity[2] == 1.0  # fires once: one class
        assert purity[3:].isfinite().all() and (purity[3:] >= 1 / 3).all() and (purity[3:] <= 1).all()


def test_signed_activations_only_positive_part_counts():
    # One latent: three negative class-0 samples, one positive class-1 sample: purity 1 (class 1).
    acts = torch.tensor([[-5.0], [-3.0], [-1.0], [0.5]])
    labels = torch.tensor([0, 0, 0, 1])
    acc = ClassPurityAccumulator(1, 2)
    acc.update(acts, labels)
    assert acc.compute().item() == 1.0 and acc.compute(weighted=True).item() == 1.0
    assert acc.dominant_classes().item() == 1


def test_weighted_and_binary_differ_where_mass_disagrees_with_count():
    # Class 0 fires 3 times weakly, class 1 once strongly: binary 3/4 (class 0), weighted 10/10.3 (class 1).
    acts = torch.tensor([[0.1], [0.1], [0.1], [10.0]])
    labels = torch.tensor([0, 0, 0, 1])
    acc = ClassPurityAccumulator(1, 2)
    acc.update(acts, labels)
    want_binary, _ = brute_force_purity(acts.double().numpy(), labels.numpy(), 2, False)
    want_weighted, _ = brute_force_purity(acts.double().numpy(), labels.numpy(), 2, True)
    torch.testing.assert_close(acc.compute(), torch.from_numpy(want_binary).float())
    torch.testing.assert_close(acc.compute(weighted=True), torch.from_numpy(want_weighted).float())
    assert acc.dominant_classes().item() == 0 and acc.dominant_classes(weighted=True).item() == 1


@pytest.mark.parametrize("weighted", [False, True], ids=["binary", "weighted"])
def test_dominant_classes_match_brute_force(weighted):
    gen = torch.Generator().manual_seed(21)
    acts, labels = make_case("dead", 71, 13, 6, gen)
    acc = ClassPurityAccumulator(13, 6)
    acc.update(acts, labels)
    _, want = brute_force_purity(acts.numpy(), labels.numpy(), 6, weighted)
    assert torch.equal(acc.dominant_classes(weighted=weighted), torch.from_numpy(want).long())


@pytest.mark.parametrize("device", DEVICES)
def test_streaming_any_split_any_form_equals_one_shot(device):
    gen = torch.Generator().manual_seed(8)
    n, m, c, k = 97, 17, 7, 5
    acts, labels = make_case("signed", n, m, c, gen)
    # The one-shot reference: every batch's dense equivalent, concatenated.
    bounds = [0, 13, 14, 50, 50, 81, 97]  # uneven, one single row, one empty batch
    forms = ["dense", "topk_int64", "coo", "csr", "csr_acts", "topk_int32"]
    acc = ClassPurityAccumulator(m, c, device=device)
    dense_parts = []
    for form, start, end in zip(forms, bounds[:-1], bounds[1:]):
        given, dense = to_form(form, acts[start:end], k)
        acc.update(to_device(given, device), labels[start:end].to(device))
        dense_parts.append(dense)
    dense_all = torch.cat(dense_parts).float()
    for weighted in (False, True):
        torch.testing.assert_close(acc.compute(weighted=weighted).cpu(),
                                   class_purity(dense_all, labels, num_classes=c, weighted=weighted),
                                   equal_nan=True)
    assert acc.num_rows == n


def test_merge_and_state_dict_round_trip():
    gen = torch.Generator().manual_seed(9)
    acts, labels = make_case("relu", 60, 12, 4, gen)
    whole = ClassPurityAccumulator(12, 4)
    whole.update(acts, labels)
    first, second = ClassPurityAccumulator(12, 4), ClassPurityAccumulator(12, 4)
    first.update(acts[:25], labels[:25])
    second.update(acts[25:], labels[25:])
    second_counts = second.counts.clone()
    first.merge(second)
    assert torch.equal(second.counts, second_counts)  # other unchanged
    assert torch.equal(first.counts, whole.counts) and first.num_rows == 60
    torch.testing.assert_close(first.weights, whole.weights, rtol=1e-12, atol=0)
    restored = ClassPurityAccumulator(12, 4)
    restored.load_state_dict(whole.state_dict())
    for weighted in (False, True):
        torch.testing.assert_close(restored.compute(weighted), whole.compute(weighted), equal_nan=True)
    restored.update(acts[:3], labels[:3])  # the restored copy does not alias whole's sums
    assert restored.num_rows == 63 and whole.num_rows == 60 and not torch.equal(restored.counts, whole.counts)


def test_empty_input_gives_nan():
    acc = ClassPurityAccumulator(4, 3)
    acc.update(torch.empty(0, 4), torch.empty(0, dtype=torch.int64))
    assert acc.compute().isnan().all() and acc.compute(weighted=True).isnan().all()
    assert class_purity(torch.empty(0, 4), torch.empty(0, dtype=torch.int64)).isnan().all()
    assert (acc.dominant_classes() == -1).all()


def test_num_classes_defaults_to_max_label_plus_one():
    gen = torch.Generator().manual_seed(4)
    acts, labels = make_case("relu", 40, 6, 5, gen)
    want, _ = brute_force_purity(acts.numpy(), labels.numpy(), int(labels.max()) + 1, weighted=False)
    torch.testing.assert_close(class_purity(acts, labels), torch.from_numpy(want).float(), rtol=RTOL["binary"],
                               atol=ATOL["binary"], equal_nan=True)


def test_label_ids_refused_without_num_classes(monkeypatch):
    # IDs in place of class indices would make num_classes = 1 + the largest ID and
    # allocate (C, M) sums of that size.
    acts, labels = make_case("relu", 40, 6, 3, torch.Generator().manual_seed(5))
    ids = torch.tensor([1_000_000_000_003, 2_000_000_000_017, 3_000_000_000_001])[labels]
    with pytest.raises(ValueError, match=r"labels: labels must be class indices 0..C-1; the largest is "
                                         r"3000000000001 but only 3 distinct values occur"):
        class_purity(acts, ids)
    from monoloss_kernels import purity

    monkeypatch.setattr(purity, "ID_LABELS_MAX_BYTES", 0)  # every label set is "large": dense ones pass
    torch.testing.assert_close(class_purity(acts, labels), class_purity(acts, labels, num_classes=3),
                               rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match="labels must be class indices"):
        class_purity(acts, labels * 10)


@pytest.mark.parametrize(
    "labels, error, match",
    [
        (torch.zeros(10), TypeError, "integer tensor"),
        (torch.zeros(10, dtype=torch.bool), TypeError, "integer tensor"),
        ([0] * 10, TypeError, "torch.Tensor"),
        (torch.zeros(10, 1, dtype=torch.int64), ValueError, "1-D"),
        (torch.zeros(9, dtype=torch.int64), ValueError, "9 entries but acts has 10 rows"),
        (torch.full((10,), 3), ValueError, r"lie in \[0, num_classes=3\), got values from 3 to 3"),
        (torch.full((10,), -1), ValueError, "got values from -1"),
    ],
    ids=["float", "bool", "list", "2d", "length", "too_large", "negative"],
)
def test_bad_labels(labels, error, match):
    acc = ClassPurityAccumulator(4, 3)
    with pytest.raises(error, match=match):
        acc.update(torch.rand(10, 4), labels)
    assert acc.num_rows == 0 and acc.counts.sum() == 0


def test_negative_labels_refused_without_num_classes():
    with pytest.raises(ValueError, match="non-negative"):
        class_purity(torch.rand(3, 2), torch.tensor([0, -2, 1]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("form", ["dense", "topk_int64", "csr"])
def test_nan_inf_refused_and_sums_untouched(bad, form):
    gen = torch.Generator().manual_seed(2)
    acts, labels = make_case("relu", 12, 5, 3, gen)
    acc = ClassPurityAccumulator(5, 3)
    acc.update(acts, labels)
    state = acc.state_dict()
    acts_bad = acts.float().clone()
    acts_bad[7, 2] = bad
    if form == "dense":
        given = acts_bad
    elif form == "csr":
        given = acts_bad.to_sparse_csr()  # the bad value is nonzero, so it is stored
    else:
        indices = torch.arange(3).repeat(12, 1)  # latents 0, 1, 2 in every row: the bad one is stored
        given = (acts_bad[:, :3].contiguous(), indices)
    with pytest.raises(ValueError, match="NaN or Inf"):
        acc.update(given, labels, num_latents=5 if form.startswith("topk") else None)
    assert torch.equal(acc.counts, state["counts"]) and torch.equal(acc.weights, state["weights"])
    assert acc.num_rows == 12


def test_repeated_latent_in_a_row_refused():
    values = torch.tensor([[1.0, 2.0], [0.5, 0.3]])
    indices = torch.tensor([[1, 3], [2, 2]])
    with pytest.raises(ValueError, match="latent 2 more than once in row 1"):
        class_purity((values, indices), torch.tensor([0, 1]), num_latents=4)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: class_purity(torch.rand(4, 3).long(), torch.zeros(4, dtype=torch.long)), TypeError, "acts must be"),
        (lambda: class_purity(torch.rand(4), torch.zeros(4, dtype=torch.long)), ValueError, "acts must be 2-D"),
        (lambda: class_purity(torch.rand(4, 3), torch.zeros(4, dtype=torch.long), num_latents=5), ValueError,
         "num_latents=5 but acts has 3 columns"),
        (lambda: class_purity(torch.topk(torch.rand(4, 6), 2), torch.zeros(4, dtype=torch.long)), ValueError,
         "num_latents is required"),
        (lambda: class_purity(torch.topk(torch.rand(4, 6), 2), torch.zeros(4, dtype=torch.long), num_latents=3),
         ValueError, r"acts indices must lie in \[0, num_latents=3\)"),
        (lambda: class_purity("acts", torch.zeros(4, dtype=torch.long)), TypeError, "acts must be"),
        (lambda: ClassPurityAccumulator(3, 2).update(torch.rand(4, 5), torch.zeros(4, dtype=torch.long)),
         ValueError, "5 latents but the accumulator was built for 3"),
        (lambda: ClassPurityAccumulator(3, 2).update(torch.rand(4, 3, device="meta"),
                                                     torch.zeros(4, dtype=torch.long)),
         ValueError, "acts is on meta but the accumulator lives on cpu"),
        (lambda: class_purity(torch.rand(4, 3), torch.zeros(4, dtype=torch.long, device="meta")), ValueError,
         r"labels must be on the device of acts \(cpu\), got meta"),
        (lambda: ClassPurityAccumulator(3, -1), TypeError, "num_classes must be a non-negative int"),
        (lambda: ClassPurityAccumulator(3.0, 2), TypeError, "num_latents must be a non-negative int"),
        (lambda: ClassPurityAccumulator(3, 2).merge(ClassPurityAccumulator(3, 4)), ValueError, "cannot merge"),
        (lambda: ClassPurityAccumulator(3, 2).merge("other"), TypeError, "ClassPurityAccumulator"),
    ],
    ids=["int_acts", "1d_acts", "num_latents_mismatch", "pair_without_num_latents", "index_out_of_range",
         "str_acts", "accumulator_width", "acts_device", "labels_device", "bad_num_classes", "bad_num_latents",
         "merge_sizes", "merge_type"],
)
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_state_refused():
    acc = ClassPurityAccumulator(3, 2)
    state = acc.state_dict()
    with pytest.raises(KeyError, match="missing"):
        acc.load_state_dict({k: v for k, v in state.items() if k != "weights"})
    with pytest.raises(ValueError, match="num_classes=2"):
        ClassPurityAccumulator(3, 5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"state\['counts'\] is torch.float32"):
        acc.load_state_dict({**state, "counts": state["counts"].float()})
    with pytest.raises(ValueError, match="version"):
        acc.load_state_dict({**state, "version": 99})
