"""The `monoloss-kernels` command: `score` through `python -m monoloss_kernels` on files
written here (dense and TopK, CSV and JSON equal the in-memory scores, labels add purity),
the same entry in-process (`cli.main(argv)`, what the console script calls), clear errors
with exit code 2 and no traceback, and `bench` running the benchmark suite."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import monoloss_kernels as mk
from monoloss_kernels import cli
from monoloss_kernels.purity import class_purity

from .helpers import make_emb, make_topk
from .test_caches import PURITY_TOL, TOL, make_data

pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")

REPO = Path(__file__).resolve().parent.parent
N, M, D, K = 1031, 37, 19, 5  # as in test_caches; N is prime, so --batch-rows 97 leaves a short last chunk


def run_cli(*args, timeout=300) -> subprocess.CompletedProcess:
    """`python -m monoloss_kernels ARGS` from the repository root."""
    return subprocess.run([sys.executable, "-m", "monoloss_kernels", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=timeout)


def read_csv(path: Path) -> dict:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["latent"]) for r in rows] == list(range(len(rows)))
    return {name: torch.tensor([float(r[name]) for r in rows]) for name in rows[0] if name != "latent"}


def json_column(values: list) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)


def assert_scores(got: torch.Tensor, expected: torch.Tensor):
    """Values written as text: CSV and JSON carry float32 scores exactly (repr of a float)."""
    torch.testing.assert_close(got.double(), expected.double(), atol=TOL, rtol=0, equal_nan=True)


def check_summary(summary: dict, scores: torch.Tensor, top: int):
    """The summary recomputed from the per-latent scores it came with."""
    defined = scores[~scores.isnan()].double()
    stats = summary["monoscore"]
    assert summary["num_latents"] == scores.numel() and stats["num_defined"] == defined.numel()
    assert stats["mean"] == pytest.approx(defined.mean().item(), abs=1e-12)
    assert stats["median"] == pytest.approx(np.median(defined.numpy()), abs=1e-12)
    assert (stats["min"], stats["max"]) == (defined.min().item(), defined.max().item())
    counts, edges = summary["histogram"]["counts"], summary["histogram"]["edges"]
    assert sum(counts) == defined.numel() and len(counts) == cli.HISTOGRAM_BINS == len(edges) - 1
    expected_counts, _ = np.histogram(defined.numpy(), bins=np.array(edges))
    assert counts == expected_counts.tolist()
    order = np.argsort(-np.nan_to_num(scores.double().numpy(), nan=-np.inf), kind="stable")
    assert [e["latent"] for e in summary["most_monosemantic"]] == order[:top].tolist()
    assert [e["monoscore"] for e in summary["most_monosemantic"]] == pytest.approx(
        scores.double()[order[:top]].tolist(), abs=0)
    least = sorted(range(scores.numel()), key=lambda k: (math.isnan(scores[k]), scores[k].item()))[:top]
    assert {e["latent"] for e in summary["least_monosemantic"]} == set(least)


@pytest.fixture
def dense_files(tmp_path):
    acts, emb = make_data(seed=31)
    np.save(tmp_path / "acts.npy", acts.numpy())
    np.save(tmp_path / "emb.npy", emb.numpy())
    return tmp_path, acts, emb


# --------------------------------------------------------------------------- through python -m
def test_dense_npy_to_csv(dense_files):
    tmp_path, acts, emb = dense_files
    out = tmp_path / "scores.csv"
    result = run_cli("score", tmp_path / "acts.npy", "--emb", tmp_path / "emb.npy", "--out", out,
                     "--batch-rows", 97)
    assert result.returncode == 0, result.stderr
    expected = mk.monoscore(acts, emb)
    columns = read_csv(out)
    assert list(columns) == ["monoscore"]
    assert_scores(columns["monoscore"], expected)
    defined = int((~expected.isnan()).sum())
    assert f"MonoScore of {M} latents over {N} rows: {defined} defined, {M - defined} undefined" in result.stdout
    assert "most monosemantic:" in result.stdout and f"wrote {M} latents to {out}" in result.stdout


def test_topk_to_json(tmp_path):
    gen = torch.Generator().manual_seed(32)
    values, indices = make_topk("negative", N, M, K, gen)
    values = values.float()
    emb = make_emb("zero_dup", N, D, gen).float()
    np.save(tmp_path / "values.npy", values.numpy())
    np.save(tmp_path / "indices.npy", indices.numpy().astype(np.uint16))
    np.save(tmp_path / "emb.npy", emb.numpy())
    out = tmp_path / "scores.json"
    result = run_cli("score", "--values", tmp_path / "values.npy", "--indices", tmp_path / "indices.npy",
                     "--num-latents", M, "--emb", tmp_path / "emb.npy", "--out", out, "--batch-rows", 97,
                     "--top", 4, "--no-progress")
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    scores = json_column(document["monoscore"])
    assert_scores(scores, mk.monoscore((values, indices), emb, num_latents=M))
    check_summary(document["summary"], scores.float(), top=4)
    assert document["summary"]["num_rows"] == N
    assert document["inputs"]["embeddings"] == str(tmp_path / "emb.npy")


def test_labels_add_purity_columns(dense_files):
    tmp_path, acts, emb = dense_files
    labels = torch.randint(0, 6, (N,), generator=torch.Generator().manual_seed(33))
    np.save(tmp_path / "labels.npy", labels.numpy())
    out = tmp_path / "scores.csv"
    result = run_cli("score", tmp_path / "acts.npy", "--emb", tmp_path / "emb.npy", "--labels",
                     tmp_path / "labels.npy", "--out", out, "--batch-rows", 97)
    assert result.returncode == 0, result.stderr
    columns = read_csv(out)
    assert list(columns) == ["monoscore", "purity", "weighted_purity"]
    assert_scores(columns["monoscore"], mk.monoscore(acts, emb))
    torch.testing.assert_close(columns["purity"], class_purity(acts, labels, num_classes=6), atol=0, rtol=0,
                               equal_nan=True)
    torch.testing.assert_close(columns["weighted_purity"], class_purity(acts, labels, num_classes=6, weighted=True),
                               atol=PURITY_TOL, rtol=0, equal_nan=True)
    assert "class purity (6 classes): mean" in result.stdout


def test_errors_exit_2_without_traceback(dense_files):
    tmp_path, acts, emb = dense_files
    np.save(tmp_path / "emb_short.npy", emb[:-1].numpy())
    out = tmp_path / "scores.csv"
    cases = {
        "no such file: .*missing.npy": ["score", tmp_path / "missing.npy", "--emb", tmp_path / "emb.npy", "--out", out],
        rf"acts.npy have {N} rows but embeddings .*emb_short.npy have {N - 1}":
            ["score", tmp_path / "acts.npy", "--emb", tmp_path / "emb_short.npy", "--out", out],
    }
    for message, args in cases.items():
        result = run_cli(*args)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("monoloss-kernels score: error: ")
        assert re.search(message, result.stderr), result.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- in-process: cli.main(argv)
def test_main_in_process_json_with_labels(dense_files, capsys):
    tmp_path, acts, emb = dense_files
    labels = torch.randint(0, 4, (N,), generator=torch.Generator().manual_seed(34))
    torch.save(labels, tmp_path / "labels.pt")
    out = tmp_path / "scores.json"
    code = cli.main(["score", str(tmp_path / "acts.npy"), "--emb", str(tmp_path / "emb.npy"), "--labels",
                     str(tmp_path / "labels.pt"), "--out", str(out), "--batch-rows", "250", "--no-progress"])
    assert code == 0
    document = json.loads(out.read_text())
    scores = json_column(document["monoscore"])
    assert_scores(scores, mk.monoscore(acts, emb))
    check_summary(document["summary"], scores.float(), top=10)
    purity = json_column(document["purity"])
    torch.testing.assert_close(purity.float(), class_purity(acts, labels, num_classes=4), atol=0, rtol=0,
                               equal_nan=True)
    assert document["summary"]["num_classes"] == 4
    assert document["summary"]["purity"]["num_defined"] == int((~purity.isnan()).sum())
    assert "histogram of defined scores" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["parts", "safetensors"])
def test_main_reads_caches(tmp_path, fmt):
    """score takes what caches.open_activations opens: sae-for-vlm parts and safetensors."""
    from safetensors.numpy import save_file

    from .test_caches import write_parts

    acts, emb = make_data(seed=35)
    np.save(tmp_path / "emb.npy", emb.numpy())
    if fmt == "parts":
        write_parts(tmp_path / "parts", acts, [0, 500, N])
        source = [str(tmp_path / "parts")]
    else:
        save_file({"acts": acts.numpy(), "meta": np.zeros(3, np.float32)}, tmp_path / "acts.safetensors")
        source = [str(tmp_path / "acts.safetensors"), "--key", "acts"]
    out = tmp_path / "scores.csv"
    assert cli.main(["score", *source, "--emb", str(tmp_path / "emb.npy"), "--out", str(out), "--no-progress"]) == 0
    assert_scores(read_csv(out)["monoscore"], mk.monoscore(acts, emb))


def test_main_errors(dense_files, capsys):
    tmp_path, acts, emb = dense_files
    gen = torch.Generator().manual_seed(36)
    values, indices = make_topk("relu", N, M, K, gen)
    np.save(tmp_path / "values.npy", values.float().numpy())
    np.save(tmp_path / "indices_k4.npy", indices[:, :4].numpy())
    acts_npy, emb_npy, out = str(tmp_path / "acts.npy"), str(tmp_path / "emb.npy"), str(tmp_path / "s.csv")
    cases = {
        # wrong widths
        rf"acts.npy: holds {M} columns but num_latents=768": ["score", acts_npy, "--num-latents", "768", "--emb",
                                                              emb_npy, "--out", out],
        r"values.npy hold shape \(1031, 5\) but indices .*indices_k4.npy hold \(1031, 4\)":
            ["score", "--values", str(tmp_path / "values.npy"), "--indices", str(tmp_path / "indices_k4.npy"),
             "--num-latents", str(M), "--emb", emb_npy, "--out", out],
        # arguments that do not fit together, refused before any work
        "TopK activations need --num-latents": ["score", "--values", acts_npy, "--indices", acts_npy, "--emb",
                                                emb_npy, "--out", out],
        "either as ACTS or as --values": ["score", acts_npy, "--values", acts_npy, "--indices", acts_npy,
                                          "--num-latents", "3", "--emb", emb_npy, "--out", out],
        "no activations": ["score", "--emb", emb_npy, "--out", out],
        "either as --emb FILE or as --images": ["score", acts_npy, "--out", out],
        "--images needs --model": ["score", acts_npy, "--images", str(tmp_path), "--out", out],
        r"--out .*s.txt: must end in .csv or .json": ["score", acts_npy, "--emb", emb_npy, "--out",
                                                      str(tmp_path / "s.txt")],
        "the folder .*nowhere does not exist": ["score", acts_npy, "--emb", emb_npy, "--out",
                                                str(tmp_path / "nowhere" / "s.csv")],
        "--batch-rows must be a positive integer": ["score", acts_npy, "--emb", emb_npy, "--out", out,
                                                    "--batch-rows", "0"],
        "--device bogus: Expected one of": ["score", acts_npy, "--emb", emb_npy, "--out", out, "--device", "bogus"],
        "--device meta: must be cpu or cuda": ["score", acts_npy, "--emb", emb_npy, "--out", out, "--device", "meta"],
    }
    if not torch.cuda.is_available():
        cases["--device cuda: no CUDA GPU is visible"] = ["score", acts_npy, "--emb", emb_npy, "--out", out,
                                                         "--device", "cuda"]
    for message, argv in cases.items():
        assert cli.main(argv) == 2, message
        err = capsys.readouterr().err
        assert err.startswith("monoloss-kernels score: error: ") and re.search(message, err), err
    assert not Path(out).exists()
    # argparse's own usage errors: exit code 2 with the usage line, returned rather than raised
    assert cli.main(["score", acts_npy, "--emb", emb_npy, "--out", out, "--bogus"]) == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    assert cli.main(["score"]) == 2  # --out is required
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0


def test_topk_pair_in_one_safetensors_file(tmp_path, capsys):
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(42)
    top = torch.topk(torch.randn(N, M, generator=gen), K, dim=1)
    emb = make_emb("plain", N, D, gen).float()
    pair = str(tmp_path / "topk.safetensors")
    save_file({"values": top.values.contiguous(), "indices": top.indices.contiguous()}, pair)
    save_file({"emb": emb}, tmp_path / "emb.safetensors")
    argv = ["score", "--values", pair, "--indices", pair, "--num-latents", str(M), "--emb",
            str(tmp_path / "emb.safetensors"), "--out", str(tmp_path / "s.csv"), "--no-progress"]
    assert cli.main(argv) == 0
    assert_scores(read_csv(tmp_path / "s.csv")["monoscore"], mk.monoscore(top, emb, num_latents=M))
    capsys.readouterr()
    assert cli.main([*argv, "--key", "values"]) == 2  # --key would be ignored for TopK: refused
    assert "--key names dense activations" in capsys.readouterr().err


def test_label_ids_exit_2_with_one_line(dense_files, capsys):
    tmp_path, acts, emb = dense_files
    ids = np.random.default_rng(41).choice([1_000_000_000_003, 2_000_000_000_017, 3_000_000_000_001], N)
    np.save(tmp_path / "ids.npy", ids)
    assert cli.main(["score", str(tmp_path / "acts.npy"), "--emb", str(tmp_path / "emb.npy"), "--labels",
                     str(tmp_path / "ids.npy"), "--out", str(tmp_path / "s.csv"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monoloss-kernels score: error: ") and "labels must be class indices 0..C-1" in err, err
    assert len(err.strip().splitlines()) == 1


def test_out_refused_before_scoring(dense_files, capsys, monkeypatch):
    """An --out that cannot be written is refused before the streaming pass, not after it."""
    tmp_path, acts, emb = dense_files
    from monoloss_kernels import caches

    def score_activations(*args, **kwargs):
        raise AssertionError("the streaming pass ran before --out was checked")

    monkeypatch.setattr(caches, "score_activations", score_activations)
    (tmp_path / "scores.json").mkdir()  # e.g. a leftover folder of that name
    argv = ["score", str(tmp_path / "acts.npy"), "--emb", str(tmp_path / "emb.npy"), "--no-progress", "--out"]
    assert cli.main([*argv, str(tmp_path / "scores.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monoloss-kernels score: error: --out ") and "is a directory" in err, err


@pytest.mark.parametrize("suffix", ["csv", "json"])
def test_failed_write_leaves_the_previous_out_intact(dense_files, monkeypatch, suffix):
    """Scores are written to a temporary file and renamed: a write that fails midway (a full
    disk) leaves the earlier result whole, and no temporary file behind."""
    tmp_path, acts, emb = dense_files
    out = tmp_path / f"scores.{suffix}"
    argv = ["score", str(tmp_path / "acts.npy"), "--emb", str(tmp_path / "emb.npy"), "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 0
    previous = out.read_bytes()
    real_open = open

    class FullDisk:  # the file the scores are written to: the first write fails after 3 characters
        def __init__(self, file):
            self.file = file

        def write(self, text):
            self.file.write(text[:3])
            raise OSError(28, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.file.close()

    monkeypatch.setattr(cli, "open", lambda path, mode="r": FullDisk(real_open(path, mode)), raising=False)
    assert cli.main(argv) == 2
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["acts.npy", "emb.npy", out.name])


# --------------------------------------------------------------------------- --images
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random open_clip ViT, registered as in test_embeddings (no weights can be downloaded)."""
    open_clip = pytest.importorskip("open_clip")  # the `clip` extra; pinned in requirements.txt
    from .test_embeddings import TINY_CONFIG, TINY_MODEL

    config = tmp_path_factory.mktemp("open_clip_config") / f"{TINY_MODEL}.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    return TINY_MODEL


