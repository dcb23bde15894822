"""SGMV shrink (Punica's segmented gather matrix-matrix, first half) in Triton.

Prefill batches keep each request's tokens contiguous, so the batch is a list of
segments, each one run of tokens that share an adapter. For every segment g and
output slice s (q/k/v share one x):

    a = seg_adapter[g]; rows = seg_starts[g]:seg_starts[g+1]; r = ranks[a]
    if a >= 0:  v[rows, s, :r] = x[rows] @ A[s, a, :r].T            # fp32
    else:       v[rows, s, :]  = 0                                     # never read

Shapes and dtypes:
    x           [T, h_in]                  fp16 / bf16 / fp32
    A           [L, r_max, h_in] or [S, L, r_max, h_in], same dtype as x
    seg_starts  [num_segments + 1] int32   starts at 0, non-decreasing, ends at T
    seg_adapter [num_segments] int32       -1 = no LoRA for that segment
    ranks       [L] int32 or None          adapter a reads only A[:, a, :ranks[a]]
    v           [T, S, r_max] fp32         v[t, s, ranks[a]:] is written as 0

The segment tensors may be static buffers longer than the batch needs (CUDA-graph
replay): pad them with empty segments (seg_starts[g] == seg_starts[g+1]) or adapter
-1; the launch covers every segment in the buffer. `max_seg_len` (a host int, from
LoraMeta) sizes the grid; with None the grid assumes one segment could hold all T
tokens and the surplus programs exit at once. It must be >= the longest segment.

Kernel: one program per (segment, BLOCK_M tokens of it, BLOCK_C columns of the S * r_max
output columns[, K split]). The S slices' rank rows are concatenated into one column
axis, so for q/k/v at r = 16 a single [BLOCK_M, 64] tile holds all three and x is read
once. 16-bit dots run on tensor cores (wgmma on sm_90 for 64-row tiles); fp32 uses
input_precision="ieee" (FMA units, no TF32) so the 1e-5 bound holds. Rank rows past
ranks[a] are masked at the load (tests put NaN there) and a column block that is all
padding skips its K loop. split_k > 1 (the default for small grids, pick_split_k) splits
h_in: each split stores its partial sums into its own slice of an fp32 [split_k, T, S, r_max]
buffer and one torch.sum adds them in a fixed order, so the result is deterministic (no
atomics) and does not depend on the segment layout.

Bytes that must move (for GB/s):  T_lora * h_in * e  (x rows with an adapter)
+  distinct adapters * S * rank * h_in * e  (A; re-read per token block, from L2)
+  T * S * r_max * 4  (v written), with e the element size of x.
"""
import os
import sys
from typing import Optional

if __name__ == "__main__":   # run as a script: the repo root holds multilora_impl; on a
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import torch               # CPU the kernels run in the interpreter (set before @triton.jit)
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
import triton
import triton.language as tl
from torch import Tensor

from multilora_impl import MAX_RANK, debug_checks

# ---------------------------------------------------------------------------------------
# Block sizes (H200, sm_90)
# ---------------------------------------------------------------------------------------
BLOCK_M_MAX = 64      # one Hopper wgmma tile is 64 rows; shorter segments get 16/32 rows
BLOCK_K_16BIT = 128   # 256 contiguous bytes per x/A row per step, half the K-loop trips of 64
BLOCK_K_FP32 = 32     # fp32 (ieee) dots run on FMA units: BLOCK_K 64 spills registers on sm_90
BLOCK_C_MAX = 128     # all slices' rank columns in one tile up to 128 (qkv r=16: 64): x read once
NUM_STAGES = 3        # the K loop is load-bound: 3 stages in flight hide HBM latency
SPLIT_K_MAX = 4       # split_k=0 (auto) splits h_in until the grid has >= SPLIT_K_PROGRAMS
SPLIT_K_PROGRAMS = 256  # 64-row tiles (~2 per SM); H200 sweep, PERF_LOG v8: 8 x 512 tokens 18.6 -> 14.9 us
# num_warps: 8 for a [>=32, 128] accumulator, else 4 (sm_90 ptxas: [64, 128] at 4 warps
# spills, at 8 it takes 152 registers; [64, 64] at 4 takes 176, no spill).


