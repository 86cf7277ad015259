"""MonoScore speed at the issue's target shapes: each of our backends against the
published two-pass algorithm (the peer), the peer under torch.compile, the bare GEMM
every exact method pays for, and the O(N²) pairwise definition where it is affordable.
(The sweep over N is test_bench_scaling.py.)

    pytest benchmarks/ --benchmark-only [--profile quick|full]

Benchmarks the CUDA device when there is one, else the CPU; MONOSCORE_BENCH_DEVICE=cpu
(or cuda) overrides. Each case's inputs and reference scores are made once, and every
method's result is checked against the reference once, untimed, before it is timed.
Speedup tables and <results-dir>/<device>/summary.json come from conftest.py.
"""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import monoloss_kernels
from monoloss_kernels.reference import closed_form_monoscore, pairwise_monoscore, published_monoscore

from .common import (
    DEVICE, OURS_PREFIX, PAIRWISE, SEED, check_scores, dtype_name, make_dense_acts, make_embeddings, our_backends,
)
from .conftest import COMPILED_PEER, GEMM, PEER, bench_profile, device_name

# The pairwise definition is O(N²·M): run it (and use it as the reference) only up to here.
PAIRWISE_MAX_ROWS = 4096
PAIRWISE_ROUNDS = 3


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
        return f"{self.label}-N{self.num_rows}-M{self.num_latents}-d{self.dim}-{dtype_name(self.dtype)}"

    @property
    def gemm_flops(self) -> int:
        return 2 * self.num_rows * self.num_latents * self.dim


# "target" is the size; "small" is where the pairwise definition still runs.
# Each target run takes ~0.3-2 s on the 2-core CPU; quick keeps the suite near 10 minutes.
CASES = {
    ("quick", "cpu"): [
        Case("target", 16384, 4096, 512, torch.float32, rounds=3),
        Case("small", 2048, 1024, 256, torch.float32, rounds=10),
    ],
    ("full", "cpu"): [
        Case("target", 16384, 4096, 512, torch.float32, rounds=10),
        Case("small", 2048, 1024, 256, torch.float32, rounds=20),
    ],
    ("quick", "cuda"): [
        Case("target", 65536, 8192, 768, torch.float32, rounds=10),
        Case("small", 2048, 1024, 256, torch.float32, rounds=20),
    ],
    ("full", "cuda"): [
        Case("target", 65536, 8192, 768, torch.float32, rounds=20),
        Case("target", 65536, 8192, 768, torch.bfloat16, rounds=20),
        Case("small", 2048, 1024, 256, torch.float32, rounds=50),
    ],
}

# One compiled function for all cases; dynamic=False so that each case's shape gets a
# kernel specialised to it (as a user compiling for one shape would), instead of the
# dynamic-shape kernel a second shape would otherwise trigger.
compiled_peer = torch.compile(published_monoscore, dynamic=False)


def methods_for(case: Case) -> list[str]:
    methods = [OURS_PREFIX + backend for backend in our_backends(DEVICE)] + [PEER, COMPILED_PEER, GEMM]
    if case.num_rows <= PAIRWISE_MAX_ROWS:
        methods.append(PAIRWISE)
    return methods


def pytest_generate_tests(metafunc):
    if "inputs" not in metafunc.fixturenames:
        return
    cases = CASES[(bench_profile(metafunc.config), DEVICE.type)]
    metafunc.parametrize(
        "inputs, method",
        [pytest.param(case, method, id=f"{case.group}-{method}") for case in cases for method in methods_for(case)],
        indirect=["inputs"],
    )


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
    """Fresh random inputs of one case (drawn on the device itself), and their reference
    scores (made once per case)."""
    case = request.param
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    acts = make_dense_acts(case.num_rows, case.num_latents, gen, DEVICE)  # ReLU-sparse, as SAE latents
    emb = make_embeddings(case.num_rows, case.dim, gen, DEVICE)
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


def test_monoscore_speed(inputs, method, measure):
    case = inputs.case
    run = method_callable(method, inputs)
    extra_info = {
        "shape": {"N": case.num_rows, "M": case.num_latents, "d": case.dim},
        "dtype": dtype_name(case.dtype),
        "device": device_name(DEVICE),
        "reference": inputs.reference_method,
    }
    if method.startswith(OURS_PREFIX):
        extra_info["backend"] = method.removeprefix(OURS_PREFIX)
    # Untimed check, which is also the compiled peer's compile-and-warm-up call. The GEMM
    # returns no scores, and the pairwise run is the reference itself where it runs.
    if method not in (GEMM, PAIRWISE):
        extra_info["max_abs_error"] = check_scores(method, run(), inputs.reference, case.dtype, label=case.group,
                                                   reference_method=inputs.reference_method)
    measure(
        run,
        device=DEVICE,
        group=case.group,
        method=method,
        rounds=PAIRWISE_ROUNDS if method == PAIRWISE else case.rounds,
        gemm_flops=case.gemm_flops,
        extra_info=extra_info,
    )
