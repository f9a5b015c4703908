"""Builds expertmesh._C from csrc/.

A CppExtension always; a CUDAExtension instead when the installed torch has CUDA and nvcc
exists. CUDA architectures come from TORCH_CUDA_ARCH_LIST (never probed from a GPU, so
builds on GPU-less machines are reproducible). Ops register themselves with TORCH_LIBRARY,
so the module needs no pybind11 bindings: importing it is enough. The sources and flags live
in csrc/build_flags.py, which tests/gpu/test_cuda_compile.py compiles and links with too.
"""

import importlib.util
import os
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_flags():
    spec = importlib.util.spec_from_file_location("build_flags", os.path.join(ROOT, "csrc", "build_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    flags = _build_flags()
    cpp = flags.sources("*.cpp")
    if not cpp:
        return [], {}
    common = dict(include_dirs=list(flags.INCLUDE_DIRS), extra_link_args=list(flags.LINK_FLAGS), py_limited_api=False)
    cu = flags.sources("*.cu")
    use_cuda = bool(cu) and torch.version.cuda is not None and shutil.which("nvcc") is not None
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", flags.DEFAULT_CUDA_ARCH_LIST)
        ext = CUDAExtension(
            flags.NAME,
            cpp + cu,
            extra_compile_args={"cxx": list(flags.CXX_FLAGS), "nvcc": list(flags.NVCC_FLAGS)},
            **common,
        )
    else:
        ext = CppExtension(flags.NAME, cpp, extra_compile_args={"cxx": list(flags.CXX_FLAGS)}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
