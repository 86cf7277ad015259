"""Builds monoloss_kernels._C: the C++ CPU kernels always, the CUDA kernels whenever
a CUDA toolkit (nvcc) and a CUDA build of torch are present -- no GPU needed.

Install with the torch you will run against already installed, and without build
isolation (an isolated build would fetch another torch to compile against):

    pip install --no-build-isolation .

Environment switches:
    MONOLOSS_FORCE_CUDA=1    fail the build if the CUDA kernels cannot be built
    MONOLOSS_SKIP_CUDA=1     build the CPU kernels only
    TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;9.0+PTX": A100, H100/H200)
    MAX_JOBS                 parallel compile jobs (ninja)
"""

import glob
import os
import sys

# torch guesses CUDA_HOME from `which nvcc`; a wrapper script on PATH (as in some
# images) makes that guess wrong, so prefer the conventional toolkit location.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.isdir("/usr/local/cuda/bin"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"


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


def _extension():
    with_cuda = _want_cuda()
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


setup(
    packages=find_packages(include=["monoloss_kernels", "monoloss_kernels.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
