"""Field-by-field comparison of the GPU backends' statistics with the plain-torch
specification, the scores' error against the float64 closed form, the time at
the issue's size, and the C++ error path. GPU only.

    python benchmarks/diagnose_cuda.py

It found (benchmarks/results/NVIDIA-H200/run3/diagnose.log) that a 3xTF32 WMMA
cross kernel carried TF32-level errors, which is why the CUDA backend keeps its products
in IEEE float32 (an FMA kernel then, cuBLAS SGEMM since).
"""

import torch
import triton

import monoloss_kernels as mk
from monoloss_kernels._dispatch import stats_function
from monoloss_kernels.reference import closed_form_monoscore
from monoloss_kernels.stats import reshift, torch_monoscore_stats


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def check_cpp_errors():
    """The C++ shape and dtype checks must raise, not crash (they once crashed on this image)."""
    acts, emb = torch.rand(23, 9), torch.rand(23, 6)
    for args in [(acts, emb[:-1]), (acts.long(), emb)]:
        try:
            torch.ops.monoloss_kernels.monoscore_stats(*args)
            print("C++ check: no error raised")
        except RuntimeError as exc:
            print("C++ check raised:", str(exc).splitlines()[0][:100])


def main():
    check_cpp_errors()
    torch.manual_seed(0)
    device = torch.device("cuda")
    acts = torch.relu(torch.randn(20011, 515, device=device))
    emb = torch.randn(20011, 257, device=device) + 0.7 * torch.randn(1, 257, device=device)
    want = torch_monoscore_stats(acts, emb)
    want_min = reshift(want, want.act_range[0])
    reference = closed_form_monoscore(acts, emb)
    big_acts = torch.relu(torch.randn(65536, 8192, device=device))
    big_emb = torch.randn(65536, 768, device=device)
    for backend in ["cuda", "triton"]:
        got = stats_function(backend, device)(acts, emb)
        got_min = reshift(got, got.act_range[0])
        errors = {field: rel_err(getattr(got_min, field), getattr(want_min, field)) for field in want._fields}
        score_err = (mk.monoscore(acts, emb, backend=backend).double() - reference).abs().nan_to_num(0).max().item()
        ms = triton.testing.do_bench(lambda: mk.monoscore(big_acts, big_emb, backend=backend), warmup=20, rep=200)
        print(f"{backend}: score max|err| {score_err:.2e}; target {ms:.1f} ms; field rel. errors "
              + " ".join(f"{k}={v:.1e}" for k, v in errors.items()))


if __name__ == "__main__":
    main()
