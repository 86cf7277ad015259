"""TopK-sparse MonoScore at the issue's target shape: our kernels on the (values,
indices) pair an SAE hands over, against the published algorithm (the peer) on the
densified matrix, its compiled version, the bare dense GEMM, and (on the GPU) the O(N²)
pairwise definition; a batch with heavy-tailed latent frequencies and values, where
many latents need monoscore's float64 recomputation (refine.py), against the one-pass
scores alone; plus a streaming run over N = 2^22 rows that never holds more than one
batch. (TopK against N is in test_bench_scaling.py.)

    pytest benchmarks/test_bench_topk.py --benchmark-only [--profile quick|full]

The speedup table and summary.json come from conftest.py, as for the dense cases.
"""

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import monoloss_kernels
from monoloss_kernels import _extension
from monoloss_kernels._dispatch import stats_function
from monoloss_kernels._validate import validate_acts
from monoloss_kernels.reference import closed_form_monoscore, pairwise_monoscore, published_monoscore
from monoloss_kernels.refine import csr_entries, ill_conditioned_latents, torch_deflated_scores
from monoloss_kernels.stats import finalize

from .common import (DEVICE, OURS_PREFIX, PAIRWISE, SEED, check_scores, make_embeddings, make_topk_batch,
                     our_backends)
from .conftest import COMPILED_PEER, GEMM, PEER, bench_profile, device_name, results_dir
from .test_bench_monoscore import compiled_peer

# Latents whose scores are checked against the float64 closed form: the dense float64
# copies a full check needs (N x M x 8 bytes, several times) do not fit a 24 GB machine.
CHECKED_LATENTS = 512


@dataclass(frozen=True)
class TopKCase:
    num_rows: int  # N
    num_latents: int  # M
    k: int  # latents kept per sample
    dim: int  # d
    rounds: int  # ours
    gemm_rounds: int
    peer_rounds: int  # peer, compiled peer, pairwise; 1: timed once, cold, that call checked
    pairwise: bool  # time the O(N²) definition too (GPU only: hours on 2 CPU cores)

    @property
    def group(self) -> str:
        return f"topk-N{self.num_rows}-M{self.num_latents}-k{self.k}-d{self.dim}-float32"

    @property
    def gemm_flops(self) -> int:  # the dense product the peer pays for, as in the dense suite
        return 2 * self.num_rows * self.num_latents * self.dim


# The peer takes 20-45 s per call on the 2-core CPU: quick times it once.
CASES = {
    ("quick", "cpu"): TopKCase(32768, 16384, 32, 512, rounds=5, gemm_rounds=3, peer_rounds=1, pairwise=False),
    ("full", "cpu"): TopKCase(32768, 16384, 32, 512, rounds=10, gemm_rounds=5, peer_rounds=3, pairwise=False),
    ("quick", "cuda"): TopKCase(65536, 8192, 64, 768, rounds=10, gemm_rounds=10, peer_rounds=3, pairwise=True),
    ("full", "cuda"): TopKCase(65536, 8192, 64, 768, rounds=20, gemm_rounds=20, peer_rounds=5, pairwise=True),
}


@dataclass
class TopKInputs:
    case: TopKCase
    values: torch.Tensor
    indices: torch.Tensor
    emb: torch.Tensor
    dense: torch.Tensor  # (N, M) densified, what the peer reads
    checked: torch.Tensor  # (CHECKED_LATENTS,) latent ids
    reference: torch.Tensor  # their float64 scores
    reference_method: str


@pytest.fixture(scope="module")
def topk_inputs(request) -> TopKInputs:
    case = CASES[(bench_profile(request.config), DEVICE.type)]
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    values, indices, emb = make_topk_batch(case.num_rows, case.num_latents, case.k, case.dim, gen, DEVICE)
    dense = torch.zeros(case.num_rows, case.num_latents, device=DEVICE).scatter_(1, indices, values)
    checked = torch.randperm(case.num_latents, generator=torch.Generator().manual_seed(SEED))[:CHECKED_LATENTS]
    checked = checked.to(DEVICE)
    reference = closed_form_monoscore(dense[:, checked], emb)
    return TopKInputs(case, values, indices, emb, dense, checked, reference, f"closed_form on {CHECKED_LATENTS} latents")


def methods(case: TopKCase) -> list[str]:
    ours = our_backends(DEVICE)
    if DEVICE.type == "cpu":
        ours = [b for b in ours if b != "torch"]  # the readable float64 reference path: minutes here
    names = [OURS_PREFIX + b for b in ours] + [PEER, COMPILED_PEER, GEMM]
    return names + ([PAIRWISE] if case.pairwise else [])


