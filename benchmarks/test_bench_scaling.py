"""MonoScore time against dataset size N, the paper's scaling figure with our kernels
added: for dense and TopK activations of the SAE settings that matter (M=8192, d=768 as
for CLIP ViT-B; M=16384, d=1024), in float32 and bfloat16, every method at
N = 2^10 ... 2^20:

- pairwise-loop: the original metric code's double loop (pairwise_baselines.py), O(N²)
- pairwise-blocked: the same pair sums as blocked matrix products, O(N²)
- peer: the published linear algorithm (reference.published_monoscore), and
  peer-compiled: torch.compile of it (dynamic shapes: compiled once for every N)
- gemm: the bare product ÊᵀA every exact method pays for
- ours-<backend>: each of our backends on this device (on the CPU not Triton, which
  runs there only in its interpreter)

    pytest benchmarks/test_bench_scaling.py --benchmark-only [--profile quick|full]

What each profile runs is `PLANS` below. A method is not run at a point when
- its estimated time (its time at the previous N times the growth of its cost, N² or N)
  exceeds the profile's budget for one call: listed as skipped and plotted as an
  extrapolated point;
- its estimated memory exceeds what the device has free;
- the profile's time budget for the whole sweep is spent (later points are listed).

Timing: each method's first call at a point is untimed; its scores are checked against
the float64 reference there (pairwise definition where affordable, else the closed form,
on 1024 random latents, 256 above N = 2^16), then it is timed for a number of rounds that fits the budget
(medians; CUDA synchronised inside the timed call). Calls too slow to repeat (the O(N²)
methods, and any call estimated above `single_shot_s`) are timed once, cold, and that
timed call's own result is checked. Inputs are fresh random values for every point.
The scaling table, plots and summary.json are written by conftest.py.
"""

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import monoloss_kernels
from monoloss_kernels.reference import closed_form_monoscore, pairwise_monoscore, published_monoscore

from .common import (
    DEVICE, OURS_PREFIX, SEED, check_scores, dtype_name, make_dense_acts, make_embeddings, make_topk_batch,
    our_backends,
)
from .conftest import COMPILED_PEER, GEMM, PAIRWISE, PAIRWISE_BLOCKED, PAIRWISE_LOOP, PEER, bench_profile, device_name
from .pairwise_baselines import pairwise_blocked_monoscore, pairwise_loop_monoscore

CLIP_VIT_B = (8192, 768)  # (M, d): an 8192-latent SAE on CLIP ViT-B/16 image features
WIDE = (16384, 1024)  # (M, d): a 16384-latent SAE on 1024-wide features (ViT-L)
TOPK_K = 64


@dataclass(frozen=True)
class Series:
    """One line family of the plot: a form of activations, an SAE setting, a dtype."""

    form: str  # "dense" or "topk"
    num_latents: int  # M
    dim: int  # d
    dtype: torch.dtype
    k: int | None = None  # latents kept per sample (topk)

    @property
    def key(self) -> str:
        k = f"-k{self.k}" if self.k else ""
        return f"{self.form}-M{self.num_latents}-d{self.dim}{k}-{dtype_name(self.dtype)}"

    @property
    def element_bytes(self) -> int:
        return torch.finfo(self.dtype).bits // 8


def series_of(setting, dtype, form) -> Series:
    num_latents, dim = setting
    return Series(form, num_latents, dim, dtype, TOPK_K if form == "topk" else None)


def powers_of_two(low: int, high: int) -> tuple[int, ...]:
    return tuple(2**e for e in range(low, high + 1))


@dataclass(frozen=True)
class Plan:
    """What a profile runs on a device type."""

    series: tuple  # ((Series, (N, ...)), ...) in the order run: what matters most first
    quadratic_budget_s: float  # one call of an O(N²) method: skipped (and extrapolated) above this
    linear_budget_s: float  # one call of any other method
    single_shot_s: float  # a call estimated above this is timed once, cold
    round_target_s: float  # timed rounds ≈ this / one call, within [min_rounds, max_rounds]
    min_rounds: int
    max_rounds: int
    deadline_s: float  # the whole sweep; points after it are listed as not run


FP32, BF16 = torch.float32, torch.bfloat16