@pytest.mark.filterwarnings("ignore:.*random weights")
def test_images_folder_with_class_subfolders(tiny_model, tmp_path):
    """--images embeds the folder with embed_images; class subfolders give the labels for
    purity; --save-emb keeps the embeddings, and scoring them with --emb gives the same."""
    from monoloss_kernels.embeddings import embed_images, load_embeddings

    from .test_embeddings import write_images

    gen = np.random.default_rng(37)
    for name, count in (("cat", 5), ("dog", 4), ("eel", 4)):
        write_images(tmp_path / "images" / name, [f"{name}{i}.png" for i in range(count)], gen)
    num_images = 13
    acts = torch.relu(torch.randn(num_images, 11, generator=torch.Generator().manual_seed(38)) - 0.2)
    np.save(tmp_path / "acts.npy", acts.numpy())
    torch.manual_seed(0)  # random init of the model inside the command
    out, saved = tmp_path / "scores.json", tmp_path / "emb.npy"
    assert cli.main(["score", str(tmp_path / "acts.npy"), "--images", str(tmp_path / "images"), "--model",
                     tiny_model, "--save-emb", str(saved), "--out", str(out), "--no-progress"]) == 0
    torch.manual_seed(0)
    emb, labels = embed_images(tmp_path / "images", model_name=tiny_model, progress=False)
    assert torch.equal(load_embeddings(saved).embeddings, emb) and torch.equal(load_embeddings(saved).labels, labels)
    document = json.loads(out.read_text())
    assert_scores(json_column(document["monoscore"]), mk.monoscore(acts, emb))
    torch.testing.assert_close(json_column(document["purity"]).float(), class_purity(acts, labels, num_classes=3),
                               atol=0, rtol=0, equal_nan=True)
    assert document["inputs"]["labels"] == f"class subfolders of {tmp_path / 'images'}"


