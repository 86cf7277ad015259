"""GPU probe: which tensor-core split keeps cross = Êᵀ(A - shift) float32-accurate, and
how fast each runs through cuBLAS, at the dense target (N=65536, M=8192, d=768); then
where a MonoLoss step's time goes (torch profiler) for each GPU backend.

    python benchmarks/probe_split_gemm.py [--rows 65536] [--profile-loss]

Variants of the product (each a sum of cuBLAS GEMMs on split operands):
  sgemm     float32 SIMT GEMM (TF32 off): the peer's product
  tf32      one TF32 GEMM (the accuracy plain tensor cores give)
  bf16      one bf16 GEMM
  3xtf32    hi·hi + hi·lo + lo·hi in TF32 (hi = x rounded to TF32, lo = x - hi)
  split/C   the scheme of the tensor-core CUDA kernel tried in
            benchmarks/results/NVIDIA-H200/run7-split-gemm: both operands rows-contiguous (K-major), hi·hi in
            TF32 as one product per C rows summed in float32 (the tensor cores truncate
            as they accumulate, so one long product drifts), the two corrections as one
            bf16 GEMM over 2N rows (they need ~10 bits: lo is 2^-10 of x)
Accuracy: the scores from each variant's cross against the scores from a float64 cross
of the same inputs (moments exact in float64), max |Δscore|; relu(randn) activations and
1000 + randn ones (shifted by the first row before the split, as the CUDA kernel does).
"""

import argparse
import statistics

import torch


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """x rounded to nearest TF32 (10 explicit mantissa bits), kept in float32."""
    bits = x.view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """x truncated to TF32, as the CUDA kernel splits it."""
    return (x.view(torch.int32) & ~0x1FFF).view(torch.float32)


def timed(fn, reps=10):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def set_tf32(on: bool):
    torch.backends.cuda.matmul.allow_tf32 = on


