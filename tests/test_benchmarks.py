"""The benchmark suite's own pieces (benchmarks/), which decide what the speedup report
says: the O(N²) baselines it times against our kernels, the score check that keeps a
wrong kernel out of the tables, the scaling summary, the time estimates that skip and
extrapolate slow points, and the plots.

The baselines are compared with the float64 pairwise definition on odd shapes (not
multiples of their chunk or block sizes) with dead, constant and single-firing latents.
"""

import pytest
import torch

from benchmarks import conftest as bench
from benchmarks.common import TOLERANCE, check_scores, make_topk_batch
from benchmarks.pairwise_baselines import pairwise_blocked_monoscore, pairwise_loop_monoscore
from monoloss_kernels.reference import pairwise_monoscore

from .helpers import make_acts, make_emb

# fp32: the baselines' float32 sums over ~N² pairs; bf16: as for our backends, against the
# pairwise score of the same rounded values.
BASELINE_ATOL = {torch.float32: 2e-5, torch.bfloat16: 1e-3}

BASELINES = {
    "loop": lambda acts, emb: pairwise_loop_monoscore(acts, emb, chunk_rows=7),
    "loop-default-chunk": pairwise_loop_monoscore,
    "blocked": lambda acts, emb: pairwise_blocked_monoscore(acts, emb, block_rows=13),
    "blocked-default-block": pairwise_blocked_monoscore,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case, emb_case", [("relu", "plain"), ("negative", "plain"), ("dead_constant", "plain"),
                                            ("relu", "zero_dup")])
@pytest.mark.parametrize("baseline", BASELINES)
def test_baselines_match_pairwise_definition(baseline, case, emb_case, dtype):
    gen = torch.Generator().manual_seed(5)
    num_rows, num_latents, dim = 203, 37, 19
    acts = make_acts(case, num_rows, num_latents, gen).to(dtype)
    emb = make_emb(emb_case, num_rows, dim, gen).to(dtype)  # zero_dup: zero-norm rows have cosine 0
    acts_before, emb_before = acts.clone(), emb.clone()

    scores = BASELINES[baseline](acts, emb)
    expected = pairwise_monoscore(acts, emb)  # float64 on the same (rounded) values

    assert scores.shape == (num_latents,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores.double(), expected, rtol=0, atol=BASELINE_ATOL[dtype], equal_nan=True)
    assert torch.equal(acts, acts_before) and torch.equal(emb, emb_before)


def test_baselines_give_nan_for_undefined_latents():
    gen = torch.Generator().manual_seed(6)
    acts = make_acts("dead_constant", 57, 5, gen).float()  # dead, constant, one firing sample, one pair
    emb = make_emb("plain", 57, 9, gen).float()
    for baseline in BASELINES.values():
        scores = baseline(acts, emb)
        assert scores[:3].isnan().all() and scores[3:].isfinite().all()


