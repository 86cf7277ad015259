"""Shared benchmark machinery: the profiles (`--profile quick|full`), the `measure`
fixture that times one method and records its median, `skip_point` for what a profile
does not run, and the end-of-session report: speedup tables in the terminal, the
scaling table, summary.json and the scaling plots under <results-dir>/<device>/.

    pytest benchmarks/ --benchmark-only                        # quick: ~10 min on 2 CPU cores
    pytest benchmarks/ --benchmark-only --profile full         # GPUs: N up to 2^20, both settings and dtypes
    pytest benchmarks/ --benchmark-only --benchmark-json=out.json --results-dir=/tmp/bench

Medians are recorded by `measure` itself into a registry on `config.stash` rather than
read back from pytest-benchmark's session (`config._benchmarksession`), which is private
API; the fixture already holds `benchmark.stats` right after `pedantic`, so recording
there needs nothing beyond the public fixture. The speedups are computed here, once,
because pytest-benchmark's own table caps ratios at 1000x and knows nothing of "peer".
"""

import json
import math
import platform
import re
import time
from pathlib import Path

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
PROFILES = ("quick", "full")

# Method names the summary relates every other method to.
PEER = "peer"  # reference.published_monoscore, the published linear algorithm
COMPILED_PEER = "peer-compiled"  # torch.compile of it
GEMM = "gemm"  # the bare product ÊᵀA every exact method pays for
PAIRWISE = "pairwise"  # reference.pairwise_monoscore, float64
PAIRWISE_LOOP = "pairwise-loop"  # the original metric code's double loop (pairwise_baselines.py)
PAIRWISE_BLOCKED = "pairwise-blocked"  # the O(N²) sums as blocked matrix products
OURS_PREFIX = "ours-"

# group -> method -> record; filled by `measure`, read by pytest_terminal_summary.
RECORDS_KEY = pytest.StashKey[dict]()
# A method whose warm-up call is fast gets more rounds than asked for, so that its
# median is taken over at least this many seconds of calls: three rounds of a 30 ms
# call are at the mercy of one hiccup of a shared machine, three of a 2 s call are not.
MIN_TIMED_S = 1.0
MAX_ROUNDS = 200
# What a profile or budget left out, with the reason: filled by `skip_point`.
SKIPS_KEY = pytest.StashKey[list]()


def pytest_addoption(parser):
    group = parser.getgroup("monoloss_kernels benchmarks")
    group.addoption(
        "--profile", choices=PROFILES, default="quick",
        help="quick (default): the issue targets and a small scaling sweep, ~10 min on 2 CPU cores; "
        "full: the scaling sweep N = 2^10..2^20 over both SAE settings and both dtypes (for GPUs)",
    )
    group.addoption(
        "--results-dir", default=str(RESULTS_DIR),
        help="where <device>/summary.json and the scaling plots go (default: benchmarks/results)",
    )


def pytest_configure(config):
    config.stash[RECORDS_KEY] = {}
    config.stash[SKIPS_KEY] = []


def bench_profile(config) -> str:
    """The profile this session runs ("quick" where the option is not registered)."""
    try:
        return config.getoption("--profile")
    except ValueError:
        return "quick"


def results_dir(config) -> Path:
    try:
        return Path(config.getoption("--results-dir"))
    except ValueError:
        return RESULTS_DIR


@pytest.fixture(scope="session")
def profile(request) -> str:
    return bench_profile(request.config)


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
    """measure(fn, *, device, group, method, rounds, gemm_flops, extra_info, warmup_rounds=1,
    check_after=None) times `fn` with `benchmark.pedantic` and records its median for the
    summary; returns the median in seconds (None under --benchmark-disable).

    `gemm_flops` is 2·N·M·d, the matrix product every exact method pays for; the
    GFLOP/s reported is that count over the method's median, so methods compare on one
    scale (for the pairwise methods it understates the work they really do).
    `warmup_rounds=0` is for calls so slow that one is all a profile can afford: the
    caller then checks the timed call's own result in `check_after`, a function called
    after timing whose dict (e.g. the max error) joins `extra_info` before recording.
    `rounds` is a minimum: a fast method is timed over at least MIN_TIMED_S seconds
    (the rounds it got are recorded).
    """
    records = request.config.stash[RECORDS_KEY]

    def run(fn, *, device, group, method, rounds, gemm_flops, extra_info, warmup_rounds=1, check_after=None):
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
        if warmup_rounds > 0:  # the first warm-up call, timed to size the rounds
            start = time.perf_counter()
            timed()
            call_s = time.perf_counter() - start
            rounds = max(rounds, min(MAX_ROUNDS, math.ceil(MIN_TIMED_S / max(call_s, 1e-9))))
            warmup_rounds -= 1
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        if check_after is not None:
            benchmark.extra_info.update(check_after())

        if device.type == "cuda":
            peak_bytes = torch.cuda.max_memory_allocated(device)
            benchmark.extra_info["peak_memory_mib"] = peak_bytes / 2**20
            # Beyond the inputs already resident: what the method itself allocates.
            benchmark.extra_info["peak_workspace_mib"] = (peak_bytes - inputs_bytes) / 2**20
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
            return None
        median_s = benchmark.stats.stats.median
        benchmark.extra_info["gemm_gflop_per_s"] = gemm_flops / median_s / 1e9
        records.setdefault(group, {})[method] = {
            **benchmark.extra_info,
            "torch_device": str(device),
            "median_s": median_s,
            "rounds": rounds,
            "warmup_rounds": warmup_rounds,
            "profile": bench_profile(request.config),
        }
        return median_s

    return run


