"""BGMV in Triton: batched gather matrix-vector LoRA kernels, one adapter per token (Punica).

Semantics (float64 reference: multilora_impl.lora_reference). For every token t with
adapter i = idx[t] >= 0, r = ranks[i] (r_max when ranks is None), every slice s:

    v[t, s, :r]                   = x[t] @ A[s, i, :r].T                     # shrink, fp32
    y[t, off_s:off_s + h_out_s]  += scale[i] * v[t, s, :r] @ B_s[i, :, :r].T  # expand

Rows with idx[t] == -1 are never written in y (their v row is set to 0).

Shapes and dtypes (layouts of torch.nn.Linear / PEFT):
    x      [T, h_in]               fp16 / bf16 / fp32
    A      [L, r_max, h_in]  or [S, L, r_max, h_in] (S output slices share x: q/k/v)
    B      [L, h_out, r_max] or a tuple of S <= 3 tensors B_s [L, h_out_s, r_max]
    y      [T, sum_s h_out_s]      same dtype as x, updated in place; slice s owns columns
                                   [off_s, off_s + h_out_s), off_s = h_out_0 + ... + h_out_{s-1}
    idx    [T]                     int32 / int64; -1 = no LoRA for that token
    scale  [L]                     fp32, applied in the expand
    ranks  [L] int32/int64 or None adapter i uses rows [:r] of A and columns [:r] of B;
                                   the padded rows / columns are never loaded
    v      [T, S, r_max]           fp32, the shrink result, kept in fp32 until the expand
    r_max <= 128 (MAX_RANK); any h_in, h_out (masks everywhere); arbitrary strides.

Bytes that must move (what GB/s is computed from), with D the distinct adapters in idx,
e = element size, r their rank:
    shrink:  D * S * r * h_in * e (A)  +  T * h_in * e (x)  +  T * S * r_max * 4 (v written)
    expand:  D * sum_s h_out_s * r * e (B)  +  2 * T * sum_s h_out_s * e (y read + written)
             +  T * S * r_max * 4 (v read)

Kernels
    _bgmv_shrink_kernel  one program per (token, slice, K-chunk). The K-chunk is the whole
                         h_in (plain) or 1/SPLIT_K of it (split-K: partial sums into a
                         [SPLIT_K, T, S, r_max] fp32 workspace, added in order by the expand
                         in bgmv_lora or by torch in bgmv_shrink, deterministic; or, with
                         atomic=True, fp32 atomic adds into a zeroed v, whose last bits then
                         vary run to run).
    _bgmv_expand_kernel  one program per (token, output tile); the tiles of all S slices
                         are numbered one after the other, and each tile lies in one slice.

Both are torch custom ops (multilora::bgmv_shrink, multilora::bgmv_expand; opaque to
torch.compile, safe in CUDA graphs: no host sync, no data-dependent host control flow,
block sizes and split factor depend on shapes only). On a CPU they run in the Triton
interpreter (TRITON_INTERPRET=1 set before triton is imported).

Programmatic Dependent Launch (PDL, Hopper sm_90+): the kernels are launched with
launch_pdl=True and call griddepcontrol.wait / launch_dependents (tl.extra.cuda.gdc_wait /
gdc_launch_dependents, triton >= 3.5), so a kernel may start before the previous one ends.
That hides most of the launch gap between the two tiny decode kernels in a CUDA graph.
The shrink waits before touching memory, so it may be PDL-launched after anything. The
expand is PDL-launched only right after this call's shrink (bgmv_lora, or bgmv_expand with
after_shrink=True): it loads idx / ranks / scale / its B tile before waiting for v, which
overlaps the shrink's tail (the ordering argument is in _bgmv_expand_kernel). The one
kernel that must not run between the two is one that writes scale or B: torch.compile
could in principle place one there, a decode step has none. The expand also reads y
before its wait, so no kernel that writes y may run between the two either.
PDL is opt-in here: MULTILORA_TRITON_PDL=1 turns it on (read once at import into
PDL_ENABLED, which a benchmark or test may set: it is read at each launch). On the H200
(torch 2.11, triton 3.6) the PDL tests pass, eager and captured in a CUDA graph, bitwise
equal to plain launches (tests/test_bgmv_triton.py::test_gpu_pdl_on_off); it stays off by
default until the end-to-end engine tests have run with it, and because the gain measured
so far is small (bs 1: 8.3 -> 7.9 us). The CUDA extension's PDL (bgmv_cuda) is on by
default. pdl_enabled(device) says whether launches on a
device use PDL: never on the CPU, under TRITON_INTERPRET, below sm_90 or with triton < 3.5.
The arithmetic is the same either way: y is bitwise identical with PDL on or off.

Index range: idx is not read on the host (that would sync); a token whose idx is outside
[-1, L) is treated like -1 by the kernels (no out-of-bounds access). ranks[i] is clamped
to [0, r_max] likewise. With MULTILORA_CHECK=1 (multilora_impl's debug flag) every
wrapper below checks those values on the host and raises ValueError instead.

Checked by tests/test_bgmv_triton.py (interpreter at awkward sizes with NaN rank pads;
GPU tier at Llama-3-8B shapes, torch.compile, CUDA-graph replay); validated and timed at
real sizes by bgmv_triton/run_bgmv.py (plain vs split-K shrink, expand, whole call).
"""
import functools
import os
import re
import sys
from typing import Optional, Sequence, Union