# quick: sized so that the whole `pytest benchmarks/ --benchmark-only` finishes in about
# 10 minutes on the 2-core CPU machine (measured 7.5 min; there the O(N²) loop takes ~4 s
# at N=1024 and ~16 s at 2048, the blocked products ~18 s at 16384).
# full: the sweep, for GPUs; the budgets keep it within a ~10-minute GPU run.
PLANS = {
    ("quick", "cpu"): Plan(
        series=(
            (series_of(CLIP_VIT_B, FP32, "dense"), powers_of_two(10, 14)),
            (series_of(CLIP_VIT_B, FP32, "topk"), powers_of_two(10, 14)),
            (series_of(CLIP_VIT_B, BF16, "dense"), (2**12,)),
        ),
        quadratic_budget_s=20.0, linear_budget_s=20.0, single_shot_s=3.0,
        round_target_s=1.0, min_rounds=3, max_rounds=10, deadline_s=300.0,
    ),
    ("full", "cpu"): Plan(
        series=tuple((series_of(setting, dtype, form), powers_of_two(10, 20))
                     for dtype in (FP32, BF16) for setting in (CLIP_VIT_B, WIDE) for form in ("dense", "topk")),
        quadratic_budget_s=60.0, linear_budget_s=60.0, single_shot_s=5.0,
        round_target_s=2.0, min_rounds=3, max_rounds=10, deadline_s=3 * 3600.0,
    ),
    ("quick", "cuda"): Plan(
        series=(
            (series_of(CLIP_VIT_B, FP32, "dense"), powers_of_two(10, 17)),
            (series_of(CLIP_VIT_B, FP32, "topk"), powers_of_two(10, 17)),
            (series_of(CLIP_VIT_B, BF16, "dense"), (2**16,)),
        ),
        quadratic_budget_s=2.0, linear_budget_s=5.0, single_shot_s=1.0,
        round_target_s=0.2, min_rounds=3, max_rounds=20, deadline_s=120.0,
    ),
    ("full", "cuda"): Plan(
        series=tuple((series_of(setting, dtype, form), powers_of_two(10, 20))
                     for dtype in (FP32, BF16) for setting in (CLIP_VIT_B, WIDE) for form in ("dense", "topk")),
        quadratic_budget_s=4.0, linear_budget_s=10.0, single_shot_s=1.0,
        round_target_s=0.25, min_rounds=3, max_rounds=20, deadline_s=330.0,
    ),
}

QUADRATIC = (PAIRWISE_LOOP, PAIRWISE_BLOCKED)
# Latents whose scores are checked per point: the reference reads them in float64, so
# above 2^16 rows fewer of them, to keep its (N, latents) float64 copies small next to
# the inputs (at N = 2^20, 256 latents are 2 GiB a copy).
CHECKED_LATENTS = 1024
CHECKED_LATENTS_LARGE_N = 256
LARGE_N = 2**16


def checked_latent_count(series, num_rows: int) -> int:
    return min(series.num_latents, CHECKED_LATENTS if num_rows <= LARGE_N else CHECKED_LATENTS_LARGE_N)

# Up to here the reference is the float64 pairwise definition (an N×N float64 matrix and
# O(N²·1024) work); above, the float64 closed form (tested equal to it).
PAIRWISE_REFERENCE_MAX_ROWS = 16384 if DEVICE.type == "cuda" else 4096
# Use at most this share of the free memory (the allocator and the OS need the rest).
MEMORY_SHARE = 0.85

# One compiled peer for every point: dynamic shapes, as one compiles a function that is
# called at many N (dynamic=False would recompile at each N; the fixed-shape compile is
# timed in test_bench_monoscore.py). Dynamo's per-function limit on recompilations is
# raised so that the dtypes of a full run never fall back to eager silently.
torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
compiled_peer = torch.compile(published_monoscore, dynamic=True)


def plan_for(config) -> Plan:
    return PLANS[(bench_profile(config), DEVICE.type)]


def methods() -> list[str]:
    """Ours first (what a short budget must not lose), the O(N²) methods last."""
    return [OURS_PREFIX + b for b in our_backends(DEVICE)] + [PEER, COMPILED_PEER, GEMM, *QUADRATIC]


def pytest_generate_tests(metafunc):
    """The points of this session's profile, in the plan's order, every method at each
    (pytest keeps a module-scoped parameter's tests together: one point's inputs at a time)."""
    if "scaling_point" not in metafunc.fixturenames:
        return
    plan = plan_for(metafunc.config)
    points = [(series, num_rows) for series, rows in plan.series for num_rows in rows]
    metafunc.parametrize("scaling_point", points, ids=[f"{s.key}-N{n}" for s, n in points],
                         indirect=True, scope="module")
    metafunc.parametrize("method", methods())


