"""Builds diffkern._C from csrc/: CPU kernels always, CUDA kernels when a toolkit and a CUDA torch exist.

Environment:
  DIFFKERN_SKIP_CUDA_BUILD=1   never build the CUDA kernels
  FORCE_CUDA=1                 build them even if torch sees no GPU (a toolkit is still required)
  TORCH_CUDA_ARCH_LIST         honoured as by torch (default here: the visible GPUs, else "9.0")
  MAX_JOBS                     parallel compile jobs (torch's ninja builder)
This file never downloads or installs anything.
"""

import os
import sys
import warnings
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent


def _want_cuda():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    if os.environ.get("DIFFKERN_SKIP_CUDA_BUILD", "0") == "1":
        return False, "DIFFKERN_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} has no CUDA support"
    if CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if not torch.cuda.is_available() and os.environ.get("FORCE_CUDA", "0") != "1":
        return False, "no GPU visible (set FORCE_CUDA=1 to build anyway)"
    return True, ""


def _extensions():
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    # no -std flag: torch's build helpers pick the standard its headers need (C++20 for torch 2.13)
    cxx = ["-O3"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP template inlined into our code: without -fopenmp it runs
        # serially. torch ships libgomp, so this adds no second OpenMP runtime.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = ["csrc/bindings.cpp", "csrc/cpu/group_norm.cpp", "csrc/cpu/group_norm_avx2.cpp", "csrc/cpu/group_norm_avx512.cpp", "csrc/cpu/dynamic_threshold.cpp", "csrc/cpu/guided_step.cpp", "csrc/cpu/guided_step_avx2.cpp", "csrc/cpu/guided_step_avx512.cpp", "csrc/cpu/sampler_update.cpp", "csrc/cpu/sampler_update_avx2.cpp", "csrc/cpu/sampler_update_avx512.cpp"]
    use_cuda, why = _want_cuda()
    if not use_cuda:
        warnings.warn(f"diffkern: building the CPU kernels only, no CUDA kernels: {why}", stacklevel=1)
        ext = CppExtension("diffkern._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    else:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            import torch

            caps = {f"{a}.{b}" for a, b in (torch.cuda.get_device_capability(i)
                                               for i in range(torch.cuda.device_count()))}
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(sorted(caps)) or "9.0"
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        defines = ["-DWITH_CUDA", f'-DDIFFKERN_CUDA_ARCHS="{archs}"']
        ext = CUDAExtension(
            "diffkern._C",
            sources + ["csrc/cuda/group_norm_planning.cu", "csrc/cuda/group_norm_resident.cu", "csrc/cuda/group_norm_split.cu", "csrc/cuda/group_norm_channels_last_rows.cu", "csrc/cuda/dynamic_threshold.cu", "csrc/cuda/guided_step.cu", "csrc/cuda/sampler_update.cu"],
            extra_compile_args={"cxx": cxx + defines,
                                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"] + defines},
            extra_link_args=link,
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="diffkern",
    packages=find_packages(include=["diffkern", "diffkern.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