@pytest.fixture
def skip_point(request):
    """skip_point(*, device, group, method, reason, **info): records that this method is
    not run at this point and why (listed in the report; `estimate_s` with `extrapolate=True`
    is plotted as an extrapolated point), then skips the test."""
    skips = request.config.stash[SKIPS_KEY]

    def skip(*, device, group, method, reason, **info):
        skips.append({"group": group, "method": method, "reason": reason, "torch_device": str(device), **info})
        pytest.skip(f"{method} on {group}: {reason}")

    return skip


def ratio(numerator, denominator):
    if numerator is None or denominator is None:
        return None
    return numerator / denominator


def group_summary(methods: dict) -> dict:
    """Per method: median, speedup vs the peer (peer/method), ratio to the bare GEMM
    (method/GEMM), speedup vs the compiled peer (compiled/method) and vs the float64
    pairwise definition (pairwise/method)."""

    def median(method):
        return methods[method]["median_s"] if method in methods else None

    summary = {}
    for method, record in sorted(methods.items(), key=lambda item: item[1]["median_s"]):
        summary[method] = {
            "median_s": record["median_s"],
            "speedup_vs_peer": ratio(median(PEER), record["median_s"]),
            "ratio_to_gemm": ratio(record["median_s"], median(GEMM)),
            "speedup_vs_compiled_peer": ratio(median(COMPILED_PEER), record["median_s"]),
            "speedup_vs_pairwise": ratio(median(PAIRWISE), record["median_s"]),
            "gemm_gflop_per_s": record.get("gemm_gflop_per_s"),
            "max_abs_error": record.get("max_abs_error"),
            "peak_memory_mib": record.get("peak_memory_mib"),
            "peak_workspace_mib": record.get("peak_workspace_mib"),
            "saved_for_backward_mib": record.get("saved_for_backward_mib"),
            "rounds": record["rounds"],
            "profile": record.get("profile"),
        }
    return summary


# Column order of the scaling tables and plots: baselines first, then ours.
SCALING_BASELINES = (PAIRWISE_LOOP, PAIRWISE_BLOCKED, PEER, COMPILED_PEER, GEMM)


def method_order(methods) -> list[str]:
    baselines = [m for m in SCALING_BASELINES if m in methods]
    return baselines + sorted(m for m in methods if m not in SCALING_BASELINES)