def pytest_generate_tests(metafunc):
    if "topk_method" in metafunc.fixturenames:
        metafunc.parametrize("topk_method", methods(CASES[(bench_profile(metafunc.config), DEVICE.type)]))


def method_callable(method: str, inputs: TopKInputs):
    num_latents = inputs.case.num_latents
    if method.startswith(OURS_PREFIX):
        backend = method.removeprefix(OURS_PREFIX)
        pair = (inputs.values, inputs.indices)
        return lambda: monoloss_kernels.monoscore(pair, inputs.emb, num_latents=num_latents, backend=backend)
    if method == PEER:
        return lambda: published_monoscore(inputs.dense, inputs.emb)
    if method == COMPILED_PEER:
        return lambda: compiled_peer(inputs.dense, inputs.emb)
    if method == GEMM:
        unit_emb = F.normalize(inputs.emb, dim=1)
        return lambda: unit_emb.T @ inputs.dense
    if method == PAIRWISE:
        return lambda: pairwise_monoscore(inputs.dense, inputs.emb)
    raise ValueError(method)


def test_topk_speed(topk_inputs, topk_method, measure):
    method, case = topk_method, topk_inputs.case
    fn = method_callable(method, topk_inputs)
    extra_info = {
        "shape": {"N": case.num_rows, "M": case.num_latents, "k": case.k, "d": case.dim},
        "dtype": "float32",
        "device": device_name(DEVICE),
        "reference": topk_inputs.reference_method,
    }
    last_scores = {}

    def run():
        last_scores["scores"] = fn()

    def check() -> dict:
        if method == GEMM:  # no scores
            return {}
        scores = last_scores.pop("scores")[topk_inputs.checked]
        return {"max_abs_error": check_scores(method, scores, topk_inputs.reference, torch.float32,
                                              label=case.group, reference_method=topk_inputs.reference_method,
                                              hold_baselines=False)}

    if method.startswith(OURS_PREFIX):
        rounds = case.rounds
    else:
        rounds = case.gemm_rounds if method == GEMM else case.peer_rounds
    # A method timed once is timed cold and its timed call checked; otherwise an untimed
    # checked call warms it up (the compiled peer's is its compilation, so it gets one more).
    single_shot = rounds == 1 and method != COMPILED_PEER
    if not single_shot:
        run()
        extra_info.update(check())
    measure(run, device=DEVICE, group=case.group, method=method, rounds=rounds,
            warmup_rounds=1 if method == COMPILED_PEER else 0, gemm_flops=case.gemm_flops, extra_info=extra_info,
            check_after=check if single_shot else None)


# Heavy-tailed TopK: latent frequencies ∝ 1/rank (Zipf, as SAE latent frequencies
# are) and values Exp(1)³, so that many rare latents have one sample that carries nearly
# all of their mass: κ > KAPPA_MAX for ~45% of them, each recomputed in float64.
HEAVY_TAILED = TopKCase(16384, 16384, 32, 512, rounds=10, gemm_rounds=0, peer_rounds=0, pairwise=False)
ONE_PASS = "one-pass"  # statistics and finalize without the recomputation: what it costs on top
ROWS_PER_DRAW = 1024  # rows of latent indices drawn at once: a (rows, M) float32 block of probabilities


def heavy_tailed_topk(case: TopKCase, gen: torch.Generator):
    frequency = 1.0 / torch.arange(1, case.num_latents + 1, device=DEVICE, dtype=torch.float32)
    indices = torch.cat([torch.multinomial(frequency.expand(min(ROWS_PER_DRAW, case.num_rows - r0), -1), case.k,
                                           generator=gen)
                         for r0 in range(0, case.num_rows, ROWS_PER_DRAW)])
    values = torch.empty(case.num_rows, case.k, device=DEVICE).exponential_(generator=gen) ** 3
    return values, indices, make_embeddings(case.num_rows, case.dim, gen, DEVICE)


@pytest.mark.parametrize("method", [OURS_PREFIX + b for b in our_backends(DEVICE)
                                    if not (DEVICE.type == "cpu" and b == "torch")] + [ONE_PASS])