import torch

if __name__ == "__main__" and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before any @triton.jit below

import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.jit import JITFunction

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from multilora_impl import (MAX_RANK, TOLERANCE, check_index_values, check_lora_args,  # noqa: E402
                            debug_checks)

# ---------------------------------------------------------------------------------------
# Constants (tuned for the H200: decode is memory-bound, so every choice aims at many
# programs each streaming 16-byte vectors of A / B; to be confirmed with run_bgmv.py)
# ---------------------------------------------------------------------------------------
MAX_SLICES = 3           # q/k/v: the expand kernel takes up to 3 explicit B pointers
DEFAULT_NUM_SMS = 132    # H200; used on the CPU (interpreter) where there is no device
# Elements of A (shrink) or B (expand) loaded per program per iteration: 4096 over
# 4 warps = 32 per thread = four 16-byte fp16 vectors in flight, with a modest register
# footprint (the fp32 accumulator tile has the same size).
TILE_ELEMS = 4096
NUM_WARPS = 4
# Shrink K block: TILE_ELEMS // BLOCK_R, kept in [32, 512] so a row segment of A is at
# least 64 bytes (two 32-byte sectors) and the loop is not needlessly long for tiny ranks.
MIN_BLOCK_K, MAX_BLOCK_K = 32, 512
# Split-K: only when the plain grid T * S leaves SMs idle and h_in is long enough to be
# worth cutting; aim at ~2 programs per SM, each streaming at least SPLIT_MIN_K columns.
SPLIT_MIN_H_IN = 1024
SPLIT_PROGRAMS_PER_SM = 2
SPLIT_MIN_K = 128
# Expand N block: TILE_ELEMS // BLOCK_R kept in [32, 256], then halved (not below 32) while
# the grid T * tiles has fewer than ~2 programs per SM (decode with small T).
MIN_BLOCK_N, MAX_BLOCK_N = 32, 256
EXPAND_PROGRAMS_PER_SM = 2
# PDL switch (module docstring): off unless MULTILORA_TRITON_PDL=1. Read at each launch, so
# a benchmark can time both by setting it (a captured CUDA graph keeps what it captured).
PDL_ENABLED = os.environ.get("MULTILORA_TRITON_PDL", "0") == "1"
# launch_pdl and tl.extra.cuda.gdc_* came with triton PR #6394 (April 2025, first released
# in 3.4); their `_builder` / `_semantic` keyword mismatch (issue #7377) was fixed by #7379,
# listed in the 3.5.0 notes. So PDL only from 3.5 on (the GPU box runs 3.6).
_TRITON_HAS_PDL = tuple(int(n) for n in re.findall(r"\d+", triton.__version__)[:2]) >= (3, 5)


# ---------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------
@triton.jit
def _adapter_rank(idx_ptr, t, stride_idx, ranks_ptr, stride_rank, L, r_max,
                  HAS_RANKS: tl.constexpr):
    """Token t's adapter i and its rank. idx outside [0, L) (-1 included) gives rank 0;
    ranks[i] is only read for a valid i (masked scalar load) and clamped to r_max."""
    i = tl.load(idx_ptr + t * stride_idx).to(tl.int64)
    valid = (i >= 0) & (i < L)
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + i * stride_rank, mask=valid, other=0).to(tl.int32)
        rank = tl.minimum(rank, r_max)
    else:
        rank = tl.where(valid, r_max, 0)
    return i, rank


