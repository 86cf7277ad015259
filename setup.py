"""Builds monoloss_kernels._C: the C++ CPU kernels always, the CUDA kernels whenever
a CUDA toolkit (nvcc) and a CUDA build of torch are present -- no GPU needed.

Install with the torch you will run against already installed, and without build
isolation (an isolated build would fetch another torch to compile against):

    pip install --no-build-isolation .

The versions it was built with (torch, its CUDA, nvcc, the arch list, Python) are written
to monoloss_kernels/_build_info.json beside the compiled module, for editable installs
too; `monoloss_kernels.build_info()` reports them, and the load-failure warning compares
them with the running versions.

Environment switches:
    MONOLOSS_FORCE_CUDA=1    fail the build if the CUDA kernels cannot be built
    MONOLOSS_SKIP_CUDA=1     build the CPU kernels only
    TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;9.0+PTX": A100, H100/H200)
    MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import json
import os
import platform
import re
import subprocess
import sys

# torch guesses CUDA_HOME from `which nvcc`; a wrapper script on PATH (as in some
# images) makes that guess wrong, so prefer the conventional toolkit location.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.isdir("/usr/local/cuda/bin"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"
PACKAGE = "monoloss_kernels"
BUILD_INFO_FILE = "_build_info.json"  # read by monoloss_kernels/_extension.py


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda():
    if _env_flag("MONOLOSS_SKIP_CUDA"):
        return False
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if _env_flag("MONOLOSS_FORCE_CUDA") and not available:
        raise RuntimeError(
            "MONOLOSS_FORCE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r} "
            "(install a CUDA build of torch and a CUDA toolkit with nvcc, or set CUDA_HOME)"
        )
    return available


def _extension(with_cuda):
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    define_macros = [("MONOLOSS_PYTHON_MODULE", None)]
    extra_compile_args = {"cxx": ["-O3"]}  # the C++ standard is torch's default
    extra_link_args = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an inline OpenMP loop: without -fopenmp here it runs on one
        # thread. libgomp resolves to the copy torch already loaded.
        extra_compile_args["cxx"].append("-fopenmp")
        extra_link_args.append("-fopenmp")
    if not with_cuda:
        return CppExtension(
            "monoloss_kernels._C", sources, define_macros=define_macros,
            extra_compile_args=extra_compile_args, extra_link_args=extra_link_args,
        )
    # Without this, torch compiles for the GPUs it sees: none on a CI machine.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    define_macros.append(("MONOLOSS_WITH_CUDA", None))
    extra_compile_args["nvcc"] = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "2")]
    return CUDAExtension(
        "monoloss_kernels._C", sources, define_macros=define_macros,
        extra_compile_args=extra_compile_args, extra_link_args=extra_link_args,
    )


def _nvcc_version():
    """The release of the nvcc that compiles the CUDA kernels, e.g. "12.8"."""
    try:
        out = subprocess.run([os.path.join(CUDA_HOME, "bin", "nvcc"), "--version"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


def _build_info(with_cuda):
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,  # the CUDA of the torch built against (None: a CPU torch)
        "cuda_kernels": with_cuda,
        "nvcc": _nvcc_version() if with_cuda else None,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
        "python": platform.python_version(),
        "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
    }


class BuildExtensionWithInfo(BuildExtension):
    """BuildExtension that also writes BUILD_INFO_FILE beside the compiled module: into the
    build directory (what a wheel installs) and, for in-place and editable builds, into the
    source package (what is imported)."""

    def _build_info_paths(self):
        paths = [os.path.join(self.build_lib, PACKAGE, BUILD_INFO_FILE)]
        if self.inplace:
            package_dir = self.get_finalized_command("build_py").get_package_dir(PACKAGE)
            paths.append(os.path.join(package_dir, BUILD_INFO_FILE))
        return paths

    def run(self):
        info = _build_info(WITH_CUDA)
        # With ninja, BuildExtension always relinks and ninja recompiles what changed (torch's
        # headers included). Without it, setuptools skips a module newer than its sources even
        # after a torch upgrade: force the rebuild whenever the recorded versions differ.
        try:
            with open(self._build_info_paths()[0]) as f:
                recorded = json.load(f)
        except (OSError, ValueError):
            recorded = None
        if recorded != info:
            self.force = True
        super().run()
        for path in self._build_info_paths():
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(info, f, indent=2, sort_keys=True)
                f.write("\n")

    def get_outputs(self):
        outputs = super().get_outputs()
        if not self.inplace:  # in-place builds list the build-directory files they copy
            outputs.append(os.path.join(self.build_lib, PACKAGE, BUILD_INFO_FILE))
        return outputs


WITH_CUDA = _want_cuda()

setup(
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    ext_modules=[_extension(WITH_CUDA)],
    cmdclass={"build_ext": BuildExtensionWithInfo},
)
