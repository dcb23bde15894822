"""Compile-only check of the BGMV CUDA kernels, for CI (nvcc, no GPU, CPU-only torch).

Compiles bgmv_cuda/bgmv.cu -- the torch-free translation unit that includes only
bgmv_kernel.cuh (and its bgmv_params.h) and instantiates every kernel -- with the loader's
own NVCC_FLAGS (bgmv_cuda.py), for sm_80 and sm_90 in one `nvcc -c` call with `-Xptxas -v`,
and fails on any compiler error or any register spill.  The torch binding, bgmv_ext.cpp, is
host-compiler code that needs a CUDA build of torch: the extension build covers it.
Prints registers / spills / stack / shared memory per kernel and architecture (the numbers
bgmv_kernel.cuh's launch configuration comment quotes).  Takes a few seconds.

    python bgmv_cuda/compile_check.py                 # sm_80 and sm_90
    python bgmv_cuda/compile_check.py --arch 80 90 100
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

DEFAULT_ARCHS = ("80", "90")


@dataclass
class KernelResources:
    """ptxas -v figures for one kernel on one architecture."""
    kernel: str               # mangled name
    arch: str                 # e.g. "sm_90"
    registers: int = -1
    stack_bytes: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem_bytes: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_ANY_SPILL = re.compile(r"(\d+) bytes spill (?:stores|loads)")


def parse_ptxas(text: str) -> list[KernelResources]:
    """Per-kernel resources from `ptxas -v` output (entry-function blocks, in order)."""
    out: list[KernelResources] = []
    cur: Optional[KernelResources] = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = KernelResources(m.group(1), m.group(2))
            out.append(cur)
            continue
        if cur is None:
            continue
        m = _FRAME.search(line)
        if m:
            cur.stack_bytes, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        m = _USED.search(line)
        if m:
            cur.registers = int(m.group(1))
            m = _SMEM.search(line)
            cur.smem_bytes = int(m.group(1)) if m else 0
    return out


def spill_lines(text: str) -> list[str]:
    """Every ptxas line reporting a non-zero spill, wherever it appears."""
    return [ln.strip() for ln in text.splitlines()
            if any(int(n) > 0 for n in _ANY_SPILL.findall(ln))]


def find_nvcc() -> Optional[str]:
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def nvcc_command(nvcc: str, archs: Sequence[str], obj: str) -> list[str]:
    from bgmv_cuda.bgmv_cuda import KERNEL_SOURCE, NVCC_FLAGS  # the loader's exact flags

    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # -std=c++17: the oldest standard torch's extension builds use (newer ones use c++20).
    return [nvcc, "-c", KERNEL_SOURCE, "-o", obj, *NVCC_FLAGS, "-std=c++17",
            "-Xcompiler", "-fPIC", *gencode, "-Xptxas", "-v"]


def run_compile_check(archs: Sequence[str] = DEFAULT_ARCHS, nvcc: Optional[str] = None
                      ) -> tuple[list[KernelResources], str]:
    """Compile; return (per-kernel resources, full compiler output). Raises RuntimeError
    (with the compiler output) on a compile error, a spill, or no kernel reported."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("compile_check: nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = nvcc_command(nvcc, archs, os.path.join(tmp, "bgmv.o"))
        proc = subprocess.run(cmd, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"compile_check: nvcc failed (exit {proc.returncode}):\n"
                           f"{' '.join(cmd)}\n{text}")
    kernels = parse_ptxas(text)
    if not kernels:
        raise RuntimeError(f"compile_check: no ptxas -v report in the output:\n{text}")
    spills = spill_lines(text)
    if spills:
        raise RuntimeError("compile_check: register spills:\n" + "\n".join(spills) +
                           f"\n\nfull output:\n{text}")
    return kernels, text


def demangle_short(name: str) -> str:
    """_Z19_bgmv_expand_kernelI6__halfLi8ELi1EEv16BgmvExpandParams -> expand<__half,8,1>."""
    m = re.match(r"_Z\d+_bgmv_(shrink|expand|fused)_kernelI(.*)Ev", name)
    if not m:
        return name
    args = m.group(2)
    dtype = next((d for d in ("__half", "__nv_bfloat16") if d in args), "float")
    ints = re.findall(r"Li(\d+)E", args)
    return f"{m.group(1)}<{', '.join([dtype] + ints)}>"


def main(args: argparse.Namespace) -> int:
    try:
        kernels, _ = run_compile_check(args.arch, args.nvcc)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{'kernel':34s} {'arch':6s} {'regs':>5s} {'stack':>6s} {'spill st':>9s} "
          f"{'spill ld':>9s} {'smem':>5s}")
    for k in sorted(kernels, key=lambda k: (k.arch, demangle_short(k.kernel))):
        print(f"{demangle_short(k.kernel):34s} {k.arch:6s} {k.registers:5d} {k.stack_bytes:6d} "
              f"{k.spill_stores:9d} {k.spill_loads:9d} {k.smem_bytes:5d}")
    print(f"compile_check: {len(kernels)} kernels, no spills")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Compile bgmv.cu with the loader's flags; fail on errors or spills.",
        epilog="example:\n  python bgmv_cuda/compile_check.py --arch 80 90",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", default=list(DEFAULT_ARCHS),
                   help="compute capabilities without the dot, e.g. 80 90")
    p.add_argument("--nvcc", default=None, help="nvcc to use (default: PATH, then CUDA_HOME)")
    return p


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    sys.exit(main(build_parser().parse_args()))