@pytest.mark.filterwarnings("ignore:.*random weights")
@pytest.mark.parametrize("target", ["acts", "labels_sidecar", "flat_folder_removes_sidecar"])
def test_save_emb_never_overwrites_an_input(tiny_model, tmp_path, capsys, target):
    """--save-emb (or its .labels.npy sidecar, written, or removed when the folder gives no
    labels) naming an input is refused before any work, and the input is left as it was."""
    from .test_embeddings import write_images

    gen = np.random.default_rng(40)
    if target == "labels_sidecar":
        for name in ("cat", "dog"):
            write_images(tmp_path / "images" / name, [f"{name}{i}.png" for i in range(3)], gen)
    else:
        write_images(tmp_path / "images", [f"{i}.png" for i in range(6)], gen)
    acts_path = tmp_path / "acts.npy"
    np.save(acts_path, np.maximum(gen.standard_normal((6, 10)), 0).astype(np.float32))
    np.save(tmp_path / "emb.labels.npy", np.array([0, 1, 0, 1, 0, 1]))
    argv = ["score", str(acts_path), "--images", str(tmp_path / "images"), "--model", tiny_model,
            "--out", str(tmp_path / "s.csv"), "--no-progress", "--save-emb"]
    if target == "acts":
        argv.append(str(acts_path))
    else:  # the sidecar of emb.npy is emb.labels.npy, the --labels input
        argv += [str(tmp_path / "emb.npy"), "--labels", str(tmp_path / "emb.labels.npy")]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.npy")}
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("monoloss-kernels score: error: --save-emb ") and "would overwrite" in err, err
    assert len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.npy")} == before
    assert not (tmp_path / "s.csv").exists()


