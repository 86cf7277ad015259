"""The scaling plots: MonoScore time against N on log-log axes, one line per method,
one figure per (SAE setting, dtype) with a panel per form (dense, TopK), speedups of our
default backend annotated at each N, as in the paper's figure. Points a time budget
skipped are drawn extrapolated (dashed line, hollow markers).

Called by conftest.py at the end of a benchmark run; to redraw from a summary:

    python -m benchmarks.plot_scaling benchmarks/results/<device>/summary.json

matplotlib (the [bench] extra) is imported on first use, with the Agg backend.
"""

import argparse
import json
import math
from pathlib import Path

from .conftest import (
    COMPILED_PEER, GEMM, OURS_PREFIX, PAIRWISE_BLOCKED, PAIRWISE_LOOP, PEER, device_label, series_title,
)

LABELS = {
    PAIRWISE_LOOP: "pairwise loop (original metric code)",
    PAIRWISE_BLOCKED: "pairwise, blocked matrix products",
    PEER: "published linear algorithm (torch)",
    COMPILED_PEER: "published linear, torch.compile",
    GEMM: "bare GEMM ÊᵀA (floor)",
}
STYLES = {  # (colour, marker)
    PAIRWISE_LOOP: ("#d62728", "s"),
    PAIRWISE_BLOCKED: ("#ff7f0e", "D"),
    PEER: ("#1f77b4", "o"),
    COMPILED_PEER: ("#17becf", "v"),
    GEMM: ("#7f7f7f", "x"),
}
OUR_STYLES = [("#2ca02c", "*"), ("#9467bd", "P"), ("#8c564b", "^"), ("#e377c2", "h")]


def method_label(method: str, default_backend: str) -> str:
    if method.startswith(OURS_PREFIX):
        backend = method.removeprefix(OURS_PREFIX)
        return f"ours: {backend}" + (" (default)" if backend == default_backend else "")
    return LABELS.get(method, method)


def method_style(method: str, our_methods: list[str]) -> tuple[str, str]:
    if method in STYLES:
        return STYLES[method]
    return OUR_STYLES[our_methods.index(method) % len(OUR_STYLES)]


def format_ratio(value: float) -> str:
    return f"{value:,.0f}×" if value >= 10 else f"{value:.1f}×"


def draw_series(ax, s: dict) -> None:
    """One panel: every method's measured and extrapolated times, and the speedups."""
    our_methods = [m for m in s["methods"] if m.startswith(OURS_PREFIX)]
    default = OURS_PREFIX + s["default_backend"]
    for method, points in s["methods"].items():
        colour, marker = method_style(method, our_methods)
        measured = sorted((int(n), p["median_s"]) for n, p in points.items() if p["status"] == "measured")
        extrapolated = sorted((int(n), p["estimate_s"]) for n, p in points.items()
                              if p["status"] == "extrapolated" and p.get("estimate_s") is not None)
        width = 2.4 if method == default else 1.4
        if measured:
            ax.plot(*zip(*measured), color=colour, marker=marker, linewidth=width, markersize=6,
                    label=method_label(method, s["default_backend"]))
        if extrapolated:
            # Dashed from the last measured point on, hollow markers: not measured.
            line = ([measured[-1]] if measured else []) + extrapolated
            ax.plot(*zip(*line), color=colour, linestyle="--", linewidth=1.2)
            ax.plot(*zip(*extrapolated), color=colour, marker=marker, linestyle="none", markersize=7,
                    markerfacecolor="none", label=method_label(method, s["default_backend"]) + " (extrapolated)")

    # Speedups at each N, below our default backend's point: vs the peer, vs the loop.
    ours = s["methods"].get(default, {})
    for n, speedup in s["speedups"].items():
        point = ours.get(n)
        if point is None or point["status"] != "measured":
            continue
        xy = (int(n), point["median_s"])
        offset = -14
        if speedup.get("ours_vs_peer") is not None:
            ax.annotate(format_ratio(speedup["ours_vs_peer"]) + " vs peer", xy, xytext=(0, offset),
                        textcoords="offset points", ha="center", va="top", fontsize=6.5, color=STYLES[PEER][0],
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": STYLES[PEER][0], "lw": 0.6})
            offset -= 13
        if speedup.get("ours_vs_pairwise_loop") is not None:
            guessed = speedup.get("pairwise_loop_extrapolated")
            ax.annotate(("~" if guessed else "") + format_ratio(speedup["ours_vs_pairwise_loop"]) + " vs loop", xy,
                        xytext=(0, offset), textcoords="offset points", ha="center", va="top", fontsize=6.5,
                        color=STYLES[PAIRWISE_LOOP][0], fontstyle="italic" if guessed else "normal",
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": STYLES[PAIRWISE_LOOP][0], "lw": 0.6,
                              "linestyle": "--" if guessed else "-"})

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(s["rows"])
    ax.set_xticklabels([f"$2^{{{n.bit_length() - 1}}}$" for n in s["rows"]])
    ax.set_xlabel("N (samples)")
    ax.set_ylabel("time per MonoScore call (s)")
    ax.set_title(series_title(s), fontsize=10)
    ax.grid(True, which="both", linewidth=0.3, alpha=0.6)
    low, high = ax.get_ylim()
    ax.set_ylim(low / 8, high)  # room for the speedup boxes under the fastest line


