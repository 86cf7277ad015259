"""TopK-sparse MonoScore: our kernels on the (values, indices) pair an SAE hands over,
against the published algorithm (the peer) on the densified matrix, its compiled
version, the bare dense GEMM, and (on the GPU) the O(N²) pairwise definition; plus a
streaming run over N = 2^22 rows that never holds more than one batch.

    pytest benchmarks/test_bench_topk.py --benchmark-only

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
from monoloss_kernels.reference import closed_form_monoscore, pairwise_monoscore, published_monoscore

from .conftest import COMPILED_PEER, GEMM, PEER, RESULTS_DIR, device_name
from .test_bench_monoscore import DEVICE, OURS_PREFIX, PAIRWISE, TOLERANCE, compiled_peer

# Latents whose scores are checked against the float64 closed form: the dense float64
# copies a full check needs (N x M x 8 bytes, several times) do not fit a 24 GB machine.
CHECKED_LATENTS = 512
SEED = 0


@dataclass(frozen=True)
class TopKCase:
    num_rows: int  # N
    num_latents: int  # M
    k: int  # latents kept per sample
    dim: int  # d
    rounds: int
    peer_rounds: int
    pairwise: bool  # time the O(N²) definition too (GPU only: hours on 2 CPU cores)

    @property
    def group(self) -> str:
        return f"topk-N{self.num_rows}-M{self.num_latents}-k{self.k}-d{self.dim}-float32"

    @property
    def gemm_flops(self) -> int:  # the dense product the peer pays for, as in the dense suite
        return 2 * self.num_rows * self.num_latents * self.dim


CPU_CASE = TopKCase(32768, 16384, 32, 512, rounds=5, peer_rounds=1, pairwise=False)
CUDA_CASE = TopKCase(65536, 8192, 64, 768, rounds=20, peer_rounds=5, pairwise=True)
CASE = CUDA_CASE if DEVICE.type == "cuda" else CPU_CASE


def make_topk_batch(num_rows, num_latents, k, dim, gen, device):
    """TopK activations with distinct latents per row and ReLU-like values, and CLIP-like
    embeddings. Indices are start + j·step mod M with an odd step and M a power of two,
    so a row's k latents are distinct without an O(M) draw per row."""
    start = torch.randint(0, num_latents, (num_rows, 1), generator=gen, device=device)
    step = 2 * torch.randint(0, num_latents // 2, (num_rows, 1), generator=gen, device=device) + 1
    indices = (start + torch.arange(k, device=device) * step) % num_latents
    values = torch.rand(num_rows, k, generator=gen, device=device)
    emb = torch.randn(num_rows, dim, generator=gen, device=device)
    emb += 0.7 * torch.randn(1, dim, generator=gen, device=device)
    return values, indices, emb


@dataclass
class TopKInputs:
    values: torch.Tensor
    indices: torch.Tensor
    emb: torch.Tensor
    dense: torch.Tensor  # (N, M) densified, what the peer reads
    checked: torch.Tensor  # (CHECKED_LATENTS,) latent ids
    reference: torch.Tensor  # their float64 scores
    reference_method: str


@pytest.fixture(scope="module")
def topk_inputs() -> TopKInputs:
    assert CASE.num_latents & (CASE.num_latents - 1) == 0, "make_topk_batch needs M a power of two"
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    values, indices, emb = make_topk_batch(CASE.num_rows, CASE.num_latents, CASE.k, CASE.dim, gen, DEVICE)
    dense = torch.zeros(CASE.num_rows, CASE.num_latents, device=DEVICE).scatter_(1, indices, values)
    checked = torch.randperm(CASE.num_latents, generator=torch.Generator().manual_seed(SEED))[:CHECKED_LATENTS]
    checked = checked.to(DEVICE)
    reference = closed_form_monoscore(dense[:, checked], emb)
    return TopKInputs(values, indices, emb, dense, checked, reference, "closed_form")


def methods() -> list[str]:
    ours = [b for b in monoloss_kernels.available_backends(DEVICE) if not (DEVICE.type == "cpu" and b == "triton")]
    if DEVICE.type == "cpu":
        ours = [b for b in ours if b != "torch"]  # the readable float64 reference path: minutes here
    names = [OURS_PREFIX + b for b in ours] + [PEER, COMPILED_PEER, GEMM]
    return names + ([PAIRWISE] if CASE.pairwise else [])


def method_callable(method: str, inputs: TopKInputs):
    if method.startswith(OURS_PREFIX):
        backend = method.removeprefix(OURS_PREFIX)
        pair = (inputs.values, inputs.indices)
        return lambda: monoloss_kernels.monoscore(pair, inputs.emb, num_latents=CASE.num_latents, backend=backend)
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


@pytest.mark.parametrize("method", methods())
def test_topk_speed(topk_inputs, method, measure):
    run = method_callable(method, topk_inputs)
    extra_info = {
        "shape": {"N": CASE.num_rows, "M": CASE.num_latents, "k": CASE.k, "d": CASE.dim},
        "dtype": "float32",
        "device": device_name(DEVICE),
        "reference": f"{topk_inputs.reference_method} on {CHECKED_LATENTS} latents",
    }
    if method != GEMM:  # untimed check (and warm-up / compile)
        scores = run()[topk_inputs.checked].double()
        error = (scores - topk_inputs.reference).abs().nan_to_num(nan=0.0).max().item()
        extra_info["max_abs_error"] = error
        assert error <= TOLERANCE[torch.float32] or method in (PEER, COMPILED_PEER), f"{method}: error {error:.1e}"
    slow = method in (PEER, COMPILED_PEER, PAIRWISE)
    measure(run, device=DEVICE, group=CASE.group, method=method,
            rounds=CASE.peer_rounds if slow else CASE.rounds, gemm_flops=CASE.gemm_flops, extra_info=extra_info)


STREAM_SCRIPT = Path(__file__).with_name("stream_topk.py")
STREAM_PEAK_LIMIT_MIB = 2048


def test_streaming_topk(benchmark):
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
    out_dir = RESULTS_DIR / device_name(DEVICE)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "stream_topk.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nstreaming: {report}")
    assert report["peak_rss_mib"] < STREAM_PEAK_LIMIT_MIB, report