@triton.jit
def _bgmv_shrink_kernel(
    # pointers: inputs x [T, h_in], A [S, L, r_max, h_in], idx [T], ranks [L] (or a dummy
    # when HAS_RANKS is False); output out [SPLIT_K, T, S, r_max] fp32 (v itself when
    # SPLIT_K == 1 or ATOMIC)
    x_ptr, A_ptr, idx_ptr, ranks_ptr, out_ptr,
    # sizes: adapters, inner dim, padded rank, columns per K-chunk (a multiple of BLOCK_K)
    L, h_in, r_max, K_PER_SPLIT,
    # strides, in elements
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_idx, stride_rank,
    stride_oc, stride_ot, stride_os, stride_or,
    # constexprs: BLOCK_R >= r_max (power of two), BLOCK_K columns per iteration; USE_PDL:
    # launched with launch_pdl=True
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_RANKS: tl.constexpr, ATOMIC: tl.constexpr, USE_PDL: tl.constexpr,
):
    if USE_PDL:
        # Wait for the previous kernel (of unknown origin: it may write x, idx, ranks, A or
        # the memory of v) before any load or store, in every program, then let the expand
        # launch: its programs load their B tiles while this grid finishes.
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # Program id -> (token, slice, K-chunk). T is on axis 0, whose limit is 2**31 - 1.
    pid_t = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1)
    pid_c = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    out_ptrs = out_ptr + pid_c * stride_oc + pid_t * stride_ot + pid_s * stride_os \
        + offs_r * stride_or

    i, rank = _adapter_rank(idx_ptr, pid_t, stride_idx, ranks_ptr, stride_rank, L, r_max,
                            HAS_RANKS)

    # Early exit for -1 rows and rank-0 adapters: v is defined (0) but nothing is streamed.
    # With ATOMIC, v was zeroed by the host, so there is nothing to write.
    if rank <= 0:
        if not ATOMIC:
            tl.store(out_ptrs, tl.zeros([BLOCK_R], dtype=tl.float32), mask=offs_r < r_max)
        return

    # K loop over this program's chunk [k_start, k_end). Rows r >= rank of A are masked
    # out, so the padded rank rows are never loaded (they may hold anything, even NaN).
    # The accumulator is a full [BLOCK_R, BLOCK_K] fp32 tile reduced once after the loop
    # (no cross-thread reduction inside the loop).
    r_mask = offs_r < rank
    k_start = pid_c * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, h_in)
    a_row_ptrs = A_ptr + pid_s * stride_as + i * stride_al + offs_r[:, None] * stride_ar
    x_row_ptr = x_ptr + pid_t * stride_xt
    acc = tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        # Upcast right after the load: all arithmetic in fp32.
        xk = tl.load(x_row_ptr + offs_k * stride_xk, mask=k_mask, other=0.0).to(tl.float32)
        a = tl.load(a_row_ptrs + offs_k[None, :] * stride_ak,
                    mask=r_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += a * xk[None, :]
    v = tl.sum(acc, axis=1)                                    # [BLOCK_R], 0 for r >= rank

    # Store: the whole padded row (zeros past rank) so v is fully defined; atomics only
    # need the used part (the rest stays at the host's zero).
    if ATOMIC:
        tl.atomic_add(out_ptrs, v, mask=r_mask)
    else:
        tl.store(out_ptrs, v, mask=offs_r < r_max)


@triton.jit
def _bgmv_expand_kernel(
    # pointers: y [T, h_out] (in place), v [n_split, T, S, r_max] fp32 (the split-K shrink's
    # partial sums, added here in a fixed order: deterministic), idx [T], scale [L] fp32,
    # ranks [L] (dummy when HAS_RANKS is False), B_s [L, h_out_s, r_max] for s < NUM_SLICES
    # (unused ones are dummies)
    y_ptr, v_ptr, idx_ptr, scale_ptr, ranks_ptr, B0_ptr, B1_ptr, B2_ptr,
    # sizes: adapters, padded rank, output columns of each slice (0 for unused slices)
    L, r_max, H0, H1, H2, n_split,
    # strides, in elements
    stride_yt, stride_yn,
    stride_vc, stride_vt, stride_vs, stride_vr,
    stride_idx, stride_scale, stride_rank,
    stride_b0l, stride_b0n, stride_b0r,
    stride_b1l, stride_b1n, stride_b1r,
    stride_b2l, stride_b2n, stride_b2r,
    # constexprs: BLOCK_N output columns per program, BLOCK_R >= r_max (power of two);
    # USE_PDL: launched with launch_pdl=True right after the shrink of the same call
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    NUM_SLICES: tl.constexpr, HAS_RANKS: tl.constexpr, USE_PDL: tl.constexpr,
):
    # PDL ordering. With USE_PDL this grid may start while the one before it (the shrink,
    # or the split-K sum after it) still runs; gdc_wait() returns once that grid has
    # completed and its writes are visible. Before the wait it reads only idx, ranks, scale,
    # B and y, which the shrink does not write. A kernel before the shrink may
    # have written them, but it has completed: the shrink triggers this launch only after
    # its own gdc_wait, which covers all earlier work. v (the shrink's output) is read and y
    # written only after the wait. Every
    # program waits, also those that store nothing, so this grid's completion implies the
    # shrink's: the next kernel can rely on plain stream order (e.g. one reusing v's
    # memory, or the next atomic split-K call's v.zero_(), a plain launch that starts only
    # after this grid has ended).
    # Program id -> (token, tile). Tiles are numbered slice after slice, so no tile
    # straddles two slices and each slice's last tile is masked on its own h_out_s.
    pid_t = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)

    # -1 rows (and out-of-range idx, and rank 0) exit before any store: y rows without
    # LoRA are never written.
    i, rank = _adapter_rank(idx_ptr, pid_t, stride_idx, ranks_ptr, stride_rank, L, r_max,
                            HAS_RANKS)
    if rank <= 0:
        if USE_PDL:
            tl.extra.cuda.gdc_wait()        # see the ordering note above
        return

    # Which slice owns this tile: s, its first tile, its column offset in y, its B. Scalar
    # selects (no pointer table in memory: runs in the interpreter, no stale pointers).
    s = tile * 0
    tile0 = tile * 0
    col0 = tile * 0
    h_out = H0 + tile * 0
    b_ptr = B0_ptr
    stride_bl, stride_bn, stride_br = stride_b0l, stride_b0n, stride_b0r
    if NUM_SLICES > 1:
        end0 = tl.cdiv(H0, BLOCK_N)
        in1 = tile >= end0
        s = tl.where(in1, 1, s)
        tile0 = tl.where(in1, end0, tile0)
        col0 = tl.where(in1, H0, col0)
        h_out = tl.where(in1, H1, h_out)
        b_ptr = tl.where(in1, B1_ptr, b_ptr)
        stride_bl = tl.where(in1, stride_b1l, stride_bl)
        stride_bn = tl.where(in1, stride_b1n, stride_bn)
        stride_br = tl.where(in1, stride_b1r, stride_br)
        if NUM_SLICES > 2:
            end1 = end0 + tl.cdiv(H1, BLOCK_N)
            in2 = tile >= end1
            s = tl.where(in2, 2, s)
            tile0 = tl.where(in2, end1, tile0)
            col0 = tl.where(in2, H0 + H1, col0)
            h_out = tl.where(in2, H2, h_out)
            b_ptr = tl.where(in2, B2_ptr, b_ptr)
            stride_bl = tl.where(in2, stride_b2l, stride_bl)
            stride_bn = tl.where(in2, stride_b2n, stride_bn)
            stride_br = tl.where(in2, stride_b2r, stride_br)

    # One [BLOCK_N, BLOCK_R] tile of B_s[i] (rank fits one block: no R loop). Columns
    # r >= rank are masked: padded rank columns are never loaded; v is fp32 already.
    offs_n = (tile - tile0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_mask = offs_n < h_out
    r_mask = offs_r < rank
    b_ptrs = b_ptr + i * stride_bl + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br
    if HAS_RANKS:
        # r is the contiguous dim of B, and a mask with a loaded bound r < rank would
        # make every load a 2-byte scalar one. Load [0, rank8) (rank8 = rank rounded down
        # to 8, provably, so 16-byte vectors) and the tail [rank8, rank) apart; the tail
        # load is fully masked off (no memory traffic) for the usual ranks 8, 16, 32, ...
        rank8 = tl.multiple_of((rank // 8) * 8, 8)
        main = offs_r < rank8
        tail = (offs_r >= rank8) & r_mask
        b = tl.load(b_ptrs, mask=n_mask[:, None] & main[None, :], other=0.0).to(tl.float32) \
            + tl.load(b_ptrs, mask=n_mask[:, None] & tail[None, :], other=0.0).to(tl.float32)
    else:
        b = tl.load(b_ptrs, mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + i * stride_scale)
    # y is read here too, with B: no kernel between the shrink and this one writes it (the
    # read-modify-write is in fp32, converted once at the store, masked on h_out_s).
    y_ptrs = y_ptr + pid_t * stride_yt + (col0 + offs_n) * stride_yn
    yv = tl.load(y_ptrs, mask=n_mask, other=0.0).to(tl.float32)

    # v comes from the shrink: read only after the wait. The next kernel, if PDL-launched,
    # waits for this whole grid anyway, so it may be launched now.
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    v_row = v_ptr + pid_t * stride_vt + s * stride_vs + offs_r * stride_vr
    vv = tl.load(v_row, mask=r_mask, other=0.0)
    for c in range(1, n_split):                                # split-K partials, in order
        vv += tl.load(v_row + c * stride_vc, mask=r_mask, other=0.0)
    delta = tl.sum(b * vv[None, :], axis=1) * scale           # [BLOCK_N] fp32
    tl.store(y_ptrs, (yv + delta).to(y_ptr.dtype.element_ty), mask=n_mask)


# ---------------------------------------------------------------------------------------
# Launch parameters (shapes only: the same for every call at a given shape, so a CUDA
# graph or a compiled graph captures the right choice)
# ---------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_NUM_SMS


@functools.lru_cache(maxsize=None)
def _device_has_pdl(device: torch.device) -> bool:
    # Compiled kernels only: under TRITON_INTERPRET the @triton.jit objects are interpreted
    # functions, which know neither launch_pdl nor gdc_*. Checked before touching CUDA.
    if not isinstance(_bgmv_shrink_kernel, JITFunction) or not _TRITON_HAS_PDL:
        return False
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_enabled(device: Union[torch.device, str]) -> bool:
    """True when launches on `device` use programmatic dependent launch: PDL_ENABLED (off
    unless MULTILORA_TRITON_PDL=1), compiled Triton >= 3.5 (not the interpreter), CUDA sm_90+."""
    return PDL_ENABLED and _device_has_pdl(torch.device(device))


def _block_r(r_max: int) -> int:
    return triton.next_power_of_2(r_max)


def _block_k(r_max: int, h_in: int) -> int:
    bk = max(MIN_BLOCK_K, min(MAX_BLOCK_K, TILE_ELEMS // _block_r(r_max)))
    return min(bk, max(16, triton.next_power_of_2(h_in)))   # no wider than h_in needs


def pick_split_k(T: int, S: int, h_in: int, r_max: int, num_sms: int = DEFAULT_NUM_SMS) -> int:
    """Split factor of the shrink's K loop chosen from the shapes alone.

    Rule (a heuristic for a memory-bound decode step, to be confirmed by the run_bgmv.py
    timings on the H200): keep the plain kernel (1) when the T * S programs already cover
    the SMs or h_in < SPLIT_MIN_H_IN; otherwise split so that there are about
    SPLIT_PROGRAMS_PER_SM programs per SM, each chunk at least SPLIT_MIN_K columns."""
    programs = T * S
    if programs >= num_sms or h_in < SPLIT_MIN_H_IN:
        return 1
    want = triton.cdiv(SPLIT_PROGRAMS_PER_SM * num_sms, programs)
    most = triton.cdiv(h_in, max(SPLIT_MIN_K, _block_k(r_max, h_in)))
    return max(1, min(want, most))


def _split_layout(h_in: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(columns per chunk rounded up to BLOCK_K, number of non-empty chunks)."""
    k_per_split = triton.cdiv(triton.cdiv(h_in, split_k), block_k) * block_k
    return k_per_split, triton.cdiv(h_in, k_per_split)


def split_layout(T: int, S: int, h_in: int, r_max: int, device: torch.device,
                 split_k: int = 0) -> tuple[int, int, int]:
    """(split_k, columns per chunk, n_split) of the shrink, from shapes only; split_k 0 =
    pick_split_k. bgmv_lora sizes its partial-sum buffer [n_split, T, S, r_max] with it."""
    if split_k <= 0:
        split_k = pick_split_k(T, S, h_in, r_max, _num_sms(device))
    return (split_k,) + _split_layout(h_in, split_k, _block_k(r_max, h_in))


def _pick_block_n(T: int, h_outs: Sequence[int], r_max: int, num_sms: int) -> int:
    bn = max(MIN_BLOCK_N, min(MAX_BLOCK_N, TILE_ELEMS // _block_r(r_max)))
    while bn > MIN_BLOCK_N and \
            T * sum(triton.cdiv(h, bn) for h in h_outs) < EXPAND_PROGRAMS_PER_SM * num_sms:
        bn //= 2
    return bn


# ---------------------------------------------------------------------------------------
# Kernel-specific input checks (ValueError naming the argument)
# ---------------------------------------------------------------------------------------
def _fail(arg: str, expected: str, got: object) -> None:
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def _check_idx_ranks(idx: Tensor, ranks: Optional[Tensor], T: int, L: int,
                     device: torch.device) -> None:
    if not isinstance(idx, Tensor) or idx.dtype not in (torch.int32, torch.int64) \
            or idx.shape != (T,):
        _fail("idx", f"int32/int64 tensor of shape [T={T}]",
              f"{getattr(idx, 'dtype', type(idx))} {tuple(getattr(idx, 'shape', ()))}")
    if idx.device != device:
        _fail("idx", f"device {device} (same as x)", idx.device)
    if ranks is not None:
        if not isinstance(ranks, Tensor) or ranks.dtype not in (torch.int32, torch.int64) \
                or ranks.shape != (L,):
            _fail("ranks", f"int32/int64 tensor of shape [L={L}] or None",
                  f"{getattr(ranks, 'dtype', type(ranks))} {tuple(getattr(ranks, 'shape', ()))}")
        if ranks.device != device:
            _fail("ranks", f"device {device} (same as x)", ranks.device)


def _check_v(v: Tensor, T: int, S: int, r_max: int, device: torch.device) -> None:
    if not isinstance(v, Tensor) or v.dtype != torch.float32 or v.shape != (T, S, r_max):
        _fail("v", f"float32 tensor of shape [T={T}, S={S}, r_max={r_max}]",
              f"{getattr(v, 'dtype', type(v))} {tuple(getattr(v, 'shape', ()))}")
    if v.device != device:
        _fail("v", f"device {device}", v.device)


def _check_shrink_args(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor],
                       v: Optional[Tensor]) -> Tensor:
    """Validate the shrink's inputs; returns A as [S, L, r_max, h_in]."""
    if not isinstance(x, Tensor) or x.dtype not in TOLERANCE or x.dim() != 2 or x.shape[0] == 0:
        _fail("x", "a 2-D [T >= 1, h_in] float16/bfloat16/float32 tensor",
              f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(A, Tensor) or A.dim() not in (3, 4):
        _fail("A", "[L, r_max, h_in] or [S, L, r_max, h_in]", tuple(getattr(A, "shape", ())))
    A4 = A if A.dim() == 4 else A.unsqueeze(0)
    T, h_in = x.shape
    S, L, r_max, a_h_in = A4.shape
    if A4.dtype != x.dtype:
        _fail("A", f"dtype {x.dtype} (same as x)", A4.dtype)
    if A4.device != x.device:
        _fail("A", f"device {x.device} (same as x)", A4.device)
    if a_h_in != h_in or L == 0 or r_max == 0:
        _fail("A", f"[S, L >= 1, 1 <= r_max, h_in={h_in}]", tuple(A.shape))
    if r_max > MAX_RANK:
        _fail("A", f"r_max <= {MAX_RANK}", r_max)
    if S > MAX_SLICES:
        _fail("A", f"at most {MAX_SLICES} slices", S)
    _check_idx_ranks(idx, ranks, T, L, x.device)
    if v is not None:
        _check_v(v, T, S, r_max, x.device)
    return A4


def _check_expand_args(y: Tensor, v: Tensor, B: Union[Tensor, Sequence[Tensor]], idx: Tensor,
                       scale: Tensor, ranks: Optional[Tensor]) -> list[Tensor]:
    """Validate the expand's inputs; returns B as a list of S tensors [L, h_out_s, r_max]."""
    if not isinstance(y, Tensor) or y.dtype not in TOLERANCE or y.dim() != 2 or y.shape[0] == 0:
        _fail("y", "a 2-D [T >= 1, h_out] float16/bfloat16/float32 tensor",
              f"{getattr(y, 'dtype', type(y))} {tuple(getattr(y, 'shape', ()))}")
    Bs = [B] if isinstance(B, Tensor) else list(B)
    if not 1 <= len(Bs) <= MAX_SLICES or not all(isinstance(b, Tensor) for b in Bs):
        _fail("B", f"a Tensor or 1..{MAX_SLICES} Tensors", [type(b).__name__ for b in Bs])
    T = y.shape[0]
    if not isinstance(v, Tensor) or v.dim() != 3:
        _fail("v", "a 3-D float32 tensor [T, S, r_max]", tuple(getattr(v, "shape", ())))
    S, r_max = v.shape[1], v.shape[2]
    if len(Bs) != S:
        _fail("B", f"{S} slice(s) to match v", len(Bs))
    _check_v(v, T, S, r_max, y.device)
    L = Bs[0].shape[0] if Bs[0].dim() == 3 else -1
    for s, b in enumerate(Bs):
        name = "B" if isinstance(B, Tensor) else f"B[{s}]"
        if b.dim() != 3 or b.shape[0] != L or b.shape[2] != r_max or L < 1:
            _fail(name, f"[L, h_out_s, r_max={r_max}] with the same L for every slice",
                  tuple(b.shape))
        if b.dtype != y.dtype:
            _fail(name, f"dtype {y.dtype} (same as y)", b.dtype)
        if b.device != y.device:
            _fail(name, f"device {y.device} (same as y)", b.device)
    h_out = sum(b.shape[1] for b in Bs)
    if y.shape[1] != h_out:
        _fail("y", f"[T={T}, h_out={h_out}] (sum of the B slices)", tuple(y.shape))
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.shape != (L,):
        _fail("scale", f"float32 tensor of shape [L={L}]",
              f"{getattr(scale, 'dtype', type(scale))} {tuple(getattr(scale, 'shape', ()))}")
    if scale.device != y.device:
        _fail("scale", f"device {y.device} (same as y)", scale.device)
    _check_idx_ranks(idx, ranks, T, L, y.device)
    return Bs


# ---------------------------------------------------------------------------------------
# Custom ops: the launches. Shapes in, nothing read from device memory on the host.
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("multilora::bgmv_shrink", mutates_args=("v",))
def _bgmv_shrink_op(v: Tensor, x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor],
                    split_k: int, atomic: bool) -> None:
    """v [T, S, r_max] fp32 <- shrink of x [T, h_in] by A [S, L, r_max, h_in].
    split_k: 0 = pick from shapes (pick_split_k), 1 = plain, > 1 = split the K loop.
    v may be [n_split, T, S, r_max] with n_split = split_layout(...)[1]: the partial sums
    are then left apart, for the expand to add (bgmv_lora: no summing kernel between)."""
    T, h_in = x.shape
    S, L, r_max, _ = A.shape
    block_k = _block_k(r_max, h_in)
    split_k, k_per_split, n_split = split_layout(T, S, h_in, r_max, x.device, split_k)
    block_r = _block_r(r_max)
    ranks_arg = ranks if ranks is not None else idx          # dummy pointer, never read
    stride_rank = ranks.stride(0) if ranks is not None else 0
    if v.dim() == 4:
        if v.shape[0] != n_split:
            _fail("v", f"[n_split={n_split}, T, S, r_max] for split_k={split_k}", tuple(v.shape))
        out, atomic = v, False
    elif n_split == 1:
        out, atomic = v, False
    elif atomic:
        v.zero_()                                            # atomics accumulate into 0
        out = v
    else:
        out = torch.empty((n_split, T, S, r_max), dtype=torch.float32, device=x.device)
    o4 = out if out.dim() == 4 else out.unsqueeze(0)         # [n_split or 1, T, S, r_max]
    use_pdl = pdl_enabled(x.device)      # safe after any kernel: it waits before any access
    _bgmv_shrink_kernel[(T, S, n_split)](
        x, A, idx, ranks_arg, o4,
        L, h_in, r_max, k_per_split,
        x.stride(0), x.stride(1),
        A.stride(0), A.stride(1), A.stride(2), A.stride(3),
        idx.stride(0), stride_rank,
        o4.stride(0) if out.dim() == 4 else 0, o4.stride(1), o4.stride(2), o4.stride(3),
        BLOCK_R=block_r, BLOCK_K=block_k, HAS_RANKS=ranks is not None, ATOMIC=atomic,
        USE_PDL=use_pdl, num_warps=NUM_WARPS, **({"launch_pdl": True} if use_pdl else {}),
    )
    if out is not v:
        torch.sum(out, dim=0, out=v)                         # fixed order: deterministic


@_bgmv_shrink_op.register_fake
def _(v, x, A, idx, ranks, split_k, atomic) -> None:
    return None


@torch.library.custom_op("multilora::bgmv_expand", mutates_args=("y",))
def _bgmv_expand_op(y: Tensor, v: Tensor, B: list[Tensor], idx: Tensor, scale: Tensor,
                    ranks: Optional[Tensor], after_shrink: bool = False) -> None:
    """y[:, off_s:off_s+h_out_s] += scale[idx] * v[:, s] @ B_s[idx].T for each slice s.
    v [T, S, r_max], or [n_split, T, S, r_max]: split-K partial sums, added in order.
    after_shrink: this launch directly follows the shrink that wrote v: only then is the
    expand PDL-launched, as its early loads need that."""
    T = y.shape[0]
    v4 = v if v.dim() == 4 else v.unsqueeze(0)               # [n_split, T, S, r_max]
    S, r_max = v4.shape[2], v4.shape[3]
    L = B[0].shape[0]
    h_outs = [b.shape[1] for b in B]
    block_r = _block_r(r_max)
    block_n = _pick_block_n(T, h_outs, r_max, _num_sms(y.device))
    n_tiles = sum(triton.cdiv(h, block_n) for h in h_outs)
    Bp = list(B) + [B[0]] * (MAX_SLICES - S)                  # dummies for unused slices
    Hp = h_outs + [0] * (MAX_SLICES - S)
    Sp = [b.stride() for b in B] + [(0, 0, 0)] * (MAX_SLICES - S)
    ranks_arg = ranks if ranks is not None else idx
    stride_rank = ranks.stride(0) if ranks is not None else 0
    if n_tiles == 0:
        return
    use_pdl = after_shrink and pdl_enabled(y.device)
    _bgmv_expand_kernel[(T, n_tiles)](
        y, v, idx, scale, ranks_arg, Bp[0], Bp[1], Bp[2],
        L, r_max, Hp[0], Hp[1], Hp[2], v4.shape[0],
        y.stride(0), y.stride(1),
        v4.stride(0), v4.stride(1), v4.stride(2), v4.stride(3),
        idx.stride(0), scale.stride(0), stride_rank,
        *Sp[0], *Sp[1], *Sp[2],
        BLOCK_N=block_n, BLOCK_R=block_r, NUM_SLICES=S, HAS_RANKS=ranks is not None,
        USE_PDL=use_pdl, num_warps=NUM_WARPS, **({"launch_pdl": True} if use_pdl else {}),
    )


@_bgmv_expand_op.register_fake
def _(y, v, B, idx, scale, ranks, after_shrink=False) -> None:
    return None


# ---------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------
def bgmv_shrink(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor] = None,
                v: Optional[Tensor] = None, *, split_k: Optional[int] = None,
                atomic: bool = False) -> Tensor:
    """v[t, s, :r] = x[t] @ A[s, idx[t], :r].T in fp32; returns v [T, S, r_max] fp32.

    A is [L, r_max, h_in] (S = 1) or [S, L, r_max, h_in]. v (given or allocated) is
    fully written: 0 for rows with idx = -1 and for rank columns past ranks[i].
    split_k: None picks by shape (pick_split_k); 1 forces the plain kernel; k > 1 splits
    h_in into about k chunks. atomic=True accumulates the chunks with fp32 atomics into a
    zeroed v (last bits vary run to run) instead of the deterministic two-pass sum."""
    A4 = _check_shrink_args(x, A, idx, ranks, v)
    if debug_checks():
        check_index_values(idx, A4.shape[1], ranks, A4.shape[2])
    if split_k is not None and (not isinstance(split_k, int) or split_k < 1):
        _fail("split_k", "None or an int >= 1", split_k)
    if v is None:
        v = torch.empty((x.shape[0], A4.shape[0], A4.shape[2]), dtype=torch.float32,
                        device=x.device)                    # [T, S, r_max]
    torch.ops.multilora.bgmv_shrink(v, x, A4, idx, ranks, split_k or 0, bool(atomic))
    return v


def bgmv_expand(y: Tensor, v: Tensor, B: Union[Tensor, Sequence[Tensor]], idx: Tensor,
                scale: Tensor, ranks: Optional[Tensor] = None, *,
                after_shrink: bool = False) -> None:
    """y[t, off_s:off_s+h_out_s] += scale[i] * v[t, s, :r] @ B_s[i, :, :r].T, in place.

    v [T, S, r_max] fp32 from bgmv_shrink; B a tensor [L, h_out, r_max] (S = 1) or S <= 3
    tensors B_s [L, h_out_s, r_max]; rows with idx = -1 are not written.
    after_shrink=True only when called right after the bgmv_shrink that wrote v, with no
    other kernel in between on the stream: the expand is then PDL-launched (module
    docstring) and reads idx, ranks, scale and B before the shrink has finished."""
    Bs = _check_expand_args(y, v, B, idx, scale, ranks)
    if debug_checks():
        check_index_values(idx, Bs[0].shape[0], ranks, v.shape[2])
    torch.ops.multilora.bgmv_expand(y, v, Bs, idx, scale, ranks, bool(after_shrink))


def bgmv_lora(y: Tensor, x: Tensor, A: Tensor, B: Union[Tensor, Sequence[Tensor]], idx: Tensor,
              scale: Tensor, ranks: Optional[Tensor] = None, meta: object = None) -> None:
    """The `bgmv_triton` mode: y += scale[idx] * (x @ A[idx].T) @ B[idx].T per token,
    shrink once for all slices then expand; meta is unused (BGMV needs no segments)."""
    A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks)
    if len(Bs) > MAX_SLICES:
        _fail("B", f"at most {MAX_SLICES} slices", len(Bs))
    T, S, r_max = x.shape[0], A4.shape[0], A4.shape[2]
    split_k, _, n_split = split_layout(T, S, x.shape[1], r_max, x.device)
    # Split-K partial sums stay apart and the expand adds them: two launches, not three.
    v = torch.empty((n_split, T, S, r_max) if n_split > 1 else (T, S, r_max),
                    dtype=torch.float32, device=x.device)
    torch.ops.multilora.bgmv_shrink(v, x, A4, idx, ranks, split_k, False)
    torch.ops.multilora.bgmv_expand(y, v, Bs, idx, scale, ranks, True)   # PDL after shrink


def lora_shrink(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor] = None,
                meta: object = None) -> Tensor:
    """Registry half (engine lora_overlap="shrink"), for a caller that runs the shrink
    beside the base GEMM (it only reads x): v as bgmv_lora makes it, [T, S, r_max] fp32 or,
    when split-K is picked, the [n_split, T, S, r_max] partials that lora_expand adds (so
    the halves are exactly bgmv_lora's two kernels)."""
    A4 = _check_shrink_args(x, A, idx, ranks, None)
    if debug_checks():
        check_index_values(idx, A4.shape[1], ranks, A4.shape[2])
    T, S, r_max = x.shape[0], A4.shape[0], A4.shape[2]
    split_k, _, n_split = split_layout(T, S, x.shape[1], r_max, x.device)
    v = torch.empty((n_split, T, S, r_max) if n_split > 1 else (T, S, r_max),
                    dtype=torch.float32, device=x.device)
    torch.ops.multilora.bgmv_shrink(v, x, A4, idx, ranks, split_k, False)
    return v


def lora_expand(y: Tensor, v: Tensor, B: Union[Tensor, Sequence[Tensor]], idx: Tensor,
                scale: Tensor, ranks: Optional[Tensor] = None, meta: object = None) -> None:
    """Registry half: y += the expand of lora_shrink's v (a plain launch: the base GEMM,
    not the shrink, is the kernel just before it, and it wrote y)."""
    Bs = _check_expand_args(y, v if v.dim() == 3 else v[0], B, idx, scale, ranks)
    if debug_checks():
        check_index_values(idx, Bs[0].shape[0], ranks, v.shape[-1])
    torch.ops.multilora.bgmv_expand(y, v, Bs, idx, scale, ranks, False)


if __name__ == "__main__":
    # One small shape against the float64 reference (CPU: the Triton interpreter).
    # (Not through MODES: that would import this file a second time as another module.)
    from multilora_impl import lora_reference, make_lora_inputs, make_workload, relative_error
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = make_lora_inputs(5, 72, [24, 56], L=3, r_max=16, dtype=torch.float16,
                           device=dev, ranks=[16, 3, 8])
    idx = make_workload("uniform", 5, 3, no_lora_share=0.3, seed=1).to(dev)
    args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    y = inp["y"].clone()
    bgmv_lora(y, *args)
    err = relative_error(y, lora_reference(inp["y"], *args))
    print(f"bgmv_triton T=5 h_in=72 h_out=[24, 56] fp16 ranks [16, 3, 8]: rel err {err:.2e} "
          f"(tolerance {TOLERANCE[torch.float16]:.0e})")
