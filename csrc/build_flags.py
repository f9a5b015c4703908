"""The build of expertmesh._C in one place: its sources and the flags we pass on top of torch's.

setup.py builds the extension from these, and tests/gpu/test_cuda_compile.py compiles and links the
same sources with the same flags. Both load this file by path (it is not part of the installed
package), so it imports nothing but the standard library and works before anything is built.
BuildExtension adds its own flags on top (torch's include dirs, COMMON_NVCC_FLAGS, -fPIC, the
-gencode flags from TORCH_CUDA_ARCH_LIST, -DTORCH_EXTENSION_NAME, ...); the test replicates those.
"""

import glob
import os

CSRC = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(CSRC)

NAME = "expertmesh._C"
INCLUDE_DIRS = [CSRC]
CXX_FLAGS = ["-O3", "-std=c++20", "-fopenmp"]
NVCC_FLAGS = ["-O3", "-std=c++20"]
LINK_FLAGS = ["-fopenmp"]
# Used when TORCH_CUDA_ARCH_LIST is unset: A100 and H100/H200, plus PTX of the newest so that a newer
# GPU (Blackwell) JIT-compiles it instead of finding no kernel image. Never probed from a visible GPU,
# so a build on a GPU-less machine gives the same library as one on a GPU machine.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def sources(pattern: str) -> list[str]:
    """csrc/**/<pattern>, sorted, relative to the repository root (as setuptools wants them)."""
    paths = glob.glob(os.path.join(CSRC, "**", pattern), recursive=True)
    return sorted(os.path.relpath(p, ROOT) for p in paths)
