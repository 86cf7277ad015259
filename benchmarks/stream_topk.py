"""Streams N = 2^22 TopK rows (M = 16384, k = 64, d = 768) through a MonoScoreAccumulator,
generating each batch on the fly, and prints one JSON line: wall time, time inside
`update`, peak resident memory of this process, and how many latents came out defined.
(That the streamed scores equal one-shot scores is tested in tests/test_accumulator.py.)

    python benchmarks/stream_topk.py [--rows 4194304] [--batch 32768]

Run as its own process by benchmarks/test_bench_topk.py, so the peak is the stream's.
"""

import argparse
import json
import resource
import sys
import time

import torch

import monoloss_kernels as mk

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from benchmarks.common import make_topk_batch  # noqa: E402


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage: a child inherits its
    parent's ru_maxrss across fork and exec, so under pytest it would report pytest's peak."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2**22)
    parser.add_argument("--batch", type=int, default=2**15)
    parser.add_argument("--latents", type=int, default=16384)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dim", type=int, default=768)
    args = parser.parse_args()

    gen = torch.Generator().manual_seed(0)
    acc = mk.MonoScoreAccumulator(args.latents, args.dim)
    start = time.perf_counter()
    update_s = 0.0
    for n0 in range(0, args.rows, args.batch):
        rows = min(args.batch, args.rows - n0)
        values, indices, emb = make_topk_batch(rows, args.latents, args.k, args.dim, gen, "cpu")
        t = time.perf_counter()
        acc.update((values, indices), emb)
        update_s += time.perf_counter() - t
        print(f"{n0 + rows}/{args.rows} rows, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    scores = acc.compute()
    wall_s = time.perf_counter() - start
    print(json.dumps({
        "rows": args.rows, "batch": args.batch, "latents": args.latents, "k": args.k, "dim": args.dim,
        "wall_s": round(wall_s, 2), "update_s": round(update_s, 2), "peak_rss_mib": round(peak_rss_mib(), 1),
        "defined_latents": int(scores.isfinite().sum()),
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
