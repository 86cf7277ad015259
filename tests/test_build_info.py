"""A build that explains itself: the versions the extension was built with, and what
happens when it cannot be loaded (simulated in a fresh interpreter, as after a torch
upgrade: `undefined symbol`), against the real build of this checkout."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import monoloss_kernels as mk
from monoloss_kernels import _extension

REPO_ROOT = Path(__file__).resolve().parent.parent
# Fallback scores against the float64 pairwise definition: the tests' float32 bound (README, Accuracy).
SCORE_ATOL = 2e-5
UNDEFINED_SYMBOL = "undefined symbol: _ZN3c1017RegisterOperatorsD1Ev"

# Runs in a fresh interpreter: makes `import monoloss_kernels._C` fail the way the named
# failure does, imports the package recording every warning, then exercises it.
# Prints one JSON line for the test to check.
FAILED_LOAD_SCRIPT = r"""
import json, sys, warnings
failure = sys.argv[1]
if failure == "undefined_symbol":
    class BrokenExtension:  # what the loader raises for an extension built against another torch
        def find_spec(self, name, path=None, target=None):
            if name == "monoloss_kernels._C":
                raise ImportError("/site-packages/monoloss_kernels/_C.cpython-311-x86_64-linux-gnu.so: "
                                  + sys.argv[2])
            return None
    sys.meta_path.insert(0, BrokenExtension())
else:  # "not_built": no _C at all
    sys.modules["monoloss_kernels._C"] = None

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import monoloss_kernels as mk
    from monoloss_kernels import reference

    gen = torch.Generator().manual_seed(7)
    acts = torch.relu(torch.randn(41, 13, generator=gen, dtype=torch.float64))
    emb = torch.randn(41, 9, generator=gen, dtype=torch.float64)
    scores = mk.monoscore(acts.float(), emb.float())
    loss_acts = acts.float().requires_grad_()
    mk.monoloss(loss_acts, emb.float()).backward()
    reference_scores = reference.pairwise_monoscore(acts, emb)
    errors = {}
    for backend in ("cpu", "cuda"):
        try:
            mk.monoscore(acts.float(), emb.float(), backend=backend)
        except Exception as exc:
            errors[backend] = f"{type(exc).__name__}: {exc}"
    if torch.cuda.is_available():  # "auto" on CUDA tensors: Triton
        cuda_scores = mk.monoscore(acts.float().cuda(), emb.float().cuda()).cpu()
        cuda_error = float((cuda_scores.double() - reference_scores).abs().nan_to_num(0).max())
        try:
            mk.monoscore(acts.float().cuda(), emb.float().cuda(), backend="cuda")
        except Exception as exc:
            errors["cuda_on_cuda"] = f"{type(exc).__name__}: {exc}"
    info = mk.build_info()

load_warnings = [str(w.message) for w in caught if issubclass(w.category, mk.ExtensionLoadWarning)]
print(json.dumps({
    "warnings": load_warnings,
    "max_error": float((scores.double() - reference_scores).abs().nan_to_num(0).max()),
    "nan_agree": bool((scores.isnan() == reference_scores.isnan()).all()),
    "grad_finite": bool(loss_acts.grad.isfinite().all()),
    "errors": errors,
    "cuda_max_error": cuda_error if torch.cuda.is_available() else None,
    "info": info,
    "extension_error": mk._extension.EXTENSION_ERROR,
}))
"""


def run_failed_load(failure: str) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # a user's CPU machine: no Triton interpreter
    result = subprocess.run(
        [sys.executable, "-c", FAILED_LOAD_SCRIPT, failure, UNDEFINED_SYMBOL],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def undefined_symbol():
    return run_failed_load("undefined_symbol")


def test_failed_load_warns_once_with_versions_and_command(undefined_symbol):
    warnings = undefined_symbol["warnings"]
    assert len(warnings) == 1, warnings
    message = warnings[0]
    assert UNDEFINED_SYMBOL in message
    running = _extension.running_versions()
    assert f"running:    torch {running['torch']}, CUDA {running['cuda']}, Python {running['python']}" in message
    built, why = _extension.read_build_info()
    if built is not None:
        assert f"built with: torch {built['torch']}, CUDA {built['cuda']}, Python {built['python']}" in message
    else:
        assert f"built with: unknown ({why})" in message
    assert "pip install --no-build-isolation --force-reinstall --no-deps" in message
    assert message == undefined_symbol["extension_error"]


def test_failed_load_auto_falls_back_with_correct_scores(undefined_symbol):
    assert undefined_symbol["max_error"] <= SCORE_ATOL
    assert undefined_symbol["nan_agree"]
    assert undefined_symbol["grad_finite"]  # MonoLoss backward through the torch formula
    info = undefined_symbol["info"]
    assert info["extension_loaded"] is False
    assert info["kernels"] == {"cpu": False, "cuda": False}
    assert info["backends"]["cpu"] == ["torch"]
    assert UNDEFINED_SYMBOL in info["load_error"]


def test_failed_load_named_backends_raise_the_message(undefined_symbol):
    errors = undefined_symbol["errors"]
    assert errors["cpu"] == f"RuntimeError: {undefined_symbol['extension_error']}"
    # "cuda" on CPU tensors names the device first; on a GPU machine it raises the load message
    assert "backend='cuda' needs cuda tensors" in errors["cuda"] or errors["cuda"].endswith(
        undefined_symbol["extension_error"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_failed_load_on_gpu_uses_triton(undefined_symbol):
    assert undefined_symbol["cuda_max_error"] <= SCORE_ATOL
    assert undefined_symbol["info"]["backends"]["cuda"] == ["triton", "torch"]
    assert undefined_symbol["errors"]["cuda_on_cuda"] == f"RuntimeError: {undefined_symbol['extension_error']}"


def test_not_built_warns_and_falls_back():
    result = run_failed_load("not_built")
    assert len(result["warnings"]) == 1
    message = result["warnings"][0]
    assert "monoloss_kernels._C (the C++/CUDA kernels) could not be loaded: ModuleNotFoundError" in message
    assert result["max_error"] <= SCORE_ATOL and result["nan_agree"]
    assert result["errors"]["cpu"].startswith("RuntimeError: monoloss_kernels._C")


def test_missing_build_info_is_reported_not_fatal(tmp_path):
    info, why = _extension.read_build_info(tmp_path / "_build_info.json")
    assert info is None and "_build_info.json is missing" in why
    message = _extension.load_error_message(ImportError("libcudart.so.12: cannot open shared object file"), None, why)
    assert f"built with: unknown ({why})" in message
    assert "libcudart.so.12" in message
    (tmp_path / "_build_info.json").write_text("{truncated")
    info, why = _extension.read_build_info(tmp_path / "_build_info.json")
    assert info is None and "could not be read" in why


def test_real_build_reports_this_torch():
    info = mk.build_info()
    assert info["extension_loaded"] and info["load_error"] is None
    assert info["build_info_error"] is None, info["build_info_error"]
    built = info["built_with"]
    assert built["torch"] == torch.__version__ == info["running"]["torch"]
    assert built["cuda"] == torch.version.cuda
    assert built["python"] == platform.python_version() == info["running"]["python"]
    assert built["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert info["kernels"]["cpu"] and "cpu" in info["backends"]["cpu"]
    # what the build says it compiled is what the dispatcher has
    assert built["cuda_kernels"] == info["kernels"]["cuda"]
    if built["cuda_kernels"]:
        assert built["cuda_arch_list"] and built["nvcc"]
    else:
        assert built["cuda_arch_list"] is None and built["nvcc"] is None