def products(unit: torch.Tensor, shifted: torch.Tensor):
    """name -> (split step, GEMM step) closures; the split step returns the operands."""
    def split_3xtf32():
        e_hi, a_hi = tf32_round(unit), tf32_round(shifted)
        return e_hi, unit - e_hi, a_hi, shifted - a_hi

    def gemm_3xtf32(ops):
        e_hi, e_lo, a_hi, a_lo = ops
        set_tf32(True)
        out = e_hi.T @ a_hi
        out.addmm_(e_hi.T, a_lo).addmm_(e_lo.T, a_hi)
        set_tf32(False)
        return out

    def gemm_tf32(ops):
        set_tf32(True)
        out = ops[0].T @ ops[1]
        set_tf32(False)
        return out

    def split_k_major():
        e_t, a_t = unit.T.contiguous(), shifted.T.contiguous()  # (d, N), (M, N): rows contiguous
        e_hi, a_hi = tf32_truncate(e_t), tf32_truncate(a_t)
        e_parts = torch.cat([(e_t - e_hi).bfloat16(), e_hi.bfloat16()], 1)
        a_parts = torch.cat([a_hi.bfloat16(), (a_t - a_hi).bfloat16()], 1)
        return e_hi, a_hi, e_parts, a_parts

    def gemm_chunked(chunk):
        def gemm(ops):  # TF32 chunks summed in float32, one bf16 correction GEMM
            e_hi, a_hi, e_parts, a_parts = ops
            rows = e_hi.shape[1]
            set_tf32(True)
            partial = torch.bmm(e_hi.view(-1, rows // chunk, chunk).transpose(0, 1),
                                a_hi.view(-1, rows // chunk, chunk).permute(1, 2, 0))
            set_tf32(False)
            return partial.sum(0) + (e_parts @ a_parts.T).float()
        return gemm

    variants = {
        "sgemm": (lambda: (unit, shifted), lambda ops: ops[0].T @ ops[1]),
        "tf32": (lambda: (unit, shifted), gemm_tf32),
        "3xtf32": (split_3xtf32, gemm_3xtf32),
    }
    for chunk in (1024, 2048, 4096, unit.shape[0]):
        if unit.shape[0] % chunk == 0:
            variants[f"split/{chunk}"] = (split_k_major, gemm_chunked(chunk))
    return variants


def scores_from_cross(cross, acts64, shift64, unit64):
    """Closed-form scores with `cross` = Êᵀ(A - shift) and every other sum exact."""
    amin, amax = acts64.amin(0), acts64.amax(0)
    delta = amin - shift64
    u = cross.double() - unit64.sum(0)[:, None] * delta[None, :]  # Êᵀ(A - min)
    b = acts64 - amin
    w = (unit64 * unit64).sum(1)
    s1, s2, s2w = b.sum(0), (b * b).sum(0), (w[:, None] * b * b).sum(0)
    num = (u * u).sum(0) - s2w
    den = s1 * s1 - s2
    return torch.where(den > 0, num / den, float("nan"))


def probe_products(rows, latents, dim):
    gen = torch.Generator(device="cuda").manual_seed(0)
    emb = torch.randn(rows, dim, generator=gen, device="cuda") + 0.3
    unit = emb / emb.norm(dim=1, keepdim=True)
    print(f"\n== products at N={rows}, M={latents}, d={dim} (ms, median of 10; err = max |Δscore| vs float64 cross)")
    print(f"{'variant':10s} {'gemm ms':>8s} {'split ms':>9s} {'relu err':>10s} {'1000+x err':>11s}")
    results = {}
    for data in ("relu", "offset"):
        acts = torch.randn(rows, latents, generator=gen, device="cuda")
        acts = torch.relu(acts) if data == "relu" else 1000 + acts
        shifted = acts - acts[0]
        unit64 = unit.double()
        acts64 = acts.double()
        shift64 = acts64[0]
        exact = scores_from_cross(unit64.T @ (acts64 - shift64), acts64, shift64, unit64)
        for name, (split, gemm) in products(unit, shifted).items():
            ops = split()
            cross = gemm(ops)
            err = (scores_from_cross(cross, acts64, shift64, unit64) - exact).abs().nan_to_num(0).max().item()
            entry = results.setdefault(name, {})
            entry[data] = err
            if data == "relu":
                entry["gemm"] = timed(lambda: gemm(ops))
                entry["split"] = timed(split)
            del ops, cross
        del acts, shifted, acts64, exact
        torch.cuda.empty_cache()
    # Layout: the same TF32 GEMM with both operands K-major (rows = the reduction, contiguous).
    acts = torch.relu(torch.randn(rows, latents, generator=gen, device="cuda"))
    unit_t, acts_t = unit.T.contiguous(), acts.T.contiguous()
    set_tf32(True)
    k_major = timed(lambda: unit_t @ acts_t.T)
    natural = timed(lambda: unit.T @ acts)
    set_tf32(False)
    for name, entry in results.items():
        print(f"{name:10s} {entry['gemm']:8.2f} {entry['split']:9.2f} {entry['relu']:10.2e} {entry['offset']:11.2e}")
    print(f"one TF32 GEMM: natural layout {natural:.2f} ms, both K-major {k_major:.2f} ms")
    flops = 2 * rows * latents * dim
    print(f"TF32 rate natural {flops / natural / 1e9:.0f} TFLOP/s; SGEMM {flops / results['sgemm']['gemm'] / 1e9:.0f}")


def profile_loss():
    import monoloss_kernels
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, latents, dim, k = 4096, 8192, 768, 64
    pre = torch.randn(rows, latents, generator=gen, device="cuda")
    emb = torch.randn(rows, dim, generator=gen, device="cuda")
    top = torch.topk(pre, k, dim=1)
    dense = torch.relu(pre).requires_grad_()
    values = top.values.contiguous().requires_grad_()
    for backend in ("cuda", "triton"):
        for label, make in (("topk", lambda: (values, top.indices)), ("dense", lambda: dense)):
            def step():
                loss = monoloss_kernels.monoloss(make(), emb, num_latents=latents, backend=backend)
                loss.backward()
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            step_ms = timed(step)
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                step()
                torch.cuda.synchronize()
            events = prof.key_averages()
            kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
            print(f"\n== MonoLoss {label} backend={backend}: {step_ms:.3f} ms per step (median), "
                  f"{kernels} GPU kernel/memcpy events")
            print(events.table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--latents", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--profile-loss", action="store_true")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    if args.profile_loss:
        profile_loss()
    probe_products(args.rows, args.latents, args.dim)


if __name__ == "__main__":
    main()
