"""Installs megamoe and builds megamoe._C (token dispatch/combine kernels).

The C++ CPU kernels are always built; the CUDA kernels are added when torch was built with CUDA
and nvcc is available (or MEGAMOE_FORCE_CUDA=1). Set MEGAMOE_NO_CUDA=1 to build CPU-only.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    if os.environ.get("MEGAMOE_NO_CUDA") == "1":
        return False
    if os.environ.get("MEGAMOE_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _extension():
    cpp = sorted(glob.glob("csrc/*.cpp"))
    flags = {"cxx": ["-O3", "-std=c++17"]}
    if _want_cuda():
        cu = sorted(glob.glob("csrc/*.cu"))
        flags["cxx"].append("-DMEGAMOE_WITH_CUDA")
        flags["nvcc"] = ["-O3", "-std=c++17", "--use_fast_math", "-DMEGAMOE_WITH_CUDA"]
        return CUDAExtension("megamoe._C", cpp + cu, extra_compile_args=flags)
    return CppExtension("megamoe._C", cpp, extra_compile_args=flags)


setup(
    name="megamoe",
    version="0.1.0",
    description="Megatron-style parallel trainer for LLaMA-MoE",
    packages=find_packages(include=["megamoe", "megamoe.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "megatron-core==0.16.1",
        "numpy",
        "sentencepiece",
        "tensorboard",
        "pybind11",
        "psutil",  # megatron-core's dist_checkpointing hangs without it
        "safetensors",
        "tqdm",
        "pyyaml",
    ],
    extras_require={"test": ["pytest", "pytest-timeout", "transformers"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["megamoe=megamoe.cli:main"]},
)