@dataclass
class SweepState:
    """Across the sweep's tests: when it started, and each method's last time per series
    (measured, or estimated where skipped) and per form (measured), from which its time
    at the next point is estimated."""

    started: float | None = None
    last: dict = field(default_factory=dict)  # (series key, method) -> (N, seconds)
    last_measured: dict = field(default_factory=dict)  # (form, method) -> (Series, N, seconds)

    def elapsed(self) -> float:
        if self.started is None:
            self.started = time.perf_counter()
        return time.perf_counter() - self.started

    def record(self, series: "Series", method: str, num_rows: int, seconds: float, *, measured: bool) -> None:
        self.last[(series.key, method)] = (num_rows, seconds)
        if measured:
            self.last_measured[(series.form, method)] = (series, num_rows, seconds)

    def estimate(self, series: "Series", method: str, num_rows: int) -> tuple[float, str] | None:
        """(estimated seconds of one call at `num_rows`, what it is estimated from): the
        method's last time in this series scaled by N^growth; at a series' first point, its
        last measured time in another series of the same form, scaled by N^growth and by
        the matrix sizes (M for the O(N²) methods, M·d for the others)."""
        if (series.key, method) in self.last:
            prev_rows, prev_s = self.last[(series.key, method)]
            return prev_s * (num_rows / prev_rows) ** growth(method), f"N={prev_rows}"
        if (series.form, method) in self.last_measured:
            other, prev_rows, prev_s = self.last_measured[(series.form, method)]
            size = series.num_latents / other.num_latents
            if method not in QUADRATIC:
                size *= series.dim / other.dim
            return prev_s * (num_rows / prev_rows) ** growth(method) * size, f"{other.key} at N={prev_rows}"
        return None


STATE = SweepState()


def growth(method: str) -> int:
    """Exponent of N in the method's cost."""
    return 2 if method in QUADRATIC else 1


def free_bytes() -> int:
    """Memory the next allocation on DEVICE can still get."""
    if DEVICE.type == "cuda":
        free, _ = torch.cuda.mem_get_info(DEVICE)
        return free + torch.cuda.memory_reserved(DEVICE) - torch.cuda.memory_allocated(DEVICE)
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def gib(num_bytes: float) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