def scaling_summary(records: list[dict], skips: list[dict]) -> dict:
    """The scaling sweep by series: for each series (form, M, d, k, dtype) and each N,
    every method's measured median, or its extrapolated time (a time-budget skip), or
    the reason it was skipped; and the speedups of our default backend over the peer
    and over the pairwise loop at each N.

    `records` and `skips` are the sweep's entries (each with a "sweep" dict naming the
    series, N and the default backend). Returns {series key: series summary}.
    """
    series = {}

    def entry(sweep):
        s = series.setdefault(sweep["series"], {
            "form": sweep["form"], "num_latents": sweep["num_latents"], "dim": sweep["dim"],
            "k": sweep.get("k"), "dtype": sweep["dtype"], "default_backend": sweep["default_backend"],
            "profile": sweep.get("profile"), "rows": [], "methods": {}, "speedups": {},
        })
        if sweep["num_rows"] not in s["rows"]:
            s["rows"].append(sweep["num_rows"])
        return s

    for record in records:
        sweep = record["sweep"]
        entry(sweep)["methods"].setdefault(record["method"], {})[str(sweep["num_rows"])] = {
            "status": "measured",
            "median_s": record["median_s"],
            "rounds": record["rounds"],
            "max_abs_error": record.get("max_abs_error"),
            "reference": record.get("reference"),
            "peak_workspace_mib": record.get("peak_workspace_mib"),
        }
    for skip in skips:
        sweep = skip["sweep"]
        point = {"status": "extrapolated" if skip.get("extrapolate") else "skipped", "reason": skip["reason"]}
        if skip.get("estimate_s") is not None:
            point["estimate_s"] = skip["estimate_s"]
        entry(sweep)["methods"].setdefault(skip["method"], {})[str(sweep["num_rows"])] = point

    for s in series.values():
        s["rows"].sort()
        s["methods"] = {m: s["methods"][m] for m in method_order(s["methods"])}
        ours = OURS_PREFIX + s["default_backend"]
        for num_rows in s["rows"]:
            key = str(num_rows)
            ours_s = point_seconds(s["methods"].get(ours, {}).get(key), extrapolated=False)
            peer_s = point_seconds(s["methods"].get(PEER, {}).get(key), extrapolated=False)
            loop_point = s["methods"].get(PAIRWISE_LOOP, {}).get(key)
            loop_s = point_seconds(loop_point, extrapolated=True)
            s["speedups"][key] = {
                "ours_vs_peer": ratio(peer_s, ours_s),
                "ours_vs_pairwise_loop": ratio(loop_s, ours_s),
                "pairwise_loop_extrapolated": loop_point is not None and loop_point["status"] == "extrapolated",
            }
    return series


def point_seconds(point: dict | None, *, extrapolated: bool) -> float | None:
    """A point's median, or (if `extrapolated`) its extrapolated time; None otherwise."""
    if point is None:
        return None
    if point["status"] == "measured":
        return point["median_s"]
    if extrapolated and point["status"] == "extrapolated":
        return point.get("estimate_s")
    return None


def format_value(value, spec, suffix=""):
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def format_speedup(value) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}x" if value >= 100 else f"{value:.2f}x"


def series_title(s: dict) -> str:
    k = f", k={s['k']}" if s.get("k") else ""
    form = "TopK" if s["form"] == "topk" else "dense"
    return f"{form}, M={s['num_latents']}, d={s['dim']}{k}, {s['dtype']}"


def write_group_tables(write, groups: dict, summary: dict) -> None:
    for group, methods in groups.items():
        first = next(iter(methods.values()))
        rows = group_summary(methods)
        summary["groups"][group] = {"shape": first.get("shape"), "dtype": first.get("dtype"), "methods": rows}
        with_pairwise = PAIRWISE in methods
        write("")
        write(group)
        header = (
            f"  {'method':<24}{'median':>12}{'x vs peer':>12}{'/ GEMM':>10}"
            f"{'x vs compiled':>15}" + (f"{'x vs pairwise':>15}" if with_pairwise else "") + f"{'max |err|':>11}"
        )
        write(header)
        write("  " + "-" * (len(header) - 2))
        for method, row in rows.items():
            write(
                f"  {method:<24}{format_seconds(row['median_s']):>12}"
                f"{format_value(row['speedup_vs_peer'], '.2f', 'x'):>12}"
                f"{format_value(row['ratio_to_gemm'], '.2f'):>10}"
                f"{format_value(row['speedup_vs_compiled_peer'], '.2f', 'x'):>15}"
                + (f"{format_speedup(row['speedup_vs_pairwise']):>15}" if with_pairwise else "")
                + f"{format_value(row['max_abs_error'], '.1e'):>11}"
            )


def write_scaling_tables(write, scaling: dict) -> None:
    for s in scaling.values():
        methods = list(s["methods"])
        ours = OURS_PREFIX + s["default_backend"]
        width = max(12, *(len(m) + 2 for m in methods))
        write("")
        write(f"scaling: {series_title(s)}   (ours = {ours}; ~ extrapolated, skip = not run, see below)")
        header = f"  {'N':>8}" + "".join(f"{m:>{width}}" for m in methods) + f"{'ours vs peer':>14}{'vs pairwise-loop':>18}"
        write(header)
        write("  " + "-" * (len(header) - 2))
        for num_rows in s["rows"]:
            key = str(num_rows)
            cells = []
            for m in methods:
                point = s["methods"][m].get(key)
                if point is None:
                    cells.append("")
                elif point["status"] == "measured":
                    cells.append(format_seconds(point["median_s"]))
                elif point["status"] == "extrapolated" and point.get("estimate_s") is not None:
                    cells.append("~" + format_seconds(point["estimate_s"]))
                else:
                    cells.append("skip")
            speedup = s["speedups"][key]
            vs_loop = format_speedup(speedup["ours_vs_pairwise_loop"])
            if speedup["pairwise_loop_extrapolated"] and speedup["ours_vs_pairwise_loop"] is not None:
                vs_loop = "~" + vs_loop
            write(f"  {num_rows:>8}" + "".join(f"{c:>{width}}" for c in cells)
                  + f"{format_speedup(speedup['ours_vs_peer']):>14}{vs_loop:>18}")


