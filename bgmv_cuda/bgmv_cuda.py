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

The kernels are in bgmv_kernel.cuh (plain CUDA, the file to copy, with its parameter blocks
in bgmv_params.h), the dtype dispatch in bgmv.cu (nvcc), the tensor checks, stream and
launch functions in bgmv_ext.cpp (host compiler: every torch header stays out of
nvcc-compiled code). The ops multilora::bgmv_cuda_{shrink,expand,fused} are torch custom
ops defined below (torch.library.custom_op) around the extension's functions, which return
an error message instead of throwing: a C++ exception thrown from an extension op crashed
the process on the H200 image (torch 2.11 + g++ 13.3), so a bad direct op call raises
ValueError here instead. On sm_90+ bgmv_lora launches both kernels with programmatic
dependent launch (PDL: the expand starts and loads its B tile while the shrink runs; see
bgmv_kernel.cuh); MULTILORA_PDL=0 turns it off.  Every expand (bgmv_lora, bgmv_expand,
lora_expand) sizes its outputs per lane J by the grid (the smallest J in {1, 4, 8} with at
most ~640 blocks; bgmv_kernel.cuh, kBgmvExpandMaxBlocks) and, under tile rule "rank" (the
default since PERF_LOG v10), each token's lanes per B row by its adapter's rank;
MULTILORA_EXPAND_TILES=residency keeps J but sizes every token's lanes by the largest rank
(the default from v5 to v10), =classic brings back the first rule (J = 1 under 512 blocks,
else 4). The results are bitwise the same, only the grid and the tiles differ (rule
"pairs", PERF_LOG v15, was removed in session 7: slower everywhere); =mma (PERF_LOG
v16-v22) runs the bf16 expand on the tensor cores (mma.sync, v split into three bf16
parts so it stays fp32-exact): the same values up to
the order of the fp32 sum (half and float run as "rank");
`tiles=` on those functions overrides the variable per call.  Both variables are
read at each call (a CUDA graph keeps the choice it captured).  The wrappers below run
every check of bgmv_ext.cpp and bgmv.cu first, in Python (check_shrink_args /
check_expand_args, ValueError naming the argument), so a bad input never reaches C++
through them (one exception: while torch.compile traces, tensors have no address, and a
misaligned data_ptr is left to the C++ check); the C++ checks guard direct op calls.
This module owns the source list and nvcc flags and builds with
torch.utils.cpp_extension.load on first use only (importing it, `--help` and the CPU tests
never run nvcc); bgmv_cuda/compile_check.py compiles bgmv.cu with the same NVCC_FLAGS for
CI.  Fake impls registered below make the ops usable under torch.compile; no host sync in
the call path, so CUDA graphs capture it.

    python bgmv_cuda/bgmv_cuda.py --check            # build, then validate a few shapes
    BGMV_CUDA_VERBOSE=1 python bgmv_cuda/bgmv_cuda.py --check   # also print ptxas -v
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn, Optional, Sequence

import torch
from torch import Tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from multilora_impl import (BList, RANK_GROUPS, build_rank_work, check_index_values,  # noqa: E402
                            check_lora_args, debug_checks)

if __name__ == "__main__":
    # Run the copy imported under its package name, the one the registry resolves, so the
    # custom ops below are defined once per process. The script's own folder goes off
    # sys.path first: its bgmv_cuda.py would shadow the bgmv_cuda/ namespace package
    # (regular modules win over namespace packages).
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    from bgmv_cuda import bgmv_cuda as _module
    sys.exit(_module.main(_module.build_parser().parse_args()))

# ---------------------------------------------------------------------------------------
# Sources and flags (compile_check.py reuses NVCC_FLAGS and KERNEL_SOURCE)
# ---------------------------------------------------------------------------------------
HERE = os.path.dirname(os.path.abspath(__file__))
KERNEL_HEADER = os.path.join(HERE, "bgmv_kernel.cuh")
PARAMS_HEADER = os.path.join(HERE, "bgmv_params.h")   # torch-free, included by both sources
KERNEL_SOURCE = os.path.join(HERE, "bgmv.cu")         # nvcc: every kernel, torch-free
BINDING_SOURCE = os.path.join(HERE, "bgmv_ext.cpp")   # host compiler: checks + launch functions
SOURCES = [KERNEL_SOURCE, BINDING_SOURCE]
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
# Limits of the C++ side, mirrored by check_shrink_args / check_expand_args.
MAX_SLICES = 3          # kBgmvMaxSlices in bgmv_params.h
MAX_RANK = 128          # kBgmvMaxRank in bgmv_params.h
MAX_SPLIT = 64          # kBgmvMaxSplit in bgmv_params.h (split-K chunks of h_in)
SHRINK_ROWS = 4         # kBgmvShrinkRows: rank rows per shrink block
SHRINK_THREADS = 128    # kBgmvShrinkThreads
# Variants of bgmv_lora (the registry's `bgmv_cuda` mode is "default"; see VARIANTS_DOC):
VARIANTS = ("default", "split", "fused")
# Split-K rule: aim at SPLIT_BLOCKS_PER_SM shrink blocks per SM, each chunk at least one
# 16-byte vector per thread (128 x 16 bytes of h_in), so no thread idles.
SPLIT_BLOCKS_PER_SM = 4
DEFAULT_NUM_SMS = 132   # H200, for the rule when no device is given
H_IN_MULTIPLE = 8       # 16-byte vector loads of x and A (8 halves; 4 floats divide it too)
INT_MAX = 2**31 - 1     # T, h_in, h_out, L are C ints in the params; T is also grid.x
GRID_Y_MAX = 65535      # gridDim.y limit, for the expand's output tiles
EXPAND_WARPS = 4        # kBgmvExpandThreads / 32
EXPAND_OUTS = 4         # kBgmvExpandOuts: outputs per lane J of the tiles checked against grid.y
EXPAND_OUTS_MAX = 8     # kBgmvExpandOutsMax: the largest J (rule "residency", 16-byte loads)
EXPAND_SMALL_GRID = 512     # kBgmvExpandSmallGrid: rule "classic" takes J = 1 below it
EXPAND_MAX_BLOCKS = 640     # kBgmvExpandMaxBlocks: rule "residency"'s grid cap
EXPAND_TILE_RULES = ("classic", "residency", "rank", "mma")  # tile_rule 0-3 (kBgmvTileRule*, bgmv_params.h)
MMA_RULES = ("mma",)   # the tensor-core rules
MMA_ROWS_PER_WARP = 16      # kBgmvMmaRowsPerWarp: rule "mma"'s m16 tiles
CHUNK_TOKENS = 8            # kBgmvChunkTokens: tokens per chunk of rule "mma" (build_chunks)
WORK_STRIDE = 3             # kBgmvWorkStride: rule "rank"'s token list rows (build_rank_work)
RM_ROWS = 8                 # kBgmvRmRows: rank-major B's expand, rank rows per warp behind KS
CHUNK_STRIDE = CHUNK_TOKENS + 1   # kBgmvChunkStride: a chunk row, its tokens then its adapter
MMA_MAX_SPLIT = 8           # kBgmvMmaMaxSplit: rule "mma"'s chunked shrink, at most this many K splits
MMA_MAX_TILES = 16          # kBgmvMmaMaxTiles: rule "mma"'s 16-row tiles per warp
MMA_BLOCKS_PER_SM = 6       # kBgmvMmaMinBlocksPerSM: the one wave rule "mma"'s grids aim at
DEFAULT_TILES = "rank"   # H200, PERF_LOG v10: mixed ranks 16.2 -> 13.7 us, uniform bs 64 6.6 -> 6.1
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
VERBOSE_ENV = "BGMV_CUDA_VERBOSE"      # =1: build verbosely, with ptxas -v
BUILD_DIR_ENV = "BGMV_CUDA_BUILD_DIR"  # override the build cache folder
PDL_ENV = "MULTILORA_PDL"              # =0: launch without programmatic dependent launch
TILES_ENV = "MULTILORA_EXPAND_TILES"   # a name in EXPAND_TILE_RULES (unset: DEFAULT_TILES)


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
_STATE = {"loaded": False, "module": None}