def plot_scaling(scaling: dict, out_dir: Path, device_label: str) -> list[Path]:
    """Writes one PNG per (M, d, dtype) of the scaling summary (conftest.scaling_summary)
    into `out_dir`; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = {}
    for s in scaling.values():
        if not any(p["status"] == "measured" for points in s["methods"].values() for p in points.values()):
            continue  # nothing ran in this series (memory, time budget): its skips are in the report
        key = (s["num_latents"], s["dim"], s["dtype"])
        figures.setdefault(key, []).append(s)
    paths = []
    for (num_latents, dim, dtype), panels in figures.items():
        panels.sort(key=lambda s: s["form"] != "dense")  # dense left, TopK right
        fig, axes = plt.subplots(1, len(panels), figsize=(max(11.0, 7.5 * len(panels)), 6.5), squeeze=False)
        legend = {}  # one legend for the figure: label -> handle, in first-drawn order
        for ax, s in zip(axes[0], panels):
            draw_series(ax, s)
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        fig.suptitle(f"MonoScore time vs N on {device_label}\n"
                     "boxes: speedup of our default backend over the published algorithm (peer) and over the\n"
                     "pairwise loop (~: over its extrapolated time); hollow markers, dashed: extrapolated", fontsize=10)
        columns = min(3 if len(panels) == 1 else 4, len(legend))
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=columns, fontsize=8, frameon=False)
        rows = math.ceil(len(legend) / columns)
        fig.tight_layout(rect=(0, 0.032 * rows + 0.01, 1, 1))
        path = Path(out_dir) / f"scaling-M{num_latents}-d{dim}-{dtype}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description="Redraw the scaling plots from a benchmark summary.json.")
    parser.add_argument("summary", type=Path, help="benchmarks/results/<device>/summary.json")
    parser.add_argument("--out-dir", type=Path, help="where the PNGs go (default: next to the summary)")
    args = parser.parse_args()
    try:
        summary = json.loads(args.summary.read_text())
    except (OSError, json.JSONDecodeError) as error:
        parser.error(f"cannot read summary {args.summary}: {error}")
    if not summary.get("scaling"):
        parser.error(f"{args.summary} has no scaling results (run benchmarks/test_bench_scaling.py)")
    for path in plot_scaling(summary["scaling"], args.out_dir or args.summary.parent, device_label(summary["machine"])):
        print(path)


if __name__ == "__main__":
    main()
