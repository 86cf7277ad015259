"""MonoScore speed: each of our backends against the published two-pass algorithm
(the peer), the peer under torch.compile, the bare GEMM every exact method pays for,
and the O(N²) pairwise definition where it is affordable.

    pytest benchmarks/ --benchmark-only

Benchmarks the CUDA device when there is one, else the CPU; MONOSCORE_BENCH_DEVICE=cpu
(or cuda) overrides. Each case's inputs and reference scores are made once, and every
method's result is checked against the reference once, untimed, before it is timed.
Speedup tables and benchmarks/results/<device>/summary.json come from conftest.py.
"""

import os
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import monoloss_kernels
from monoloss_kernels.reference import closed_form_monoscore, pairwise_monoscore, published_monoscore

from .conftest import COMPILED_PEER, GEMM, PEER, device_name

DEVICE = torch.device(os.environ.get("MONOSCORE_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))

OURS_PREFIX = "ours-"
PAIRWISE = "pairwise"
# The pairwise definition is O(N²·M): run it (and use it as the reference) only up to here.
PAIRWISE_MAX_ROWS = 4096
PAIRWISE_ROUNDS = 3

# Max |score - reference| allowed of our backends (scores lie in [-1, 1]).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1e-3}

SEED = 0
# A direction shared by all embeddings, as in CLIP features: cosines, and so scores, well away from 0.
SHARED_DIRECTION_WEIGHT = 0.7


@dataclass(frozen=True)
class Case:
    label: str
    num_rows: int  # N samples
    num_latents: int  # M
    dim: int  # d, embedding width
    dtype: torch.dtype
    rounds: int

    @property
    def group(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.label}-N{self.num_rows}-M{self.num_latents}-d{self.dim}-{dtype}"

    @property
    def gemm_flops(self) -> int:
        return 2 * self.num_rows * self.num_latents * self.dim


# "target" is the size; "small" is where the pairwise definition still runs.
# Rounds keep the CPU suite within a few minutes on 2 cores (each target run takes ~0.3-2 s).
CPU_CASES = [
    Case("target", 16384, 4096, 512, torch.float32, rounds=3),
    Case("small", 2048, 1024, 256, torch.float32, rounds=10),
]
CUDA_CASES = [
    Case("target", 65536, 8192, 768, torch.float32, rounds=20),
    Case("target", 65536, 8192, 768, torch.bfloat16, rounds=20),
    Case("small", 2048, 1024, 256, torch.float32, rounds=50),
]
CASES = CUDA_CASES if DEVICE.type == "cuda" else CPU_CASES

# One compiled function for all cases; dynamic=False so that each case's shape gets a
# kernel specialised to it (as a user compiling for one shape would), instead of the
# dynamic-shape kernel a second shape would otherwise trigger.
compiled_peer = torch.compile(published_monoscore, dynamic=False)


def our_backends(device: torch.device) -> list[str]:
    # Triton runs on the CPU only through its interpreter: a correctness tool, not a fast path.
    return [
        backend
        for backend in monoloss_kernels.available_backends(device)
        if not (device.type == "cpu" and backend == "triton")
    ]


def methods_for(case: Case) -> list[str]:
    methods = [OURS_PREFIX + backend for backend in our_backends(DEVICE)] + [PEER, COMPILED_PEER, GEMM]
    if case.num_rows <= PAIRWISE_MAX_ROWS:
        methods.append(PAIRWISE)
    return methods


@dataclass
class CaseInputs:
    case: Case
    acts: torch.Tensor  # (N, M) in case.dtype
    emb: torch.Tensor  # (N, d) in case.dtype
    unit_emb: torch.Tensor  # (N, d) unit rows of emb, in case.dtype: the GEMM's left operand
    reference: torch.Tensor  # (M,) float64 scores of these very inputs
    reference_method: str


@pytest.fixture(scope="module")
def inputs(request) -> CaseInputs:
    """Fresh random inputs of one case, and their reference scores (made once per case).

    The inputs are tests/helpers.py's "relu" acts and plain emb, drawn here on the device
    itself: the helpers draw float64 on the CPU, 4 GiB and seconds at the CUDA target.
    """
    case = request.param
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    shape = (case.num_rows, case.num_latents)
    acts = torch.relu(torch.randn(shape, generator=gen, device=DEVICE))  # ReLU-sparse, as SAE latents
    emb = torch.randn(case.num_rows, case.dim, generator=gen, device=DEVICE)
    emb += SHARED_DIRECTION_WEIGHT * torch.randn(1, case.dim, generator=gen, device=DEVICE)
    acts, emb = acts.to(case.dtype), emb.to(case.dtype)
    unit_emb = F.normalize(emb.float(), dim=1).to(case.dtype)
    # References read the inputs in float64, so they score exactly the (possibly bf16) values timed.
    if case.num_rows <= PAIRWISE_MAX_ROWS:
        reference, reference_method = pairwise_monoscore(acts, emb), PAIRWISE
    else:  # the O(N·M·d) closed form in float64, tested equal to the pairwise sum
        reference, reference_method = closed_form_monoscore(acts, emb), "closed_form"
    return CaseInputs(case, acts, emb, unit_emb, reference, reference_method)


def method_callable(method: str, inputs: CaseInputs):
    acts, emb = inputs.acts, inputs.emb
    if method.startswith(OURS_PREFIX):
        backend = method.removeprefix(OURS_PREFIX)
        return lambda: monoloss_kernels.monoscore(acts, emb, backend=backend)
    if method == PEER:
        return lambda: published_monoscore(acts, emb)
    if method == COMPILED_PEER:
        return lambda: compiled_peer(acts, emb)
    if method == GEMM:
        unit_emb = inputs.unit_emb
        return lambda: unit_emb.T @ acts  # (d, M)
    if method == PAIRWISE:
        return lambda: pairwise_monoscore(acts, emb)
    raise ValueError(method)


def check_scores(method: str, scores: torch.Tensor, inputs: CaseInputs) -> float:
    """Max |scores - reference|; fails the benchmark where a method misses the tolerance."""
    dtype, reference = inputs.case.dtype, inputs.reference
    tolerance = TOLERANCE[dtype]
    assert scores.shape == reference.shape, f"{method}: scores of shape {tuple(scores.shape)}"
    error = (scores.double() - reference).abs().nan_to_num(nan=0.0).max().item()
    # The peer computes in the input dtype by design (its scores come back in bf16 for
    # bf16 inputs), so below float32 its error is reported, not held to our tolerance.
    if method.startswith(OURS_PREFIX) or dtype == torch.float32:
        torch.testing.assert_close(
            scores.double(), reference, rtol=0, atol=tolerance, equal_nan=True,
            msg=lambda m: f"{method} is wrong on {inputs.case.group} "
            f"(reference: {inputs.reference_method}, atol {tolerance}):\n{m}",
        )
    elif error > tolerance:
        warnings.warn(f"{method} on {inputs.case.group} is off by {error:.1e} (> {tolerance:.0e}); timed anyway")
    return error


@pytest.mark.parametrize(
    "inputs, method",
    [pytest.param(case, method, id=f"{case.group}-{method}") for case in CASES for method in methods_for(case)],
    indirect=["inputs"],
)
def test_monoscore_speed(inputs, method, measure):
    case = inputs.case
    run = method_callable(method, inputs)
    extra_info = {
        "shape": {"N": case.num_rows, "M": case.num_latents, "d": case.dim},
        "dtype": str(case.dtype).removeprefix("torch."),
        "device": device_name(DEVICE),
        "reference": inputs.reference_method,
    }
    if method.startswith(OURS_PREFIX):
        extra_info["backend"] = method.removeprefix(OURS_PREFIX)
    # Untimed check, which is also the compiled peer's compile-and-warm-up call. The GEMM
    # returns no scores, and the pairwise run is the reference itself where it runs.
    if method not in (GEMM, PAIRWISE):
        extra_info["max_abs_error"] = check_scores(method, run(), inputs)
    measure(
        run,
        device=DEVICE,
        group=case.group,
        method=method,
        rounds=PAIRWISE_ROUNDS if method == PAIRWISE else case.rounds,
        gemm_flops=case.gemm_flops,
        extra_info=extra_info,
    )
