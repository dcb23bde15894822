"""SGMV expand (Punica's segmented gather matrix-matrix, second half) in Triton.

For every segment g (a run of tokens sharing adapter a = seg_adapter[g]) and output
slice s with columns [off_s, off_s + h_out_s) of y:

    rows = seg_starts[g]:seg_starts[g+1]; r = ranks[a]
    if a >= 0:
        y[rows, off_s:off_s + h_out_s] += scale[a] * v[rows, s, :r] @ B_s[a, :, :r].T

Shapes and dtypes:
    y           [T, sum_s h_out_s]          fp16 / bf16 / fp32, updated in place
    v           [T, S, r_max] fp32          the shrink's output (sgmv_shrink_triton.py), or
                [n, T, S, r_max] fp32       its split-K partial sums, added here in order
    B           [L, h_out, r_max], or a tuple of S such tensors whose h_out differ
                (q/k/v of Llama-3-8B: 4096 / 1024 / 1024), same dtype as y
    seg_starts  [num_segments + 1] int32,  seg_adapter [num_segments] int32 (-1: skip)
    scale       [L] fp32                    ranks [L] int32 or None

Kernel: one program per (segment, BLOCK_M tokens, BLOCK_N output columns of one slice);
the n-blocks of all slices (up to 3 per launch, more are chunked) are numbered one after
another, so q/k/v are one launch. The rank loop stops at ranks[a]; padded columns of B
and v never reach the result (with r_max a multiple of 8, up to 7 of them per row come
in with the 16-byte vector that holds the rank's end and are replaced by 0: NaN-safe).
16-bit products run on tensor cores with v converted to y's dtype at the dot: fp16 keeps
11 bits (as Punica and vLLM do), bf16 only 8, so for bf16 v is split into hi + lo bf16
parts and dotted twice, which keeps v fp32-accurate (the expand is bound by y's bytes,
the second dot is nearly free). fp32 uses input_precision="ieee". Each y element is
loaded, updated in fp32, converted once and stored once; -1 segments exit before
touching y. Deterministic.

Bytes that must move (for GB/s):  2 * T_lora * h_out * e  (y read + written, T_lora = tokens with
an adapter)  +  T_lora * S * r * 4  (v)  +  distinct adapters * h_out * r * e  (B),
with e the element size of y.
"""
import os
import sys
from typing import Optional, Sequence, Union

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
from sgmv_triton.sgmv_shrink_triton import (_fail, check_block, check_ranks, check_segments,
                                            pick_block_m)

# ---------------------------------------------------------------------------------------
# Block sizes (H200, sm_90)
# ---------------------------------------------------------------------------------------
BLOCK_M_16BIT = 16    # 16-bit: 16-token tiles whatever the segment length (H200 sweep,
BLOCK_N_16BIT = 256   # PERF_LOG v8: 8 x 512 tokens [64, 128] 61.8 us -> [16, 256] 24.8 us)
BLOCK_N_FP32 = 64     # same bytes per row in fp32 (fp32 dots run on FMA units)
BLOCK_R_BF16 = 16     # rank step for bf16: its split v (hi + lo) doubles the dot operands
BLOCK_R_MAX = 32      # rank step otherwise; [64, 128] tiles at 64 spill on sm_90
MAX_SLICES = 3        # explicit B pointers per launch (q/k/v); more slices are chunked
NUM_STAGES = 2        # the rank loop is 1-8 steps: double buffering is enough
# num_warps: 8 for a 64-row tile, else 4 (sm_90 ptxas: [64, 128] at 4 warps spills,
# at 8 takes 148-158 registers).


# ---------------------------------------------------------------------------------------
# Kernel
# ---------------------------------------------------------------------------------------
@triton.jit
def _load_v(v_ptrs, mask, stride_vk, N_PARTS: tl.constexpr):
    """v, or the sum of its N_PARTS split-K partials in order 0, 1, ... (deterministic)."""
    vt = tl.load(v_ptrs, mask=mask, other=0.0)
    for k in tl.static_range(1, N_PARTS):
        vt += tl.load(v_ptrs + k * stride_vk, mask=mask, other=0.0)
    return vt


