"""The examples run (briefly) and report what they claim to."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_topk_classifier_runs():
    example = load("finetune_topk_classifier")
    for mono_lambda in (0.0, 0.05):
        result = example.train(mono_lambda, steps=40)
        assert 0.1 < result["accuracy"] <= 1.0  # better than chance (10 classes)
        assert -1.0 <= result["mean_monoscore"] <= 1.0 and result["defined_latents"] > 0


def test_full_dataset_monoloss_runs():
    example = load("full_dataset_monoloss")
    result = example.train(1.0, epochs=1, mono_steps=1, num_samples=1024)
    (row,) = result["history"]
    assert 0.0 <= row["dataset_monoloss"] <= 2.0  # 1 - a mean of cosine-weighted scores in [-1, 1]
    assert -1.0 <= row["mean_monoscore"] <= 1.0 and row["defined_latents"] > 0
    assert row["recon_loss"] > 0