def write_skips(write, skips: list[dict]) -> None:
    if not skips:
        return
    write("")
    write(f"not run ({len(skips)}):")
    for skip in skips:
        estimate = f" (estimated {format_seconds(skip['estimate_s'])})" if skip.get("estimate_s") is not None else ""
        write(f"  {skip['group']} {skip['method']}: {skip['reason']}{estimate}")


def merge_summary(out_path: Path, summary: dict) -> dict:
    """Groups and scaling series of earlier runs stay (a run of one benchmark file must
    not drop the others' results); those measured now replace theirs, with this machine
    info. Skips are this run's."""
    if out_path.exists():
        try:
            earlier = json.loads(out_path.read_text())
        except json.JSONDecodeError:
            earlier = {}
        summary["groups"] = {**earlier.get("groups", {}), **summary["groups"]}
        summary["scaling"] = {**earlier.get("scaling", {}), **summary["scaling"]}
    return summary


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    records = config.stash.get(RECORDS_KEY, {})
    all_skips = config.stash.get(SKIPS_KEY, [])
    if not records and not all_skips:
        return
    by_device = {}  # one summary.json per device (a session normally benchmarks one)
    for group, methods in records.items():
        device = torch.device(next(iter(methods.values()))["torch_device"])
        by_device.setdefault(device, {"groups": {}, "sweep": [], "skips": []})
        for method, record in methods.items():
            if "sweep" in record:
                by_device[device]["sweep"].append({**record, "method": method})
            else:
                by_device[device]["groups"].setdefault(group, {})[method] = record
    for skip in all_skips:
        by_device.setdefault(torch.device(skip["torch_device"]), {"groups": {}, "sweep": [], "skips": []})
        by_device[torch.device(skip["torch_device"])]["skips"].append(skip)

    write = terminalreporter.write_line
    profile = bench_profile(config)
    terminalreporter.section(f"MonoScore speedups (medians; peer = published_monoscore; profile {profile})")
    for device, measured in by_device.items():
        info = machine_info(device)
        write(f"device {info['device']}, torch {info['torch']}, {info['torch_threads']} threads")
        summary = {"machine": info, "profile": profile, "groups": {}, "scaling": {}, "skipped": measured["skips"]}
        write_group_tables(write, measured["groups"], summary)
        sweep_skips = [s for s in measured["skips"] if "sweep" in s]
        summary["scaling"] = scaling_summary(measured["sweep"], sweep_skips)
        write_scaling_tables(write, summary["scaling"])
        write_skips(write, measured["skips"])

        out_dir = results_dir(config) / info["device"]
        out_dir.mkdir(parents=True, exist_ok=True)
        out_path = out_dir / "summary.json"
        summary = merge_summary(out_path, summary)
        out_path.write_text(json.dumps(finite_or_none(summary), indent=2, allow_nan=False) + "\n")
        write("")
        write(f"summary written to {out_path}")
        if summary["scaling"]:
            try:
                from .plot_scaling import plot_scaling
            except ImportError as error:  # matplotlib is an optional [bench] extra
                write(f"no scaling plots: {error} (pip install matplotlib)")
            else:
                try:
                    paths = plot_scaling(summary["scaling"], out_dir, device_label(info))
                except Exception as error:  # the tables and summary.json are out already: keep the report
                    write(f"scaling plots failed: {type(error).__name__}: {error}")
                else:
                    for path in paths:
                        write(f"plot written to {path}")


def device_label(info: dict) -> str:
    """The device as the plot titles name it."""
    if info["device_type"] == "cuda":
        return f"{info['gpu']} (torch {info['torch']})"
    return f"{info['cpu']}, {info['torch_threads']} threads (torch {info['torch']})"


def finite_or_none(value):
    """`value` with every non-finite float replaced by None: JSON has no NaN (the
    tables print n/a)."""
    if isinstance(value, dict):
        return {key: finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