def test_check_scores_fails_a_wrong_kernel():
    reference = torch.rand(50, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    reference[3] = float("nan")
    exact = reference.float()
    off = exact.clone()
    off[10] += 10 * TOLERANCE[torch.float32]
    nan_missing = exact.clone()
    nan_missing[3] = 0.5
    kwargs = {"label": "case", "reference_method": "pairwise"}

    assert check_scores("ours-cpu", exact, reference, torch.float32, **kwargs) < TOLERANCE[torch.float32]
    with pytest.raises(AssertionError, match="ours-cpu is wrong"):
        check_scores("ours-cpu", off, reference, torch.float32, **kwargs)
    with pytest.raises(AssertionError, match="ours-cpu is wrong"):  # a score where the reference has none
        check_scores("ours-cpu", nan_missing, reference, torch.float32, **kwargs)
    # A baseline is compared where the reference is defined, and held on float32 inputs
    # unless told not to (TopK latents that fire a few times).
    assert check_scores("peer", nan_missing, reference, torch.float32, **kwargs) < TOLERANCE[torch.float32]
    with pytest.raises(AssertionError, match="peer is wrong"):
        check_scores("peer", off, reference, torch.float32, **kwargs)
    with pytest.warns(UserWarning, match="peer on case is off by"):
        error = check_scores("peer", off, reference, torch.float32, hold_baselines=False, **kwargs)
    assert error == pytest.approx((off[10].double() - reference[10]).abs().item())


def test_make_topk_batch_keeps_latents_distinct():
    values, indices, emb = make_topk_batch(301, 64, 9, 5, torch.Generator().manual_seed(8), "cpu")
    assert values.shape == indices.shape == (301, 9) and emb.shape == (301, 5)
    assert (indices.sort(dim=1).values.diff(dim=1) > 0).all()
    assert (values >= 0).all() and (values < 1).all()
    with pytest.raises(ValueError, match="num_latents a power of two"):
        make_topk_batch(4, 48, 3, 5, torch.Generator(), "cpu")


def sweep_info(series, num_rows, form="dense"):
    return {"series": series, "form": form, "num_latents": 64, "dim": 8, "k": None, "dtype": "float32",
            "num_rows": num_rows, "default_backend": "cpu"}


def fake_sweep(times: dict, skips: list) -> tuple[list, list]:
    """Sweep records from {(method, N): seconds} and skips from [(method, N, estimate or None)]."""
    records = [{"method": method, "median_s": seconds, "rounds": 3, "sweep": sweep_info("s", n)}
               for (method, n), seconds in times.items()]
    skip_records = [{"method": method, "group": f"g{n}", "reason": "why", "sweep": sweep_info("s", n),
                     **({"estimate_s": estimate, "extrapolate": True} if estimate is not None else {})}
                    for method, n, estimate in skips]
    return records, skip_records


def test_scaling_summary_relates_ours_to_peer_and_loop():
    gen = torch.Generator().manual_seed(9)
    seconds = {(method, n): float(torch.rand((), generator=gen)) + 0.1
               for method in ("ours-cpu", "ours-torch", "peer", "pairwise-loop") for n in (1024, 2048)}
    del seconds[("pairwise-loop", 2048)]
    del seconds[("peer", 2048)]
    loop_estimate = 4 * seconds[("pairwise-loop", 1024)]
    records, skips = fake_sweep(seconds, [("pairwise-loop", 2048, loop_estimate), ("peer", 2048, None)])

    series = bench.scaling_summary(records, skips)["s"]

    assert series["rows"] == [1024, 2048]
    assert list(series["methods"]) == ["pairwise-loop", "peer", "ours-cpu", "ours-torch"]
    at_1024, at_2048 = series["speedups"]["1024"], series["speedups"]["2048"]
    assert at_1024["ours_vs_peer"] == pytest.approx(seconds[("peer", 1024)] / seconds[("ours-cpu", 1024)])
    assert at_1024["ours_vs_pairwise_loop"] == pytest.approx(
        seconds[("pairwise-loop", 1024)] / seconds[("ours-cpu", 1024)])
    assert not at_1024["pairwise_loop_extrapolated"]
    assert at_2048["ours_vs_peer"] is None  # the peer was skipped there: no ratio
    assert at_2048["ours_vs_pairwise_loop"] == pytest.approx(loop_estimate / seconds[("ours-cpu", 2048)])
    assert at_2048["pairwise_loop_extrapolated"]
    assert series["methods"]["peer"]["2048"] == {"status": "skipped", "reason": "why"}
    assert series["methods"]["pairwise-loop"]["2048"]["status"] == "extrapolated"


def test_sweep_estimates_follow_each_methods_growth():
    from benchmarks.test_bench_scaling import PAIRWISE_LOOP, SweepState, series_of

    series = series_of((64, 8), torch.float32, "dense")
    wide_bf16 = series_of((256, 16), torch.bfloat16, "dense")
    topk = series_of((64, 8), torch.float32, "topk")
    state = SweepState()
    assert state.estimate(series, PAIRWISE_LOOP, 2048) is None  # nothing measured yet: run it
    state.record(series, PAIRWISE_LOOP, 1024, 3.0, measured=True)
    state.record(series, "peer", 1024, 0.5, measured=True)
    assert state.estimate(series, PAIRWISE_LOOP, 4096) == (pytest.approx(3.0 * 4**2), "N=1024")
    assert state.estimate(series, "peer", 4096) == (pytest.approx(0.5 * 4), "N=1024")
    # A skipped point's estimate is where the next N extrapolates from.
    state.record(series, PAIRWISE_LOOP, 4096, 48.0, measured=False)
    assert state.estimate(series, PAIRWISE_LOOP, 8192)[0] == pytest.approx(48.0 * 4)
    # A series' first point: from the same form's last measured time, scaled by the sizes.
    assert state.estimate(wide_bf16, PAIRWISE_LOOP, 2048)[0] == pytest.approx(3.0 * 4 * 4)
    assert state.estimate(wide_bf16, "peer", 2048)[0] == pytest.approx(0.5 * 2 * 4 * 2)
    assert state.estimate(topk, "peer", 2048) is None  # not from another form


def test_plot_scaling_writes_one_png_per_setting(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plot_scaling import plot_scaling

    gen = torch.Generator().manual_seed(10)
    rows = (1024, 2048, 4096)
    seconds = {(method, n): float(torch.rand((), generator=gen)) * n / 1024
               for method in ("ours-cpu", "peer", "gemm", "pairwise-loop", "pairwise-blocked") for n in rows}
    del seconds[("pairwise-loop", 4096)]
    records, skips = fake_sweep(seconds, [("pairwise-loop", 4096, 16 * seconds[("pairwise-loop", 2048)])])
    topk = [{**r, "sweep": {**r["sweep"], "series": "t", "form": "topk", "k": 4}} for r in records]
    scaling = bench.scaling_summary(records + topk, skips)

    paths = plot_scaling(scaling, tmp_path, "test device")

    assert [p.name for p in paths] == ["scaling-M64-d8-float32.png"]  # dense and TopK: two panels of one figure
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_scaling_leaves_out_series_where_nothing_ran(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.plot_scaling import plot_scaling

    _, skips = fake_sweep({}, [("peer", 1024, None), ("ours-cpu", 1024, None)])
    assert plot_scaling(bench.scaling_summary([], skips), tmp_path, "test device") == []
    assert list(tmp_path.iterdir()) == []
