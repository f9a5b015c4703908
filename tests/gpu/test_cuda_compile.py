"""csrc/ compiles for sm_90 and links into one shared library wherever nvcc exists, GPU or not.

The sources and our flags come from csrc/build_flags.py, as in setup.py; what torch's BuildExtension
adds on top (COMMON_NVCC_FLAGS, -fPIC, the -gencode flags of TORCH_CUDA_ARCH_LIST, the
TORCH_EXTENSION_NAME define, the libraries CUDAExtension links) is taken from the same torch helpers.
The .cu files go through nvcc and ops.cpp (schema, module init) through the host compiler, then they link
with -shared against torch and cudart, so duplicate definitions and declared-but-never-defined
functions fail here rather than at `import expertmesh._C` on a GPU machine. A CPU build of torch
ships no libc10_cuda/libtorch_cuda: only symbols from those (c10::cuda::, at::cuda::) and Python's
C API may remain unresolved.
"""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sysconfig
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_ext

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
ARCH_LIST = "9.0"  # H100/H200: sm_90 only, to keep the compile short
TOOLS = ("ldd", "nm", "readelf", "c++filt")
# The CUDA libraries CUDAExtension links beyond cudart, and the namespace of the symbols each defines.
TORCH_CUDA_LIBS = {"c10_cuda": "c10::cuda::", "torch_cuda": "at::cuda::"}


def _load_build_flags():
    spec = importlib.util.spec_from_file_location("build_flags", ROOT / "csrc" / "build_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FLAGS = _load_build_flags()
EXT_NAME = FLAGS.NAME.rsplit(".", 1)[-1]  # BuildExtension defines TORCH_EXTENSION_NAME as the last part


def _cuda_home() -> Path:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), Path(NVCC).resolve().parents[1],
                  "/usr/local/cuda"]
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").is_file():
            return Path(c)
    pytest.fail(f"nvcc is {NVCC} but no CUDA headers under any of {candidates}")


def _include_dirs(shim: Path, cuda_home: Path) -> list[str]:
    # The extension's include_dirs (ours, torch's, CUDA's), then Python's, in build_ext's order.
    dirs = [*FLAGS.INCLUDE_DIRS, *cpp_ext.include_paths(), str(cuda_home / "include"), sysconfig.get_paths()["include"]]
    generated = Path(cpp_ext.include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not generated.is_file():
        # A CPU build of torch ships the c10/cuda headers but not this one CMake-generated file.
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        dirs.append(str(shim))
    return [f"-I{d}" for d in dirs]


def _torch_defines() -> list[str]:
    # BuildExtension.build_extensions appends these to the cxx and the nvcc flags alike (older torch
    # also the _GLIBCXX_USE_CXX11_ABI define, through this helper that newer versions no longer have).
    abi = getattr(cpp_ext, "_get_glibcxx_abi_build_flags", lambda: [])()
    return [*abi, "-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={EXT_NAME}"]


def _nvcc_command(src: Path, obj: Path, includes: list[str]) -> list[str]:
    # BuildExtension's unix_cuda_flags: COMMON_NVCC_FLAGS, -fPIC for the host side, ours, the arch flags.
    post = [*FLAGS.NVCC_FLAGS, *_torch_defines()]
    post = [*cpp_ext.COMMON_NVCC_FLAGS, "--compiler-options", "-fPIC", *post, *cpp_ext._get_cuda_arch_flags(post)]
    if os.environ.get("CC"):
        post += ["-ccbin", os.environ["CC"]]
    return [NVCC, *includes, "-c", str(src), "-o", str(obj), *post]


def _cxx_command(src: Path, obj: Path, includes: list[str]) -> list[str]:
    # distutils' compiler_so flags (Python's CFLAGS and -fPIC), then the extension's cxx flags.
    base = [f for var in ("CFLAGS", "CCSHARED") for f in shlex.split(sysconfig.get_config_var(var) or "")]
    cxx = os.environ.get("CXX", "c++")
    return [cxx, *base, *includes, "-c", str(src), "-o", str(obj), *FLAGS.CXX_FLAGS, *_torch_defines()]


def _absent_torch_cuda_libs() -> list[str]:
    torch_lib = Path(cpp_ext.library_paths()[0])
    return [lib for lib in TORCH_CUDA_LIBS if not (torch_lib / f"lib{lib}.so").is_file()]


def _link_command(objs: list[Path], so: Path, cuda_home: Path) -> list[str]:
    # CUDAExtension's libraries, less those a CPU build of torch does not ship.
    torch_lib = Path(cpp_ext.library_paths()[0])
    libs = ["c10", "torch", "torch_cpu", "torch_python", "cudart"]
    libs += [lib for lib in TORCH_CUDA_LIBS if lib not in _absent_torch_cuda_libs()]
    cxx = os.environ.get("CXX", "c++")
    return [cxx, "-shared", *map(str, objs), f"-L{torch_lib}", f"-L{cuda_home / 'lib64'}",
            *[f"-l{lib}" for lib in libs], *FLAGS.LINK_FLAGS, "-o", str(so)]


def _compile_all(jobs: list[tuple[Path, list[str]]]) -> None:
    def run(job):
        src, cmd = job
        return src, cmd, subprocess.run(cmd, capture_output=True, text=True, timeout=600)

    # Two at a time unless MAX_JOBS (which BuildExtension reads too) says more, as on a GPU machine.
    with ThreadPoolExecutor(max_workers=int(os.environ.get("MAX_JOBS") or 2)) as pool:
        for src, cmd, r in pool.map(run, jobs):
            assert r.returncode == 0, f"{src.name} failed to compile:\n{shlex.join(cmd)}\n{r.stderr[-4000:]}"


def _unresolved(so: Path, cuda_home: Path) -> list[str]:
    """Symbols the dynamic loader could not bind (ldd -r), demangled, less the ones Python provides."""
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join([cpp_ext.library_paths()[0], str(cuda_home / "lib64")]))
    r = subprocess.run(["ldd", "-r", str(so)], capture_output=True, text=True, env=env, timeout=120)
    assert "not found" not in r.stdout, r.stdout
    names = re.findall(r"undefined symbol: (\S+)", r.stdout + r.stderr)
    names = [n for n in names if not n.startswith(("Py", "_Py"))]
    if not names:
        return []
    return subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")