def _fail(arg: str, expected: str, got: object) -> None:
    raise ValueError(f"{arg}: expected {expected}, got {got}")


# ---------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------
@triton.jit
def _sgmv_shrink_kernel(
    # pointers
    x_ptr, a_ptr, v_ptr, seg_starts_ptr, seg_adapter_ptr, ranks_ptr,
    # sizes (num_m_blocks: token blocks per segment, the grid's upper bound)
    num_tokens, h_in, num_adapters, r_max, n_cols, num_m_blocks, num_c_blocks,
    # strides
    stride_xt, stride_xk,
    stride_as, stride_al, stride_ar, stride_ak,
    stride_vt, stride_vs, stride_vr, stride_vk,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, HAS_RANKS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    # Program id -> (segment, token block, column block, K split); the column blocks and
    # K splits of one token block are neighbours so they share x through L2.
    pid = tl.program_id(0)
    n_ck = num_c_blocks * SPLIT_K
    pid_ck = pid % n_ck
    pid_k = pid_ck % SPLIT_K
    pid_c = pid_ck // SPLIT_K
    rest = pid // n_ck
    pid_m = rest % num_m_blocks
    seg = rest // num_m_blocks

    # Clamped to [0, T]: a corrupt segment table cannot make us read or write out of bounds.
    seg_start = tl.maximum(tl.load(seg_starts_ptr + seg), 0)
    seg_end = tl.minimum(tl.load(seg_starts_ptr + seg + 1), num_tokens)
    m0 = seg_start + pid_m * BLOCK_M
    if m0 >= seg_end:          # the grid is sized for the longest segment
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < seg_end
    rows64 = rows.to(tl.int64)

    # Output columns: c = s * r_max + r over all slices (v is [T, S, r_max]).
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_s = cols // r_max
    col_r = cols % r_max
    col_in = cols < n_cols
    v_ptrs = (v_ptr + pid_k * stride_vk + rows64[:, None] * stride_vt + col_s[None, :] * stride_vs
              + col_r[None, :] * stride_vr)                  # K split k: its own partial slice
    out_mask = row_mask[:, None] & col_in[None, :]

    # Early exit for -1 segments (and out-of-range adapters, never read out of bounds):
    # write zeros so v is fully defined, skip every weight load.
    adapter = tl.load(seg_adapter_ptr + seg)
    if (adapter < 0) | (adapter >= num_adapters):
        tl.store(v_ptrs, tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32), mask=out_mask)
        return
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + adapter), r_max)
    else:
        rank = r_max
    # Padded rank rows are never loaded: they read as 0 through the mask, so the dot
    # (which needs >= 16 columns) still sees a full tile.
    col_valid = col_in & (col_r < rank)
    if tl.sum(col_valid.to(tl.int32), axis=0) == 0:   # a block of padding only
        tl.store(v_ptrs, tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32), mask=out_mask)
        return

    # K range of this split (whole BLOCK_K steps, the last split may be short).
    k_per_split = tl.cdiv(tl.cdiv(h_in, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, h_in)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows64[:, None] * stride_xt + (k_lo + offs_k)[None, :] * stride_xk
    a_base = a_ptr + adapter.to(tl.int64) * stride_al
    a_ptrs = (a_base + col_s.to(tl.int64)[None, :] * stride_as + col_r[None, :] * stride_ar
              + (k_lo + offs_k)[:, None] * stride_ak)                     # [BLOCK_K, BLOCK_C]

    acc = tl.zeros([BLOCK_M, BLOCK_C], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:   # no K mask: lets the compiler vectorise the loads
            xt = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
            at = tl.load(a_ptrs, mask=col_valid[None, :], other=0.0)
        else:
            k_mask = (k0 + offs_k) < k_hi
            xt = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=k_mask[:, None] & col_valid[None, :], other=0.0)
        if UPCAST:   # the CPU interpreter cannot multiply bf16
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, at, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak

    # Masked store of the fp32 result (of this K split's partial slice).
    tl.store(v_ptrs, acc, mask=out_mask)


# ---------------------------------------------------------------------------------------
# Host side: checks, block choice, launch
# ---------------------------------------------------------------------------------------
def check_segments(seg_starts: Tensor, seg_adapter: Tensor, T: int, L: int, device: torch.device,
                   max_seg_len: Optional[int] = None, check: bool = False) -> None:
    """Shape / dtype / device checks (free); with check=True also the values (reads the
    segment tensors on the host: a sync, for debugging and tests only)."""
    for name, t in (("seg_starts", seg_starts), ("seg_adapter", seg_adapter)):
        if not isinstance(t, Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__)
        if t.dtype != torch.int32 or t.dim() != 1:
            _fail(name, "a 1-D int32 tensor", f"{t.dtype} {tuple(t.shape)}")
        if t.device != device:
            _fail(name, f"device {device} (same as x)", t.device)
    if seg_adapter.numel() == 0:
        _fail("seg_adapter", "at least one segment", tuple(seg_adapter.shape))
    if seg_starts.numel() != seg_adapter.numel() + 1:
        _fail("seg_starts", f"len(seg_adapter) + 1 = {seg_adapter.numel() + 1} entries",
              seg_starts.numel())
    if max_seg_len is not None and (not isinstance(max_seg_len, int) or max_seg_len < 1):
        _fail("max_seg_len", "a positive host int or None", max_seg_len)
    if not check:
        return
    st = seg_starts.to("cpu", torch.int64)
    ad = seg_adapter.to("cpu", torch.int64)
    if int(st[0]) != 0 or int(st[-1]) != T:
        _fail("seg_starts", f"first entry 0 and last entry T={T}",
              f"{int(st[0])} ... {int(st[-1])}")
    lens = st[1:] - st[:-1]
    if bool((lens < 0).any()):
        _fail("seg_starts", "non-decreasing values", st.tolist()[:16])
    if max_seg_len is not None and int(lens.max()) > max_seg_len:
        _fail("max_seg_len", f">= the longest segment ({int(lens.max())})", max_seg_len)
    if int(ad.min()) < -1 or int(ad.max()) >= L:
        _fail("seg_adapter", f"values in [-1, {L - 1}]",
              f"range [{int(ad.min())}, {int(ad.max())}]")


def check_ranks(ranks: Optional[Tensor], L: int, r_max: int, device: torch.device,
                check: bool = False) -> None:
    if ranks is None:
        return
    if not isinstance(ranks, Tensor) or ranks.dtype not in (torch.int32, torch.int64) \
            or ranks.shape != (L,):
        _fail("ranks", f"int32/int64 tensor of shape [L={L}] or None",
              f"{getattr(ranks, 'dtype', type(ranks).__name__)} "
              f"{tuple(getattr(ranks, 'shape', ()))}")
    if ranks.device != device:
        _fail("ranks", f"device {device} (same as x)", ranks.device)
    if check:
        lo, hi = int(ranks.min()), int(ranks.max())
        if lo < 0 or hi > r_max:
            _fail("ranks", f"values in [0, r_max={r_max}]", f"range [{lo}, {hi}]")


def check_block(name: str, value: int) -> None:
    """A block-size override: 0 (default) or a power of two >= 16 (tl.dot's minimum)."""
    if not isinstance(value, int) or (value != 0 and (value < 16 or value & (value - 1))):
        _fail(name, "0 (default) or a power of two >= 16", value)


def pick_block_m(max_seg_len: Optional[int]) -> int:
    """16 / 32 / 64 token rows: the smallest that covers short segments, else 64."""
    if max_seg_len is None or max_seg_len > 32:
        return BLOCK_M_MAX
    return 16 if max_seg_len <= 16 else 32


def pick_split_k(num_programs: int) -> int:
    """split_k=0 (auto): the smallest power of two <= SPLIT_K_MAX that gives the grid
    >= SPLIT_K_PROGRAMS programs. num_programs: 64-row token tiles x column blocks (few,
    short segments leave most SMs idle otherwise)."""
    split = 1
    while split < SPLIT_K_MAX and num_programs * split < SPLIT_K_PROGRAMS:
        split *= 2
    return split


def shrink_config(dtype: torch.dtype, n_cols: int, max_seg_len: Optional[int],
                  block_m: int = 0, block_k: int = 0) -> dict:
    """Block sizes and launch options for the H200 (0 = pick the default)."""
    block_m = block_m or pick_block_m(max_seg_len)
    block_c = min(BLOCK_C_MAX, max(16, triton.next_power_of_2(n_cols)))
    return dict(BLOCK_M=block_m,
                BLOCK_K=block_k or (BLOCK_K_FP32 if dtype == torch.float32 else BLOCK_K_16BIT),
                BLOCK_C=block_c, num_warps=8 if block_c == 128 and block_m >= 32 else 4,
                num_stages=NUM_STAGES)


def _launch_sgmv_shrink(v: Tensor, x: Tensor, A4: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
                        ranks: Optional[Tensor], max_seg_len: Optional[int], split_k: int,
                        block_m: int, block_k: int) -> None:
    """Launch only (inputs already checked). v: [T, S, r_max] fp32, or with split_k > 1 the
    [split_k, T, S, r_max] partials (summed by the caller)."""
    T, h_in = x.shape
    S, L, r_max, _ = A4.shape
    n_cols = S * r_max
    cfg = shrink_config(x.dtype, n_cols, max_seg_len, block_m, block_k)
    num_m_blocks = triton.cdiv(max_seg_len if max_seg_len is not None else T, cfg["BLOCK_M"])
    num_c_blocks = triton.cdiv(n_cols, cfg["BLOCK_C"])
    grid = (seg_adapter.shape[0] * num_m_blocks * num_c_blocks * split_k,)
    _sgmv_shrink_kernel[grid](
        x, A4, v, seg_starts, seg_adapter, ranks if ranks is not None else seg_adapter,
        T, h_in, L, r_max, n_cols, num_m_blocks, num_c_blocks,
        x.stride(0), x.stride(1),
        A4.stride(0), A4.stride(1), A4.stride(2), A4.stride(3),
        v.stride(-3), v.stride(-2), v.stride(-1), v.stride(0) if v.dim() == 4 else 0,
        SPLIT_K=split_k, EVEN_K=(h_in % (cfg["BLOCK_K"] * split_k) == 0),
        HAS_RANKS=ranks is not None,
        UPCAST=(x.device.type == "cpu" and x.dtype == torch.bfloat16),
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        **cfg,
    )


# ---------------------------------------------------------------------------------------
# Custom op (opaque to torch.compile, capturable in CUDA graphs: no sync, no data reads)
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("multilora::sgmv_shrink", mutates_args=("v",))
def _sgmv_shrink_op(v: Tensor, x: Tensor, A: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
                    ranks: Optional[Tensor], max_seg_len: Optional[int], split_k: int,
                    block_m: int, block_k: int) -> None:
    if split_k == 1 or v.dim() == 4:      # v itself, or the partials kept (sgmv_expand adds them)
        _launch_sgmv_shrink(v, x, A, seg_starts, seg_adapter, ranks, max_seg_len, split_k,
                            block_m, block_k)
        return
    parts = torch.empty((split_k,) + tuple(v.shape), device=v.device, dtype=torch.float32)
    _launch_sgmv_shrink(parts, x, A, seg_starts, seg_adapter, ranks, max_seg_len, split_k,
                        block_m, block_k)
    torch.sum(parts, 0, out=v)       # fixed order: deterministic, unlike atomics


@_sgmv_shrink_op.register_fake
def _(v, x, A, seg_starts, seg_adapter, ranks, max_seg_len, split_k, block_m, block_k) -> None:
    return None


def sgmv_shrink(x: Tensor, A: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
                ranks: Optional[Tensor] = None, v: Optional[Tensor] = None,
                max_seg_len: Optional[int] = None, *, split_k: int = 0, block_m: int = 0,
                block_k: int = 0, partials: bool = False, check: bool = False) -> Tensor:
    """v[rows of segment g, s, :ranks[a]] = x[rows] @ A[s, a, :ranks[a]].T in fp32, returns v.

    A: [L, r_max, h_in] or [S, L, r_max, h_in]. v: [T, S, r_max] fp32, allocated when None.
    max_seg_len: host int >= the longest segment (sizes the grid), None = T.
    split_k > 1 splits h_in over programs that store partial sums, added in a fixed order
    (deterministic): more parallelism for few, short segments. 0 (default) picks by the
    token count and columns only (pick_split_k of the grid 64-row tiles would make), so
    the same T gives the same split, and the same bits, whatever the segment layout (eager
    and CUDA-graph calls agree). partials=True returns the split's partial sums
    [split_k, T, S, r_max] unsummed when it splits (sgmv_expand adds them in order as it
    loads v: one launch fewer than summing them here; PERF_LOG session 14), else v.
    block_m / block_k: 0 picks the H200 defaults. check=True also checks index values
    (a host sync)."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.dtype not in (
            torch.float16, torch.bfloat16, torch.float32):
        _fail("x", "a 2-D [T, h_in] fp16/bf16/fp32 tensor",
              f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    T, h_in = x.shape
    if T == 0 or h_in == 0:
        _fail("x", "T >= 1 and h_in >= 1", tuple(x.shape))
    if not isinstance(A, Tensor) or A.dim() not in (3, 4):
        _fail("A", "[L, r_max, h_in] or [S, L, r_max, h_in]", tuple(getattr(A, "shape", ())))
    A4 = A if A.dim() == 4 else A.unsqueeze(0)
    S, L, r_max, a_h_in = A4.shape
    if a_h_in != h_in or L == 0 or S == 0 or not 1 <= r_max <= MAX_RANK:
        _fail("A", f"[S, L >= 1, 1 <= r_max <= {MAX_RANK}, h_in={h_in}]", tuple(A.shape))
    if A.dtype != x.dtype or A.device != x.device:
        _fail("A", f"{x.dtype} on {x.device} (as x)", f"{A.dtype} on {A.device}")
    check = check or debug_checks()          # MULTILORA_CHECK=1: values too
    check_segments(seg_starts, seg_adapter, T, L, x.device, max_seg_len, check)
    check_ranks(ranks, L, r_max, x.device, check)
    if not isinstance(split_k, int) or isinstance(split_k, bool) or split_k < 0:
        _fail("split_k", "an int >= 0 (0 = pick by grid size)", split_k)
    check_block("block_m", block_m)
    check_block("block_k", block_k)
    if split_k == 0:
        block_c = shrink_config(x.dtype, S * r_max, None)["BLOCK_C"]
        split_k = pick_split_k(triton.cdiv(T, BLOCK_M_MAX) * triton.cdiv(S * r_max, block_c))
    shape = (split_k, T, S, r_max) if partials and split_k > 1 else (T, S, r_max)
    if v is None:
        v = torch.empty(shape, device=x.device, dtype=torch.float32)
    elif not isinstance(v, Tensor) or v.shape != shape or v.dtype != torch.float32 \
            or v.device != x.device:
        _fail("v", f"fp32 {list(shape)} on {x.device}",
              f"{getattr(v, 'dtype', None)} {tuple(getattr(v, 'shape', ()))}")
    torch.ops.multilora.sgmv_shrink(v, x, A4, seg_starts, seg_adapter, ranks, max_seg_len,
                                    split_k, block_m, block_k)
    return v


if __name__ == "__main__":   # one small shape against the float64 math
    from multilora_impl import build_segments, make_lora_inputs
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = make_lora_inputs(37, 72, [40, 24], L=3, r_max=16, dtype=torch.float32, device=dev,
                           ranks=[16, 5, 9])
    idx = torch.tensor([0] * 20 + [-1] * 5 + [2] * 12, dtype=torch.int32, device=dev)
    st, ad = build_segments(idx)
    v = sgmv_shrink(inp["x"], inp["A"], st, ad, inp["ranks"], check=True)
    ok = True
    for t, a in enumerate(idx.tolist()):
        if a >= 0:
            r = int(inp["ranks"][a])
            ref = inp["x"][t].double() @ inp["A"][:, a, :r].double().transpose(1, 2)  # [S, r]
            ok &= bool(torch.allclose(v[t, :, :r].double(), ref, rtol=1e-5, atol=1e-5))
    print("sgmv_shrink", "OK" if ok else "MISMATCH")
