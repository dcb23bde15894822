"""CUDA C++ BGMV (Punica-style) multi-LoRA: the JIT loader, the custom ops and `bgmv_lora`.

Semantics (per token t with adapter i = idx[t]; nothing when idx[t] == -1):

    v[t, s, :r] = x[t] @ A[s, i, :r].T                      # multilora::bgmv_cuda_shrink (fp32)
    y[t, off_s:off_s + h_out_s] += scale[i] * v[t, s, :r] @ B[s][i, :, :r].T
                                                          # multilora::bgmv_cuda_expand
with r = ranks[i] (r_max when ranks is None); padded rank rows / columns are never read.

Shapes: x [T, h_in], y [T, sum h_out_s], A [L, r_max, h_in] or [S, L, r_max, h_in],
B [L, h_out, r_max] or a tuple of S <= 3 of them (q/k/v: one launch each for shrink and
expand), idx [T] int32/int64, scale [L] fp32, ranks [L] int32/int64 or None; fp16, bf16,
fp32.  Supported: h_in a multiple of 8 (16-byte loads of x and A, 16-byte aligned rows),
any h_out, r_max <= 128.  Bytes moved (for GB/s): x + 2 y + each distinct adapter's
S r h_in + sum_s h_out_s r elements, plus the fp32 v written and read back.

The kernels are in bgmv_kernel.cuh (plain CUDA, the file to copy), the dtype dispatch in
bgmv.cu, the tensor checks and TORCH_LIBRARY registration in bgmv_ext.cu.  This module owns
the source list and nvcc flags and builds with torch.utils.cpp_extension.load on first use
only (importing it, `--help` and the CPU tests never run nvcc); bgmv_cuda/compile_check.py
compiles bgmv.cu with the same NVCC_FLAGS for CI.  Fake impls registered below make the
ops usable under torch.compile; no host sync in the call path, so CUDA graphs capture it.

    python bgmv_cuda/bgmv_cuda.py --check            # build, then validate a few shapes
    BGMV_CUDA_VERBOSE=1 python bgmv_cuda/bgmv_cuda.py --check   # also print ptxas -v
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch
from torch import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from multilora_impl import BList, check_lora_args  # noqa: E402

# ---------------------------------------------------------------------------------------
# Sources and flags (compile_check.py reuses NVCC_FLAGS and KERNEL_SOURCE)
# ---------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_HEADER = os.path.join(HERE, "bgmv_kernel.cuh")
KERNEL_SOURCE = os.path.join(HERE, "bgmv.cu")         # instantiates every kernel, torch-free
SOURCES = [KERNEL_SOURCE, os.path.join(HERE, "bgmv_ext.cu")]
EXT_NAME = "multilora_bgmv_cuda"
# torch.utils.cpp_extension adds the four -D__CUDA_NO_* and --expt-relaxed-constexpr
# itself; they are listed here too so that the compile check sees exactly the same macros.
NVCC_FLAGS = [
    "-O3",
    "-lineinfo",                           # source lines for profilers; no effect on code
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
MAX_SLICES = 3          # kBgmvMaxSlices in bgmv_kernel.cuh
H_IN_MULTIPLE = 8       # 16-byte vector loads of x and A (8 halves; 4 floats divide it too)
VERBOSE_ENV = "BGMV_CUDA_VERBOSE"      # =1: build verbosely, with ptxas -v
BUILD_DIR_ENV = "BGMV_CUDA_BUILD_DIR"  # override the build cache folder


def arch_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc flags for the GPU's own architecture only, e.g. (9, 0) -> sm_90 (no PTX)."""
    major, minor = capability
    return [f"-gencode=arch=compute_{major}{minor},code=sm_{major}{minor}"]


def default_build_dir(capability: tuple[int, int]) -> str:
    """<repo>/build/bgmv_cuda/<torch>-<cuda>-sm<cc> (git-ignored; one per toolchain)."""
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda}-sm{capability[0]}{capability[1]}"
    return os.environ.get(BUILD_DIR_ENV) or os.path.join(ROOT, "build", "bgmv_cuda", tag)


# ---------------------------------------------------------------------------------------
# Loader: build on first use, show the compiler's output when the build fails
# ---------------------------------------------------------------------------------------
_STATE = {"loaded": False, "library": None}