def load_extension(sources: Optional[Sequence[str]] = None, name: str = EXT_NAME,
                   build_dir: Optional[str] = None, verbose: Optional[bool] = None):
    """Build (once per source / flag change; cached in build_dir) and import the extension
    module (functions shrink / expand / fused, each returning "" or an error message).
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
        module = cpp_extension.load(name=name, sources=sources, extra_cflags=["-O3"],
                                    extra_cuda_cflags=flags, build_directory=build_dir,
                                    is_python_module=True, verbose=verbose)
    except (RuntimeError, OSError, ImportError) as e:
        text = str(e)
        prefix = f"Error building extension '{name}'"
        if text.startswith(prefix):
            text = text[len(prefix):].lstrip(": \n") or "(compiler output printed above)"
        raise RuntimeError(f"bgmv_cuda: building {name} failed (sources {sources}, nvcc flags "
                           f"{' '.join(flags)}, build dir {build_dir}).\n"
                           f"Compiler output:\n{text}") from None
    return module


def load_and_register(verbose: Optional[bool] = None):
    """Build / import the extension once per process; returns the module."""
    if not _STATE["loaded"]:
        _STATE["module"] = load_extension(verbose=verbose)
        _STATE["loaded"] = True
    return _STATE["module"]


def _run(fn: str, *args) -> None:
    """Call the extension's function fn; its non-empty return value is the error message."""
    err = getattr(load_and_register(), fn)(*args)
    if err:
        raise ValueError(err)


# The custom ops (run under torch.compile and in CUDA graphs; the fakes say: in place only).
@torch.library.custom_op("multilora::bgmv_cuda_shrink", mutates_args=("v",))
def _shrink_op(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor], v: Tensor,
               pdl: bool = False, chunks: Optional[Tensor] = None,
               work: Optional[Tensor] = None, work_rows: Optional[list[int]] = None) -> None:
    _run("shrink", x, A, idx, ranks, v, pdl, chunks, work, list(work_rows or ()))


@torch.library.custom_op("multilora::bgmv_cuda_expand", mutates_args=("y",))
def _expand_op(y: Tensor, v: Tensor, B: list[Tensor], idx: Tensor, scale: Tensor,
               ranks: Optional[Tensor], pdl: bool = False, tile_rule: int = 1,
               chunks: Optional[Tensor] = None, work: Optional[Tensor] = None,
               work_rows: Optional[list[int]] = None) -> None:
    _run("expand", y, v, list(B), idx, scale, ranks, pdl, tile_rule, chunks, work,
         list(work_rows or ()))


@torch.library.custom_op("multilora::bgmv_cuda_fused", mutates_args=("y", "v", "counters"))
def _fused_op(y: Tensor, x: Tensor, A: Tensor, B: list[Tensor], idx: Tensor, scale: Tensor,
              ranks: Optional[Tensor], v: Tensor, counters: Tensor) -> None:
    _run("fused", y, x, A, list(B), idx, scale, ranks, v, counters)


@_shrink_op.register_fake
def _(x, A, idx, ranks, v, pdl=False, chunks=None, work=None, work_rows=None) -> None:
    return None


@_expand_op.register_fake
def _(y, v, B, idx, scale, ranks, pdl=False, tile_rule=1, chunks=None, work=None,
      work_rows=None) -> None:
    return None


@_fused_op.register_fake
def _(y, x, A, B, idx, scale, ranks, v, counters) -> None:
    return None


_PDL: dict = {}


def pdl_enabled(device: torch.device) -> bool:
    """Programmatic dependent launch: on for CUDA devices of compute capability >= 9 unless
    MULTILORA_PDL=0 (read at each call: a shape-free host decision, fixed in a CUDA graph)."""
    if device.type != "cuda" or os.environ.get(PDL_ENV, "1") == "0":
        return False
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _PDL:
        _PDL[key] = torch.cuda.get_device_capability(key)[0] >= 9
    return _PDL[key]


def expand_tile_rule(tiles: Optional[str] = None) -> int:
    """The expand's tile_rule code (index in EXPAND_TILE_RULES) for tiles "classic",
    "residency", "rank" (residency's J; each token's lanes per B row from its adapter's
    rank, for mixed ranks: PERF_LOG v10, the default), "mma" (bf16 on the tensor cores:
    PERF_LOG v16-v22, see expand_mma_tiles); None reads
    MULTILORA_EXPAND_TILES at each call (unset or empty: DEFAULT_TILES).
    A value outside EXPAND_TILE_RULES raises ValueError naming `tiles` or the variable, so
    a typo cannot silently measure the default rule."""
    name = "tiles"
    if tiles is None:
        name, tiles = TILES_ENV, os.environ.get(TILES_ENV) or DEFAULT_TILES
    if tiles not in EXPAND_TILE_RULES:
        _fail(name, f"one of {EXPAND_TILE_RULES}", repr(tiles))
    return EXPAND_TILE_RULES.index(tiles)


@torch.compiler.assume_constant_result
def ensure_loaded() -> bool:
    """load_and_register() for the call path. Marked constant for torch.compile: Dynamo
    runs it once while tracing (building if needed) and keeps it out of the graph."""
    load_and_register()
    return True


