"""Builds (once per machine) and loads the fused CPU decode extension (csrc/).

torch.utils.cpp_extension compiles csrc/decode_step.cpp with the system C++ compiler, -O3
-march=native and OpenMP (ATen's at::parallel_for is OpenMP in the CPU wheel; without -fopenmp
its header would run every loop on one thread). The result lives under the engine's cache dir
(beside the int4 weights), in a directory named by a key over the sources, torch's version, the
CPU's features and the compiler: a warm start imports the built module directly (no compiler,
no ninja), and a change of any of them builds a fresh one. A host without a compiler, or a
build that fails, gets one warning and None: the engine then runs the eager path.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import time
from types import ModuleType

import torch

from shared.config import resolve_cache_dir

log = logging.getLogger(__name__)

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
SOURCES = ("decode_step.cpp",)
HEADERS = (
    "common.h",
    "norm.h",
    "rope.h",
    "activation.h",
    "attention.h",
    "prefill_attention.h",
    "int4_layout.h",
    "quantize_rows.h",
    "int4_matmul.h",
    "int4_matmul_avx2.h",
    "int4_matmul_avx512.h",
    "lane_dot.h",
    "int8_matmul.h",
    "bf16_matmul.h",
    "dense_matmul.h",
)
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17")
LDFLAGS = ("-fopenmp",)
_DONE = "built"
DEFAULT_CACHE_DIR = resolve_cache_dir()


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


CAPABILITIES = ("default", "avx2", "avx512")
"""ATen's x86 CPU capabilities, narrowest first."""


def capability(cpu_flags: str, requested: str | None) -> str:
    """The CPU_CAPABILITY ATen's own kernels use on this CPU: AVX-512 where the CPU has the parts
    ATen's AVX-512 build needs, else AVX2, else its portable code; narrower where
    ATEN_CPU_CAPABILITY (`requested`) asks for one, as ATen's dispatch does."""
    flags = set(cpu_flags.split())
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        best = "avx512"
    elif {"avx2", "fma"} <= flags:
        best = "avx2"
    else:
        best = "default"
    asked = (requested or "").lower()
    if asked in CAPABILITIES and CAPABILITIES.index(asked) < CAPABILITIES.index(best):
        return asked
    return best


def _capability_flags() -> list[str]:
    """The defines of the capability for the at::vec types; below the CPU's own (an AVX2 build
    on an AVX-512 host: ATEN_CPU_CAPABILITY=avx2, to run the AVX2 code where it is tested), also
    the -march=native features above it turned off, so that the kernels chosen by the compiler's
    macros (int4_matmul.h: __AVX512F__) are the same ones such a CPU gets."""
    cpu_flags = _cpu_flags()
    cap = capability(cpu_flags, os.environ.get("ATEN_CPU_CAPABILITY"))
    if cap == "avx512":
        return ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    has = set(cpu_flags.split())
    if cap == "avx2":
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", *(["-mno-avx512f"] if "avx512f" in has else [])]
    return ["-DCPU_CAPABILITY=DEFAULT", *(["-mno-avx"] if "avx" in has else [])]


def cflags() -> list[str]:
    return [*CFLAGS, *_capability_flags()]


def build_key(csrc: str = CSRC) -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        path = os.path.join(csrc, name)
        if csrc != CSRC and not os.path.exists(path):
            continue  # another version's sources (a benchmark's baseline) may lack a newer header
        with open(path, "rb") as f:
            h.update(name.encode() + b"\0" + f.read())
    for part in (torch.__version__, sys.version, _cpu_flags(), os.environ.get("CXX", "c++"), " ".join(cflags())):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _import(name: str, path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_modules: dict[str, ModuleType | None] = {}
"""Loaded (or failed) builds by key: each is built and imported at most once per process."""


def load(cache_dir: str, csrc: str = CSRC) -> ModuleType | None:
    """The built extension module, building it into cache_dir/fused_cpu/ first if neither
    cache_dir nor the default cache dir holds this build; None (after one warning) when it
    cannot be built or loaded here. csrc: the sources (another version's, for a benchmark's
    before/after in one process)."""
    key = build_key(csrc)
    if key not in _modules:
        try:
            _modules[key] = _load(cache_dir, key, csrc)
        except Exception as e:  # a missing compiler, a failed build, a module that does not import
            lines = str(e).strip().splitlines()
            log.warning(
                "the fused CPU decode kernels are unavailable (%s: %s): running the eager decode path "
                "(a C++ compiler, g++, makes decode steps faster)",
                type(e).__name__,
                lines[-1] if lines else "",
            )
            _modules[key] = None
    return _modules[key]


def _load(cache_dir: str, key: str, csrc: str) -> ModuleType:
    name = f"novainfer_fused_cpu_{key}"
    # A build is the same wherever it lies: one made under the default cache dir serves an
    # engine given another (tests, benchmarks' fresh cache dirs) without a second build.
    for root in dict.fromkeys((cache_dir, DEFAULT_CACHE_DIR)):
        found = os.path.join(root, "fused_cpu", key)
        if os.path.isfile(os.path.join(found, _DONE)):
            return _import(name, os.path.join(found, f"{name}.so"))
    build_dir = os.path.join(cache_dir, "fused_cpu", key)
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler}) on PATH")
    # Imported here: they pull in setuptools, which a warm start does not need.
    import ninja  # the build tool cpp_extension drives (a dependency: its binary, on PATH here)
    from torch.utils import cpp_extension

    os.environ["PATH"] = os.pathsep.join((ninja.BIN_DIR, os.environ.get("PATH", "")))

    os.makedirs(build_dir, exist_ok=True)
    t0 = time.perf_counter()
    module = cpp_extension.load(
        name=name,
        sources=[os.path.join(csrc, s) for s in SOURCES],
        extra_cflags=cflags(),
        extra_ldflags=list(LDFLAGS),
        extra_include_paths=[csrc],
        build_directory=build_dir,
        verbose=False,
    )
    # Marks the module complete: another engine starting meanwhile must not import a half-linked
    # file (cpp_extension serialises the builds themselves with a lock file in build_dir).
    with open(os.path.join(build_dir, _DONE), "w") as f:
        f.write(name)
    log.info("built the fused CPU decode kernels in %.1fs (cached in %s)", time.perf_counter() - t0, build_dir)
    return module
