"""Fused decode-step kernels of the engine (Triton), each beside its plain torch form.

The H200 profile of one Llama-3-8B decode step at batch 64 (README, "Where a decode step
goes") has ~22% of its kernel time in small kernels that each move well under a megabyte:
RMSNorm (65 calls), the residual adds (64), RoPE as mul + flip + addcmul (96), the K / V
cache writes (64 index_copy), SiLU and the multiply by up (64). Each costs a launch and a
round trip. These kernels do the same work in fewer launches (per layer 11 -> 4):

    add_rms_norm(x, r, w, eps)          x += r in place, then h = RMSNorm(x) * w   (1 kernel)
    rope_qkv_to_cache(qkv, ...)         RoPE on q and k, k and v into the cache    (1 kernel)
    silu_mul(gu)                        silu(gate) * up                            (1 kernel)
    stacked_expand(y, v, bt, idx, ...)  mode "stacked": y += masked v @ bt          (1 kernel)

Shapes (one decode step, T = batch rows): x, r [T, hidden]; qkv [T, (H + 2 Hkv) d];
gu [T, 2 I]. Arithmetic: fp32 inside, one rounding to the storage dtype per output (the
torch forms round after every op, so results differ by at most ~1 ulp of bf16). The torch
forms (`*_torch`) define the semantics and are what the engine runs without
fused_elementwise; the tests compare the two (CPU: Triton interpreter).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None


# Tile configs of the folded stacked kernels, from sm_90 ptxas output (the Triton 3.6 of
# the H200 image, compiled ahead of time on a CPU machine; tests/test_engine_kernels.py
# ::test_folded_kernels_compile_for_sm90_without_spills): add_rms_norm with a LoRA, one
# rank row per unrolled step over 32 warps (64 registers, no spills; 8-16 warps spilled
# 8-300 bytes); stacked_silu_mul, 32-column tiles over 8 warps (4 warps: 312-1,544 bytes
# of spills; 64 columns: 72). Timed on the H200 (session 6, PERF_LOG v9c): the add_rms_norm
# fold wins (4.90 against 6.60 us per site, the CUDA default), stacked_silu_mul at this
# tile loses to expand + silu_mul (14.75 against 11.78 us). Its tile sweep (session 7,
# PERF_LOG v14, plots/session7/call3_stacked_rows_sweep_70bab56.json): at best 10.52 us
# (128 columns, 8 warps), 1.3 us under expand + silu_mul, within the end-to-end spread;
# the gate/up fold stays opt-in ("triton_folded") with this tile.
LORA_NORM_WARPS = 32

# ---------------------------------------------------------------------------------------
# Residual add + RMSNorm
# ---------------------------------------------------------------------------------------
def add_rms_norm_torch(x: Tensor, r: Optional[Tensor], w: Tensor, eps: float,
                       lora: Optional[tuple] = None) -> Tensor:
    """x += r (in place, x's dtype), returns F.rms_norm(x) with weight w. r None: no add.
    lora: see add_rms_norm (r is then required)."""
    if lora is not None:
        x.copy_((x.float() + r.float() + _stacked_delta(*lora)).to(x.dtype))
    elif r is not None:
        x.add_(r)
    return F.rms_norm(x, (x.shape[-1],), w, eps)


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, h_ptr, N, stride_x, stride_r, stride_h, eps,
                             v_ptr, bt_ptr, idx_ptr, stride_v, stride_be, L,
                             HAS_R: tl.constexpr, HAS_LORA: tl.constexpr, RANK: tl.constexpr,
                             RB: tl.constexpr, BLOCK: tl.constexpr):
        # One program per row: the row (N <= BLOCK elements) stays in registers between the
        # add, the sum of squares and the scaled store. HAS_LORA: r also gets the row's
        # adapter's expand, RB rank rows of bt per step, all steps unrolled so their loads
        # can be in flight together.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_R:
            add = tl.load(r_ptr + row * stride_r + offs, mask=m, other=0.0).to(tl.float32)
            if HAS_LORA:
                a = tl.load(idx_ptr + row).to(tl.int64)
                if (a >= 0) & (a < L):                  # else no LoRA (never out of bounds)
                    for j0 in tl.static_range(0, RANK, RB):
                        j = j0 + tl.arange(0, RB)
                        jm = j < RANK
                        vj = tl.load(v_ptr + row * stride_v + a * RANK + j, mask=jm,
                                     other=0.0).to(tl.float32)
                        b = tl.load(bt_ptr + (a * RANK + j)[:, None] * stride_be + offs[None, :],
                                    mask=jm[:, None] & m[None, :], other=0.0).to(tl.float32)
                        add += tl.sum(vj[:, None] * b, 0)
            x = x + add
            xs = x.to(x_ptr.dtype.element_ty)
            tl.store(x_ptr + row * stride_x + offs, xs, mask=m)
            x = xs.to(tl.float32)                    # normalise the rounded sum, as torch does
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
        w = tl.load(w_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * stride_h + offs, (x * rstd * w).to(h_ptr.dtype.element_ty), mask=m)


def add_rms_norm(x: Tensor, r: Optional[Tensor], w: Tensor, eps: float,
                 lora: Optional[tuple] = None) -> Tensor:
    """Fused add_rms_norm_torch: x [T, N] (unit stride along N, updated in place when r is
    given), r [T, N] or None, w [N] -> h [T, N] in x's dtype.
    lora (v, bt, idx, layout): mode "stacked"'s expand of a one-slice site (o, down) folded
    into the add, x += r + v_a bt_a for row t's adapter a = idx[t] (none when -1), with
    v [T, E] the site GEMM's extra columns (column a r + j: adapter a, rank row j), bt
    [E, N] contiguous, idx [T] int32, layout (1, L, r, E); an idx outside [0, L) adds no
    LoRA (the torch form: the same). Each row reads only its
    adapter's r rows of bt (BGMV-style), so no tile of y makes a round trip to memory."""
    T, N = x.shape
    if x.stride(1) != 1 or (r is not None and (r.shape != x.shape or r.stride(1) != 1)) \
            or w.shape != (N,):
        raise ValueError(f"add_rms_norm: x [T, N] and r [T, N] with unit stride along N, w [N]; "
                         f"got x {tuple(x.shape)} stride {x.stride()}, r "
                         f"{None if r is None else (tuple(r.shape), r.stride())}, w {tuple(w.shape)}")
    rank, L = 1, 0
    if lora is not None:
        v, bt, idx, (S, L, rank, E) = lora
        if r is None or S != 1 or v.shape != (T, E) or v.stride(1) != 1 or bt.shape != (E, N) \
                or not bt.is_contiguous() or idx.shape != (T,) or idx.dtype != torch.int32 \
                or L * rank > E:
            raise ValueError(f"add_rms_norm: lora (v [T, E] unit column stride, bt [E, N] "
                             f"contiguous, idx [T] int32, layout (1, L, r, E >= L r)) needs r; "
                             f"got v {tuple(v.shape)} {v.stride()}, bt {tuple(bt.shape)}, idx "
                             f"{tuple(idx.shape)} {idx.dtype}, layout {(S, L, rank, E)}, r "
                             f"{'given' if r is not None else None}")
    h = torch.empty_like(x)
    if T == 0:
        return h
    block = triton.next_power_of_2(N)
    v, bt, idx = lora[:3] if lora is not None else (x, x, x)
    _add_rms_norm_kernel[(T,)](x, r if r is not None else x, w, h, N, x.stride(0),
                               r.stride(0) if r is not None else 0, h.stride(0), eps,
                               v, bt, idx, v.stride(0), bt.stride(0), L,
                               HAS_R=r is not None, HAS_LORA=lora is not None, RANK=rank,
                               RB=1, BLOCK=block, num_warps=(min(16, max(4, block // 512))
                                                             if lora is None else LORA_NORM_WARPS))
    return h


# ---------------------------------------------------------------------------------------
# RoPE on q and k, k and v into the cache
# ---------------------------------------------------------------------------------------
def rope_torch(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """x [T, n, d] rotated: x * cos + rotate_half(x) * sin (cos, sin_signed [T, 1, d], the
    first half of sin negated); 3 kernels (mul, flip, addcmul) for all n heads together."""
    T, n, d = x.shape
    flipped = x.view(T, n, 2, d // 2).flip(2).view(T, n, d)      # [x2, x1]
    return torch.addcmul(x * cos, flipped, sin_signed)


def rope_qkv_to_cache_torch(qkv: Tensor, cos: Tensor, sin_signed: Tensor, pos: Tensor,
                            k_cache: Tensor, v_cache: Tensor, slot: Tensor, H: int, Hkv: int,
                            lora: Optional[tuple] = None) -> Tensor:
    """qkv [T, (H + 2 Hkv) d] -> q [T, H, d] rotated; writes rotated k and v into
    k_cache / v_cache [>= T, Hkv, S, d] at slot (int64 [1]) for rows 0..T-1. cos,
    sin_signed [n_pos, d]: the engine's tables (first half of sin negated); pos [T] int64."""
    T = qkv.shape[0]
    d = k_cache.shape[-1]
    dtype = qkv.dtype
    if lora is not None:        # the expand added in fp32, rotated in fp32, rounded once
        qkv = qkv.float() + _stacked_delta(*lora)
        cos, sin_signed = cos.float(), sin_signed.float()
    qk = rope_torch(qkv[:, :(H + Hkv) * d].view(T, H + Hkv, d), cos[pos][:, None],
                    sin_signed[pos][:, None]).to(dtype)                   # [T, H + Hkv, d]
    v = qkv[:, (H + Hkv) * d:].view(T, Hkv, d).to(dtype)
    k_cache[:T].index_copy_(2, slot, qk[:, H:, None, :])
    v_cache[:T].index_copy_(2, slot, v[:, :, None, :])
    return qk[:, :H]


if triton is not None:
    @triton.jit
    def _rope_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, kc_ptr, vc_ptr, slot_ptr,
                         stride_qkv, stride_q, stride_q_h, stride_c_b, stride_c_h, stride_c_s,
                         H, Hkv, v_ptr, bt_ptr, idx_ptr, stride_v, stride_be, L,
                         D: tl.constexpr, HAS_LORA: tl.constexpr, RANK: tl.constexpr,
                         RB: tl.constexpr):
        # Program (row t, head j): j < H a query head (rotated into q), H <= j < H + Hkv a
        # key head (rotated into the cache), then the value heads (copied into the cache).
        # HAS_LORA: the head's columns first get the row's adapter's expand (mode "stacked":
        # its RANK rows of bt in the head's slice, [RB, D] read once per program).
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        offs = tl.arange(0, D)
        half: tl.constexpr = D // 2
        src = qkv_ptr + t * stride_qkv + j * D
        slot = tl.load(slot_ptr)
        if HAS_LORA:
            a = tl.load(idx_ptr + t).to(tl.int64)
            s_i = (j >= H).to(tl.int64) + (j >= H + Hkv).to(tl.int64)    # slice q, k or v
            rr = tl.arange(0, RB)
            e = s_i * L * RANK + a * RANK + rr                            # its adapter's rows
            a_rr = rr * 0 + a           # a as a vector: a scalar & a vector makes no mask
            em = (rr < RANK) & (a_rr >= 0) & (a_rr < L)                   # (interpreter)
            vv = tl.load(v_ptr + t * stride_v + e, mask=em, other=0.0).to(tl.float32)
            brow = bt_ptr + e[:, None] * stride_be + j * D
            d_x = tl.sum(vv[:, None] * tl.load(brow + offs[None, :], mask=em[:, None],
                                               other=0.0).to(tl.float32), 0)
        if j < H + Hkv:
            x = tl.load(src + offs).to(tl.float32)
            xf = tl.load(src + (offs + half) % D).to(tl.float32)      # the other half
            if HAS_LORA:
                x += d_x
                xf += tl.sum(vv[:, None] * tl.load(brow + ((offs + half) % D)[None, :],
                                                   mask=em[:, None], other=0.0).to(tl.float32), 0)
            p = tl.load(pos_ptr + t)
            c = tl.load(cos_ptr + p * D + offs).to(tl.float32)
            s = tl.load(sin_ptr + p * D + offs).to(tl.float32)
            y = x * c + xf * s
            if j < H:
                tl.store(q_ptr + t * stride_q + j * stride_q_h + offs, y.to(q_ptr.dtype.element_ty))
            else:
                dst = kc_ptr + t * stride_c_b + (j - H) * stride_c_h + slot * stride_c_s
                tl.store(dst + offs, y.to(kc_ptr.dtype.element_ty))
        else:
            v = tl.load(src + offs)
            if HAS_LORA:
                v = (v.to(tl.float32) + d_x).to(vc_ptr.dtype.element_ty)
            dst = vc_ptr + t * stride_c_b + (j - H - Hkv) * stride_c_h + slot * stride_c_s
            tl.store(dst + offs, v)


def rope_qkv_to_cache(qkv: Tensor, cos: Tensor, sin_signed: Tensor, pos: Tensor,
                      k_cache: Tensor, v_cache: Tensor, slot: Tensor, H: int, Hkv: int,
                      lora: Optional[tuple] = None) -> Tensor:
    """Fused rope_qkv_to_cache_torch (same arguments and result); one launch.
    lora (v, bt, idx, layout): mode "stacked"'s q/k/v expand folded in (as add_rms_norm's
    lora: v [T, E] the GEMM's extra columns, bt [E, (H + 2 Hkv) d] block-diagonal over the
    q, k, v slices, idx [T] int32, layout (3, L, r, E)); each (row, head) program reads
    its adapter's r rows of bt at the head's columns. qkv is not written."""
    T = qkv.shape[0]
    d = k_cache.shape[-1]
    rank, L = 1, 0
    if lora is not None:
        lv, lbt, lidx, (S, L, rank, E) = lora
        if S != 3 or lv.shape != (T, E) or lv.stride(1) != 1 or lbt.shape != (E, qkv.shape[1]) \
                or not lbt.is_contiguous() or lidx.shape != (T,) or lidx.dtype != torch.int32 \
                or 3 * L * rank > E:
            raise ValueError(f"rope_qkv_to_cache: lora (v [T, E] unit column stride, bt [E, "
                             f"(H + 2 Hkv) d] contiguous, idx [T] int32, layout (3, L, r, E >= "
                             f"3 L r)); got v {tuple(lv.shape)} {lv.stride()}, bt "
                             f"{tuple(lbt.shape)}, idx {tuple(lidx.shape)} {lidx.dtype}, layout "
                             f"{(S, L, rank, E)}")
    if qkv.shape[1] != (H + 2 * Hkv) * d or qkv.stride(1) != 1 or d & (d - 1) \
            or k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() \
            or k_cache.stride(-1) != 1 or cos.stride() != (d, 1) or sin_signed.stride() != (d, 1):
        raise ValueError(f"rope_qkv_to_cache: qkv [T, (H + 2 Hkv) d] (d a power of two), equal "
                         f"unit-stride caches [B, Hkv, S, d], tables [n_pos, d]; got qkv "
                         f"{tuple(qkv.shape)}, H={H}, Hkv={Hkv}, cache {tuple(k_cache.shape)}")
    q = torch.empty(T, H, d, dtype=qkv.dtype, device=qkv.device)
    if T:
        lv, lbt, lidx = lora[:3] if lora is not None else (qkv, qkv, pos)
        _rope_qkv_kernel[(T, H + 2 * Hkv)](
            qkv, cos, sin_signed, pos, q, k_cache, v_cache, slot,
            qkv.stride(0), q.stride(0), q.stride(1),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), H, Hkv,
            lv, lbt, lidx, lv.stride(0), lbt.stride(0), L, D=d, HAS_LORA=lora is not None,
            RANK=rank, RB=max(2, triton.next_power_of_2(rank)),
            num_warps=1 if lora is None else 4)
    return q


# ---------------------------------------------------------------------------------------
# SiLU(gate) * up
# ---------------------------------------------------------------------------------------
def silu_mul_torch(gu: Tensor) -> Tensor:
    """gu [T, 2 I] = [gate | up] -> silu(gate) * up [T, I]."""
    inter = gu.shape[1] // 2
    return F.silu(gu[:, :inter]) * gu[:, inter:]


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, I, stride_gu, stride_out, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = offs < I
        g = tl.load(gu_ptr + t * stride_gu + offs, mask=m, other=0.0).to(tl.float32)
        u = tl.load(gu_ptr + t * stride_gu + I + offs, mask=m, other=0.0).to(tl.float32)
        y = g / (1.0 + tl.exp(-g)) * u
        tl.store(out_ptr + t * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=m)


def silu_mul(gu: Tensor) -> Tensor:
    """Fused silu_mul_torch: gu [T, 2 I] (unit stride along columns) -> [T, I]; one launch."""
    T, two_i = gu.shape
    if two_i % 2 or gu.stride(1) != 1:
        raise ValueError(f"silu_mul: gu [T, 2 I] with unit column stride; got {tuple(gu.shape)}, "
                         f"stride {gu.stride()}")
    inter = two_i // 2
    out = torch.empty(T, inter, dtype=gu.dtype, device=gu.device)
    block = min(2048, triton.next_power_of_2(max(inter, 16)))
    if T:
        _silu_mul_kernel[(T, triton.cdiv(inter, block))](gu, out, inter, gu.stride(0), out.stride(0),
                                                         BLOCK=block, num_warps=4)
    return out


# ---------------------------------------------------------------------------------------
# Mode "stacked": the masked expand (multilora_engine.build_stacked_site)
# ---------------------------------------------------------------------------------------
def stacked_mask(idx: Tensor, col_adapter: Tensor, dtype: torch.dtype) -> Tensor:
    """[T, E] of 1 where column e belongs to row t's adapter: idx [T] int32 (-1: no LoRA),
    col_adapter [E] int32 (the adapter of each column, -2 = padding)."""
    return (idx[:, None] == col_adapter[None, :]).to(dtype)


def stacked_col_adapter(layout: tuple, device=None) -> Tensor:
    """[E] int32: the adapter of each extra column of a stacked site with layout (S, L, r,
    E): column s L r + a r + j belongs to adapter a (slice s, rank row j); the padding
    columns past S L r to -2 (no one's)."""
    S, L, r, E = layout
    col = torch.arange(E, device=device)
    return torch.where(col < S * L * r, col // r % L, -2).to(torch.int32)


def _stacked_delta(v: Tensor, bt: Tensor, idx: Tensor, layout: tuple) -> Tensor:
    """(v masked to each row's adapter) @ bt in fp32: mode "stacked"'s expand of one site,
    v [T, E], bt [E, N]; the torch form of the folded kernels' lora= argument (idx outside
    [0, L): no LoRA)."""
    mask = stacked_mask(idx, stacked_col_adapter(layout, v.device), torch.float32)
    return (v.float() * mask) @ bt.float()


def stacked_expand_torch(y: Tensor, v: Tensor, bt: Tensor, mask: Tensor) -> Tensor:
    """y [T, N] += (v * mask) @ bt, in place; v [T, E] (x A^T of every adapter), mask [T, E]
    (stacked_mask), bt [E, N]. Two kernels: the multiply and cuBLAS's addmm."""
    return y.addmm_(v * mask, bt)


if triton is not None:
    @triton.jit
    def _stacked_tile(T, N, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
        # Program (pid_n, pid_t) of a stacked kernel: its BLOCK_T rows (int64, masked at T)
        # and BLOCK_N columns (masked at N).
        rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        return rows.to(tl.int64), rows < T, cols, cols < N

    @triton.jit
    def _masked_expand_acc(acc, v_ptr, bt_ptr, rows64, a_row, cols, cmask, e_lo, e_hi, L, R,
                           stride_vt, stride_be, BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
        # acc [rows, cols] += (v[rows, e] masked to each row's adapter) @ bt[e, cols] over the
        # extra columns e in [e_lo, e_hi) (column e belongs to adapter (e // R) % L); a chunk
        # no row uses is skipped (prefill tiles hold one or two adapters, decode tiles all).
        for e0 in range(e_lo, e_hi, BLOCK_E):
            e = e0 + tl.arange(0, BLOCK_E)
            a_col = tl.where(e < e_hi, (e // R) % L, -2)               # adapter of column e
            hit = a_row[:, None] == a_col[None, :]                     # [rows, BLOCK_E]
            if tl.max(hit.to(tl.int32)) > 0:
                v = tl.load(v_ptr + rows64[:, None] * stride_vt + e[None, :], mask=hit, other=0.0)
                b = tl.load(bt_ptr + e[:, None].to(tl.int64) * stride_be + cols[None, :],
                            mask=(e < e_hi)[:, None] & cmask[None, :], other=0.0)
                acc = tl.dot(v.to(b.dtype), b, acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def _stacked_expand_kernel(y_ptr, v_ptr, bt_ptr, idx_ptr, T, N, n_used, L, R, LR, OFF1, OFF2,
                               stride_yt, stride_vt, stride_be,
                               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
        # One program per (BLOCK_T rows, BLOCK_N columns) of y: acc = sum over the extra
        # columns of the slices this tile's columns belong to (LR = L r per slice; slice 1
        # starts at column OFF1, slice 2 at OFF2) of (v masked to each row's adapter) @ bt.
        # L r <= BLOCK_E (one chunk per slice), so the B loads of a
        # tile are one round trip, with y loaded before them.
        rows64, rmask, cols, cmask = _stacked_tile(T, N, BLOCK_T, BLOCK_N)
        ptrs = y_ptr + rows64[:, None] * stride_yt + cols[None, :]
        m = rmask[:, None] & cmask[None, :]
        y = tl.load(ptrs, mask=m, other=0.0).to(tl.float32)           # in flight with bt
        a_row = tl.load(idx_ptr + rows64, mask=rmask, other=-1)
        c_first = tl.program_id(0) * BLOCK_N
        c_last = tl.minimum(c_first + BLOCK_N, N) - 1
        s_lo = (c_first >= OFF1).to(tl.int32) + (c_first >= OFF2).to(tl.int32)
        s_hi = (c_last >= OFF1).to(tl.int32) + (c_last >= OFF2).to(tl.int32)
        e_hi = tl.minimum((s_hi + 1) * LR, n_used)
        zero = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        acc = _masked_expand_acc(zero, v_ptr, bt_ptr, rows64, a_row, cols, cmask, s_lo * LR,
                                 e_hi, L, R, stride_vt, stride_be, BLOCK_E, PRECISION)
        tl.store(ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=m)


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input_precision: IEEE fp32 for fp32 (TF32 broke the fp32 bound on the H200),
    else the default (bf16 / fp16 inputs take the tensor cores either way)."""
    return "ieee" if dtype == torch.float32 else "tf32"


BLOCK_T_CHOICES = (16, 32, 64, 128)   # token rows per program of the stacked kernels (tl.dot: >= 16)


def _block_t(T: int, block_t: Optional[int], name: str) -> int:
    """Rows per program: block_t if given (a sweep's), else the smallest tile for T <= 32
    and 64 above (all T rows of a decode batch of 64 in one program)."""
    if block_t is None:
        return 64 if T > 32 else 16 if T <= 16 else 32
    if block_t not in BLOCK_T_CHOICES:
        raise ValueError(f"{name}: block_t must be one of {BLOCK_T_CHOICES} or None, got {block_t!r}")
    return block_t


def stacked_expand(y: Tensor, v: Tensor, bt: Tensor, idx: Tensor, layout: tuple,
                   slice_starts: tuple = (), block_n: Optional[int] = None,
                   num_warps: Optional[int] = None, block_t: Optional[int] = None) -> Tensor:
    """Fused stacked_expand_torch (one launch, the mask computed in the kernel): y [T, N]
    and v [T, E] with unit column stride (row strides free: both are views of the site's
    [T, N + E] GEMM output), bt [E, N] contiguous, idx [T] int32, layout (S, L, r, E) of
    the extra columns (column s L r + a r + j belongs to adapter a of slice s; columns >=
    S L r are padding). slice_starts: the first output column of slices 1 .. S-1 (q/k/v,
    gate/up); then bt must be block-diagonal, as multilora_engine.build_stacked_site
    builds it, and slice s's rows are read only for its own columns (1/S of bt). Empty:
    every row of bt for every column. block_n (columns per program; default by N),
    block_t (rows per program, one of BLOCK_T_CHOICES; default by T) and num_warps are for
    sweeps (run_stacked_expand.py). Returns y."""
    S, L, r, E = layout
    T, N = y.shape
    if y.stride(1) != 1 or v.stride(1) != 1 or v.shape != (T, E) or bt.shape != (E, N) \
            or not bt.is_contiguous() or idx.shape != (T,) or idx.dtype != torch.int32 \
            or (slice_starts and (len(slice_starts) != S - 1 or S > 3
                                  or list(slice_starts) != sorted(slice_starts))):
        raise ValueError(f"stacked_expand: y [T, N], v [T, E] (unit column stride), bt [E, N] "
                         f"contiguous, idx [T] int32, layout (S, L, r, E), S <= 3 and S - 1 "
                         f"increasing slice_starts, or none; got y {tuple(y.shape)} {y.stride()}, v "
                         f"{tuple(v.shape)} {v.stride()}, bt {tuple(bt.shape)}, idx "
                         f"{tuple(idx.shape)} {idx.dtype}, layout {layout}, slice_starts "
                         f"{slice_starts}")
    block_t = _block_t(T, block_t, "stacked_expand")
    if T:
        n_used = S * L * r
        lr = L * r if slice_starts else n_used         # rows per slice (all: one slice)
        off = list(slice_starts) + [N] * (2 - len(slice_starts))
        if block_n is None:     # H200 sweep, T 64 (plots/stacked_expand_sweep_h200.json)
            block_n = 128 if N >= 16384 else 64 if N > 4096 else 32
        block_e = max(16, min(128, triton.next_power_of_2(lr)))
        grid = (triton.cdiv(N, block_n), triton.cdiv(T, block_t))
        _stacked_expand_kernel[grid](y, v, bt, idx, T, N, n_used, L, r, lr, off[0], off[1],
                                     y.stride(0), v.stride(0), bt.stride(0), BLOCK_T=block_t,
                                     BLOCK_N=block_n, BLOCK_E=block_e,
                                     PRECISION=_dot_precision(y.dtype),
                                     num_warps=num_warps or 4)
    return y


def stacked_silu_mul_torch(gu: Tensor, v: Tensor, bt: Tensor, mask: Tensor) -> Tensor:
    """silu_mul_torch of gu [T, 2 I] + (v * mask) @ bt, without writing gu; in fp32."""
    return silu_mul_torch(gu.float() + (v.float() * mask) @ bt.float()).to(gu.dtype)


if triton is not None:
    @triton.jit
    def _stacked_silu_mul_kernel(gu_ptr, v_ptr, bt_ptr, idx_ptr, h_ptr, T, I, L, R, LR,
                                 stride_gt, stride_vt, stride_be, stride_ht,
                                 BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_E: tl.constexpr, PRECISION: tl.constexpr):
        # One program per (BLOCK_T rows, BLOCK_N columns of h): the gate and up tiles of
        # those columns get their slices' masked expands (gate: bt rows [0, LR) at columns
        # [0, I); up: rows [LR, 2 LR) at columns [I, 2 I)), then h = silu(gate) * up, all in
        # fp32; gu is read once and never written back.
        rows64, rmask, cols, cmask = _stacked_tile(T, I, BLOCK_T, BLOCK_N)
        m = rmask[:, None] & cmask[None, :]
        gptrs = gu_ptr + rows64[:, None] * stride_gt + cols[None, :]
        g = tl.load(gptrs, mask=m, other=0.0).to(tl.float32)            # in flight with bt
        u = tl.load(gptrs + I, mask=m, other=0.0).to(tl.float32)
        a_row = tl.load(idx_ptr + rows64, mask=rmask, other=-1)
        zero = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        g += _masked_expand_acc(zero, v_ptr, bt_ptr, rows64, a_row, cols, cmask, 0, LR, L, R,
                                stride_vt, stride_be, BLOCK_E, PRECISION)
        u += _masked_expand_acc(zero, v_ptr, bt_ptr + I, rows64, a_row, cols, cmask, LR, 2 * LR,
                                L, R, stride_vt, stride_be, BLOCK_E, PRECISION)
        h = g / (1.0 + tl.exp(-g)) * u
        tl.store(h_ptr + rows64[:, None] * stride_ht + cols[None, :],
                 h.to(h_ptr.dtype.element_ty), mask=m)


def stacked_silu_mul(gu: Tensor, v: Tensor, bt: Tensor, idx: Tensor, layout: tuple,
                     block_n: Optional[int] = None, num_warps: int = 8,
                     block_t: Optional[int] = None) -> Tensor:
    """Mode "stacked"'s gate/up expand fused with silu_mul (one launch instead of two, and
    the [T, 2 I] GEMM output is read once, not read, written and read again):
    gu [T, 2 I] = [gate | up] and v [T, E] unit column stride (views of the site's GEMM
    output), bt [E, 2 I] contiguous and block-diagonal (gate rows s = 0 at columns [0, I),
    up rows s = 1 at [I, 2 I), as multilora_engine.build_stacked_site builds it), idx [T]
    int32, layout (2, L, r, E) -> h [T, I] = silu(gate') * up' with gate', up' the
    LoRA-added halves, in fp32 (not rounded to gu's dtype in between). block_n, num_warps
    and block_t (stacked_expand's) are for sweeps (run_stacked_expand.py --folded)."""
    S, L, r, E = layout
    T, two_i = gu.shape
    inter = two_i // 2
    if S != 2 or two_i % 2 or gu.stride(1) != 1 or v.stride(1) != 1 or v.shape != (T, E) \
            or bt.shape != (E, two_i) or not bt.is_contiguous() or idx.shape != (T,) \
            or idx.dtype != torch.int32 or 2 * L * r > E:
        raise ValueError(f"stacked_silu_mul: gu [T, 2 I], v [T, E] (unit column stride), bt "
                         f"[E, 2 I] contiguous, idx [T] int32, layout (2, L, r, E >= 2 L r); got "
                         f"gu {tuple(gu.shape)} {gu.stride()}, v {tuple(v.shape)} {v.stride()}, "
                         f"bt {tuple(bt.shape)}, idx {tuple(idx.shape)} {idx.dtype}, layout {layout}")
    block_t = _block_t(T, block_t, "stacked_silu_mul")
    h = torch.empty(T, inter, dtype=gu.dtype, device=gu.device)
    if T:
        lr = L * r
        block_n = block_n or 32
        block_e = max(16, min(128, triton.next_power_of_2(lr)))
        grid = (triton.cdiv(inter, block_n), triton.cdiv(T, block_t))
        _stacked_silu_mul_kernel[grid](gu, v, bt, idx, h, T, inter, L, r, lr, gu.stride(0),
                                       v.stride(0), bt.stride(0), h.stride(0),
                                       BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_E=block_e,
                                       PRECISION=_dot_precision(gu.dtype),
                                       num_warps=num_warps)
    return h


# ---------------------------------------------------------------------------------------
# Decode attention over the filled part of the cache (flash-decoding)
# ---------------------------------------------------------------------------------------
def decode_bias(slots: Tensor, start: Tensor, cur: Tensor, dtype) -> Tensor:
    """Additive decode mask [T, 1, 1, Sb]: 0 where start[b] <= slot <= cur, else -inf
    (slots [Sb] int64, start [T], cur int64 [1]); built once per step, shared by layers."""
    valid = (slots[None, :] >= start[:, None]) & (slots[None, :] <= cur)     # [T, Sb]
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    return bias.masked_fill(~valid, float("-inf"))[:, None, None, :]


def decode_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor,
                           cur: Tensor, Sb: int, scale: float) -> Tensor:
    """q [T, H, d]; k_cache, v_cache [>= T, Hkv, S, d]; row b attends over slots
    start[b] <= s <= cur (cur: int64 [1]) among the first Sb -> [T, H d]. The engine's
    plain path: the G = H / Hkv query heads of a KV head as G rows, one SDPA call."""
    T, H, d = q.shape
    Hkv = k_cache.shape[1]
    bias = decode_bias(torch.arange(Sb, device=q.device), start[:T], cur, q.dtype)
    a = F.scaled_dot_product_attention(q.reshape(T, Hkv, H // Hkv, d), k_cache[:T, :, :Sb],
                                       v_cache[:T, :, :Sb], attn_mask=bias, scale=scale)
    return a.reshape(T, H * d)


if triton is not None:
    @triton.jit
    def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, start_ptr, cur_ptr, acc_ptr, ml_ptr, out_ptr,
                            Sb, SPLIT_LEN, G, scale,
                            stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ch, stride_cs,
                            NS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                            BLOCK_N: tl.constexpr):
        # Program (row b, KV head h, split c): the G query heads of h (rows of a GP x D tile,
        # GP >= 16 for tl.dot) against slots [c SPLIT_LEN, (c + 1) SPLIT_LEN) of the row's
        # valid range, online softmax in fp32. NS == 1: normalise and store the output;
        # else store the unnormalised partial (acc, max, sum) for _decode_attn_combine.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        c = tl.program_id(2)
        rows = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        rmask = rows < G
        q = tl.load(q_ptr + b * stride_qt + (h * G + rows[:, None]) * stride_qh + offs_d[None, :],
                    mask=rmask[:, None], other=0.0)
        cur = tl.load(cur_ptr)
        lo = tl.maximum(tl.load(start_ptr + b), c * SPLIT_LEN)
        hi = tl.minimum(tl.minimum(cur + 1, Sb), (c + 1) * SPLIT_LEN)
        kbase = k_ptr + b * stride_cb + h * stride_ch
        vbase = v_ptr + b * stride_cb + h * stride_ch
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < hi
            k = tl.load(kbase + n[:, None] * stride_cs + offs_d[None, :], mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale                               # [GP, BLOCK_N]
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(vbase + n[:, None] * stride_cs + offs_d[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        if NS == 1:
            o = acc / l_i[:, None]
            tl.store(out_ptr + b * stride_ot + (h * G + rows[:, None]) * stride_oh + offs_d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        else:
            part = (b * tl.num_programs(1) + h) * NS + c                     # [T, Hkv, NS]
            tl.store(acc_ptr + part * GP * D + rows[:, None] * D + offs_d[None, :], acc)
            tl.store(ml_ptr + part * 2 * GP + rows, m_i)
            tl.store(ml_ptr + part * 2 * GP + GP + rows, l_i)

    @triton.jit
    def _decode_attn_combine(acc_ptr, ml_ptr, out_ptr, G, stride_ot, stride_oh,
                             NS: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
        # Program (row b, KV head h): the NS partials -> softmax-weighted sum. Splits with
        # no valid slot have max -inf and weight 0; the slot `cur` is always valid, so the
        # overall max is finite.
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        rows = tl.arange(0, GP)
        offs_d = tl.arange(0, D)
        base = (b * tl.num_programs(1) + h) * NS
        m = tl.full([GP], float("-inf"), tl.float32)
        for c in range(NS):
            m = tl.maximum(m, tl.load(ml_ptr + (base + c) * 2 * GP + rows))
        l_sum = tl.zeros([GP], tl.float32)
        o = tl.zeros([GP, D], tl.float32)
        for c in range(NS):
            m_c = tl.load(ml_ptr + (base + c) * 2 * GP + rows)
            w = tl.where(m_c > float("-inf"), tl.exp(m_c - m), 0.0)
            l_sum += w * tl.load(ml_ptr + (base + c) * 2 * GP + GP + rows)
            o += w[:, None] * tl.load(acc_ptr + (base + c) * GP * D + rows[:, None] * D + offs_d[None, :])
        o = o / l_sum[:, None]
        tl.store(out_ptr + b * stride_ot + (h * G + rows[:, None]) * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=(rows < G)[:, None])


DECODE_ATTN_BLOCK_N = 64        # cache slots per iteration
DECODE_ATTN_PROGRAMS = 264      # split the cache until T * Hkv * splits covers ~2 waves of SMs


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, cur: Tensor,
                     Sb: int, scale: float, splits: Optional[int] = None) -> Tensor:
    """Triton decode_attention_torch (same arguments and result): one kernel when T * Hkv
    programs fill the GPU, else the cache split into `splits` ranges (default: enough for
    DECODE_ATTN_PROGRAMS programs) plus a combine kernel. Reads only slots [start[b], cur]
    of each row. Sb (host int) fixes the grid, so one CUDA graph serves every cur < Sb."""
    T, H, d = q.shape
    Hkv = k_cache.shape[1]
    if q.stride(2) != 1 or H % Hkv or d & (d - 1) or d < 16 or k_cache.stride() != v_cache.stride() \
            or k_cache.stride(-1) != 1 or k_cache.shape[-1] != d or Sb > k_cache.shape[2]:
        raise ValueError(f"decode_attention: q [T, H, d] (d a power of two >= 16, unit stride), "
                         f"caches [B, Hkv, S >= Sb, d] with equal strides; got q {tuple(q.shape)}, "
                         f"cache {tuple(k_cache.shape)}, Sb={Sb}")
    G = H // Hkv
    out = torch.empty(T, H, d, dtype=q.dtype, device=q.device)
    if T == 0:
        return out.reshape(T, H * d)
    if splits is None:
        splits = 1
        while T * Hkv * splits < DECODE_ATTN_PROGRAMS and Sb > splits * 2 * DECODE_ATTN_BLOCK_N:
            splits *= 2
    split_len = triton.cdiv(triton.cdiv(Sb, splits), DECODE_ATTN_BLOCK_N) * DECODE_ATTN_BLOCK_N
    NS = triton.cdiv(Sb, split_len)
    GP = max(16, triton.next_power_of_2(G))
    acc = ml = out
    if NS > 1:
        acc = torch.empty(T, Hkv, NS, GP, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(T, Hkv, NS, 2, GP, dtype=torch.float32, device=q.device)
    o_strides = (out.stride(0), out.stride(1))
    _decode_attn_kernel[(T, Hkv, NS)](q, k_cache, v_cache, start, cur, acc, ml, out, Sb, split_len,
                                      G, scale, q.stride(0), q.stride(1), *o_strides,
                                      k_cache.stride(0), k_cache.stride(1),
                                      k_cache.stride(2), NS=NS, GP=GP, D=d,
                                      BLOCK_N=DECODE_ATTN_BLOCK_N, num_warps=4)
    if NS > 1:
        _decode_attn_combine[(T, Hkv)](acc, ml, out, G, *o_strides, NS=NS, GP=GP, D=d, num_warps=4)
    return out.reshape(T, H * d)