@dataclass
class ScalingPoint:
    """The inputs of one (series, N), their float64 reference on the checked latents,
    and (TopK) the densified matrix the dense methods read, built on first use."""

    series: Series
    num_rows: int
    unavailable: str | None = None  # why nothing runs at this point
    acts: torch.Tensor | None = None  # (N, M) dense series
    values: torch.Tensor | None = None  # (N, k) TopK series
    indices: torch.Tensor | None = None  # (N, k) int64
    emb: torch.Tensor | None = None  # (N, d)
    checked: torch.Tensor | None = None  # (L,) latent ids
    reference: torch.Tensor | None = None  # (L,) float64
    reference_method: str = ""
    _dense: torch.Tensor | None = None

    @property
    def group(self) -> str:
        return f"scaling-{self.series.key}-N{self.num_rows}"

    @property
    def dense_bytes(self) -> int:
        return self.num_rows * self.series.num_latents * self.series.element_bytes

    @property
    def dense(self) -> torch.Tensor:
        if self.acts is not None:
            return self.acts
        if self._dense is None:
            s = self.series
            self._dense = torch.zeros(self.num_rows, s.num_latents, dtype=s.dtype, device=DEVICE)
            self._dense.scatter_(1, self.indices, self.values)
        return self._dense

    def method_bytes(self, method: str) -> int:
        """Rough peak memory `method` adds to the inputs (measured multiples of the dense
        matrix where known: peer 2.3x, compiled peer 1.15x, triton 0.45x, torch 5.3x on
        an H200), plus the densified matrix if a dense method needs it and it is not built."""
        s, dense = self.series, self.dense_bytes
        if method.startswith(OURS_PREFIX):
            backend = method.removeprefix(OURS_PREFIX)
            if s.form == "dense":
                return int((6.0 if backend == "torch" else 0.5) * dense)
            entries = self.num_rows * s.k
            return entries * 48 + self.num_rows * s.dim * 8  # per-entry indices/values, float64 unit rows
        factor = {PEER: 2.5, COMPILED_PEER: 1.5, GEMM: 0.05, PAIRWISE_LOOP: 2.0, PAIRWISE_BLOCKED: 1.5}[method]
        densify = dense if (s.form == "topk" and self._dense is None) else 0
        return int(factor * dense) + densify

    def callable(self, method: str):
        s, emb = self.series, self.emb
        if method.startswith(OURS_PREFIX):
            backend = method.removeprefix(OURS_PREFIX)
            if s.form == "dense":
                return lambda: monoloss_kernels.monoscore(self.acts, emb, backend=backend)
            pair = (self.values, self.indices)
            return lambda: monoloss_kernels.monoscore(pair, emb, num_latents=s.num_latents, backend=backend)
        dense = self.dense
        if method == PEER:
            return lambda: published_monoscore(dense, emb)
        if method == COMPILED_PEER:
            return lambda: compiled_peer(dense, emb)
        if method == GEMM:
            unit_emb = F.normalize(emb.float(), dim=1).to(s.dtype)
            return lambda: unit_emb.T @ dense  # (d, M)
        if method == PAIRWISE_LOOP:
            return lambda: pairwise_loop_monoscore(dense, emb)
        if method == PAIRWISE_BLOCKED:
            return lambda: pairwise_blocked_monoscore(dense, emb)
        raise ValueError(method)

    def checked_columns(self) -> torch.Tensor:
        """(N, L) activations of the checked latents, without densifying a TopK batch."""
        if self.acts is not None:
            return self.acts[:, self.checked]
        column_of = torch.full((self.series.num_latents,), -1, dtype=torch.long, device=DEVICE)
        column_of[self.checked] = torch.arange(len(self.checked), device=DEVICE)
        columns = column_of[self.indices]  # (N, k): -1 where the latent is not checked
        kept = columns >= 0
        out = torch.zeros(self.num_rows, len(self.checked), dtype=self.values.dtype, device=DEVICE)
        rows = torch.arange(self.num_rows, device=DEVICE)[:, None].expand_as(columns)
        out[rows[kept], columns[kept]] = self.values[kept]
        return out

    def sweep_info(self) -> dict:
        s = self.series
        return {
            "series": s.key, "form": s.form, "num_latents": s.num_latents, "dim": s.dim, "k": s.k,
            "dtype": dtype_name(s.dtype), "num_rows": self.num_rows,
            "default_backend": monoloss_kernels.available_backends(DEVICE)[0],
        }


def input_bytes(series: Series, num_rows: int) -> int:
    """The inputs plus the float64 reference's temporaries: float64 copies of the checked
    columns (4: the copy, the scaled copy, products) and of the embeddings (2: the copy,
    the unit rows), and for the pairwise definition its N×N cosines and a block."""
    s = series
    if s.form == "dense":
        inputs = num_rows * s.num_latents * s.element_bytes
    else:
        inputs = num_rows * s.k * (s.element_bytes + 8)
    inputs += num_rows * s.dim * s.element_bytes
    reference = (4 * checked_latent_count(s, num_rows) + 2 * s.dim) * num_rows * 8
    if num_rows <= PAIRWISE_REFERENCE_MAX_ROWS:
        reference += (num_rows + 2048) * num_rows * 8
    return inputs + reference