@triton.jit
def _expand_tile(
    y_ptr, v_ptr, b_ptr, scale_ptr,
    rows64, row_mask, adapter, rank, v_slice, pid_n, col_off, h_out,
    stride_yt, stride_yn, stride_vt, stride_vs, stride_vr, stride_vk, stride_bl, stride_bn,
    stride_br,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_RANKS: tl.constexpr, RANK8: tl.constexpr, SPLIT_V: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr, N_PARTS: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of one slice: y += scale * v[:, :rank] @ B_s[a, n, :rank].T."""
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < h_out
    offs_r = tl.arange(0, BLOCK_R)
    v_ptrs = v_ptr + rows64[:, None] * stride_vt + v_slice * stride_vs + offs_r[None, :] * stride_vr
    b_ptrs = (b_ptr + adapter.to(tl.int64) * stride_bl + offs_n[None, :] * stride_bn
              + offs_r[:, None] * stride_br)                               # [BLOCK_R, BLOCK_N]

    # Rank loop: stops at this adapter's rank; the tail chunk masks the padded columns
    # (they read as 0, so the dot's >= 16 inner size is kept).
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    rank8 = ((rank + 7) // 8) * 8          # the rank rounded up to 8 (RANK8: <= r_max)
    for r0 in range(0, rank, BLOCK_R):
        r_mask = (r0 + offs_r) < rank
        if HAS_RANKS and RANK8:
            # r is the contiguous dim of v and B, and a mask with a loaded bound (r < rank)
            # would make every load a scalar one (PERF_LOG v40). Load up to rank rounded up
            # to 8, a bound that is provably a multiple of 8 (16-byte vectors; r0 is a
            # multiple of BLOCK_R), and select 0 past the rank: at most 7 padded elements
            # of a row are read, inside the 16-byte chunk that holds the rank's end (B's
            # rows are r_max long, a multiple of 8), and never used (NaN-safe).
            m8 = offs_r < tl.multiple_of(rank8 - r0, 8)
            vt = tl.where(r_mask[None, :],
                          _load_v(v_ptrs, row_mask[:, None] & m8[None, :], stride_vk, N_PARTS), 0.0)
            bt = tl.where(r_mask[:, None],
                          tl.load(b_ptrs, mask=m8[:, None] & n_mask[None, :], other=0.0), 0.0)
        else:
            vt = _load_v(v_ptrs, row_mask[:, None] & r_mask[None, :], stride_vk, N_PARTS)  # fp32
            bt = tl.load(b_ptrs, mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        # Tensor-core inputs in B's dtype (a no-op for fp32). bf16 keeps 8 mantissa bits:
        # v = hi + lo, two dots, so v stays fp32-accurate (the expand is bound by y's
        # bytes, the second dot is nearly free); fp16's 11 bits need no split.
        v_hi = vt.to(b_ptr.dtype.element_ty)
        if SPLIT_V:
            v_lo = (vt - v_hi.to(tl.float32)).to(b_ptr.dtype.element_ty)
        if UPCAST:   # the CPU interpreter cannot multiply bf16
            bt = bt.to(tl.float32)
            v_hi = v_hi.to(tl.float32)
            if SPLIT_V:
                v_lo = v_lo.to(tl.float32)
        acc = tl.dot(v_hi, bt, acc, input_precision=PRECISION)
        if SPLIT_V:
            acc = tl.dot(v_lo, bt, acc, input_precision=PRECISION)
        v_ptrs += BLOCK_R * stride_vr
        b_ptrs += BLOCK_R * stride_br

    # One load, one fp32 update, one conversion, one store per element of y.
    s = tl.load(scale_ptr + adapter)
    y_ptrs = y_ptr + rows64[:, None] * stride_yt + (col_off + offs_n)[None, :] * stride_yn
    y_mask = row_mask[:, None] & n_mask[None, :]
    y = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + s * acc).to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _sgmv_expand_kernel(
    # pointers (b1_ptr / b2_ptr repeat b0_ptr when there are fewer slices)
    y_ptr, v_ptr, b0_ptr, b1_ptr, b2_ptr, scale_ptr, seg_starts_ptr, seg_adapter_ptr, ranks_ptr,
    # sizes: per slice its h_out, first y column and n-block count; v slice of slice 0
    num_tokens, num_adapters, r_max, num_m_blocks, v_slice0,
    h_out0, h_out1, h_out2, col_off0, col_off1, col_off2, nb0, nb1, nb_total,
    # strides
    stride_yt, stride_yn, stride_vt, stride_vs, stride_vr, stride_vk,
    stride_b0l, stride_b0n, stride_b0r, stride_b1l, stride_b1n, stride_b1r,
    stride_b2l, stride_b2n, stride_b2r,
    # meta-parameters
    NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr, HAS_RANKS: tl.constexpr, RANK8: tl.constexpr,
    SPLIT_V: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    N_PARTS: tl.constexpr,
):
    # Program id -> (segment, token block, n-block over all slices); the n-blocks of one
    # token block are neighbours so they share the v tile through L2.
    pid = tl.program_id(0)
    pid_n = pid % nb_total
    rest = pid // nb_total
    pid_m = rest % num_m_blocks
    seg = rest // num_m_blocks

    # Clamped to [0, T]: a corrupt segment table cannot make us read or write out of bounds.
    seg_start = tl.maximum(tl.load(seg_starts_ptr + seg), 0)
    seg_end = tl.minimum(tl.load(seg_starts_ptr + seg + 1), num_tokens)
    m0 = seg_start + pid_m * BLOCK_M
    if m0 >= seg_end:          # the grid is sized for the longest segment
        return
    adapter = tl.load(seg_adapter_ptr + seg)
    if (adapter < 0) | (adapter >= num_adapters):   # no LoRA: y untouched
        return
    if HAS_RANKS:
        rank = tl.minimum(tl.load(ranks_ptr + adapter), r_max)
    else:
        rank = r_max
    if rank <= 0:
        return
    rows = m0 + tl.arange(0, BLOCK_M)
    row_mask = rows < seg_end
    rows64 = rows.to(tl.int64)

    # Which slice this n-block belongs to (a branch per slice, each with its own B).
    if pid_n < nb0:
        _expand_tile(y_ptr, v_ptr, b0_ptr, scale_ptr, rows64, row_mask, adapter, rank,
                     v_slice0, pid_n, col_off0, h_out0,
                     stride_yt, stride_yn, stride_vt, stride_vs, stride_vr, stride_vk,
                     stride_b0l, stride_b0n, stride_b0r,
                     BLOCK_M, BLOCK_N, BLOCK_R, HAS_RANKS, RANK8, SPLIT_V, UPCAST, PRECISION,
                     N_PARTS)
    elif NUM_SLICES >= 2:
        if pid_n < nb0 + nb1:
            _expand_tile(y_ptr, v_ptr, b1_ptr, scale_ptr, rows64, row_mask, adapter, rank,
                         v_slice0 + 1, pid_n - nb0, col_off1, h_out1,
                         stride_yt, stride_yn, stride_vt, stride_vs, stride_vr, stride_vk,
                         stride_b1l, stride_b1n, stride_b1r,
                         BLOCK_M, BLOCK_N, BLOCK_R, HAS_RANKS, RANK8, SPLIT_V, UPCAST, PRECISION,
                         N_PARTS)
        elif NUM_SLICES >= 3:
            _expand_tile(y_ptr, v_ptr, b2_ptr, scale_ptr, rows64, row_mask, adapter, rank,
                         v_slice0 + 2, pid_n - nb0 - nb1, col_off2, h_out2,
                         stride_yt, stride_yn, stride_vt, stride_vs, stride_vr, stride_vk,
                         stride_b2l, stride_b2n, stride_b2r,
                         BLOCK_M, BLOCK_N, BLOCK_R, HAS_RANKS, RANK8, SPLIT_V, UPCAST, PRECISION,
                         N_PARTS)


# ---------------------------------------------------------------------------------------
# Host side: launch
# ---------------------------------------------------------------------------------------
def expand_config(dtype: torch.dtype, r_max: int, max_seg_len: Optional[int],
                  block_m: int = 0, block_n: int = 0) -> dict:
    """Block sizes and launch options for the H200 (0 = pick the default)."""
    if not block_m:
        block_m = pick_block_m(max_seg_len) if dtype == torch.float32 else \
            min(BLOCK_M_16BIT, pick_block_m(max_seg_len))
    r_step = BLOCK_R_BF16 if dtype == torch.bfloat16 else BLOCK_R_MAX
    return dict(BLOCK_M=block_m,
                BLOCK_N=block_n or (BLOCK_N_FP32 if dtype == torch.float32 else BLOCK_N_16BIT),
                BLOCK_R=min(r_step, max(16, triton.next_power_of_2(r_max))),
                num_warps=8 if block_m >= 64 else 4, num_stages=NUM_STAGES)


def _launch_sgmv_expand(y: Tensor, v: Tensor, Bs: Sequence[Tensor], seg_starts: Tensor,
                        seg_adapter: Tensor, scale: Tensor, ranks: Optional[Tensor],
                        max_seg_len: Optional[int], block_m: int, block_n: int) -> None:
    """Launch only (inputs already checked): one launch per group of up to 3 slices."""
    T = y.shape[0]
    L, r_max = Bs[0].shape[0], Bs[0].shape[2]
    cfg = expand_config(y.dtype, r_max, max_seg_len, block_m, block_n)
    num_m_blocks = triton.cdiv(max_seg_len if max_seg_len is not None else T, cfg["BLOCK_M"])
    col = 0
    for s0 in range(0, len(Bs), MAX_SLICES):
        group = list(Bs[s0:s0 + MAX_SLICES])
        n = len(group)
        h_outs = [b.shape[1] for b in group]
        offs = [col + sum(h_outs[:i]) for i in range(n)]
        nbs = [triton.cdiv(h, cfg["BLOCK_N"]) for h in h_outs]
        col += sum(h_outs)
        pad = MAX_SLICES - n                     # unused slots repeat slice 0
        group, h_outs, offs = group + group[:1] * pad, h_outs + [0] * pad, offs + [0] * pad
        grid = (seg_adapter.shape[0] * num_m_blocks * sum(nbs),)
        _sgmv_expand_kernel[grid](
            y, v, group[0], group[1], group[2], scale, seg_starts, seg_adapter,
            ranks if ranks is not None else seg_adapter,
            T, L, r_max, num_m_blocks, s0,
            *h_outs, *offs, nbs[0], nbs[1] if n > 1 else 0, sum(nbs),
            y.stride(0), y.stride(1), v.stride(-3), v.stride(-2), v.stride(-1),
            v.stride(0) if v.dim() == 4 else 0,
            *group[0].stride(), *group[1].stride(), *group[2].stride(),
            NUM_SLICES=n, HAS_RANKS=ranks is not None, RANK8=(r_max % 8 == 0),
            SPLIT_V=(y.dtype == torch.bfloat16),
            UPCAST=(y.device.type == "cpu" and y.dtype == torch.bfloat16),
            PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
            N_PARTS=v.shape[0] if v.dim() == 4 else 1,
            **cfg,
        )


# ---------------------------------------------------------------------------------------
# Custom op (opaque to torch.compile, capturable in CUDA graphs: no sync, no data reads)
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("multilora::sgmv_expand", mutates_args=("y",))
def _sgmv_expand_op(y: Tensor, v: Tensor, B: list[Tensor], seg_starts: Tensor,
                    seg_adapter: Tensor, scale: Tensor, ranks: Optional[Tensor],
                    max_seg_len: Optional[int], block_m: int, block_n: int) -> None:
    _launch_sgmv_expand(y, v, B, seg_starts, seg_adapter, scale, ranks, max_seg_len,
                        block_m, block_n)


@_sgmv_expand_op.register_fake
def _(y, v, B, seg_starts, seg_adapter, scale, ranks, max_seg_len, block_m, block_n) -> None:
    return None


def sgmv_expand(y: Tensor, v: Tensor, B: Union[Tensor, Sequence[Tensor]], seg_starts: Tensor,
                seg_adapter: Tensor, scale: Tensor, ranks: Optional[Tensor] = None,
                max_seg_len: Optional[int] = None, *, block_m: int = 0, block_n: int = 0,
                check: bool = False) -> None:
    """y[rows of g, slice s] += scale[a] * v[rows, s, :ranks[a]] @ B_s[a, :, :ranks[a]].T.

    y [T, sum h_out_s] in place; v [T, S, r_max] fp32, or sgmv_shrink's partials
    [n, T, S, r_max] (partials=True), added in order; B a tensor [L, h_out, r_max] or a
    sequence of S of them. max_seg_len: host int >= the longest segment, None = T.
    block_m / block_n: 0 picks the H200 defaults. check=True also checks index values."""
    if not isinstance(y, Tensor) or y.dim() != 2 or y.dtype not in (
            torch.float16, torch.bfloat16, torch.float32):
        _fail("y", "a 2-D [T, h_out] fp16/bf16/fp32 tensor",
              f"{getattr(y, 'dtype', type(y).__name__)} {tuple(getattr(y, 'shape', ()))}")
    T = y.shape[0]
    if T == 0:
        _fail("y", "T >= 1", tuple(y.shape))
    Bs = [B] if isinstance(B, Tensor) else list(B)
    if not Bs or not all(isinstance(b, Tensor) for b in Bs):
        _fail("B", "a Tensor or a non-empty sequence of Tensors", type(B).__name__)
    L, r_max = Bs[0].shape[0], Bs[0].shape[-1]
    for s, b in enumerate(Bs):
        name = "B" if isinstance(B, Tensor) else f"B[{s}]"
        if b.dim() != 3 or b.shape[0] != L or b.shape[2] != r_max or b.shape[0] == 0 \
                or not 1 <= r_max <= MAX_RANK:
            _fail(name, f"[L={L}, h_out, r_max={r_max}] with 1 <= r_max <= {MAX_RANK}",
                  tuple(b.shape))
        if b.dtype != y.dtype or b.device != y.device:
            _fail(name, f"{y.dtype} on {y.device} (as y)", f"{b.dtype} on {b.device}")
    S = len(Bs)
    h_total = sum(b.shape[1] for b in Bs)
    if y.shape[1] != h_total:
        _fail("y", f"[T, sum h_out = {h_total}]", tuple(y.shape))
    if not isinstance(v, Tensor) or v.shape[-3:] != (T, S, r_max) or v.dim() not in (3, 4) \
            or v.dtype != torch.float32 or v.device != y.device \
            or (v.dim() == 4 and not 1 <= v.shape[0] <= 64):
        _fail("v", f"fp32 [T={T}, S={S}, r_max={r_max}] or [n <= 64, T, S, r_max] on {y.device}",
              f"{getattr(v, 'dtype', None)} {tuple(getattr(v, 'shape', ()))}")
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or scale.shape != (L,) \
            or scale.device != y.device:
        _fail("scale", f"fp32 [L={L}] on {y.device}",
              f"{getattr(scale, 'dtype', None)} {tuple(getattr(scale, 'shape', ()))}")
    check = check or debug_checks()          # MULTILORA_CHECK=1: values too
    check_segments(seg_starts, seg_adapter, T, L, y.device, max_seg_len, check)
    check_ranks(ranks, L, r_max, y.device, check)
    check_block("block_m", block_m)
    check_block("block_n", block_n)
    torch.ops.multilora.sgmv_expand(y, v, Bs, seg_starts, seg_adapter, scale, ranks,
                                    max_seg_len, block_m, block_n)


if __name__ == "__main__":   # one small shape against the float64 reference
    from multilora_impl import build_segments, lora_reference, make_lora_inputs, relative_error
    from sgmv_triton.sgmv_shrink_triton import sgmv_shrink
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = make_lora_inputs(37, 72, [40, 24, 24], L=3, r_max=16, dtype=torch.float32,
                           device=dev, ranks=[16, 5, 9])
    idx = torch.tensor([0] * 20 + [-1] * 5 + [2] * 12, dtype=torch.int32, device=dev)
    st, ad = build_segments(idx)
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    v = sgmv_shrink(inp["x"], inp["A"], st, ad, inp["ranks"], check=True)
    y = inp["y"].clone()
    sgmv_expand(y, v, inp["B"], st, ad, inp["scale"], inp["ranks"], check=True)
    print(f"sgmv_expand rel err {relative_error(y, ref):.2e}")