def load_extension(sources: Optional[Sequence[str]] = None, name: str = EXT_NAME,
                   build_dir: Optional[str] = None, verbose: Optional[bool] = None) -> str:
    """Build (once per source / flag change; cached in build_dir) and load the extension,
    which registers the multilora::bgmv_cuda_* ops. Returns the shared library's path.
    verbose (default: $BGMV_CUDA_VERBOSE) prints the build, including `ptxas -v`.
    A failed build raises RuntimeError with the compiler's output."""
    from torch.utils import cpp_extension  # heavy import, only when building

    if not torch.cuda.is_available():
        raise RuntimeError("bgmv_cuda: building the extension needs a CUDA GPU and a CUDA "
                           f"build of torch (torch {torch.__version__}, CUDA available: False)")
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "0") not in ("", "0")
    cap = torch.cuda.get_device_capability()
    flags = NVCC_FLAGS + arch_flags(cap) + (["-Xptxas", "-v"] if verbose else [])
    build_dir = build_dir or default_build_dir(cap)
    os.makedirs(build_dir, exist_ok=True)
    sources = list(sources or SOURCES)
    # The `ninja` pip package installs its binary next to this interpreter, which is not on
    # PATH when the venv is not activated; cpp_extension looks for it on PATH.
    venv_bin = os.path.dirname(sys.executable)
    if os.path.isfile(os.path.join(venv_bin, "ninja")) and venv_bin not in \
            os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    try:
        path = cpp_extension.load(name=name, sources=sources, extra_cflags=["-O3"],
                                  extra_cuda_cflags=flags, build_directory=build_dir,
                                  is_python_module=False, verbose=verbose)
    except (RuntimeError, OSError, ImportError) as e:
        text = str(e)
        prefix = f"Error building extension '{name}'"
        if text.startswith(prefix):
            text = text[len(prefix):].lstrip(": \n") or "(compiler output printed above)"
        raise RuntimeError(f"bgmv_cuda: building {name} failed (sources {sources}, nvcc flags "
                           f"{' '.join(flags)}, build dir {build_dir}).\n"
                           f"Compiler output:\n{text}") from None
    return path


def _shrink_fake(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor], v: Tensor) -> None:
    return None          # in place: v is the only output


def _expand_fake(y: Tensor, v: Tensor, B: Sequence[Tensor], idx: Tensor, scale: Tensor,
                 ranks: Optional[Tensor]) -> None:
    return None          # in place: y is the only output


def load_and_register(verbose: Optional[bool] = None) -> str:
    """Load the extension once per process and register the fake impls (register_fake
    needs the ops to exist, so it runs after the load). Returns the library's path."""
    if not _STATE["loaded"]:
        _STATE["library"] = load_extension(verbose=verbose)
        torch.library.register_fake("multilora::bgmv_cuda_shrink", _shrink_fake)
        torch.library.register_fake("multilora::bgmv_cuda_expand", _expand_fake)
        _STATE["loaded"] = True
    return _STATE["library"]


@torch.compiler.assume_constant_result
def ensure_loaded() -> bool:
    """load_and_register() for the call path. Marked constant for torch.compile: Dynamo
    runs it once while tracing (building if needed) and keeps it out of the graph."""
    load_and_register()
    return True


# ---------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------
def _check_cuda_args(x: Tensor, A4: Tensor, Bs: Sequence[Tensor]) -> None:
    """What this extension adds to the contract (check_lora_args checks the rest);
    data_ptr / stride alignment is checked in bgmv_ext.cu, on the real tensors."""
    h_in = x.shape[1]
    if h_in % H_IN_MULTIPLE != 0:
        raise ValueError(f"x: bgmv_cuda needs h_in a multiple of {H_IN_MULTIPLE} (16-byte vector "
                         f"loads of x and A), got h_in = {h_in}")
    if len(Bs) > MAX_SLICES:
        raise ValueError(f"B: bgmv_cuda takes at most {MAX_SLICES} output slices, got {len(Bs)}")
    if x.device.type != "cuda":
        raise ValueError(f"x: bgmv_cuda runs on CUDA tensors only, got device {x.device}")