# ---------------------------------------------------------------------------------------
# Input checks: every check of bgmv_ext.cpp (and of the launchers in bgmv.cu), in Python
# ---------------------------------------------------------------------------------------
def _fail(arg: str, expected: str, got: object) -> NoReturn:
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def _byte_address(t: Tensor) -> int:
    """t.data_ptr(), or 0 while torch.compile traces: fake tensors have no address (and
    Dynamo does not trace storage_offset), so there the op's own C++ check, which runs on
    the real tensors in the compiled graph, is the one that sees the pointer."""
    if torch.compiler.is_compiling():
        return 0
    return t.data_ptr()


def _misaligned16(t: Tensor) -> bool:
    """True unless data_ptr and every row stride (dims with more than one entry, all but
    the last) are multiples of 16 bytes: the condition for 16-byte vector loads."""
    es = t.element_size()
    if _byte_address(t) % 16:
        return True
    for d in range(t.dim() - 1):
        if t.shape[d] != 1 and (t.stride(d) * es) % 16:
            return True
    return False


def _check_aligned16(name: str, t: Tensor) -> None:
    if _misaligned16(t):
        _fail(name, "a 16-byte aligned data_ptr and row strides that are multiples of 16 bytes "
              "(16-byte vector loads; pass a .contiguous() tensor that starts at its storage)",
              f"data_ptr % 16 = {_byte_address(t) % 16}, strides {tuple(t.stride())} "
              f"(elements of {t.element_size()} bytes), sizes {tuple(t.shape)}")


