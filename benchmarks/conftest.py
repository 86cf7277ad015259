"""Shared benchmark machinery: the `measure` fixture that times one method and records
its median, and the end-of-session speedup tables and summary.json built from those
records.

Medians are recorded by `measure` itself into a registry on `config.stash` rather than
read back from pytest-benchmark's session (`config._benchmarksession`), which is private
API; the fixture already holds `benchmark.stats` right after `pedantic`, so recording
there needs nothing beyond the public fixture. The speedups are computed here, once,
because pytest-benchmark's own table caps ratios at 1000x and knows nothing of "peer".
"""

import json
import platform
import re
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"

# Method names the summary relates every other method to (set by test_bench_monoscore.py).
PEER = "peer"
COMPILED_PEER = "peer-compiled"
GEMM = "gemm"

# group -> method -> record; filled by `measure`, read by pytest_terminal_summary.
RECORDS_KEY = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[RECORDS_KEY] = {}


def sanitize(name: str) -> str:
    """A folder-safe name: runs of anything but letters, digits, '.', '_' become one '-'."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """e.g. 'NVIDIA-H100-80GB-HBM3' or 'cpu-Intel-R-Xeon-R-Processor': names the results folder."""
    if device.type == "cuda":
        return sanitize(torch.cuda.get_device_name(device))
    return sanitize(f"{device.type}-{cpu_model()}")


def machine_info(device: torch.device) -> dict:
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


@pytest.fixture
def measure(benchmark, request):
    """measure(fn, *, device, group, method, rounds, gemm_flops, extra_info) times `fn`
    with `benchmark.pedantic` and records its median for the summary.

    `gemm_flops` is 2·N·M·d, the matrix product every exact method pays for; the
    GFLOP/s reported is that count over the method's median, so methods compare on one
    scale (for the pairwise reference it understates the work it really does).
    """
    records = request.config.stash[RECORDS_KEY]

    def run(fn, *, device, group, method, rounds, gemm_flops, extra_info):
        if device.type == "cuda":
            # The timer reads the host clock: wait for the kernels inside the timed call.
            def timed():
                fn()
                torch.cuda.synchronize(device)

            torch.cuda.synchronize(device)
            inputs_bytes = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            timed = fn

        benchmark.group = group
        benchmark.extra_info.update(extra_info, method=method, group=group)
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)

        if device.type == "cuda":
            peak_bytes = torch.cuda.max_memory_allocated(device)
            benchmark.extra_info["peak_memory_mib"] = peak_bytes / 2**20
            # Beyond the inputs already resident: what the method itself allocates.
            benchmark.extra_info["peak_workspace_mib"] = (peak_bytes - inputs_bytes) / 2**20
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
            return
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["gemm_gflop_per_s"] = gemm_flops / median_s / 1e9
        records.setdefault(group, {})[method] = {
            **benchmark.extra_info,
            "torch_device": str(device),
            "median_s": median_s,
            "rounds": rounds,
        }

    return run


def ratio(numerator, denominator):
    if numerator is None or denominator is None:
        return None
    return numerator / denominator


def group_summary(methods: dict) -> dict:
    """Per method: median, speedup vs the peer (peer/method), ratio to the bare GEMM
    (method/GEMM) and speedup vs the compiled peer (compiled/method)."""

    def median(method):
        return methods[method]["median_s"] if method in methods else None

    summary = {}
    for method, record in sorted(methods.items(), key=lambda item: item[1]["median_s"]):
        summary[method] = {
            "median_s": record["median_s"],
            "speedup_vs_peer": ratio(median(PEER), record["median_s"]),
            "ratio_to_gemm": ratio(record["median_s"], median(GEMM)),
            "speedup_vs_compiled_peer": ratio(median(COMPILED_PEER), record["median_s"]),
            "gemm_gflop_per_s": record.get("gemm_gflop_per_s"),
            "max_abs_error": record.get("max_abs_error"),
            "peak_memory_mib": record.get("peak_memory_mib"),
            "peak_workspace_mib": record.get("peak_workspace_mib"),
            "saved_for_backward_mib": record.get("saved_for_backward_mib"),
            "rounds": record["rounds"],
        }
    return summary


def format_value(value, spec, suffix=""):
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = config.stash.get(RECORDS_KEY, {})
    if not records:
        return
    by_device = {}  # one summary.json per device (a session normally benchmarks one)
    for group, methods in records.items():
        device = torch.device(next(iter(methods.values()))["torch_device"])
        by_device.setdefault(device, {})[group] = methods

    write = terminalreporter.write_line
    terminalreporter.section("MonoScore speedups (medians; peer = published_monoscore)")
    for device, groups in by_device.items():
        info = machine_info(device)
        write(f"device {info['device']}, torch {info['torch']}, {info['torch_threads']} threads")
        summary = {"machine": info, "groups": {}}
        for group, methods in groups.items():
            first = next(iter(methods.values()))
            rows = group_summary(methods)
            summary["groups"][group] = {
                "shape": first.get("shape"),
                "dtype": first.get("dtype"),
                "methods": rows,
            }
            write("")
            write(group)
            header = (
                f"  {'method':<16}{'median':>12}{'x vs peer':>12}{'/ GEMM':>10}"
                f"{'x vs compiled':>15}{'max |err|':>11}"
            )
            write(header)
            write("  " + "-" * (len(header) - 2))
            for method, row in rows.items():
                write(
                    f"  {method:<16}{format_seconds(row['median_s']):>12}"
                    f"{format_value(row['speedup_vs_peer'], '.2f', 'x'):>12}"
                    f"{format_value(row['ratio_to_gemm'], '.2f'):>10}"
                    f"{format_value(row['speedup_vs_compiled_peer'], '.2f', 'x'):>15}"
                    f"{format_value(row['max_abs_error'], '.1e'):>11}"
                )
        out_dir = RESULTS_DIR / info["device"]
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path = out_dir / "summary.json"
        # Groups of earlier runs stay (a run of one benchmark file must not drop the
        # others' results); the groups measured now replace theirs, with this machine info.
        if out_path.exists():
            earlier = json.loads(out_path.read_text()).get("groups", {})
            summary["groups"] = {**earlier, **summary["groups"]}
        out_path.write_text(json.dumps(summary, indent=2) + "\n")
        write("")
        write(f"summary written to {out_path}")