def bgmv_shrink(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor] = None,
                v: Optional[Tensor] = None) -> Tensor:
    """v [T, S, r_max] fp32 = x @ A[:, idx].T per token (rows past ranks[idx[t]] and rows of
    idx = -1 tokens are left as they were). A [L, r_max, h_in] or [S, L, r_max, h_in]."""
    ensure_loaded()
    A4 = A.unsqueeze(0) if A.dim() == 3 else A
    if v is None:
        v = torch.empty((x.shape[0], A4.shape[0], A4.shape[2]), dtype=torch.float32,
                        device=x.device)                          # [T, S, r_max]
    torch.ops.multilora.bgmv_cuda_shrink(x, A4, idx, ranks, v)
    return v


def bgmv_expand(y: Tensor, v: Tensor, B: BList, idx: Tensor, scale: Tensor,
                ranks: Optional[Tensor] = None) -> None:
    """y[:, off_s:off_s + h_out_s] += scale[idx] * v[:, s] @ B_s[idx].T, in place, for the
    S <= 3 slices of B (a tensor [L, h_out, r_max] or a sequence of them)."""
    ensure_loaded()
    Bs = [B] if isinstance(B, Tensor) else list(B)
    torch.ops.multilora.bgmv_cuda_expand(y, v, Bs, idx, scale, ranks)


def bgmv_lora(y: Tensor, x: Tensor, A: Tensor, B: BList, idx: Tensor, scale: Tensor,
              ranks: Optional[Tensor] = None, meta=None) -> None:
    """Registry entry `bgmv_cuda`: y += LoRA(x), one shrink and one expand launch for all
    slices. meta is not needed (BGMV reads idx directly) and is ignored."""
    A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks)
    _check_cuda_args(x, A4, Bs)
    v = bgmv_shrink(x, A4, idx, ranks)                             # [T, S, r_max] fp32
    bgmv_expand(y, v, Bs, idx, scale, ranks)


# ---------------------------------------------------------------------------------------
# CLI: build and validate a few shapes against the float64 reference
# ---------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    from multilora_impl import DTYPES, TOLERANCE, check_mode, make_lora_inputs, make_workload

    try:
        path = load_and_register(verbose=args.verbose or None)
    except RuntimeError as e:       # no GPU, or the build failed: the message says which
        print(e, file=sys.stderr)
        return 2
    print(f"bgmv_cuda: loaded {path} on {torch.cuda.get_device_name()}")
    if not args.check:
        return 0
    failed = 0
    for dt_name in args.dtype:
        dtype = DTYPES[dt_name]
        for T, h_in, h_out, r_max in [(1, 4096, 4096, 16), (7, 72, [584, 64, 64], 64),
                                      (256, 4096, 14336, 128)]:
            L = 8
            ranks = [max(1, r_max - 9 * k) for k in range(L)]
            inp = make_lora_inputs(T, h_in, h_out, L, r_max, dtype, "cuda", ranks=ranks,
                                   seed=args.seed)
            idx = make_workload("uniform", T, L, no_lora_share=0.25, seed=args.seed)
            err = check_mode("bgmv_cuda", inp, idx)
            ok = err < TOLERANCE[dtype]
            failed += not ok
            print(f"{dt_name} T={T} h_in={h_in} h_out={h_out} r_max={r_max}: "
                  f"rel err {err:.2e} {'ok' if ok else 'FAIL'}")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Build (JIT, cached) the CUDA BGMV extension and optionally validate it.",
        epilog="examples:\n  python bgmv_cuda/bgmv_cuda.py --check\n"
               "  python bgmv_cuda/bgmv_cuda.py --verbose   # rebuild printing ptxas -v",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true",
                   help="validate a few shapes against the float64 reference")
    p.add_argument("--dtype", nargs="+", default=["fp16", "bf16", "fp32"],
                   choices=["fp16", "bf16", "fp32"], help="dtypes for --check")
    p.add_argument("--verbose", action="store_true",
                   help=f"print the build with ptxas -v (same as {VERBOSE_ENV}=1)")
    p.add_argument("--seed", type=int, default=0, help="random seed for --check")
    return p


if __name__ == "__main__":
    # Run the copy imported under its package name, the one the registry resolves, so the
    # extension is loaded and its fake impls are registered once per process. The script's
    # own folder goes off sys.path first: its bgmv_cuda.py would shadow the bgmv_cuda/
    # namespace package (regular modules win over namespace packages).
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]
    from bgmv_cuda import bgmv_cuda as _module
    sys.exit(_module.main(_module.build_parser().parse_args()))