def _registrations(paths) -> Counter:
    """(namespace, dispatch key) of every TORCH_LIBRARY_IMPL block in the given sources."""
    found = Counter()
    for p in paths:
        found.update(re.findall(r"TORCH_LIBRARY_IMPL\(\s*(\w+)\s*,\s*(\w+)\s*,", (ROOT / p).read_text()))
    return found


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.skipif(not all(map(shutil.which, TOOLS)), reason=f"needs {', '.join(TOOLS)}")
def test_extension_compiles_for_sm90_and_links(tmp_path, monkeypatch):
    # the CPU kernels (csrc/moe/cpu/) are built and tested by every install; the library's schema and module
    # init (ops.cpp) are what the CUDA objects link against
    cu, cpp = FLAGS.sources("*.cu"), [p for p in FLAGS.sources("*.cpp") if "/cpu/" not in p]
    assert cu, "no .cu files under csrc/"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", ARCH_LIST)
    cuda_home = _cuda_home()
    includes = _include_dirs(tmp_path / "shim", cuda_home)
    # Objects named after their path (cpu/combine.cpp and cuda/combine.cu must not collide).
    objs = {p: tmp_path / (p.replace("/", "_") + ".o") for p in cu + cpp}
    jobs = [(ROOT / p, _nvcc_command(ROOT / p, objs[p], includes)) for p in cu]
    jobs += [(ROOT / p, _cxx_command(ROOT / p, objs[p], includes)) for p in cpp]
    jobs.sort(key=lambda job: job[0].suffix != ".cu")  # the slow nvcc jobs first
    assert "-gencode=arch=compute_90,code=sm_90" in jobs[0][1]
    _compile_all(jobs)

    so = tmp_path / f"{EXT_NAME}.so"
    link = _link_command(list(objs.values()), so, cuda_home)
    r = subprocess.run(link, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"link failed:\n{shlex.join(link)}\n{r.stderr[-4000:]}"

    # Only what the absent libraries would define may stay unresolved (nothing, with a CUDA build of torch).
    allowed = tuple(TORCH_CUDA_LIBS[lib] for lib in _absent_torch_cuda_libs())
    missing = [s for s in _unresolved(so, cuda_home) if s and not s.startswith(allowed)]
    assert not missing, "symbols no linked library defines:\n" + "\n".join(missing)

    exported = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True).stdout
    assert re.search(rf"\bT PyInit_{EXT_NAME}$", exported, re.M), "the module init function is not exported"
    # The full symbol table (anonymous-namespace kernels and registrars are local symbols).
    symbols = subprocess.run(["nm", "-C", str(so)], capture_output=True, text=True).stdout
    for kernel in sorted({k for p in cu for k in re.findall(r"__global__\s+void\s+(\w+)", (ROOT / p).read_text())}):
        assert re.search(rf"::{kernel}<|::{kernel}\(", symbols), f"no host stub for kernel {kernel}"
    for (ns, key), n in _registrations(cu + cpp).items():
        found = len(re.findall(rf"TORCH_LIBRARY_IMPL_static_init_{ns}_{key}_\d+$", symbols, re.M))
        assert found == n, f"{n} TORCH_LIBRARY_IMPL({ns}, {key}) blocks in csrc/, {found} registrars in the library"
    sections = subprocess.run(["readelf", "-S", "-W", str(so)], capture_output=True, text=True).stdout
    assert ".nv_fatbin" in sections, "no device code (.nv_fatbin) in the library"
