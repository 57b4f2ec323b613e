"""Builds fastreload._C, the operator library behind torch.ops.fastreload.

CUDA sources (csrc/cuda/*.cu) are compiled when the torch in use was built with
CUDA and a CUDA toolkit is found: never decided by torch.cuda.is_available(),
which is False on GPU-less build machines. FASTRELOAD_FORCE_CPU=1 builds the
CPU-only variant regardless. TORCH_CUDA_ARCH_LIST and MAX_JOBS are respected.
"""

import glob
import os
import re
import subprocess

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere and Hopper, with PTX so newer GPUs can JIT the kernels.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def relative(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def cuda_build_wanted(cuda_sources):
    if os.environ.get("FASTRELOAD_FORCE_CPU", "0") == "1":
        print("fastreload: FASTRELOAD_FORCE_CPU=1, building the CPU-only variant")
        return False
    if not cuda_sources:
        return False
    if torch.version.cuda is None:
        print("fastreload: this torch has no CUDA, building the CPU-only variant")
        return False
    if CUDA_HOME is None:
        print("fastreload: torch has CUDA but no CUDA toolkit (nvcc) was found, building the "
              "CPU-only variant; set CUDA_HOME to build the CUDA kernels")
        return False
    check_nvcc_matches_torch()
    return True


def check_nvcc_matches_torch():
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    output = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", output)
    if found is None:
        raise RuntimeError(f"fastreload: could not read the CUDA version from {nvcc} --version")
    nvcc_major = int(found.group(1))
    torch_major = int(torch.version.cuda.split(".")[0])
    if nvcc_major != torch_major:
        raise RuntimeError(
            f"fastreload: nvcc at {nvcc} is CUDA {found.group(1)}.{found.group(2)} but this torch "
            f"was built with CUDA {torch.version.cuda}; install a matching toolkit, point CUDA_HOME "
            "at one, or set FASTRELOAD_FORCE_CPU=1")


def pip_cuda_include_dirs():
    """Headers torch includes (cusparse.h, cublas_v2.h, ...) that a bare toolkit may lack
    but torch's own pip dependencies carry, under site-packages/nvidia/cu<major>/include."""
    try:
        import nvidia
    except ImportError:
        return []
    major = torch.version.cuda.split(".")[0]
    candidates = [os.path.join(p, f"cu{major}", "include") for p in nvidia.__path__]
    return [d for d in candidates if os.path.isdir(d)]


def extension():
    # csrc/python holds the Python module; CMake builds the rest without it.
    sources = relative(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))
                       + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))
                       + glob.glob(os.path.join(ROOT, "csrc", "python", "*.cpp")))
    cuda_sources = relative(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    # ATen's parallel_for is inline OpenMP: without -fopenmp it silently runs serially.
    cxx_flags = ["-O3", "-fopenmp"]
    link_flags = ["-fopenmp"]
    if cuda_build_wanted(cuda_sources):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        print(f"fastreload: building the CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']} "
              f"with {CUDA_HOME}")
        return CUDAExtension(
            "fastreload._C",
            sources + cuda_sources,
            include_dirs=pip_cuda_include_dirs(),
            extra_compile_args={"cxx": cxx_flags,
                                "nvcc": ["-O3", "-Xcompiler", "-fopenmp"]},
            extra_link_args=link_flags,
        )
    return CppExtension("fastreload._C", sources, extra_compile_args={"cxx": cxx_flags},
                        extra_link_args=link_flags)


EXTENSION = extension()
VARIANT = "cuda" if any(s.endswith(".cu") for s in EXTENSION.sources) else "cpu"
OBJECTS = os.path.join(ROOT, "build", VARIANT, "objects")


class IncrementalBuildExtension(BuildExtension):
    """Keeps the objects (and ninja's record of what they were built from) in
    build/<variant>/objects, so that a rebuild compiles only the sources that changed,
    and the CPU and CUDA variants keep theirs apart. Set here rather than through
    `build` options, because pip's editable and wheel builds point `build` at a
    temporary folder that is deleted afterwards."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = OBJECTS


setup(
    packages=find_packages(include=["fastreload", "fastreload.*"]),
    ext_modules=[EXTENSION],
    cmdclass={"build_ext": IncrementalBuildExtension},
)
