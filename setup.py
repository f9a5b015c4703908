"""Builds expertmesh._C from csrc/.

A CppExtension always; a CUDAExtension instead when the installed torch has CUDA and nvcc
exists. CUDA architectures come from TORCH_CUDA_ARCH_LIST (never probed from a GPU, so
builds on GPU-less machines are reproducible). Ops register themselves with TORCH_LIBRARY,
so the module needs no pybind11 bindings: importing it is enough.
"""

import glob
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True))


def _extensions():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp = _sources("*.cpp")
    if not cpp:
        return [], {}
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    common = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"], py_limited_api=False)
    cu = _sources("*.cu")
    use_cuda = bool(cu) and torch.version.cuda is not None and shutil.which("nvcc") is not None
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "expertmesh._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20"]},
            **common,
        )
    else:
        ext = CppExtension("expertmesh._C", cpp, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
