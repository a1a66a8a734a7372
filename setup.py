"""Build reserved-kernels, compiling ``csrc/`` into ``reserved_kernels._C``.

The C++ CPU kernels and the C++ autograd are built whenever a C++ compiler is found; the CUDA kernels
too when a CUDA toolkit is found. RESERVED_KERNELS_BUILD_CUDA=1 forces the CUDA build (and fails loudly
without a toolkit); =0 builds the CPU kernels alone; unset builds CUDA when a toolkit is found.
RESERVED_KERNELS_BUILD_EXTENSION=0 compiles nothing (the pure-Python package). TORCH_CUDA_ARCH_LIST and
MAX_JOBS are honoured. Build with ``pip install --no-build-isolation .`` so the installed torch is used.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"


def _find_cuda_home() -> str | None:
    """The toolkit folder holding the real nvcc (the nvcc on PATH may be a wrapper script)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        head = b""
    if head.startswith(b"#!"):  # a wrapper: find the nvcc it execs
        match = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if match:
            nvcc = match.group(1).decode()
    return os.path.dirname(os.path.dirname(nvcc))


def _pip_cuda_include_dirs() -> list[str]:
    """Headers pip installs with torch (cublas_v2.h, cusparse.h) that the toolkit folder may lack."""
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        found += sorted(glob.glob(os.path.join(root, "nvidia", "cu*", "include")))
        found += sorted(glob.glob(os.path.join(root, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def _max_jobs() -> str:
    """nvcc with torch headers takes ~2 GB per job: cap jobs by free memory, as flash-attention does."""
    if os.environ.get("MAX_JOBS"):
        return os.environ["MAX_JOBS"]
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 4
    return str(max(1, min(os.cpu_count() or 1, int(free_gb // 2))))


def _cuda_toolkit(mode: str) -> str | None:
    """The CUDA toolkit to build with, or None for the CPU kernels alone (``mode``: RESERVED_KERNELS_BUILD_CUDA)."""
    if mode == "0":
        return None
    cuda_home = _find_cuda_home()
    if cuda_home is None or not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        if mode == "1":
            sys.exit("RESERVED_KERNELS_BUILD_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
        print("reserved-kernels: no CUDA toolkit found; building the C++ CPU kernels alone", file=sys.stderr)
        return None
    return cuda_home


def _extensions():
    if os.environ.get("RESERVED_KERNELS_BUILD_EXTENSION", "").strip() == "0":
        return [], {}
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        print("reserved-kernels: no C++ compiler found; installing the pure-Python package", file=sys.stderr)
        return [], {}
    cuda_home = _cuda_toolkit(os.environ.get("RESERVED_KERNELS_BUILD_CUDA", "").strip())
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    os.environ["MAX_JOBS"] = _max_jobs()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    common = {"name": "reserved_kernels._C", "include_dirs": [os.path.join(HERE, "csrc")]}
    if cuda_home is None:
        ext = CppExtension(sources=cpp_sources, extra_compile_args={"cxx": ["-O3"]}, **common)
    else:
        common["include_dirs"] += _pip_cuda_include_dirs()
        ext = CUDAExtension(
            sources=cpp_sources + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
            # No --use_fast_math: it would change rounding of the scale multiply and the means.
            # torch picks the C++ standard
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            **common,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
