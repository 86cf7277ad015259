"""The `monoloss-kernels` command (also `python -m monoloss_kernels`).

    monoloss-kernels score ACTS --emb EMB.npy --out scores.csv          # dense .npy/.pt/.safetensors, a cache directory
    monoloss-kernels score --values V.npy --indices I.npy --num-latents M --emb EMB.npy --out scores.json
    monoloss-kernels score ACTS --images DIR --model ViT-B-32 --pretrained weights.bin --out scores.csv
    monoloss-kernels bench [--profile quick|full] [pytest arguments ...]

User errors (missing or unreadable files, mismatched inputs) are reported on stderr
with exit code 2 and no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ._dispatch import BACKENDS
from .embeddings import ModelLoadError, labels_path  # open_clip itself is imported only where a model is loaded

PROG = "monoloss-kernels"
HISTOGRAM_BINS = 10
HISTOGRAM_WIDTH = 40  # characters of the longest bar


class UsageError(ValueError):
    """Arguments that do not fit together (reported like a bad file: exit code 2)."""


# --------------------------------------------------------------------------- score
def _add_score_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "score",
        help="MonoScore (and class purity) of every latent of activations on disk",
        description=(
            "MonoScore of every latent, streamed from files in chunks of --batch-rows rows (memory-mapped; "
            "files larger than memory are fine). Activations: a dense .npy/.pt/.safetensors file, a directory "
            "(or glob) of sae-for-vlm *_part<i>.pt files or of delphi <start>_<end>.safetensors files, or TopK "
            "--values/--indices. Row n of the activations, embeddings and labels must be the same sample."
        ),
    )
    acts = p.add_argument_group("activations")
    acts.add_argument("acts", nargs="*", metavar="ACTS",
                      help="activation file(s), a cache directory or a glob (quote it)")
    acts.add_argument("--values", metavar="FILE",
                      help="TopK values (N, k) (.npy, .pt or .safetensors); needs --indices and --num-latents")
    acts.add_argument("--indices", metavar="FILE",
                      help="TopK latent indices (N, k), any integer dtype; a .safetensors file holding tensors "
                           "'values' and 'indices' can be given as both --values and --indices")
    acts.add_argument("--num-latents", type=int, metavar="M",
                      help="the SAE width M; required for TopK, otherwise checked against the files")
    acts.add_argument("--key", help="the tensor holding the activations in a .safetensors file with several")
    acts.add_argument("--seq-len", type=int, help="delphi caches without tokens or config.json: the context length")

    emb = p.add_argument_group("embeddings (one of --emb or --images)")
    emb.add_argument("--emb", metavar="FILE", help="(N, d) embeddings: .npy (memory-mapped), .pt or .safetensors")
    emb.add_argument("--emb-key", help="the tensor holding the embeddings in a .safetensors file with several")
    emb.add_argument("--images", metavar="DIR", help="embed this folder of images with an open_clip model")
    emb.add_argument("--model", metavar="NAME", help="open_clip model name for --images (e.g. ViT-B-32)")
    emb.add_argument("--pretrained", metavar="TAG_OR_FILE",
                     help="open_clip pretrained tag or a local checkpoint file for --images")
    emb.add_argument("--image-batch-size", type=int, default=64, metavar="B", help="images per batch (default 64)")
    emb.add_argument("--save-emb", metavar="FILE.npy",
                     help="also save the --images embeddings (and FILE.labels.npy for class subfolders) for --emb")

    out = p.add_argument_group("output")
    out.add_argument("--labels", metavar="FILE",
                     help="(N,) integer class labels (.npy or .pt): adds class purity (with --images, the class "
                          "subfolders give them when this is not set)")
    out.add_argument("--out", required=True, metavar="FILE", help="per-latent scores: .csv or .json (with the summary)")
    out.add_argument("--top", type=int, default=10, metavar="K",
                     help="latents listed as most / least monosemantic (default 10)")

    run = p.add_argument_group("run")
    run.add_argument("--batch-rows", type=int, default=None, metavar="R",
                     help="rows per chunk (default 4096); memory ≈ R·(M + d) values plus d·M float64 sums")
    run.add_argument("--device", default=None, help="where to compute, e.g. cuda or cpu (default cpu)")
    run.add_argument("--backend", default="auto", choices=BACKENDS, help="statistics backend (default auto)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (none is shown when stderr is not a terminal)")
    p.set_defaults(run=_run_score)


def _check_score_args(args) -> str:
    """Checks what can be checked before any long work; returns the output format."""
    if args.values is not None or args.indices is not None:
        if args.acts:
            raise UsageError("give the activations either as ACTS or as --values/--indices, not both")
        if args.values is None or args.indices is None:
            raise UsageError("TopK activations need both --values and --indices")
        if args.num_latents is None:
            raise UsageError("TopK activations need --num-latents M (the SAE width)")
        if args.key is not None:
            raise UsageError("--key names dense activations; a .safetensors file of TopK --values/--indices with "
                             "several tensors must name them 'values' and 'indices'")
    elif not args.acts:
        raise UsageError("no activations: give ACTS or --values/--indices")
    if (args.emb is None) == (args.images is None):
        raise UsageError("give the embeddings either as --emb FILE or as --images DIR --model NAME")
    if args.images is not None and args.model is None:
        raise UsageError("--images needs --model (an open_clip model name)")
    if args.emb is not None and (args.model or args.pretrained or args.save_emb):
        raise UsageError("--model, --pretrained and --save-emb go with --images, not --emb")
    if args.save_emb is not None:
        if Path(args.save_emb).suffix != ".npy":
            raise UsageError(f"--save-emb {args.save_emb}: must end in .npy")
        _check_output_file("--save-emb", args.save_emb)
        _check_not_an_input(args)
    for name in ("batch_rows", "top", "image_batch_size", "num_latents", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            raise UsageError(f"--device {args.device}: {err}") from err
        if device.type not in ("cpu", "cuda"):  # meta, xpu, mps...: no statistics kernels there
            raise UsageError(f"--device {args.device}: must be cpu or cuda (e.g. cuda:1)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA GPU is visible to torch (torch.cuda.is_available() "
                             "is False)")
    out_format = Path(args.out).suffix.lower().lstrip(".")
    if out_format not in ("csv", "json"):
        raise UsageError(f"--out {args.out}: must end in .csv or .json")
    _check_output_file("--out", args.out)
    return out_format


def _check_output_file(option: str, path: str) -> None:
    """Refuses an output path that could not be written, before the long pass whose
    result it would hold: a directory of that name, a missing or unwritable folder."""
    if Path(path).is_dir():
        raise UsageError(f"{option} {path}: is a directory; give a file name")
    folder = Path(path).resolve().parent
    if not folder.is_dir():
        raise UsageError(f"{option} {path}: the folder {folder} does not exist")
    try:  # a real write: os.access misjudges root, read-only mounts and ACLs
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UsageError(f"{option} {path}: cannot write in {folder} ({err.strerror or err})") from err


def _input_files(args) -> list[tuple[str, str]]:
    """(option, path) of every input file named on the command line. A directory or glob
    given as ACTS is left out: its caches are .pt/.safetensors files, never a .npy that
    --save-emb could name."""
    named = [("ACTS", p) for p in args.acts]
    named += [(f"--{option}", getattr(args, option)) for option in ("values", "indices", "labels")
              if getattr(args, option) is not None]
    return named


def _same_file(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)  # also through hard links
    return os.path.realpath(a) == os.path.realpath(b)


def _check_not_an_input(args) -> None:
    """Refuses a --save-emb whose file or labels sidecar (written, or removed when the
    folder gives no labels) is one of the inputs: save_embeddings would replace it."""
    sidecar = str(labels_path(args.save_emb))
    for target, what in ((args.save_emb, "is"), (sidecar, f"its labels sidecar {sidecar} is")):
        for option, path in _input_files(args):
            if _same_file(target, path):
                raise UsageError(
                    f"--save-emb {args.save_emb}: {what} the {option} input {path}, which saving the embeddings "
                    f"would overwrite or delete; choose another --save-emb name"
                )


def _embed_images(args):
    """`embed_images` of --images: (embeddings (N, d) float32, labels (N,) or None)."""
    from .embeddings import embed_images, save_embeddings  # open_clip is optional: imported only here

    emb, labels = embed_images(args.images, model_name=args.model, pretrained=args.pretrained, device=args.device,
                               batch_size=args.image_batch_size, progress=not args.no_progress)
    if args.save_emb is not None:  # kept before anything else can fail
        save_embeddings(args.save_emb, emb, labels)
        print(f"wrote embeddings {tuple(emb.shape)} to {args.save_emb}", file=sys.stderr)
    return emb, labels


def _run_score(args, extra) -> int:
    from . import caches

    out_format = _check_score_args(args)
    if args.values is not None:
        acts = caches.open_topk(args.values, args.indices, num_latents=args.num_latents)
        acts_name = f"{args.values} + {args.indices}"
    else:
        acts = args.acts[0] if len(args.acts) == 1 else list(args.acts)
        acts_name = " ".join(args.acts)
        if args.images is not None:  # refuse a bad cache before the long embedding pass
            acts = caches.open_activations(acts, num_latents=args.num_latents, key=args.key, seq_len=args.seq_len)
    labels, labels_name = args.labels, args.labels
    if args.emb is not None:
        emb, emb_name = args.emb, args.emb
    else:
        emb, folder_labels = _embed_images(args)
        emb_name = f"{args.images} ({args.model})"
        if labels is None and folder_labels is not None:  # class subfolders: purity comes for free
            labels, labels_name = folder_labels, f"class subfolders of {args.images}"
    result = caches.score_activations(
        acts, emb, num_latents=args.num_latents,
        batch_rows=args.batch_rows or caches.DEFAULT_BATCH_ROWS, device=args.device, backend=args.backend,
        progress=False if args.no_progress else None, labels=labels, key=args.key, emb_key=args.emb_key,
        seq_len=args.seq_len,
    )
    summary = summarize(result, top=args.top)
    columns = {"monoscore": result.monoscore}
    if result.purity is not None:
        columns.update(purity=result.purity, weighted_purity=result.weighted_purity)
    if out_format == "csv":
        _write_csv(args.out, columns)
    else:
        _write_json(args.out, columns, summary, activations=acts_name, embeddings=emb_name, labels=labels_name)
    print(format_summary(summary))
    print(f"wrote {len(result.monoscore)} latents to {args.out}")
    return 0


def _float_or_none(x: float) -> float | None:
    return None if math.isnan(x) else x


def _stats(values: torch.Tensor) -> dict:
    defined = values[~values.isnan()].double()
    if defined.numel() == 0:
        return {"num_defined": 0, "mean": None, "median": None, "min": None, "max": None}
    return {
        "num_defined": defined.numel(),
        "mean": defined.mean().item(),
        "median": defined.quantile(0.5).item(),  # interpolated: the mean of the middle two for an even count
        "min": defined.min().item(),
        "max": defined.max().item(),
    }


def summarize(result, top: int = 10) -> dict:
    """Summary of a `CacheScores`: count of defined latents, mean, median, min, max, a
    histogram of the defined scores, the `top` most and least monosemantic latents
    (and purity means when labels were given). Every number is a plain float (None for
    no defined latent), so the dict goes into JSON as is."""
    scores = result.monoscore
    summary = {"num_rows": result.num_rows, "num_latents": scores.numel(), "monoscore": _stats(scores)}
    defined_index = (~scores.isnan()).nonzero().flatten()
    defined = scores[defined_index].double()
    if defined.numel():
        lo, hi = defined.min().item(), defined.max().item()
        edges = torch.linspace(lo, hi, HISTOGRAM_BINS + 1, dtype=torch.float64) if hi > lo else torch.tensor([lo, hi])
        # the last bin includes its right edge, as numpy.histogram's does
        bins = torch.bucketize(defined, edges[1:-1], right=True) if hi > lo else torch.zeros_like(defined, dtype=torch.long)
        counts = torch.bincount(bins, minlength=edges.numel() - 1)
        summary["histogram"] = {"edges": edges.tolist(), "counts": counts.tolist()}
        order = defined.argsort(descending=True, stable=True)
        ranked = [{"latent": int(defined_index[i]), "monoscore": defined[i].item()} for i in order.tolist()]
        summary["most_monosemantic"] = ranked[:top]
        summary["least_monosemantic"] = ranked[::-1][:top]
    else:
        summary.update(histogram={"edges": [], "counts": []}, most_monosemantic=[], least_monosemantic=[])
    if result.purity is not None:
        summary["num_classes"] = result.num_classes
        summary["purity"] = _stats(result.purity)
        summary["weighted_purity"] = _stats(result.weighted_purity)
    return summary


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def format_summary(summary: dict) -> str:
    """The summary as the text `score` prints."""
    stats = summary["monoscore"]
    num_latents = summary["num_latents"]
    lines = [
        f"MonoScore of {num_latents} latents over {summary['num_rows']} rows: {stats['num_defined']} defined, "
        f"{num_latents - stats['num_defined']} undefined (constant, or above their minimum on fewer than two rows)",
        f"  mean {_fmt(stats['mean'])}   median {_fmt(stats['median'])}   "
        f"min {_fmt(stats['min'])}   max {_fmt(stats['max'])}",
    ]
    hist = summary["histogram"]
    if hist["counts"]:
        lines.append("  histogram of defined scores:")
        most = max(hist["counts"])
        for i, count in enumerate(hist["counts"]):
            bar = "#" * math.ceil(HISTOGRAM_WIDTH * count / most) if count else ""
            right = "]" if i == len(hist["counts"]) - 1 else ")"
            lines.append(f"    [{hist['edges'][i]:+.4f}, {hist['edges'][i + 1]:+.4f}{right} {bar:<{HISTOGRAM_WIDTH}} {count}")
    for title, key in (("most monosemantic", "most_monosemantic"), ("least monosemantic", "least_monosemantic")):
        if summary[key]:
            listed = ", ".join(f"{e['latent']} ({e['monoscore']:.4f})" for e in summary[key])
            lines.append(f"  {title}: {listed}")
    if "purity" in summary:
        lines.append(
            f"  class purity ({summary['num_classes']} classes): mean {_fmt(summary['purity']['mean'])}, "
            f"weighted mean {_fmt(summary['weighted_purity']['mean'])} over "
            f"{summary['purity']['num_defined']} latents that fire"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def _replacing(path: str):
    """A text file to write that becomes `path` only once complete (`path`.tmp, then
    os.replace, as save_embeddings writes): a failed write leaves an earlier `path` intact."""
    temporary = f"{path}.tmp"
    try:
        with open(temporary, "w") as f:
            yield f
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _write_csv(path: str, columns: dict) -> None:
    names = list(columns)
    values = [columns[n].tolist() for n in names]
    with _replacing(path) as f:
        f.write(",".join(["latent", *names]) + "\n")
        for latent, row in enumerate(zip(*values)):
            f.write(",".join([str(latent), *(repr(float(x)) for x in row)]) + "\n")


def _write_json(path: str, columns: dict, summary: dict, **inputs) -> None:
    document = {
        "inputs": inputs,
        "summary": summary,
        # per-latent values, indexed by latent; null where undefined (JSON has no NaN)
        **{name: [_float_or_none(x) for x in column.tolist()] for name, column in columns.items()},
    }
    with _replacing(path) as f:
        json.dump(document, f, indent=1, allow_nan=False)
        f.write("\n")


# --------------------------------------------------------------------------- bench
def _add_bench_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench",
        help="run the speedup report (pytest benchmarks/ --benchmark-only)",
        description=(
            "Runs the repository's benchmark suite, `pytest benchmarks/ --benchmark-only`, which prints the "
            "speedup tables and writes benchmarks/results/<device>/summary.json. Needs a clone of the repository "
            "(the benchmarks are not part of the installed package). Further arguments go to pytest."
        ),
    )
    p.add_argument("--profile", choices=("quick", "full"), help="benchmark shapes: quick or full (passed to pytest)")
    p.set_defaults(run=_run_bench)


def benchmarks_dir() -> Path:
    """The repository's benchmarks/ folder next to this package (an editable or in-tree install)."""
    return Path(__file__).resolve().parent.parent / "benchmarks"


