"""Measures the worst absolute error of every backend against the float64 definition.

    python benchmarks/measure_accuracy.py [--large] [--ill-conditioned]

Small cases are compared with the O(N²) pairwise sum; --large adds N = 100_003
compared with the float64 closed form (equal to the pairwise sum, see tests).
Prints one table row per (backend, device, dtype, case).

--ill-conditioned instead measures the one-pass form (finalize of the statistics,
without monoscore's recomputation) on latents whose mass sits on one sample, the
tests' "dominant" cases, against the pairwise sum: the largest error / (eps32·κ),
κ = (Σã)²/((Σã)² - Σã²), which sets refine.KAPPA_MAX; the largest error among the
latents with κ <= KAPPA_MAX; and that of monoscore itself.
"""

import argparse
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import monoloss_kernels as mk  # noqa: E402
from monoloss_kernels._dispatch import stats_function  # noqa: E402
from monoloss_kernels._validate import validate_acts  # noqa: E402
from monoloss_kernels.reference import closed_form_monoscore, min_max_normalize, pairwise_monoscore  # noqa: E402
from monoloss_kernels.refine import KAPPA_MAX  # noqa: E402
from monoloss_kernels.stats import CsrActs, finalize  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # the tests' input makers
from tests.helpers import densify, make_acts, make_emb, make_topk  # noqa: E402

CASES = ["relu", "negative", "offset", "dead_constant"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_inputs(case, n, m, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return make_acts(case, n, m, gen), make_emb("zero_dup", n, d, gen)


def ill_conditioned_report(devices):
    """One row per (backend, device, input form, shape): see the module docstring."""
    eps32 = torch.finfo(torch.float32).eps
    print(f"{'backend':8} {'device':6} {'form':6} {'N x M x d':13} {'max err/(eps32·κ)':>18} "
          f"{'max err, κ<=%g' % KAPPA_MAX:>15} {'monoscore max err':>18}")
    for device in devices:
        for backend in mk.available_backends(torch.device(device)):
            for form, (n, m, d) in [(form, shape) for form in ("dense", "topk")
                                    for shape in ((263, 45, 130), (1031, 97, 17), (4099, 61, 5), (20011, 29, 769))]:
                gen = torch.Generator().manual_seed(n * m + d)
                emb = make_emb("zero_dup", n, d, gen).float()
                if form == "dense":
                    acts = make_acts("dominant", n, m, gen).float()
                    given = dense = acts
                else:
                    values, indices = make_topk("dominant", n, m, 9, gen)
                    given, dense = (values.float(), indices), densify(values.float(), indices, m)
                exact = pairwise_monoscore(dense, emb)
                a = min_max_normalize(dense.double())
                kappa = a.sum(0) ** 2 / (a.sum(0) ** 2 - (a * a).sum(0))
                on_device = (tuple(t.to(device) for t in given) if isinstance(given, tuple) else given.to(device))
                canonical, emb_d = validate_acts(on_device, emb.to(device), m)
                stats = stats_function(backend, torch.device(device), isinstance(canonical, CsrActs))(canonical, emb_d)
                one_pass = (finalize(stats).double().cpu() - exact).abs()
                refined = (mk.monoscore(on_device, emb_d, num_latents=m, backend=backend).double().cpu() - exact).abs()
                both = exact.isfinite() & one_pass.isfinite()
                ratio = (one_pass[both] / (eps32 * kappa[both])).max().item()
                left_alone = both & (kappa <= KAPPA_MAX)
                within = one_pass[left_alone].max().item() if left_alone.any() else 0.0
                print(f"{backend:8} {device:6} {form:6} {f'{n}x{m}x{d}':13} {ratio:18.2f} {within:15.1e} "
                      f"{refined.nan_to_num(0).max().item():18.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="also N=100003 (float32) against the closed form")
    parser.add_argument("--ill-conditioned", action="store_true",
                        help="the one-pass error against κ on latents whose mass sits on one sample")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if args.ill_conditioned:
        ill_conditioned_report(devices)
        return
    rows = []
    for device in devices:
        for backend in mk.available_backends(torch.device(device)):
            for dtype in DTYPES:
                for case in CASES:
                    acts, emb = make_inputs(case, 1031, 97, 65, seed=len(rows))
                    acts, emb = acts.to(device, dtype), emb.to(device, dtype)
                    err = (mk.monoscore(acts, emb, backend=backend).double().cpu() - pairwise_monoscore(acts, emb).cpu())
                    rows.append((backend, device, str(dtype).replace("torch.", ""), case, "1031x97x65",
                                 err.nan_to_num(0).abs().max().item()))
            if args.large and not (backend == "triton" and device == "cpu"):
                for case in ["relu", "offset"]:
                    acts, emb = make_inputs(case, 100_003, 33, 65, seed=len(rows))
                    acts, emb = acts.to(device, torch.float32), emb.to(device, torch.float32)
                    err = mk.monoscore(acts, emb, backend=backend).double().cpu() - closed_form_monoscore(acts, emb).cpu()
                    rows.append((backend, device, "float32", case, "100003x33x65", err.nan_to_num(0).abs().max().item()))
    print(f"{'backend':8} {'device':6} {'dtype':9} {'case':14} {'N x M x d':14} max|err|")
    for backend, device, dtype, case, shape, err in rows:
        print(f"{backend:8} {device:6} {dtype:9} {case:14} {shape:14} {err:.2e}")


if __name__ == "__main__":
    main()
