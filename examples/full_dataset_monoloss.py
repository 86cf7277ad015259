"""Train a TopK SAE with MonoLoss over the *whole dataset*, as the paper's SAE training
can: minibatch steps on the reconstruction loss, and once per epoch one step on
1 - mean MonoScore of all samples (min/max and sums over the dataset), whose exact
gradient `dataset_monoloss_backward` accumulates in two streaming passes over the
loader.

    python examples/full_dataset_monoloss.py [--epochs 8] [--mono-steps 4] [--mono-coef 1.0]

The data are synthetic "embeddings": clusters around random centres in d_in
dimensions, standing in for CLIP features; the SAE's input is also the similarity
space of MonoScore, as in the paper. Prints the MonoScore of the latents and the
reconstruction error per epoch, for the SAE trained with and without the MonoLoss steps.
"""

import argparse
import json

import torch

import monoloss_kernels as mk
from monoloss_kernels.sae import TopKSAE


def make_data(num_samples: int, d_in: int, num_clusters: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centers = 3 * torch.randn(num_clusters, d_in, generator=gen)
    labels = torch.randint(0, num_clusters, (num_samples,), generator=gen)
    return centers[labels] + torch.randn(num_samples, d_in, generator=gen)


def train(mono_coef: float, *, epochs: int, mono_steps: int = 4, num_samples: int = 4096, d_in: int = 64,
          num_clusters: int = 64, num_latents: int = 32, k: int = 4, batch_size: int = 512, seed: int = 0) -> dict:
    # More clusters than latents: each latent must cover several, and MonoLoss favours
    # covering similar ones.
    data = make_data(num_samples, d_in, num_clusters, seed=seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, num_latents, k)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    history = []
    for epoch in range(epochs):
        for x in loader:  # the usual minibatch steps
            optimizer.zero_grad()
            sae(x).loss.backward()
            optimizer.step()
        dataset_monoloss = None
        for _ in range(mono_steps if mono_coef else 0):  # full-dataset MonoLoss steps: two passes each
            optimizer.zero_grad()
            dataset_monoloss = mk.dataset_monoloss_backward(
                lambda x: (sae.latents(x), x), loader, num_latents=num_latents, scale=mono_coef,
                progress=False)
            optimizer.step()
        with torch.no_grad():
            scores = mk.monoscore(sae.latents(data), data, num_latents=num_latents)
            recon = sae(data).recon_loss.item()
        history.append({
            "epoch": epoch + 1,
            "mean_monoscore": scores.nanmean().item(),
            "defined_latents": int(scores.isfinite().sum()),
            "recon_loss": recon,
            "dataset_monoloss": dataset_monoloss,
        })
    return {"mono_coef": mono_coef, "history": history}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--mono-coef", type=float, default=1.0)
    parser.add_argument("--mono-steps", type=int, default=4, help="full-dataset MonoLoss steps per epoch")
    parser.add_argument("--num-samples", type=int, default=4096)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    results = [train(coef, epochs=args.epochs, mono_steps=args.mono_steps, num_samples=args.num_samples) for coef in (0.0, args.mono_coef)]
    print(f"{'mono_coef':>9} {'epoch':>5} {'mean MonoScore':>15} {'recon loss':>11}")
    for result in results:
        for row in result["history"]:
            print(f"{result['mono_coef']:>9} {row['epoch']:>5} {row['mean_monoscore']:>15.4f} "
                  f"{row['recon_loss']:>11.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