def _run_bench(args, extra) -> int:
    bench_dir = benchmarks_dir()
    if not (bench_dir / "conftest.py").is_file():
        raise UsageError(
            f"the speedup report runs the repository's benchmarks/ folder, which is not next to this installed "
            f"package (looked for {bench_dir}); clone the repository and install it with "
            f"`pip install --no-build-isolation -e .`, then run `monoloss-kernels bench` (or `pytest benchmarks/ "
            f"--benchmark-only`) there"
        )
    # Timings need one process: under pytest-xdist pytest-benchmark disables itself and refuses
    # --benchmark-only. `-p no:xdist` covers a config's addopts; an enclosing xdist run (this command
    # started from a test under `pytest -n`) also leaves PYTEST_XDIST_WORKER in the environment,
    # which pytest-benchmark reads as 'xdist is on' (the H200 run 8 failed so).
    command = [sys.executable, "-m", "pytest", "-p", "no:xdist", str(bench_dir), "--benchmark-only"]
    if args.profile is not None:
        command += ["--profile", args.profile]
    command += [a for a in extra if a != "--"]
    print("running: " + " ".join(command), file=sys.stderr)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    return subprocess.call(command, cwd=bench_dir.parent, env=env)


# --------------------------------------------------------------------------- entry
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Exact MonoScore of sparse-autoencoder latents: score caches on disk, run benchmarks."
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{score,bench}")
    _add_score_parser(subparsers)
    _add_bench_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line `argv` (default sys.argv[1:]); returns the exit code:
    0 on success, 2 for usage errors and bad or mismatched input files."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.command != "bench" and extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:  # --help, or argparse's usage error (already printed)
        return exit_.code if isinstance(exit_.code, int) else 2
    try:
        return args.run(args, extra)
    except (OSError, ValueError, TypeError, ImportError, FloatingPointError, ModelLoadError) as err:
        # User errors: missing or unreadable files, mismatched inputs, a missing optional package,
        # an open_clip model that cannot be created or downloaded.
        print(f"{PROG} {args.command}: error: {str(err) or repr(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
