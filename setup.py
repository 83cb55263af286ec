"""Build and install the ``codetr`` package and its ``codetr._C`` extension.

The C++ CPU kernels (multi-scale deformable attention, RoIAlign) are always built. The CUDA kernels are
built as well when ``FORCE_CUDA=1`` is set or a GPU is visible; the build itself never needs a GPU
(``TORCH_CUDA_ARCH_LIST`` selects the architectures). Install with::

    pip install -e . --no-build-isolation
"""
import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.join("projects", "CoDETR")
CSRC = os.path.join(PKG_ROOT, "codetr", "csrc")


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.cuda.is_available() and CUDA_HOME is not None


def get_extensions():
    sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cpp"), recursive=True))
    if not sources:
        return []
    cuda_sources = sorted(glob.glob(os.path.join(CSRC, "**", "*.cu"), recursive=True))
    # -fopenmp: at::parallel_for (ATen/Parallel.h, inlined into our kernels) only runs in parallel when the
    # extension itself is compiled with OpenMP; without it every kernel runs on one thread. The OpenMP
    # runtime is libgomp.so.1, the one torch already loaded. Linux only: elsewhere (macOS clang without libomp,
    # MSVC) the kernels build without it and run on one thread. CODETR_NO_OPENMP=1 turns it off.
    use_openmp = sys.platform.startswith("linux") and os.environ.get("CODETR_NO_OPENMP", "0") != "1"
    extra_compile_args = {"cxx": ["-O3"] + (["-fopenmp"] if use_openmp else [])}
    extra_link_args = ["-fopenmp"] if use_openmp else []
    define_macros = []
    extension = CppExtension
    if _want_cuda() and cuda_sources:
        if CUDA_HOME is None:
            raise RuntimeError(
                "FORCE_CUDA=1 but torch cannot find the CUDA toolkit: set CUDA_HOME to the toolkit "
                "folder (the one whose lib64 holds libcudart)."
            )
        extension = CUDAExtension
        sources += cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = [
            "-O3",
            "-DCUDA_HAS_FP16=1",
            "-D__CUDA_NO_HALF_OPERATORS__",
            "-D__CUDA_NO_HALF_CONVERSIONS__",
            "-D__CUDA_NO_HALF2_OPERATORS__",
            "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        ]
    return [
        extension(
            "codetr._C",
            sources,
            include_dirs=[os.path.join(ROOT, CSRC)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
        )
    ]


setup(
    name="codetr",
    version="0.1.0",
    description="Co-DETR (collaborative hybrid assignments) for Detectron2",
    package_dir={"": PKG_ROOT},
    packages=find_packages(PKG_ROOT),
    python_requires=">=3.9",
    install_requires=["fvcore", "iopath", "matplotlib", "pycocotools", "scipy", "timm"],
    # ONNX export and ONNX Runtime parity/benchmarks (tools/export_onnx.py, tools/benchmark_inference.py)
    extras_require={"export": ["onnx", "onnxruntime", "onnxscript"]},
    ext_modules=get_extensions(),
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