@pytest.fixture(scope="module")
def scaling_point(request) -> ScalingPoint:
    """Fresh random inputs of one (series, N) and their float64 reference scores."""
    series, num_rows = request.param
    point = ScalingPoint(series, num_rows)
    plan = plan_for(request.config)
    if STATE.elapsed() > plan.deadline_s:
        point.unavailable = f"the sweep's time budget ({plan.deadline_s:.0f} s) was spent"
        yield point
        return
    need, free = input_bytes(series, num_rows), free_bytes()
    if need > MEMORY_SHARE * free:
        point.unavailable = f"inputs and reference need ~{gib(need)}, {gib(free)} free"
        yield point
        return

    # One seed per point: every point's values are new, and a rerun draws the same ones.
    seed = SEED + num_rows + 7919 * series.num_latents + (1 if series.form == "topk" else 0)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    if series.form == "dense":
        point.acts = make_dense_acts(num_rows, series.num_latents, gen, DEVICE, series.dtype)
        point.emb = make_embeddings(num_rows, series.dim, gen, DEVICE, series.dtype)
    else:
        values, point.indices, emb = make_topk_batch(num_rows, series.num_latents, series.k, series.dim, gen, DEVICE)
        point.values, point.emb = values.to(series.dtype), emb.to(series.dtype)
    perm_gen = torch.Generator().manual_seed(seed)
    checked = torch.randperm(series.num_latents, generator=perm_gen)[:checked_latent_count(series, num_rows)]
    point.checked = checked.sort().values.to(DEVICE)
    # The references read the inputs in float64, so they score exactly the values timed.
    columns = point.checked_columns()
    if num_rows <= PAIRWISE_REFERENCE_MAX_ROWS:
        point.reference, method = pairwise_monoscore(columns, point.emb), PAIRWISE
    else:
        point.reference, method = closed_form_monoscore(columns, point.emb), "closed_form"
    point.reference_method = f"{method} (float64) on {len(point.checked)} latents"
    del columns
    yield point
    point.acts = point.values = point._dense = None
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def test_scaling(scaling_point, method, measure, skip_point, request):
    point, series = scaling_point, scaling_point.series
    plan = plan_for(request.config)
    sweep = point.sweep_info()
    where = {"device": DEVICE, "group": point.group, "method": method, "sweep": sweep}
    if point.unavailable:
        skip_point(**where, reason=point.unavailable)
    if STATE.elapsed() > plan.deadline_s:
        skip_point(**where, reason=f"the sweep's time budget ({plan.deadline_s:.0f} s) was spent")

    estimated = STATE.estimate(series, method, point.num_rows)
    budget = plan.quadratic_budget_s if method in QUADRATIC else plan.linear_budget_s
    if estimated is not None and estimated[0] > budget:
        estimate_s, basis = estimated
        STATE.record(series, method, point.num_rows, estimate_s, measured=False)  # the next N extrapolates from here
        skip_point(**where, estimate_s=estimate_s, extrapolate=True,
                   reason=f"one call estimated at {estimate_s:.3g} s (from {basis}, cost ~N^{growth(method)}), "
                   f"over the {budget:g} s budget")
    need, free = point.method_bytes(method), free_bytes()
    if need > MEMORY_SHARE * free:
        skip_point(**where, reason=f"needs ~{gib(need)} beyond the inputs, {gib(free)} free")

    extra_info = {
        "shape": {"N": point.num_rows, "M": series.num_latents, "d": series.dim,
                  **({"k": series.k} if series.k else {})},
        "dtype": dtype_name(series.dtype),
        "device": device_name(DEVICE),
        "reference": point.reference_method,
        "sweep": sweep,
    }
    if method.startswith(OURS_PREFIX):
        extra_info["backend"] = method.removeprefix(OURS_PREFIX)
    last_scores = {}

    def check(scores) -> float:
        return check_scores(method, scores[point.checked], point.reference, series.dtype, label=point.group,
                            reference_method=point.reference_method, hold_baselines=series.form == "dense")

    try:
        fn = point.callable(method)

        def run():
            last_scores["scores"] = fn()

        single_shot = method in QUADRATIC or (estimated is not None and estimated[0] > plan.single_shot_s)
        if single_shot:
            rounds, warmup_rounds = 1, 0
        else:  # untimed first call: warms up (compiles) and is checked
            start = time.perf_counter()
            run()
            synchronize()
            first_s = time.perf_counter() - start
            if method != GEMM:  # the GEMM returns no scores
                extra_info["max_abs_error"] = check(last_scores.pop("scores"))
            rounds = min(plan.max_rounds, max(plan.min_rounds, math.ceil(plan.round_target_s / first_s)))
            warmup_rounds = 1 if method == COMPILED_PEER else 0  # its first call was mostly compiling

        def check_after() -> dict:
            scores = last_scores.pop("scores")
            return {"max_abs_error": check(scores)} if single_shot and method != GEMM else {}

        median_s = measure(run, device=DEVICE, group=point.group, method=method, rounds=rounds,
                           warmup_rounds=warmup_rounds, gemm_flops=2 * point.num_rows * series.num_latents * series.dim,
                           extra_info=extra_info, check_after=check_after)
    except torch.OutOfMemoryError:
        last_scores.clear()
        torch.cuda.empty_cache()
        skip_point(**where, reason="out of memory")
    if median_s is not None:
        STATE.record(series, method, point.num_rows, median_s, measured=True)