def test_images_with_a_model_that_cannot_be_created_exit_2(tiny_model, tmp_path, capsys):
    from .test_embeddings import write_images

    write_images(tmp_path / "images", ["a.png", "b.png"], np.random.default_rng(39))
    np.save(tmp_path / "acts.npy", np.ones((2, 3), dtype=np.float32))
    assert cli.main(["score", str(tmp_path / "acts.npy"), "--images", str(tmp_path / "images"), "--model",
                     "NoSuchModel", "--out", str(tmp_path / "s.csv"), "--no-progress"]) == 2
    assert "score: error: could not create open_clip model 'NoSuchModel'" in capsys.readouterr().err


# --------------------------------------------------------------------------- bench
def test_bench_runs_the_benchmark_suite():
    """bench --profile quick --collect-only: pytest finds the repository's benchmarks and the
    --profile option, and collects benchmark tests (running them takes minutes)."""
    result = run_cli("bench", "--profile", "quick", "--collect-only", "-q", timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--benchmark-only --profile quick --collect-only -q" in result.stderr
    assert "-p no:xdist" in result.stderr
    assert "benchmarks/test_bench_monoscore.py::" in result.stdout


def test_bench_passes_arguments_through(monkeypatch):
    # As in a test under `pytest -n`: pytest-benchmark would read this as xdist on.
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda command, cwd, env: calls.append((command, cwd, env)) or 5)
    assert cli.main(["bench", "--profile", "full", "-k", "topk", "--", "-x"]) == 5  # pytest's exit code
    (command, cwd, env), = calls
    assert command == [sys.executable, "-m", "pytest", "-p", "no:xdist", str(REPO / "benchmarks"), "--benchmark-only",
                       "--profile", "full", "-k", "topk", "-x"]
    assert Path(cwd) == REPO
    assert not any(k.startswith("PYTEST_XDIST_") for k in env)


def test_bench_without_the_repository(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path / "site-packages" / "benchmarks")
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monoloss-kernels bench: error: the speedup report runs the repository's benchmarks/")
    assert "clone the repository" in err