def test_topk_heavy_tailed(method, measure):
    case = HEAVY_TAILED
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    values, indices, emb = heavy_tailed_topk(case, gen)
    backend = method.removeprefix(OURS_PREFIX) if method.startswith(OURS_PREFIX) else "auto"
    pair = (values, indices)
    if method == ONE_PASS:
        def fn():
            acts, e = validate_acts(pair, emb, case.num_latents)
            return finalize(stats_function(backend, DEVICE, True)(acts, e))
    else:
        def fn():
            return monoloss_kernels.monoscore(pair, emb, num_latents=case.num_latents, backend=backend)
    acts, e = validate_acts(pair, emb, case.num_latents)
    refined = ill_conditioned_latents(stats_function(backend, DEVICE, True)(acts, e))
    checked = refined[torch.randperm(refined.numel(), generator=torch.Generator().manual_seed(SEED))[:CHECKED_LATENTS]]
    dense = torch.zeros(case.num_rows, case.num_latents, device=DEVICE).scatter_(1, indices, values)
    reference = closed_form_monoscore(dense[:, checked], emb)
    del dense
    label = f"topk-heavy-tailed-N{case.num_rows}-M{case.num_latents}-k{case.k}-d{case.dim}-float32"
    error = check_scores(method, fn()[checked], reference, torch.float32, label=label,
                         reference_method=f"closed_form on {checked.numel()} recomputed latents",
                         hold_baselines=False)
    measure(fn, device=DEVICE, group=label, method=method, rounds=case.rounds,
            gemm_flops=case.gemm_flops, extra_info={
                "shape": {"N": case.num_rows, "M": case.num_latents, "k": case.k, "d": case.dim},
                "dtype": "float32", "device": device_name(DEVICE), "max_abs_error": error,
                "recomputed_latents": refined.numel(), "reference": "closed_form on recomputed latents"})


DEFLATED_OP, DEFLATED_TORCH = "deflated_scores op", "torch_deflated_scores"


@pytest.mark.parametrize("method", [DEFLATED_OP, DEFLATED_TORCH])
def test_deflated_scores_heavy_tailed(method, measure):
    """The recomputation alone on the heavy-tailed batch's recomputed latents (their
    entries gathered once, outside the timing): the op, which runs the C++ kernel on the
    CPU where the extension is built, against its torch implementation, which serves
    every other device."""
    case = HEAVY_TAILED
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    values, indices, emb = heavy_tailed_topk(case, gen)
    acts, e = validate_acts((values, indices), emb, case.num_latents)
    stats = stats_function("auto", DEVICE, True)(acts, e)
    latents = ill_conditioned_latents(stats)
    inputs = (*csr_entries(acts, latents), stats.act_range[:, latents], e)
    op = torch.ops.monoloss_kernels.deflated_scores
    fn = (lambda: op(*inputs)) if method == DEFLATED_OP else (lambda: torch_deflated_scores(*inputs))
    kernel, reference = op(*inputs), torch_deflated_scores(*inputs)
    # NaN where exactly one of the two is NaN, so that a mismatch shows.
    difference = torch.where(kernel.isnan() & reference.isnan(), 0.0, kernel - reference).abs().max().item()
    measure(fn, device=DEVICE, group=f"deflated-scores-heavy-tailed-N{case.num_rows}-M{case.num_latents}-k{case.k}"
            f"-d{case.dim}", method=method, rounds=case.rounds, gemm_flops=case.gemm_flops, extra_info={
                "recomputed_latents": latents.numel(), "entries": inputs[0].numel(),
                "cpu_kernel_built": _extension.has_kernel("CPU"), "max_abs_diff_op_vs_torch": difference})


STREAM_SCRIPT = Path(__file__).with_name("stream_topk.py")
STREAM_PEAK_LIMIT_MIB = 2048


def test_streaming_topk(benchmark, request):
    """N = 2^22 rows (M = 16384, k = 64, d = 768) generated batch by batch into a
    MonoScoreAccumulator, in a fresh process so that its peak memory is its own."""
    if DEVICE.type != "cpu":
        pytest.skip("the streaming target is set for the 2-core CPU machine")
    report = {}

    def run():
        out = subprocess.run([sys.executable, str(STREAM_SCRIPT)], check=True, capture_output=True, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        report.update(json.loads(out.stdout.strip().splitlines()[-1]))

    benchmark.group = "stream-topk-N4194304-M16384-k64-d768"
    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(report)
    out_dir = results_dir(request.config) / device_name(DEVICE)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stream_topk.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nstreaming: {report}")
    assert report["peak_rss_mib"] < STREAM_PEAK_LIMIT_MIB, report