def _check_tensor(name: str, t: object, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        _fail(name, "a torch.Tensor", type(t).__name__)
    if t.device != device:
        _fail(name, f"device {device} (same as the first tensor)", t.device)


def _check_index(name: str, t: object, n: int, device: torch.device) -> None:
    """idx [T] / ranks [L]: int32 or int64, contiguous, on `device`."""
    _check_tensor(name, t, device)
    if t.dtype not in (torch.int32, torch.int64):
        _fail(name, "dtype int32 or int64", t.dtype)
    if t.dim() != 1 or t.shape[0] != n:
        _fail(name, f"shape [{n}]", tuple(t.shape))
    if n > 1 and t.stride(0) != 1:
        _fail(name, "a contiguous tensor", f"strides {tuple(t.stride())}")


def _check_first(name: str, t: object, device_type: str) -> None:
    """x (shrink) / y (expand): the tensor that sets dtype and device for the others."""
    if not isinstance(t, Tensor):
        _fail(name, "a torch.Tensor", type(t).__name__)
    if t.device.type != device_type:
        _fail(name, f"a {device_type.upper()} tensor", f"device {t.device}")
    if t.dtype not in SUPPORTED_DTYPES:
        _fail(name, "dtype float16, bfloat16 or float32", t.dtype)


def _expand_layout(Bs: Sequence[Tensor], r_max: int) -> tuple[bool, int]:
    """(16-byte B loads?, G lanes per B row), as bgmv_expand_prepare decides: 16-byte loads
    along the rank when every B_s row is 16-byte aligned, else one element; G = the next
    power of two of the loads per row, at most 32."""
    vec = 16 // Bs[0].element_size()
    w = vec if r_max % vec == 0 and not any(_misaligned16(b) for b in Bs) else 1
    lanes, group = -(-r_max // w), 1
    while group < lanes and group < 32:
        group *= 2
    return w > 1, group


def _row_layout(b: Tensor, r_max: int) -> bool:
    return b.stride(2) == 1 or r_max == 1


def b_rank_major(Bs: Sequence[Tensor], r_max: int) -> bool:
    """Whether B is stored rank-major, as bgmv_ext.cpp decides from B[0]: unit stride along
    h_out instead of along r_max (B.transpose(1, 2).contiguous().transpose(1, 2): the same
    [L, h_out, r_max] tensor, each adapter's rank rows of h_out contiguous; PERF_LOG v45).
    The row layout (PEFT's) where both hold (r_max 1)."""
    b = Bs[0]
    return not _row_layout(b, r_max) and (b.stride(1) == 1 or b.shape[1] == 1)


def expand_rm_tiles(Bs: Sequence[Tensor], r_max: int) -> tuple[int, int]:
    """Rank-major B's expand (_bgmv_expand_rm_kernel): (output columns per block at r_max,
    blocks along grid.y): 32 lanes x W columns x 8 / KS warps, W = 16 bytes when every B_s
    (base, adapter and rank strides) is 16-byte aligned and W divides every h_out_s, else
    1; KS = min(8, next_pow2(ceil(r_max / RM_ROWS)))."""
    vec = 16 // Bs[0].element_size()
    es = Bs[0].element_size()
    w = vec if not any(_byte_address(b) % 16 or b.shape[1] % vec
                       or (b.shape[0] > 1 and (b.stride(0) * es) % 16)
                       or (b.shape[2] > 1 and (b.stride(2) * es) % 16)
                       for b in Bs) else 1
    log2ks = 0
    while log2ks < 3 and (RM_ROWS << log2ks) < r_max:
        log2ks += 1
    tile = 32 * w * (8 >> log2ks)
    return tile, sum(-(-b.shape[1] // tile) for b in Bs)


def expand_tiles(Bs: Sequence[Tensor], r_max: int, outs: int = EXPAND_OUTS) -> tuple[int, int]:
    """(output columns per expand block, number of blocks along grid.y) for J = outs
    outputs per lane, as bgmv_fill_tiles computes them: 4 warps x 32 / G rows x J."""
    tile = EXPAND_WARPS * (32 // _expand_layout(Bs, r_max)[1]) * outs
    return tile, sum(-(-b.shape[1] // tile) for b in Bs)


def expand_mma_tiles(Bs: Sequence[Tensor], rows: int, r_max: int,
                     num_sms: int = DEFAULT_NUM_SMS, per_sm: int = MMA_BLOCKS_PER_SM
                     ) -> Optional[tuple[int, int]]:
    """(MT 16-row tiles per warp, blocks rows * tiles) of rule "mma", as
    bgmv_mma_pick_tiles (bgmv_kernel.cuh) picks them for `rows` = chunks (or tokens without
    chunks), or None where the rule runs as "rank" (not bf16, or B rows not 16-byte
    loadable; the kernel also needs sm_80+): the smallest MT <= MMA_MAX_TILES whose grid
    fits one wave of per_sm blocks per SM, else the largest. The kernel takes per_sm from
    the CUDA occupancy API (its registers and shared memory on the GPU at hand: 7 for
    r_max 33-64 on the H200), so pass that to mirror it exactly."""
    if Bs[0].dtype != torch.bfloat16 or not _expand_layout(Bs, r_max)[0]:
        return None
    def blocks(mt: int) -> int:
        tile = EXPAND_WARPS * MMA_ROWS_PER_WARP * mt
        return rows * sum(-(-b.shape[1] // tile) for b in Bs)
    mt = 1
    while mt < MMA_MAX_TILES and blocks(mt) > per_sm * num_sms:
        mt += 1
    return mt, blocks(mt)


def expand_outs(Bs: Sequence[Tensor], T: int, r_max: int, tile_rule: int = 1
                ) -> tuple[int, int]:
    """(J outputs per lane, blocks T * tiles) of the two-launch expand, as bgmv_expand_outs
    (bgmv_kernel.cuh) picks them; the kernel decides on its own, this mirror is for the
    tests and the sweep's report. Rule 0: J = 1 when the J = 4 grid has fewer than
    EXPAND_SMALL_GRID blocks, else 4. Rule 1: the smallest J in {1, 4, 8} ({1, 4} with
    1-element loads) with at most EXPAND_MAX_BLOCKS blocks, else the largest. Rule 2
    ("rank"): rule 1's J and grid (the kernel then narrows each token's lanes per row).
    Rule 3 ("mma") has no J (see expand_mma_tiles); where it runs as "rank", rule 2's."""
    def blocks(j: int) -> int:
        return T * expand_tiles(Bs, r_max, j)[1]
    if tile_rule in (1, 2, 3):
        outs = (1, EXPAND_OUTS, EXPAND_OUTS_MAX) if _expand_layout(Bs, r_max)[0] \
            else (1, EXPAND_OUTS)
        j = next((j for j in outs if blocks(j) <= EXPAND_MAX_BLOCKS), outs[-1])
    else:
        j = 1 if (blocks(EXPAND_OUTS) < EXPAND_SMALL_GRID
                  and expand_tiles(Bs, r_max, 1)[1] <= GRID_Y_MAX) else EXPAND_OUTS
    return j, blocks(j)


def check_shrink_args(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor] = None,
                      v: Optional[Tensor] = None, *, device_type: str = "cuda") -> Tensor:
    """Every check multilora::bgmv_cuda_shrink makes (bgmv_ext.cpp, bgmv_shrink_launch),
    raising ValueError naming the argument. v=None skips v (the wrapper allocates it).
    device_type is "cuda" except in the CPU tests of these checks. Returns A as
    A4 [S, L, r_max, h_in]."""
    _check_first("x", x, device_type)
    dev = x.device
    if x.dim() != 2:
        _fail("x", "[T, h_in]", tuple(x.shape))
    T, h_in = x.shape
    if T > INT_MAX:
        _fail("x", f"at most {INT_MAX} tokens", T)
    if h_in < H_IN_MULTIPLE or h_in % H_IN_MULTIPLE or h_in > INT_MAX:
        _fail("x", f"h_in a positive multiple of {H_IN_MULTIPLE} (16-byte vector loads of x and "
              "A)", f"h_in = {h_in}")
    if x.stride(1) != 1:
        _fail("x", "unit stride along h_in", f"strides {tuple(x.stride())}")
    _check_aligned16("x", x)

    _check_tensor("A", A, dev)
    if A.dtype != x.dtype:
        _fail("A", f"dtype {x.dtype} (same as x)", A.dtype)
    if A.dim() not in (3, 4):
        _fail("A", "[L, r_max, h_in] or [S, L, r_max, h_in]", tuple(A.shape))
    A4 = A.unsqueeze(0) if A.dim() == 3 else A                     # [S, L, r_max, h_in]
    S, L, r_max, a_h_in = A4.shape
    if a_h_in != h_in:
        _fail("A", f"last dim h_in = {h_in} (as x)", tuple(A.shape))
    if not (1 <= S <= MAX_SLICES and 1 <= L <= INT_MAX):
        _fail("A", f"1 <= S <= {MAX_SLICES} slices and L >= 1 adapters", tuple(A.shape))
    if not 1 <= r_max <= MAX_RANK:
        _fail("A", f"r_max in [1, {MAX_RANK}]", tuple(A.shape))
    if A4.stride(3) != 1:
        _fail("A", "unit stride along h_in", f"strides {tuple(A.stride())}")
    _check_aligned16("A", A4)

    _check_index("idx", idx, T, dev)
    if ranks is not None:
        _check_index("ranks", ranks, L, dev)
    if v is not None:
        _check_tensor("v", v, dev)
        if v.dtype != torch.float32:
            _fail("v", "dtype float32", v.dtype)
        if tuple(v.shape) != (T, S, r_max) and not (
                v.dim() == 4 and tuple(v.shape[1:]) == (T, S, r_max)
                and 1 <= v.shape[0] <= min(MAX_SPLIT, h_in // (16 // x.element_size()))):
            _fail("v", f"[T={T}, S={S}, r_max={r_max}] or [n_split <= {MAX_SPLIT}, T, S, r_max]",
                  tuple(v.shape))
        if v.stride(-1) != 1:
            _fail("v", "unit stride along r_max", f"strides {tuple(v.stride())}")
    return A4


def check_expand_args(y: Tensor, v: Tensor, B: BList, idx: Tensor, scale: Tensor,
                      ranks: Optional[Tensor] = None, *, device_type: str = "cuda"
                      ) -> list[Tensor]:
    """Every check multilora::bgmv_cuda_expand makes (bgmv_ext.cpp, bgmv_expand_launch),
    raising ValueError naming the argument. B is a tensor [L, h_out, r_max] or a sequence
    of S <= 3 of them. Returns B as a list."""
    _check_first("y", y, device_type)
    dev = y.device
    if y.dim() != 2:
        _fail("y", "[T, sum h_out_s]", tuple(y.shape))
    T = y.shape[0]
    if y.stride(1) != 1 and y.shape[1] != 1:
        _fail("y", "unit stride along h_out", f"strides {tuple(y.stride())}")
    if T > INT_MAX:
        _fail("y", f"at most {INT_MAX} tokens", T)

    Bs = [B] if isinstance(B, Tensor) else list(B)
    S = len(Bs)
    if not 1 <= S <= MAX_SLICES:
        _fail("B", f"1 to {MAX_SLICES} output slices", S)
    _check_tensor("v", v, dev)
    if v.dtype != torch.float32:
        _fail("v", "dtype float32", v.dtype)
    v4 = v.unsqueeze(0) if v.dim() == 3 else v       # [n_split, T, S, r_max] (split-K partials)
    if v4.dim() != 4 or not 1 <= v4.shape[0] <= MAX_SPLIT or v4.shape[1] != T \
            or v4.shape[2] != S:
        _fail("v", f"[T={T}, S={S}, r_max] or [n_split <= {MAX_SPLIT}, T, S, r_max]",
              tuple(v.shape))
    if v4.stride(3) != 1:
        _fail("v", "unit stride along r_max", f"strides {tuple(v.stride())}")
    r_max = v4.shape[3]
    if not 1 <= r_max <= MAX_RANK:
        _fail("v", f"r_max in [1, {MAX_RANK}]", tuple(v.shape))

    names = ["B"] if isinstance(B, Tensor) else [f"B[{s}]" for s in range(S)]
    for name, b in zip(names, Bs):
        _check_tensor(name, b, dev)
    L = Bs[0].shape[0] if Bs[0].dim() == 3 else 0
    rank_major = Bs[0].dim() == 3 and b_rank_major(Bs, r_max)
    h_out_total = 0
    for name, b in zip(names, Bs):
        if b.dtype != y.dtype:
            _fail(name, f"dtype {y.dtype} (same as y)", b.dtype)
        if b.dim() != 3 or b.shape[0] != L or L < 1 or b.shape[2] != r_max \
                or not 1 <= b.shape[1] <= INT_MAX:
            _fail(name, f"[L={L}, h_out >= 1, r_max={r_max}]", tuple(b.shape))
        if rank_major and not b_rank_major([b], r_max):
            _fail(name, "unit stride along h_out (rank-major, as B[0])",
                  f"strides {tuple(b.stride())}")
        if not rank_major and not _row_layout(b, r_max):
            _fail(name, "unit stride along r_max (or along h_out: rank-major)",
                  f"strides {tuple(b.stride())}")
        h_out_total += b.shape[1]
    if L > INT_MAX:
        _fail("B", f"at most {INT_MAX} adapters", L)
    if y.shape[1] != h_out_total or h_out_total > INT_MAX:
        _fail("y", f"[T={T}, sum h_out_s={h_out_total}]", tuple(y.shape))
    _check_index("idx", idx, T, dev)
    if ranks is not None:
        _check_index("ranks", ranks, L, dev)
    _check_tensor("scale", scale, dev)
    if scale.dtype != torch.float32 or scale.dim() != 1 or scale.shape[0] != L \
            or (L > 1 and scale.stride(0) != 1):
        _fail("scale", f"a contiguous float32 [L={L}]",
              f"{scale.dtype} sizes {tuple(scale.shape)} strides {tuple(scale.stride())}")
    tile, tiles = expand_rm_tiles(Bs, r_max) if rank_major else expand_tiles(Bs, r_max)
    if tiles > GRID_Y_MAX:
        _fail("B", f"at most {GRID_Y_MAX} output tiles of {tile} columns (sum_s ceil(h_out_s / "
              f"{tile}))", tiles)
    return Bs


# ---------------------------------------------------------------------------------------
# Host wrappers: check in Python, then call the op (a bad input never reaches C++)
# ---------------------------------------------------------------------------------------
def _check_cuda_args(x: Tensor, A4: Tensor, Bs: Sequence[Tensor]) -> None:
    """The device-independent limits first, so that a call with CPU tensors and a bad
    shape names the shape (check_lora_args has checked the contract)."""
    h_in = x.shape[1]
    if h_in % H_IN_MULTIPLE != 0:
        raise ValueError(f"x: bgmv_cuda needs h_in a multiple of {H_IN_MULTIPLE} (16-byte vector "
                         f"loads of x and A), got h_in = {h_in}")
    if len(Bs) > MAX_SLICES:
        raise ValueError(f"B: bgmv_cuda takes at most {MAX_SLICES} output slices, got {len(Bs)}")
    if x.device.type != "cuda":
        raise ValueError(f"x: bgmv_cuda runs on CUDA tensors only, got device {x.device}")


def pick_split_k(T: int, S: int, h_in: int, r_max: int, elem_size: int = 2,
                 num_sms: int = DEFAULT_NUM_SMS) -> int:
    """Split-K factor of the CUDA shrink from the shapes alone (a CUDA graph captures it):
    enough K chunks for about SPLIT_BLOCKS_PER_SM blocks per SM over the T * S *
    ceil(r_max / 4) blocks of the plain grid, each chunk at least one 16-byte vector per
    thread; 1 when the plain grid already fills the GPU. r_max sizes the grid because the
    adapters' ranks are device data (tiles past a token's rank exit at once)."""
    blocks = T * S * -(-r_max // SHRINK_ROWS)
    most = max(1, min(MAX_SPLIT, h_in // (SHRINK_THREADS * (16 // elem_size))))
    want = -(-SPLIT_BLOCKS_PER_SM * num_sms // max(1, blocks))
    return max(1, min(most, want))


def _resolve_split(split_k: Optional[int], x: Tensor, A4: Tensor) -> int:
    if split_k is not None and (not isinstance(split_k, int) or isinstance(split_k, bool)
                                or not 0 <= split_k <= MAX_SPLIT):
        _fail("split_k", f"None, 0 (pick by shape) or an int in [1, {MAX_SPLIT}]", split_k)
    h_vecs = x.shape[1] // (16 // x.element_size())
    if split_k:
        return min(split_k, h_vecs)
    return pick_split_k(x.shape[0], A4.shape[0], x.shape[1], A4.shape[2], x.element_size(),
                        _num_sms(x.device))


def _num_sms(device: torch.device) -> int:
    return (torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda" else DEFAULT_NUM_SMS)


def check_chunks(chunks: Optional[Tensor], idx: Tensor) -> None:
    """chunks (rule "mma"): None, or int32 [n_chunks, CHUNK_STRIDE] contiguous on idx's
    device (CHUNK_TOKENS tokens, then their adapter); with MULTILORA_CHECK=1 also its values
    (a host sync): every token with idx != -1 in exactly one row, the row's tokens sharing
    one idx value, which is the row's last entry, -1 padding after the tokens."""
    if chunks is None:
        return
    if not isinstance(chunks, Tensor) or chunks.dtype != torch.int32 or chunks.dim() != 2 \
            or chunks.shape[1] != CHUNK_STRIDE or not chunks.is_contiguous() \
            or chunks.device != idx.device:
        _fail("chunks", f"a contiguous int32 [n_chunks, {CHUNK_STRIDE}] tensor (tokens, then "
              f"their adapter) on {idx.device}",
              chunks if not isinstance(chunks, Tensor) else
              f"{chunks.dtype} {tuple(chunks.shape)} on {chunks.device}")
    if debug_checks():
        full, i = chunks.cpu().long(), idx.cpu().long()
        c, adapter = full[:, :CHUNK_TOKENS], full[:, CHUNK_TOKENS]
        live = c >= 0
        toks = c[live]
        want = torch.nonzero(i != -1).flatten()
        ok = toks.numel() == want.numel() and torch.equal(toks.sort().values, want) and \
            bool((live.int().diff(dim=1) <= 0).all()) and bool(live[:, 0].all())
        ok = ok and all(torch.equal(i[row[row >= 0]], a.expand(int((row >= 0).sum())))
                        for row, a in zip(c, adapter))
        if not ok:
            _fail("chunks", "each token with idx != -1 once, one idx value per row and that "
                  "value last, -1 padding (multilora_impl.build_chunks)", full.tolist())


def check_work(work, idx: Tensor, ranks: Optional[Tensor], chunks: Optional[Tensor] = None
               ) -> Optional[tuple[Tensor, list[int]]]:
    """work (rule "rank"'s token list, PERF_LOG v41): None, or (rows, group sizes) as
    multilora_impl.build_rank_work(idx, ranks) returns them: int32 [n <= T, 3] contiguous
    on idx's device and RANK_GROUPS ints >= 0 adding up to n; needs ranks, excludes chunks.
    With MULTILORA_CHECK=1 also its values (a host sync): equal to build_rank_work's.
    Returns work with the sizes as a list (the ops' int[])."""
    if work is None:
        return None
    ok = isinstance(work, (tuple, list)) and len(work) == 2 and isinstance(work[0], Tensor)
    rows, sizes = (work[0], tuple(work[1])) if ok else (None, ())
    if not ok or rows.dtype != torch.int32 or rows.dim() != 2 or rows.shape[1] != WORK_STRIDE \
            or not rows.is_contiguous() or rows.device != idx.device \
            or rows.shape[0] > idx.shape[0] or len(sizes) != RANK_GROUPS \
            or any(not isinstance(n, int) or n < 0 for n in sizes) or sum(sizes) != rows.shape[0]:
        _fail("work", f"(int32 [n <= T, {WORK_STRIDE}] contiguous on {idx.device}, "
              f"{RANK_GROUPS} group sizes adding up to n), as build_rank_work returns",
              f"{rows.dtype} {tuple(rows.shape)} on {rows.device}, sizes {sizes}"
              if ok else type(work).__name__)
    if ranks is None:
        _fail("work", "None when ranks is None (its rows carry each token's rank)", "a list")
    if chunks is not None:
        _fail("work", "None with chunks (rule mma)", "a list")
    if debug_checks():
        want, want_sizes = build_rank_work(idx.cpu(), ranks.cpu())     # host tensors
        if sizes != want_sizes or not torch.equal(rows.cpu(), want):
            _fail("work", "build_rank_work(idx, ranks)'s rows and sizes",
                  f"{rows.cpu().tolist()} {sizes}")
    return rows, list(sizes)


def mma_split(n_chunks: int, S: int, r_max: int, h_in: int, num_sms: int = DEFAULT_NUM_SMS) -> int:
    """K splits of rule "mma"'s chunked shrink, at most MMA_MAX_SPLIT (the expand loads that
    many partial sums at once) and h_in / 128 (each warp at least one 32-wide K step): the
    most when even that grid (n_chunks x S ceil(r_max / 16) x split) fits one wave of
    MMA_BLOCKS_PER_SM blocks per SM (small batches: more SMs at work), else the one whose
    waves are fullest, the smaller on ties (a last partial wave idles SMs: at the distinct
    point 512 blocks, 65% of one wave, ran the DRAM at 65%; PERF_LOG v19); 1 from 4 waves
    of blocks on."""
    blocks = max(1, n_chunks * S * -(-r_max // MMA_ROWS_PER_WARP))
    wave = MMA_BLOCKS_PER_SM * num_sms
    most = max(1, min(MMA_MAX_SPLIT, h_in // 128))
    if blocks * most <= wave:
        return most
    if blocks >= 4 * wave:          # the last wave's idle SMs are at most a quarter wave
        return 1
    fill = [blocks * k / (-(-blocks * k // wave) * wave) for k in range(1, most + 1)]
    return 1 + fill.index(max(fill))


def bgmv_shrink(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor] = None,
                v: Optional[Tensor] = None, *, split_k: Optional[int] = 1,
                pdl: Optional[bool] = None, chunks: Optional[Tensor] = None,
                work: Optional[tuple] = None) -> Tensor:
    """v [T, S, r_max] fp32 = x @ A[:, idx].T per token (rows past ranks[idx[t]] and rows of
    idx = -1 tokens are left as they were). A [L, r_max, h_in] or [S, L, r_max, h_in].
    split_k: 1 (default) = plain; k > 1 or 0 (pick by shape, pick_split_k) = split-K over
    h_in, returning the partial sums v [n_split, T, S, r_max] that bgmv_expand adds in a
    fixed order (deterministic). A given v fixes n_split by its shape instead.
    pdl: None = pdl_enabled(device) (safe anywhere: the kernel waits for the previous
    kernel before reading anything).
    chunks: tokens grouped by adapter (multilora_impl.build_chunks): in bf16 on sm_80+ the
    tensor-core shrink of rule "mma" (one read of A per chunk, 16 rank rows per block);
    other dtypes ignore it.
    work: rule "rank"'s token list (multilora_impl.build_rank_work(idx, ranks), make_meta's
    rank_work): in half and bf16 a grid of only the row tiles the tokens' ranks need (fp32
    ignores it); the same values.
    Raises ValueError (check_shrink_args) before building or calling anything."""
    A4 = check_shrink_args(x, A, idx, ranks, v)
    check_chunks(chunks, idx)
    work = check_work(work, idx, ranks, chunks)
    if debug_checks():      # MULTILORA_CHECK=1: index values on the host (a sync)
        check_index_values(idx, A4.shape[1], ranks, A4.shape[2])
    n_split = _resolve_split(split_k, x, A4)
    ensure_loaded()
    if v is None:
        shape = (x.shape[0], A4.shape[0], A4.shape[2])                # [T, S, r_max]
        v = torch.empty(((n_split,) + shape) if n_split > 1 else shape, dtype=torch.float32,
                        device=x.device)                              # [n_split, T, S, r_max]
    torch.ops.multilora.bgmv_cuda_shrink(x, A4, idx, ranks, v,
                                         pdl_enabled(x.device) if pdl is None else pdl,
                                         chunks, *(work or (None, None)))
    return v


def bgmv_expand(y: Tensor, v: Tensor, B: BList, idx: Tensor, scale: Tensor,
                ranks: Optional[Tensor] = None, *, pdl: bool = False,
                tiles: Optional[str] = None, chunks: Optional[Tensor] = None,
                work: Optional[tuple] = None) -> None:
    """y[:, off_s:off_s + h_out_s] += scale[idx] * v[:, s] @ B_s[idx].T, in place, for the
    S <= 3 slices of B (a tensor [L, h_out, r_max] or a sequence of them).
    pdl=True only right after bgmv_shrink, with no kernel between: the expand then reads
    idx, ranks, scale, B and y before the previous kernel has finished (the shrink writes
    none of them).
    tiles: outputs-per-lane rule, "classic", "residency" or "rank" (expand_outs),
    bitwise the same result every way, or "mma" (tensor cores, bf16; the same up to the
    order of the fp32 sum); None = $MULTILORA_EXPAND_TILES.
    chunks (rule "mma" only): tokens grouped by adapter (build_chunks): one block per
    (chunk, tile), each B tile read once per chunk.
    work (rule "rank" only): the token list of bgmv_shrink: with 16-byte B loads a grid of
    only the tiles the tokens' ranks need (the same values).
    B stored rank-major (unit stride along h_out, multilora_impl.to_rank_major; every slice
    alike) runs its own expand under every rule (_bgmv_expand_rm_kernel, PERF_LOG v45-v47;
    chunks ignored, the token list used).
    Raises ValueError (check_expand_args, expand_tile_rule) before building or calling
    anything."""
    Bs = check_expand_args(y, v, B, idx, scale, ranks)
    tile_rule = expand_tile_rule(tiles)
    if chunks is not None and EXPAND_TILE_RULES[tile_rule] not in MMA_RULES:
        _fail("chunks", f"None unless tiles is one of {MMA_RULES}", "a tensor")
    if work is not None and EXPAND_TILE_RULES[tile_rule] != "rank":
        _fail("work", "None unless tiles is \"rank\"", "a list")
    check_chunks(chunks, idx)
    work = check_work(work, idx, ranks, chunks)
    if debug_checks():      # MULTILORA_CHECK=1: index values on the host (a sync)
        check_index_values(idx, Bs[0].shape[0], ranks, v.shape[-1])
    ensure_loaded()
    torch.ops.multilora.bgmv_cuda_expand(y, v, Bs, idx, scale, ranks, pdl, tile_rule, chunks,
                                         *(work or (None, None)))


_COUNTERS: dict = {}


def _fused_counters(device: torch.device, T: int) -> Tensor:
    """The fused kernel's int32 counters [>= 2 T], zeroed once per device and left zero by
    every call (its last expand block of each token resets them). Grown (a new zeroed
    buffer) only when T exceeds its size: a shape-only host decision, taken before a CUDA
    graph captures the call when the first call runs eagerly. Calls sharing it must be
    stream-ordered (not concurrent on two streams)."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < 2 * T:
        buf = torch.zeros(max(2 * T, 2 * 256), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


MMA_AUTO_BYTES = 48 * 2**20   # per-token weight traffic from which the default takes "mma"
MMA_AUTO_SHARE = 1.5          # ... when the chunks hold at least this many tokens on average


def mma_chunks_pay(meta, x: Tensor, A: Tensor, B: BList) -> bool:
    """Whether bgmv_lora's default (no tiles=, MULTILORA_EXPAND_TILES unset) runs rule "mma"
    with meta's chunks instead of rule "rank": bf16, meta built by make_meta (its chunks),
    the tokens sharing adapters (at least MMA_AUTO_SHARE per chunk on average) and the
    weights rule "rank" would pull through L2 token by token, sum over tokens of the
    token's rank x (S h_in + sum h_out) elements, at least MMA_AUTO_BYTES. Each token's
    own rank comes from meta.rank_sum (make_meta with ranks=); without it every token
    counts at r_max. Measured on the H200 after PERF_LOG v29
    (plots/session9/call7_bgmv_rule_h200_9fd6fad.json, 22 points): "mma" with chunks was
    faster at every point from 67 MB of that traffic (u7 bs 256 11.75 against 13.48 us;
    padded ranks bs 64; the distinct point 41.9 against 60.9; Llama-3-8B's q/k/v,
    gate/up and down at bs 256, gate/up at bs 64 16.6 against 18.3), "rank" at every point
    up to 38 MB (u7 bs 1-128, Punica's shape, q/k/v and down at bs 64). After v36 (call 8
    of session 10) "rank" also won mixed ranks {8..64} at bs 64 (31 MB counted by each
    token's rank, 67 MB at r_max: 12.09 against 13.27 us), which counting each token's own
    rank (PERF_LOG v37) sends to "rank". Host ints only (shapes, the chunk count,
    rank_sum): safe under CUDA-graph capture."""
    chunks = getattr(meta, "chunks", None)
    if chunks is None or x.dtype != torch.bfloat16 or chunks.shape[0] == 0:
        return False
    if x.shape[0] < MMA_AUTO_SHARE * chunks.shape[0]:
        return False
    S = A.shape[0] if A.dim() == 4 else 1
    h_out = sum(b.shape[1] for b in ([B] if isinstance(B, Tensor) else B))
    rank_sum = getattr(meta, "rank_sum", None)
    if rank_sum is None:
        rank_sum = x.shape[0] * A.shape[-2]          # every token at r_max
    nbytes = rank_sum * (S * A.shape[-1] + h_out) * x.element_size()
    return nbytes >= MMA_AUTO_BYTES


def rank_work_pays(work, T: int, r_max: int) -> bool:
    """Whether rule "rank"'s token list (make_meta's rank_work) leaves blocks out of the
    grid x = T: some token has no LoRA (idx -1 or rank 0: not listed) or sits in a group of
    smaller ranks than r_max's. Where every token has r_max's group the grids hold the same
    blocks, and the list's measured slower (PERF_LOG v43: all 64 with ranks given, pair
    17.41 against 16.99 us). Host ints only: safe under CUDA-graph capture."""
    if work is None:
        return False
    rows = list(work[1])
    full = max(1, RANK_GROUPS - 1 - (max(r_max, 1) - 1).bit_length())   # r_max's group
    return sum(rows) < T or any(rows[full + 1:])


def bgmv_lora(y: Tensor, x: Tensor, A: Tensor, B: BList, idx: Tensor, scale: Tensor,
              ranks: Optional[Tensor] = None, meta=None, *, variant: str = "default",
              split_k: Optional[int] = None, pdl: Optional[bool] = None,
              tiles: Optional[str] = None) -> None:
    """Registry entry `bgmv_cuda`: y += LoRA(x) for all slices. meta is not needed (BGMV
    reads idx directly); under tile rule "rank" with ranks its `rank_work`
    (multilora_impl.build_rank_work, built by make_meta with ranks=) sizes both grids to the
    blocks the tokens' ranks need (half and bf16, PERF_LOG v41: the same values); under
    tile rule "mma" its `chunks` (multilora_impl.build_chunks,
    built by make_meta), when present, group the tokens by adapter: both kernels then run
    one block per chunk of up to 8 tokens of one adapter on the tensor cores (bf16; the
    shrink split along h_in by mma_split), each adapter's weights read once per chunk.
    With tiles=None and MULTILORA_EXPAND_TILES unset, that path is taken where it was
    measured faster (mma_chunks_pay: bf16, shared adapters, >= 48 MB of per-token weight
    traffic), else DEFAULT_TILES.

    variant (the registry uses "default"). Measured on the H200 (bf16, h 4096, r 16;
    plots/bgmv_variants_h200.json, `python bgmv_cuda/run_bgmv_cuda.py --variants`),
    "split" and "fused" were slower than "default" at every point (bs 1: 7.5 and 9.1 us
    vs 6.8; bs 64: 12.1 and 18.5 vs 9.6): they stay opt-in, as the starting point of the
    next optimisation round (notes/PERF_LOG.md), not as a recommendation:
      "default"  plain shrink launch + expand launch (split_k ignored).
      "split"    split-K shrink (split_k: None/0 = pick_split_k by shape, or k) writing
                 n_split partial sums, + expand adding them in a fixed order: more blocks
                 for small T (T = 1: 4 -> ~16-64 shrink blocks at r 16), deterministic.
      "fused"    ONE launch: the split-K shrink blocks then the expand blocks of one grid;
                 each expand block issues its B loads, waits on a per-token counter for
                 the token's shrink blocks, then adds the partials. Saves one launch and
                 overlaps the B reads with the shrink. Deterministic. Uses a per-device
                 zeroed counter buffer (_fused_counters): calls must be stream-ordered.
    tiles: the expand's outputs-per-lane rule for "default" and "split" (bgmv_expand;
    None = $MULTILORA_EXPAND_TILES; "mma" with meta's chunks groups both kernels' tokens
    by adapter); "fused" keeps its own (J = 4) and ignores it.
    B stored rank-major (multilora_impl.to_rank_major): the default takes rule "rank" (with
    meta's token list) and the rank-major expand; "fused" refuses it (ValueError)."""
    if variant not in VARIANTS:
        _fail("variant", f"one of {VARIANTS}", repr(variant))
    A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks)
    rank_major = b_rank_major(Bs, A4.shape[2])
    if rank_major and variant == "fused":
        _fail("B", "unit stride along r_max for variant \"fused\" (it reads B by rows)",
              f"rank-major strides {tuple(Bs[0].stride())}")
    if tiles is None and not os.environ.get(TILES_ENV) and not rank_major \
            and mma_chunks_pay(meta, x, A, B):
        tiles = "mma"                  # the default's choice: see mma_chunks_pay
    if tiles is None and rank_major:
        tiles = "rank"                 # rank-major B: its one expand, meta's token list
    tiles = EXPAND_TILE_RULES[expand_tile_rule(tiles)]   # checked before building
    _check_cuda_args(x, A4, Bs)
    pdl = pdl_enabled(x.device) if pdl is None else pdl   # PDL: see the module docstring
    # rule "mma"'s chunks serve bf16 only (other dtypes run as "rank": the plain kernels)
    chunks = getattr(meta, "chunks", None) if tiles in MMA_RULES and x.dtype == torch.bfloat16 \
        else None
    if chunks is not None and variant in ("default", "split"):   # tokens grouped by adapter
        n_split = (mma_split(chunks.shape[0], A4.shape[0], A4.shape[2], x.shape[1],
                             _num_sms(x.device))
                   if variant == "default" or not split_k else _resolve_split(split_k, x, A4))
        v = bgmv_shrink(x, A4, idx, ranks, split_k=n_split, pdl=pdl, chunks=chunks)
        bgmv_expand(y, v, Bs, idx, scale, ranks, pdl=pdl, tiles=tiles, chunks=chunks)
        return
    # rule "rank" with the ranks given: meta's token list, grids of only the blocks that work
    work = getattr(meta, "rank_work", None) if tiles == "rank" and ranks is not None else None
    work = work if rank_work_pays(work, x.shape[0], A4.shape[2]) else None
    if variant == "default":
        v = bgmv_shrink(x, A4, idx, ranks, pdl=pdl, work=work)   # [T, S, r_max] fp32
        bgmv_expand(y, v, Bs, idx, scale, ranks, pdl=pdl, tiles=tiles, work=work)
        return
    n_split = _resolve_split(split_k, x, A4)
    if variant == "split":
        v = bgmv_shrink(x, A4, idx, ranks, split_k=n_split, pdl=pdl, work=work)
        bgmv_expand(y, v, Bs, idx, scale, ranks, pdl=pdl, tiles=tiles,   # v [n_split, T, S, r]
                    work=work)
        return
    check_shrink_args(x, A4, idx, ranks)
    v = torch.empty((n_split, x.shape[0], A4.shape[0], A4.shape[2]), dtype=torch.float32,
                    device=x.device)                               # [n_split, T, S, r_max]
    Bs = check_expand_args(y, v, Bs, idx, scale, ranks)
    ensure_loaded()
    torch.ops.multilora.bgmv_cuda_fused(y, x, A4, Bs, idx, scale, ranks, v,
                                        _fused_counters(x.device, x.shape[0]))


def lora_shrink(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor] = None,
                meta=None) -> Tensor:
    """Registry half (engine lora_overlap="shrink"): v [T, S, r_max] fp32, the shrink of
    bgmv_lora, for a caller that runs it beside the base GEMM (it only reads x). A plain
    launch: on a side stream its predecessor is another stream's work, nothing to overlap."""
    return bgmv_shrink(x, A, idx, ranks, pdl=False)


def lora_expand(y: Tensor, v: Tensor, B: BList, idx: Tensor, scale: Tensor,
                ranks: Optional[Tensor] = None, meta=None, *, tiles: Optional[str] = None
                ) -> None:
    """Registry half: y += the expand of v. A plain launch (no PDL): the kernel just before
    it (the base GEMM) writes y. tiles as bgmv_expand (None = $MULTILORA_EXPAND_TILES)."""
    bgmv_expand(y, v, B, idx, scale, ranks, tiles=tiles)


# ---------------------------------------------------------------------------------------
# CLI: build and validate a few shapes against the float64 reference
# ---------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    from multilora_impl import DTYPES, TOLERANCE, check_mode, make_lora_inputs, make_workload

    try:
        module = load_and_register(verbose=args.verbose or None)
    except RuntimeError as e:       # no GPU, or the build failed: the message says which
        print(e, file=sys.stderr)
        return 2
    print(f"bgmv_cuda: loaded {module.__file__} on {torch.cuda.get_device_name()}")
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

