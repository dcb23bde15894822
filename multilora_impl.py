"""Multi-LoRA: the operation's contract, the float64 reference, the torch baselines,
the registry of every implementation, and the decode microbenchmark (see main()).

For every token t whose adapter is i = idx[t] (nothing when idx[t] == -1):

    v[t]  = x[t] @ A[i, :ranks[i]].T                      # shrink, kept in fp32
    y[t] += scale[i] * v[t] @ B[i, :, :ranks[i]].T        # expand, in place

Shapes (torch.nn.Linear / PEFT layouts, so PEFT weights drop in unchanged):
    x      [T, h_in]            fp16 / bf16 / fp32
    y      [T, h_out]           same dtype as x, updated in place
    A      [L, r_max, h_in]     stacked lora_A weights of L adapters
    B      [L, h_out, r_max]    stacked lora_B weights (PEFT's rows, or the same tensor stored
                                rank-major by to_rank_major, which bgmv_cuda reads densely)
    idx    [T]                  int32 / int64, adapter of each token, -1 = no LoRA
    scale  [L]                  fp32 (lora_alpha / r, or alpha / sqrt(r) for rsLoRA)
    ranks  [L] int32 or None    adapter i uses its first ranks[i] rows of A / columns
                                of B; the padded part is never read by the kernels

Output slices (q/k/v or gate/up read the same x): A may be [S, L, r_max, h_in] and B a
tuple of S tensors [L, h_out_s, r_max]; y is then [T, sum_s h_out_s] with slice s in
columns [off_s, off_s + h_out_s). Kernels shrink once for all S slices.

Every mode is called the same way:  fn(y, x, A, B, idx, scale, ranks=None, meta=None).
`meta` (a LoraMeta from `make_meta`, built on the host where the request-to-adapter
assignment is known) carries segments and groups; when None, a mode that needs it builds
it from idx (one host sync, fine for tests, not inside a CUDA graph).

Bad input raises ValueError naming the argument (shape, dtype, device, layout: free host
checks). y must have unit stride along h_out and rows that do not overlap (a stride-0
`expand` view is refused: in-place updates of shared memory would be silently wrong);
other strides (a column slice of a wider y, non-contiguous x, A, B) give correct results.

Index values live on the device, so the hot path does not read them (that would be a host
sync, impossible inside a CUDA graph). Debug flag: with the environment variable
MULTILORA_CHECK=1 (read at each call; ignored while torch.compile traces), every
check_lora_args call, the shrink / expand wrappers of bgmv_triton and bgmv_cuda, and the
SGMV wrappers also check the values: idx in [-1, L), ranks in [0, r_max], and SGMV segment
metadata (seg_starts from 0 to T, non-decreasing, max_seg_len >= the longest segment,
seg_adapter in [-1, L), segments that rebuild idx). With the flag off, an idx outside
[-1, L) is never an out-of-bounds access, but its outcome differs by mode:
    bgmv_triton, sgmv_triton   the token is treated as idx = -1 (row untouched); ranks[i]
                               above r_max is clamped to r_max, below 0 acts as 0
    bgmv_cuda                  the token's output row becomes NaN (loud); likewise a rank
                               outside [0, r_max]
    loop, gbmm, cheat_bmm      read idx on the host anyway: idx >= L raises ValueError,
                               idx < -1 is treated as -1
(sgmv_triton called without meta builds the segments on the host and always checks.)
NaN / Inf in x, A, B or y are propagated, never hidden: into the rows (and the output
slice) that use them, and nowhere else.
"""
from __future__ import annotations

import argparse
import os
import sys
import importlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# ||out - ref|| / ||ref|| bounds against the float64 reference (DESIGN.md, Validation).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
MAX_RANK = 128  # the largest rank every kernel supports
WORKLOADS = ("distinct", "uniform", "skewed", "identical")
# Llama-3-8B linear layers: name -> (h_in, output slices); q/k/v and gate/up share one x.
LLAMA3_8B_LAYERS = {
    "qkv": (4096, [4096, 1024, 1024]),
    "o": (4096, [4096]),
    "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}

BList = Union[Tensor, Sequence[Tensor]]


# ---------------------------------------------------------------------------------------
# Input checking, shared by every public entry point
# ---------------------------------------------------------------------------------------
def _fail(arg: str, expected: str, got: object) -> None:
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def debug_checks() -> bool:
    """True when MULTILORA_CHECK is set to a non-empty value other than 0 (the debug flag
    of the module docstring). Always False while torch.compile traces (no host reads)."""
    if torch.compiler.is_compiling():
        return False
    return os.environ.get("MULTILORA_CHECK", "0") not in ("", "0")


def check_index_values(idx: Tensor, L: int, ranks: Optional[Tensor] = None,
                       r_max: Optional[int] = None) -> None:
    """idx in [-1, L) and ranks in [0, r_max]: reads both on the host (a sync), so only
    under check_idx_range=True or the MULTILORA_CHECK flag. ValueError names the argument."""
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= L:
            _fail("idx", f"values in [-1, {L - 1}]", f"range [{lo}, {hi}]")
    if ranks is not None and ranks.numel():
        rlo, rhi = int(ranks.min()), int(ranks.max())
        if rlo < 0 or (r_max is not None and rhi > r_max):
            _fail("ranks", f"values in [0, r_max={r_max}]", f"range [{rlo}, {rhi}]")


def as_slices(A: Tensor, B: BList) -> tuple[Tensor, list[Tensor]]:
    """Normalise to A4 [S, L, r_max, h_in] and a list of S tensors B_s [L, h_out_s, r_max]."""
    if not isinstance(A, Tensor):
        _fail("A", "a torch.Tensor", type(A).__name__)
    if A.dim() == 3:
        A4 = A.unsqueeze(0)
    elif A.dim() == 4:
        A4 = A
    else:
        _fail("A", "[L, r_max, h_in] or [S, L, r_max, h_in]", tuple(A.shape))
    Bs = [B] if isinstance(B, Tensor) else list(B)
    if not all(isinstance(b, Tensor) for b in Bs):
        _fail("B", "a Tensor or a sequence of Tensors", [type(b).__name__ for b in Bs])
    if len(Bs) != A4.shape[0]:
        _fail("B", f"{A4.shape[0]} slice(s) to match A", len(Bs))
    return A4, Bs


def check_lora_args(y: Tensor, x: Tensor, A: Tensor, B: BList, idx: Tensor, scale: Tensor,
                    ranks: Optional[Tensor] = None, *, max_rank: int = MAX_RANK,
                    check_idx_range: bool = False) -> tuple[Tensor, list[Tensor]]:
    """Validate the contract; raise ValueError naming the argument. Returns (A4, Bs).

    Index values (idx in [-1, L), ranks in [0, r_max]) are only checked with
    check_idx_range=True or under the MULTILORA_CHECK=1 debug flag (they are read on the
    host, a sync; kernels skip it in the hot path). y must not have overlapping rows.
    """
    A4, Bs = as_slices(A, B)
    for name, t in (("y", y), ("x", x), ("idx", idx), ("scale", scale)):
        if not isinstance(t, Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__)
    if x.dtype not in TOLERANCE:
        _fail("x", "dtype float16, bfloat16 or float32", x.dtype)
    if x.dim() != 2:
        _fail("x", "2-D [T, h_in]", tuple(x.shape))
    T, h_in = x.shape
    if T == 0:
        _fail("x", "at least one token (T >= 1)", tuple(x.shape))
    S, L, r_max, a_h_in = A4.shape
    if L == 0 or r_max == 0:
        _fail("A", "L >= 1 adapters and r_max >= 1", tuple(A.shape))
    if a_h_in != h_in:
        _fail("A", f"last dim h_in={h_in} to match x", tuple(A.shape))
    if r_max > max_rank:
        _fail("A", f"r_max <= {max_rank}", r_max)
    h_out_total = 0
    for s, b in enumerate(Bs):
        bname = "B" if len(Bs) == 1 and isinstance(B, Tensor) else f"B[{s}]"
        if b.dim() != 3 or b.shape[0] != L or b.shape[2] != r_max:
            _fail(bname, f"[L={L}, h_out, r_max={r_max}]", tuple(b.shape))
        if b.dtype != x.dtype:
            _fail(bname, f"dtype {x.dtype} (same as x)", b.dtype)
        if b.device != x.device:
            _fail(bname, f"device {x.device} (same as x)", b.device)
        h_out_total += b.shape[1]
    if y.dim() != 2 or y.shape[0] != T or y.shape[1] != h_out_total:
        _fail("y", f"[T={T}, h_out={h_out_total}]", tuple(y.shape))
    for name, t in (("y", y), ("A", A4)):
        if t.dtype != x.dtype:
            _fail(name, f"dtype {x.dtype} (same as x)", t.dtype)
    for name, t in (("y", y), ("A", A4), ("idx", idx), ("scale", scale)):
        if t.device != x.device:
            _fail(name, f"device {x.device} (same as x)", t.device)
    if idx.dtype not in (torch.int32, torch.int64) or idx.shape != (T,):
        _fail("idx", f"int32/int64 of shape [T={T}]", f"{idx.dtype} {tuple(idx.shape)}")
    if scale.dtype != torch.float32 or scale.shape != (L,):
        _fail("scale", f"float32 of shape [L={L}]", f"{scale.dtype} {tuple(scale.shape)}")
    if ranks is not None:
        if not isinstance(ranks, Tensor) or ranks.dtype not in (torch.int32, torch.int64) \
                or ranks.shape != (L,):
            _fail("ranks", f"int32 tensor of shape [L={L}] or None",
                  f"{getattr(ranks, 'dtype', type(ranks))} {tuple(getattr(ranks, 'shape', ()))}")
        if ranks.device != x.device:
            _fail("ranks", f"device {x.device} (same as x)", ranks.device)
    if y.stride(-1) != 1:
        _fail("y", "unit stride in the last dim", y.stride())
    if T > 1 and y.stride(0) < h_out_total:
        # e.g. an expand() view (row stride 0): in-place updates would race / double-add
        _fail("y", f"rows that do not overlap (row stride >= h_out={h_out_total})",
              f"strides {tuple(y.stride())}")
    if check_idx_range or debug_checks():
        check_index_values(idx, L, ranks, r_max)
    return A4, Bs


# ---------------------------------------------------------------------------------------
# The float64 reference
# ---------------------------------------------------------------------------------------
def lora_reference(y: Tensor, x: Tensor, A: Tensor, B: BList, idx: Tensor, scale: Tensor,
                   ranks: Optional[Tensor] = None) -> Tensor:
    """Return y + LoRA in float64 on the CPU (y is not modified). The operation stated
    plainly, one adapter's tokens at a time (computed in float64 on A's device, where the
    large tensors are; x, y and idx may be elsewhere)."""
    A4, Bs = as_slices(A, B)
    dev = A4.device
    out = y.detach().to(dev, torch.float64).clone()
    x64 = x.detach().to(dev, torch.float64)
    idx_d = idx.detach().to(dev, torch.long)
    r_max = A4.shape[2]
    ranks_l = ranks.tolist() if ranks is not None else [r_max] * A4.shape[1]
    scale_l = scale.tolist()
    used = sorted(i for i in set(idx_d.tolist()) if i >= 0)      # -1 (and below): no LoRA
    col = 0
    for s, B_s in enumerate(Bs):
        h_out = B_s.shape[1]
        for i in used:
            rows = (idx_d == i).nonzero().squeeze(1)
            r = ranks_l[i]
            v = x64[rows] @ A4[s, i, :r].to(torch.float64).T         # [n, r]
            out[rows, col:col + h_out] += scale_l[i] * (v @ B_s[i, :, :r].to(dev, torch.float64).T)
        col += h_out
    return out.cpu()


def logits_bound(dtype: torch.dtype, oracle_noise: float = 0.0) -> float:
    """End-to-end logits bound against PEFT's forward: TOLERANCE[dtype], widened to 2 x
    oracle_noise = ||PEFT in dtype - PEFT in fp32|| / ||.||. In bf16 a deep model turns
    last-bit differences into logits differences near the kernel bound (7e-2 after 32
    random layers, measured), so a correct implementation is within about twice the
    oracle's own error; a wrong kernel is off by the LoRA's whole effect, far above it."""
    return max(TOLERANCE[dtype], 2.0 * oracle_noise)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN anywhere gives NaN, which fails every bound)."""
    out64 = out.detach().to("cpu", torch.float64)
    ref64 = ref.detach().to("cpu", torch.float64)
    diff, norm = torch.linalg.vector_norm(out64 - ref64), torch.linalg.vector_norm(ref64)
    # all rows skipped (ref = -0.0 rows only): the absolute error, 0 when untouched
    return float(diff / norm) if norm > 0 else float(diff)


# ---------------------------------------------------------------------------------------
# Metadata: segments (SGMV) and groups (gbmm), built on the host
# ---------------------------------------------------------------------------------------
def build_segments(idx: Tensor) -> tuple[Tensor, Tensor]:
    """One segment per run of consecutive tokens with the same adapter (including -1 runs,
    whose programs exit at once). Returns int32 seg_starts [S+1] and seg_adapter [S] on
    idx's device. Reads idx on the host: call it where the assignment is known."""
    idx_h = idx.detach().to("cpu", torch.int64)
    T = idx_h.numel()
    if T == 0:
        _fail("idx", "at least one token", tuple(idx.shape))
    change = torch.ones(T, dtype=torch.bool)
    change[1:] = idx_h[1:] != idx_h[:-1]
    starts = torch.nonzero(change).flatten()
    seg_starts = torch.cat([starts, torch.tensor([T])]).to(torch.int32)
    seg_adapter = idx_h[starts].to(torch.int32)
    return seg_starts.to(idx.device), seg_adapter.to(idx.device)


def build_chunks(idx: Tensor, size: int = 8) -> Tensor:
    """Tokens grouped by adapter for bgmv_cuda's rule "mma": int32 [n_chunks, size + 1] on
    idx's device, each row up to `size` tokens (in index order) that share one idx value, -1
    padded, then that idx value (the kernels read the adapter with the tokens, not through
    idx: PERF_LOG v26); every token with idx != -1 is in exactly one row. Reads idx on the
    host: call it where the assignment is known (make_meta does)."""
    idx_h = idx.detach().to("cpu", torch.int64)
    tok = torch.nonzero(idx_h != -1).flatten()          # a fixed number of ops, no loop
    adapter, order = torch.sort(idx_h[tok], stable=True)  # tokens by adapter, index order
    tok = tok[order]
    if tok.numel() == 0:
        return torch.empty((0, size + 1), dtype=torch.int32, device=idx.device)
    first = torch.ones_like(adapter, dtype=torch.bool)
    first[1:] = adapter[1:] != adapter[:-1]
    group = torch.cumsum(first, 0) - 1                    # adapter group of each token
    pos = torch.arange(tok.numel()) - torch.nonzero(first).flatten()[group]
    per_group = -(-torch.bincount(group) // size)         # chunks per adapter
    chunk = (torch.cumsum(per_group, 0) - per_group)[group] + pos // size
    out = torch.full((int(per_group.sum()), size + 1), -1, dtype=torch.int32)
    out[chunk, pos % size] = tok.to(torch.int32)
    out[chunk, size] = adapter.to(torch.int32)
    return out.to(idx.device)


RANK_GROUPS = 9   # kBgmvRankGroups in bgmv_cuda/bgmv_params.h: invalid, then 128, 64, ..., 1


def build_rank_work(idx: Tensor, ranks: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """bgmv_cuda rule "rank"'s token list (PERF_LOG v41): the tokens with a LoRA (idx != -1,
    rank != 0) as int32 rows (token, adapter, rank) on idx's device, in RANK_GROUPS groups:
    group 0 the tokens whose idx is outside [-1, L) (adapter -2) or whose rank is negative
    (rank -1: the kernels turn their output rows into NaN), then group g >= 1 the ranks r with
    next_pow2(r) == 256 >> g (128 down to 1; ranks above 128 in group 1), tokens in index
    order within a group; and the row count of each group (host ints, the launch's grid).
    The kernels then launch only the blocks each group's rank needs. Reads idx and ranks on
    the host: call it where the assignment is known (make_meta does)."""
    idx_h = idx.detach().to("cpu", torch.int64)
    ranks_h = ranks.detach().to("cpu", torch.int64)
    T, L = idx_h.numel(), ranks_h.numel()
    valid = (idx_h >= 0) & (idx_h < L)
    rank = torch.zeros(T, dtype=torch.int64)
    rank[valid] = ranks_h[idx_h[valid]]
    invalid = ((idx_h < -1) | (idx_h >= L)) | (valid & (rank < 0))
    rank[invalid] = -1
    adapter = torch.where((idx_h < -1) | (idx_h >= L), -2, idx_h)
    # group of rank r >= 1: 8 - ceil(log2 r), at least 1
    steps = sum((rank > (1 << k)).long() for k in range(RANK_GROUPS - 1))
    group = torch.where(invalid, 0, (RANK_GROUPS - 1 - steps).clamp(min=1))
    keep = torch.nonzero(invalid | (valid & (rank > 0))).flatten()
    order = keep[torch.sort(group[keep], stable=True).indices]   # by group, then index
    work = torch.stack([order, adapter[order], rank[order]], dim=1).to(torch.int32)
    rows = torch.bincount(group[order], minlength=RANK_GROUPS)
    return work.contiguous().to(idx.device), tuple(int(n) for n in rows)


def idx_from_segments(seg_starts: Tensor, seg_adapter: Tensor) -> Tensor:
    """Inverse of build_segments: idx [T] int64 (SGMV's semantics are BGMV's on this idx)."""
    lens = (seg_starts[1:] - seg_starts[:-1]).to(torch.int64)
    return torch.repeat_interleave(seg_adapter.to(torch.int64), lens)


@dataclass
class LoraMeta:
    """Per-batch metadata built once on the host and reused by every layer and step."""
    idx: Tensor                    # [T] int32, device
    seg_starts: Tensor             # [S+1] int32, device
    seg_adapter: Tensor            # [S] int32, device
    num_segments: int
    max_seg_len: int
    # gbmm: for each adapter present, the positions of its tokens (device int64 tensors)
    groups: list[tuple[int, Tensor]] = field(default_factory=list)
    # cheat_bmm: A[idx], B[idx] gathered outside the timed region
    gathered: Optional[tuple] = None
    # bgmv_cuda (tile rule "mma"): tokens grouped by adapter, build_chunks(idx)
    chunks: Optional[Tensor] = None
    # bgmv_cuda's default switch (mma_chunks_pay): the sum of each LoRA token's own rank,
    # None when the ranks were not given (every adapter then counts at r_max)
    rank_sum: Optional[int] = None
    # bgmv_cuda rule "rank": build_rank_work(idx, ranks), the tokens grouped by rank (grids
    # of only the blocks the ranks need), None when the ranks were not given
    rank_work: Optional[tuple] = None


def make_meta(idx: Tensor, chunks: bool = True, ranks: Optional[Tensor] = None) -> LoraMeta:
    """The per-batch metadata of idx (host work). chunks=False skips build_chunks, which
    only bgmv_cuda's rule "mma" reads (callers that run another mode per step). ranks [L]
    (optional, one more device read): each adapter's rank, summed over the LoRA tokens into
    rank_sum, which bgmv_cuda's default reads to choose its rule, and the tokens grouped by
    rank (rank_work, build_rank_work) for bgmv_cuda's rule "rank"."""
    idx_h = idx.detach().to("cpu", torch.int64)      # the one device read of idx
    rank_sum = rank_work = None
    if ranks is not None:
        work, rows = build_rank_work(idx_h, ranks)      # host rows: the tokens' own ranks
        rank_sum = int(work[:, 2].clamp(min=0).sum())   # invalid rows (rank -1) count 0
        rank_work = (work.to(idx.device), rows)
    seg_starts, seg_adapter = build_segments(idx_h)   # host tensors, moved below
    lens = seg_starts[1:] - seg_starts[:-1]
    groups = []
    for a in torch.unique(idx_h).tolist():
        if a >= 0:
            groups.append((a, torch.nonzero(idx_h == a).flatten().to(idx.device)))
    return LoraMeta(idx=idx.to(torch.int32), seg_starts=seg_starts.to(idx.device),
                    seg_adapter=seg_adapter.to(idx.device),
                    num_segments=int(seg_adapter.numel()), max_seg_len=int(lens.max()),
                    groups=groups, chunks=build_chunks(idx_h).to(idx.device) if chunks else None,
                    rank_sum=rank_sum, rank_work=rank_work)


def make_static_meta(T: int, device: Union[str, torch.device], max_seg_len: Optional[int] = None,
                     idx: Optional[Tensor] = None) -> LoraMeta:
    """Metadata buffers at their maximum size for a CUDA graph over T tokens: T segments
    (every token its own, at worst), max_seg_len = T unless a smaller bound is known. Grids
    depend only on these host ints, so one capture serves every assignment. idx: an int32
    [T] buffer the caller owns (e.g. a slice of an engine's state), else a new one."""
    if idx is None:
        idx = torch.full((T,), -1, dtype=torch.int32, device=device)          # [T]
    seg_starts = torch.full((T + 1,), T, dtype=torch.int32, device=device)   # [T + 1]
    seg_starts[0] = 0
    seg_adapter = torch.full((T,), -1, dtype=torch.int32, device=device)     # [T]
    return LoraMeta(idx=idx, seg_starts=seg_starts, seg_adapter=seg_adapter, num_segments=T,
                    max_seg_len=T if max_seg_len is None else max_seg_len)


def fill_static_meta(meta: LoraMeta, idx: Tensor) -> None:
    """Write the segments of a new assignment idx [T] into meta's buffers in place (host
    work plus three copies; call it before replay, outside the captured region). Unused
    segment slots become empty segments at T with adapter -1."""
    T = meta.idx.shape[0]
    if idx.shape != (T,):
        _fail("idx", f"shape [T={T}] (the static buffers' size)", tuple(idx.shape))
    st, ad = build_segments(idx.to("cpu"))
    longest = int((st[1:] - st[:-1]).max())
    if longest > meta.max_seg_len:
        _fail("idx", f"segments no longer than max_seg_len={meta.max_seg_len}", longest)
    n = ad.numel()
    st_full = torch.full((T + 1,), T, dtype=torch.int32)     # padding: empty segments at T
    st_full[:n + 1] = st
    ad_full = torch.full((T,), -1, dtype=torch.int32)        # ... with no adapter
    ad_full[:n] = ad
    meta.seg_starts.copy_(st_full)
    meta.seg_adapter.copy_(ad_full)
    meta.idx.copy_(idx.to(torch.int32))


# ---------------------------------------------------------------------------------------
# Torch baselines
# ---------------------------------------------------------------------------------------
def _rank_mask(ranks: Optional[Tensor], adapters: Tensor, r_max: int) -> Optional[Tensor]:
    """[n, r_max] bool, True where the rank column is used (None: all are)."""
    if ranks is None:
        return None
    return torch.arange(r_max, device=adapters.device)[None, :] < ranks.long()[adapters][:, None]


def lora_none(y, x, A, B, idx, scale, ranks=None, meta=None) -> None:
    """No LoRA: the cost floor."""
    return None


def lora_loop(y, x, A, B, idx, scale, ranks=None, meta=None) -> None:
    """The obvious loop: per run of same-adapter tokens (a request in prefill, usually one
    token in decode), y[rows] += s * (x[rows] @ A_i.T) @ B_i.T. Syncs on the host."""
    A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks)
    if meta is None:
        meta = make_meta(idx, chunks=False)
    starts = meta.seg_starts.tolist()
    adapters = meta.seg_adapter.tolist()
    ranks_h = ranks.tolist() if ranks is not None else None
    for seg, i in enumerate(adapters):
        if i < 0:
            continue
        if i >= A4.shape[1]:       # a host int already: checking is free
            _fail("idx", f"values in [-1, {A4.shape[1] - 1}]", i)
        t0, t1 = starts[seg], starts[seg + 1]
        r = ranks_h[i] if ranks_h is not None else A4.shape[2]
        col = 0
        for s, B_s in enumerate(Bs):
            h_out = B_s.shape[1]
            v = x[t0:t1].float() @ A4[s, i, :r].float().T                 # [n, r]
            y[t0:t1, col:col + h_out] += (scale[i] * (v @ B_s[i, :, :r].float().T)).to(y.dtype)
            col += h_out


def _gather_weights(A4: Tensor, Bs: list[Tensor], idx: Tensor, ranks: Optional[Tensor]):
    """A4[:, idx], B_s[idx] for rows with an adapter of rank >= 1, padded rank zeroed (pads
    may be junk). Rank-0 rows are left out, as the kernels leave them: a NaN / Inf in such
    a row of x must not reach y through a multiply by zero."""
    use = idx >= 0
    if ranks is not None:
        use &= ranks.long()[idx.long().clamp(min=0)] > 0
    rows = torch.nonzero(use).flatten()
    adapters = idx[rows].long()
    mask = _rank_mask(ranks, adapters, A4.shape[2])
    Ag = A4[:, adapters]                                   # [S, n, r_max, h_in]
    Bg = [b[adapters] for b in Bs]                         # [n, h_out_s, r_max]
    if mask is not None:
        Ag = torch.where(mask[None, :, :, None], Ag, 0)
        Bg = [torch.where(mask[:, None, :], b, 0) for b in Bg]
    return rows, adapters, Ag, Bg


def prepare_cheat_bmm(x, A, B, idx, scale, ranks=None) -> LoraMeta:
    """Gather A[idx], B[idx] once (what cheat_bmm leaves out of its timed region)."""
    meta = make_meta(idx, chunks=False)
    A4, Bs = as_slices(A, B)
    if meta.groups and meta.groups[-1][0] >= A4.shape[1]:   # host ints: a device-side
        _fail("idx", f"values in [-1, {A4.shape[1] - 1}]",  # gather would assert instead
              meta.groups[-1][0])
    meta.gathered = _gather_weights(A4, Bs, idx, ranks)
    return meta


def lora_cheat_bmm(y, x, A, B, idx, scale, ranks=None, meta=None) -> None:
    """Idealised bound: weights already gathered per token (meta.gathered, built outside the
    timed region), then two batched matmuls. Leaves out the gather, which moves n x the
    adapter bytes, so it is not a deployable method."""
    A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks)
    if meta is None or meta.gathered is None:
        meta = prepare_cheat_bmm(x, A, B, idx, scale, ranks)
    rows, adapters, Ag, Bg = meta.gathered
    xr = x[rows].unsqueeze(1)                              # [n, 1, h_in]
    s = scale[adapters][:, None, None]
    col = 0
    for si, b in enumerate(Bg):
        v = torch.bmm(xr, Ag[si].transpose(1, 2))          # [n, 1, r_max]
        d = torch.bmm(v, b.transpose(1, 2)).float() * s    # [n, 1, h_out_s]
        h_out = b.shape[1]
        y[rows, col:col + h_out] += d.squeeze(1).to(y.dtype)
        col += h_out


def lora_gbmm(y, x, A, B, idx, scale, ranks=None, meta=None) -> None:
    """Group tokens by adapter (meta.groups), then two matmuls per group."""
    A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks)
    if meta is None:
        meta = make_meta(idx, chunks=False)
    ranks_h = ranks.tolist() if ranks is not None else None
    for a, pos in meta.groups:
        if a >= A4.shape[1]:       # a host int already: checking is free
            _fail("idx", f"values in [-1, {A4.shape[1] - 1}]", a)
        xg = x[pos]                                        # [n_a, h_in]
        r = ranks_h[a] if ranks_h is not None else A4.shape[2]
        col = 0
        for si, b in enumerate(Bs):
            v = xg @ A4[si, a, :r].T                       # [n_a, r]
            d = (v @ b[a, :, :r].T).float() * scale[a]     # [n_a, h_out_s]
            h_out = b.shape[1]
            y[pos, col:col + h_out] += d.to(y.dtype)
            col += h_out


# ---------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------
def _load(ref: str) -> Callable:
    """"module:attr" -> the object (lazy imports keep the registry import-light)."""
    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class LoraMode:
    """A registry entry; fn (and shrink / expand) may be "module:attr", loaded on first use."""
    name: str
    fn: Union[Callable, str]                  # callable, or "module:attr" loaded lazily
    prepare: Optional[Callable] = None        # builds meta outside the timed region
    description: str = ""
    graph_safe: bool = True                   # no host sync in the call (given meta)
    needs_cuda: bool = False                  # cannot run on the CPU at all
    is_triton: bool = False                   # runs on the CPU only under TRITON_INTERPRET=1
    # The two halves, for callers that run the shrink beside other work (the engine's
    # lora_overlap="shrink"): shrink(x, A, idx, ranks, meta) -> v, then
    # expand(y, v, B, idx, scale, ranks, meta) adds into y. None: the mode has no halves.
    shrink: Union[Callable, str, None] = None
    expand: Union[Callable, str, None] = None

    def resolve(self) -> Callable:
        if isinstance(self.fn, str):
            self.fn = _load(self.fn)
        return self.fn

    def halves(self) -> Optional[tuple[Callable, Callable]]:
        """(shrink, expand), loaded, or None when the mode has no halves."""
        if self.shrink is None or self.expand is None:
            return None
        if isinstance(self.shrink, str):
            self.shrink = _load(self.shrink)
        if isinstance(self.expand, str):
            self.expand = _load(self.expand)
        return self.shrink, self.expand

    def __call__(self, y, x, A, B, idx, scale, ranks=None, meta=None):
        return self.resolve()(y, x, A, B, idx, scale, ranks, meta)

    def make_meta(self, x, A, B, idx, scale, ranks=None) -> LoraMeta:
        return (self.prepare or (lambda x, A, B, idx, scale, ranks: make_meta(idx, ranks=ranks)))(
            x, A, B, idx, scale, ranks)


MODES: dict[str, LoraMode] = {m.name: m for m in [
    LoraMode("none", lora_none, description="no LoRA: the cost floor"),
    LoraMode("loop", lora_loop, graph_safe=False,
             description="Python loop over requests (runs of one adapter): y += s (x A_i^T) B_i^T"),
    LoraMode("cheat_bmm", lora_cheat_bmm, prepare=prepare_cheat_bmm,
             description="A[idx], B[idx] pre-gathered outside the timing, then two bmm"),
    LoraMode("gbmm", lora_gbmm, graph_safe=False,
             description="group tokens by adapter, two matmuls per group"),
    LoraMode("bgmv_triton", "bgmv_triton.bgmv_triton:bgmv_lora", is_triton=True,
             description="Triton BGMV: one program per (token, tile) gathers its adapter",
             shrink="bgmv_triton.bgmv_triton:lora_shrink",
             expand="bgmv_triton.bgmv_triton:lora_expand"),
    LoraMode("bgmv_cuda", "bgmv_cuda.bgmv_cuda:bgmv_lora", needs_cuda=True,
             description="CUDA C++ BGMV extension (JIT-built), Punica-style",
             shrink="bgmv_cuda.bgmv_cuda:lora_shrink", expand="bgmv_cuda.bgmv_cuda:lora_expand"),
    LoraMode("sgmv_triton", "sgmv_triton.sgmv_lora:sgmv_lora", is_triton=True,
             description="Triton SGMV: one program per (segment, tile), shrink then expand",
             shrink="sgmv_triton.sgmv_lora:lora_shrink", expand="sgmv_triton.sgmv_lora:lora_expand"),
]}


def get_mode(name: str) -> LoraMode:
    if name not in MODES:
        raise ValueError(f"mode: expected one of {sorted(MODES)}, got {name!r}")
    return MODES[name]


# ---------------------------------------------------------------------------------------
# Workloads and random inputs (shared by tests and benchmarks)
# ---------------------------------------------------------------------------------------
def make_workload(kind: str, num_requests: int, num_adapters: int, no_lora_share: float = 0.0,
                  seed: int = 0) -> Tensor:
    """Adapter per request, int32 on the CPU, after the Punica paper.

    distinct: every request its own adapter (when num_adapters < num_requests, all
    adapters used equally often);
    uniform: uniform over num_adapters; skewed: Zipf-like (p ~ 1/rank^1.5 over
    num_adapters); identical: adapter 0 for all. Then a share of requests gets -1."""
    g = torch.Generator().manual_seed(seed)
    n, L = num_requests, num_adapters
    if kind == "distinct":
        # Every request its own adapter; with fewer adapters than requests, every adapter
        # is used and each equally often (as distinct as the pool allows).
        a = torch.arange(n) % L
        a = a[torch.randperm(n, generator=g)]
    elif kind == "uniform":
        a = torch.randint(0, L, (n,), generator=g)
    elif kind == "skewed":
        p = 1.0 / torch.arange(1, L + 1, dtype=torch.float64) ** 1.5
        a = torch.multinomial(p / p.sum(), n, replacement=True, generator=g)
    elif kind == "identical":
        a = torch.zeros(n, dtype=torch.int64)
    else:
        raise ValueError(f"workload: expected one of {WORKLOADS}, got {kind!r}")
    if no_lora_share > 0:
        a[torch.rand(n, generator=g) < no_lora_share] = -1
    return a.to(torch.int32)


def to_rank_major(B: BList) -> BList:
    """B [L, h_out, r_max] (or a tuple of slices) stored rank-major: the same shape and
    values, unit stride along h_out, each adapter's rank rows of h_out contiguous (as A's
    rows are). A layout taken once when adapters are loaded: an adapter of rank r < r_max
    then reads r dense rows, where the row layout reads r of every r_max elements of each
    of h_out rows (PERF_LOG v42 / v45). Every registry mode takes either layout."""
    def one(b: Tensor) -> Tensor:
        return b.transpose(1, 2).contiguous().transpose(1, 2)
    return tuple(one(b) for b in B) if isinstance(B, (tuple, list)) else one(B)


def make_lora_inputs(T: int, h_in: int, h_out: Union[int, Sequence[int]], L: int, r_max: int,
                     dtype: torch.dtype, device: Union[str, torch.device] = "cpu",
                     ranks: Optional[Sequence[int]] = None, seed: int = 0,
                     pad_value: float = float("nan"), rank_major: bool = False) -> dict:
    """Fresh random x, y, A, B, scale (and ranks) with outputs of order 1.

    h_out as a list makes S slices (A [S, L, r_max, h_in], B a tuple). With ranks, the
    padded rows of A / columns of B hold pad_value (NaN by default) so that any kernel
    reading them poisons its output. rank_major: B stored as to_rank_major does (same
    values)."""
    g = torch.Generator().manual_seed(seed)
    sliced = not isinstance(h_out, int)
    h_outs = list(h_out) if sliced else [h_out]
    S = len(h_outs)
    x = torch.randn(T, h_in, generator=g)
    A = torch.randn(S, L, r_max, h_in, generator=g) / math.sqrt(h_in)
    Bs = [torch.randn(L, h, r_max, generator=g) / math.sqrt(r_max) for h in h_outs]
    y = 0.5 * torch.randn(T, sum(h_outs), generator=g)
    scale = (0.5 + torch.rand(L, generator=g)).to(torch.float32)
    ranks_t = None
    if ranks is not None:
        ranks_t = torch.tensor(list(ranks), dtype=torch.int32)
        if ranks_t.shape != (L,):
            _fail("ranks", f"{L} values", len(ranks_t))
        used = torch.arange(r_max)[None, :] < ranks_t[:, None].long()     # [L, r_max]
        A = torch.where(used[None, :, :, None], A, pad_value)
        Bs = [torch.where(used[:, None, :], b, pad_value) for b in Bs]
    cast = dict(dtype=dtype, device=device)
    B = tuple(b.to(**cast) for b in Bs) if sliced else Bs[0].to(**cast)
    return dict(
        x=x.to(**cast), y=y.to(**cast),
        A=(A if sliced else A[0]).to(**cast).contiguous(),
        B=to_rank_major(B) if rank_major else B,
        scale=scale.to(device), ranks=None if ranks_t is None else ranks_t.to(device))


def poison_skip_rows(y: Tensor, idx: Tensor) -> Tensor:
    """Copy of y with rows whose idx = -1 set to -0.0: a kernel that stores y + 0 there
    turns them into +0.0, which `skip_rows_untouched` sees (== alone would not)."""
    y = y.clone()
    y[idx.to(y.device) < 0] = -0.0
    return y


def skip_rows_untouched(y: Tensor, y0: Tensor, idx: Tensor) -> bool:
    """Bitwise equality of the idx = -1 rows of y and y0."""
    skip = idx.to(y.device) < 0
    bits = {2: torch.int16, 4: torch.int32}[y.element_size()]
    return torch.equal(y[skip].view(bits), y0[skip].view(bits))


def check_mode(mode: Union[str, LoraMode], inputs: dict, idx: Tensor,
               meta: Optional[LoraMeta] = None) -> float:
    """Run one mode on a copy of inputs, compare with the float64 reference, return the
    relative error. Rows with idx = -1 start as -0.0 and must stay bit-identical (a
    changed -1 row raises AssertionError)."""
    mode = get_mode(mode) if isinstance(mode, str) else mode
    x, A, B, scale, ranks = (inputs[k] for k in ("x", "A", "B", "scale", "ranks"))
    idx = idx.to(x.device)
    y0 = poison_skip_rows(inputs["y"], idx)
    ref = lora_reference(y0, x, A, B, idx, scale, ranks)
    y = y0.clone()
    if meta is None:
        meta = mode.make_meta(x, A, B, idx, scale, ranks)
    mode(y, x, A, B, idx, scale, ranks, meta)
    if mode.name != "none" and not skip_rows_untouched(y, y0, idx):
        raise AssertionError(f"{mode.name}: rows with idx = -1 were modified")
    return relative_error(y, ref)


# ---------------------------------------------------------------------------------------
# Microbenchmark: validate then time every mode at one point (shared with the prefill script)
# ---------------------------------------------------------------------------------------
def _fresh_set(ref: dict) -> dict:
    """Another input set on the GPU shaped like ref (fresh randn, same NaN pads)."""
    def like(t, fan_in):
        new = torch.randn_like(t) / math.sqrt(fan_in)
        return torch.where(torch.isnan(t), t, new)
    A = ref["A"]
    Bs = ref["B"] if isinstance(ref["B"], tuple) else (ref["B"],)
    newB = tuple(like(b, b.shape[-1]) for b in Bs)
    if Bs[0].shape[-1] > 1 and Bs[0].stride(-1) != 1:     # keep a rank-major layout
        newB = to_rank_major(newB)
    return dict(x=torch.randn_like(ref["x"]), y=0.5 * torch.randn_like(ref["y"]),
                A=like(A, A.shape[-1]), B=newB if isinstance(ref["B"], tuple) else newB[0],
                scale=ref["scale"], ranks=ref["ranks"])


def bench_point(modes: Sequence[str], idx: Tensor, L: int, h_in: int, h_outs: Sequence[int],
                r_max: int, dtype: torch.dtype, ranks: Optional[Sequence[int]] = None,
                seed: int = 0, device: str = "cuda", rank_major: bool = False) -> dict:
    """Validate every mode on input set 0 against the float64 reference, then time it over
    a pool of input sets (CUDA-graph replay for graph-safe modes, do_bench otherwise).
    A mode that fails validation is not timed; its error is recorded either way.
    rank_major: B stored rank-major (to_rank_major) in every set."""
    import bench_utils as bu
    T = idx.numel()
    h_out_arg = list(h_outs) if len(h_outs) > 1 else h_outs[0]
    set0 = make_lora_inputs(T, h_in, h_out_arg, L, r_max, dtype, device, ranks=ranks, seed=seed,
                            rank_major=rank_major)
    idx_d = idx.to(device, torch.int32)
    nbytes = bu.lora_bytes(idx, h_in, h_outs, r_max, dtype, set0["ranks"])
    elt = torch.finfo(dtype).bits // 8
    set_bytes = elt * (sum(t.numel() for t in (set0["x"], set0["y"], set0["A"]))
                       + sum(b.numel() for b in (set0["B"] if isinstance(set0["B"], tuple)
                                                 else (set0["B"],))))
    n_sets = bu.pool_size(set_bytes, max_sets=128) if device == "cuda" else 1
    pool = [set0] + [_fresh_set(set0) for _ in range(n_sets - 1)]
    set0["y"] = poison_skip_rows(set0["y"], idx_d)
    ref = lora_reference(set0["y"], set0["x"], set0["A"], set0["B"], idx_d, set0["scale"],
                         set0["ranks"])
    y0 = set0["y"].clone()  # timing updates the pool's y in place: validate from a copy
    out = {"T": T, "lora_rows": int((idx >= 0).sum()), "bytes": nbytes, "n_sets": n_sets,
           "b_layout": "rank-major" if rank_major else "row", "modes": {}}
    for name in modes:
        mode = get_mode(name)
        rec: dict = {}
        out["modes"][name] = rec
        if mode.needs_cuda and device != "cuda":
            rec["skipped"] = "needs CUDA"
            continue
        try:
            # Metadata depends on idx alone, except cheat_bmm's gathered weights (per set).
            metas = ([mode.make_meta(p["x"], p["A"], p["B"], idx_d, p["scale"], p["ranks"])
                      for p in pool] if mode.prepare else
                     [mode.make_meta(set0["x"], set0["A"], set0["B"], idx_d, set0["scale"],
                                     set0["ranks"])] * len(pool))
            y = y0.clone()
            mode(y, set0["x"], set0["A"], set0["B"], idx_d, set0["scale"], set0["ranks"], metas[0])
            rec["error"] = relative_error(y, ref) if name != "none" else 0.0
            if name != "none" and not skip_rows_untouched(y, y0, idx_d):
                rec["error"] = float("inf")   # an idx = -1 row was written
            if not rec["error"] <= TOLERANCE[dtype]:
                rec["skipped"] = f"validation failed: error {rec['error']:.3g}"
                print(f"  {name}: {rec['skipped']}")
                continue

            def call(k, mode=mode, metas=metas):
                p = pool[k]
                mode(p["y"], p["x"], p["A"], p["B"], idx_d, p["scale"], p["ranks"], metas[k])
            if name == "none":
                med = bu.empty_graph_us(device)
                rec.update(method="empty kernel in a CUDA graph (launch floor, measured once per run)")
                rec["median_us"] = rec["p20_us"] = rec["p80_us"] = med
                continue
            if mode.graph_safe and device == "cuda":
                try:
                    t = bu.time_graph(call, n_sets)
                    rec["method"] = f"CUDA graph replay, {n_sets} input sets"
                except Exception as e:  # a mode that cannot be captured: say so, time eagerly
                    bu.sync(device)
                    rec["graph_error"] = str(e)[:200]
                    t = bu.time_fn(lambda: call(0))
                    rec["method"] = "do_bench (capture failed)"
            else:
                t = bu.time_fn(lambda: call(0), device=device)
                rec["method"] = ("do_bench, L2 flushed" if device == "cuda"
                                 else "CPU wall clock (tests only)")
            rec["median_us"], rec["p20_us"], rec["p80_us"] = t
            rec["gbs"] = nbytes / (t[0] * 1e-6) / 1e9
        except Exception as e:
            bu.sync(device)
            rec["skipped"] = f"{type(e).__name__}: {str(e)[:300]}"
            print(f"  {name}: {rec['skipped']}")
    pool = None           # free the input sets before the next point
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------
# Decode figures: each sweep writes plots/<name>.json, then the plot is drawn from it
# ---------------------------------------------------------------------------------------
DECODE_MODES = ["loop", "cheat_bmm", "gbmm", "bgmv_triton", "bgmv_cuda", "sgmv_triton", "none"]
DECODE_FIG = "decode_lora_loop_vs_cheat_bmm_vs_gbmm_vs_bgmv_cuda_triton_vs_sgmv_triton"


def run_decode_sweep(args, workloads, batch_sizes, h_in, h_out, rank, num_adapters,
                     distinct_adapters=None, name="decode") -> dict:
    """distinct: distinct_adapters adapters (None: one per request); the other workloads
    spread the requests over num_adapters."""
    import bench_utils as bu
    dtype = DTYPES[args.dtype]
    data = {"env": bu.env_info(), "config": {
        "kind": "decode", "dtype": args.dtype, "h_in": h_in, "h_out": h_out, "rank": rank,
        "num_adapters": num_adapters, "distinct_adapters": distinct_adapters, "workloads": list(workloads),
        "batch_sizes": list(batch_sizes), "no_lora_share": args.no_lora_share,
        "modes": list(args.modes), "seed": args.seed,
        "command": " ".join(sys.argv)},
        "copy_gbs": bu.copy_bandwidth_gbs(args.device),
        "empty_graph_us": bu.empty_graph_us(args.device),
        "points": []}
    print(f"[{name}] copy bandwidth {data['copy_gbs']:.0f} GB/s, "
          f"empty graph kernel {data['empty_graph_us']:.2f} us")
    for wl in workloads:
        for bs in batch_sizes:
            L = (distinct_adapters or bs) if wl == "distinct" else num_adapters
            idx = make_workload(wl, bs, L, args.no_lora_share, seed=args.seed + bs)
            pt = bench_point(args.modes, idx, L, h_in, [h_out], rank, dtype, None,
                             seed=args.seed + bs, device=args.device)
            pt.update(workload=wl, batch=bs, L=L, gemm=bu.base_gemm_us(bs, h_in, h_out, dtype,
                                                                    args.device))
            data["points"].append(pt)
            line = "  ".join(f"{m}={r['median_us']:.1f}" for m, r in pt["modes"].items()
                             if "median_us" in r)
            print(f"  {wl:9s} bs={bs:4d} L={L:4d} gemm={pt['gemm'][0]:.1f}us  {line}")
    return data


def _series(points, modes, key="median_us"):
    return {m: [((p["modes"][m][key], p["modes"][m].get("p20_us", p["modes"][m][key]),
                  p["modes"][m].get("p80_us", p["modes"][m][key]))
                 if m in p["modes"] and key in p["modes"][m] else None) for p in points]
            for m in modes}


def plot_decode(data: dict, path: str) -> None:
    import bench_utils as bu
    plt = bu.pyplot()
    cfg = data["config"]
    wls = cfg["workloads"]
    fig, axes = plt.subplots(1, len(wls), figsize=(4.2 * len(wls), 4), sharey=True, squeeze=False)
    for ax, wl in zip(axes[0], wls):
        pts = [p for p in data["points"] if p["workload"] == wl]
        xs = [p["batch"] for p in pts]
        bu.plot_mode_lines(ax, xs, _series(pts, cfg["modes"]))
        ax.plot(xs, [p["gemm"][0] for p in pts], "k--", lw=1, label="base GEMM x@W")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{wl}" + (f" (L={pts[0]['L']})" if wl != "distinct" else " (L=batch)"))
        ax.set_xlabel("batch size (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("time per layer call (µs)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"How long does one multi-LoRA decode layer take? {data['env']['gpu']}, "
                 f"{cfg['dtype']}, h {cfg['h_in']}->{cfg['h_out']}, r={cfg['rank']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_bandwidth(data: dict, path: str) -> None:
    import bench_utils as bu
    plt = bu.pyplot()
    cfg = data["config"]
    fig, ax = plt.subplots(figsize=(6, 4))
    pts = data["points"]
    xs = [p["batch"] for p in pts]
    for m in cfg["modes"]:
        if m == "none":
            continue
        ys = [p["modes"][m]["gbs"] / data["copy_gbs"] if "gbs" in p["modes"].get(m, {}) else None
              for p in pts]
        colour, marker = bu.MODE_STYLE.get(m, ("k", "."))
        keep = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if keep:
            ax.plot(*zip(*keep), color=colour, marker=marker, label=m)
    ax.axhline(1.0, color="k", ls="--", lw=1, label=f"copy {data['copy_gbs']:.0f} GB/s")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.1)
    ax.set_xlabel("batch size (tokens)")
    ax.set_ylabel("achieved / measured copy bandwidth")
    ax.set_title(f"How close to the memory limit? {data['env']['gpu']}, {cfg['dtype']},\n"
                 f"h {cfg['h_in']}->{cfg['h_out']}, r={cfg['rank']}, "
                 f"L={cfg['num_adapters']} ({cfg['workloads'][0]})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def floor_us(point: dict, data: dict) -> float:
    """A point's floor: the larger of its bytes / the run's copy bandwidth and an empty
    kernel replayed in a CUDA graph (µs)."""
    return max(point["bytes"] / (data["copy_gbs"] * 1e3), data["empty_graph_us"])


def plot_floor(data: dict, path: str) -> None:
    """Punica's grid: best mode vs its floor max(bytes / copy bandwidth, empty graph kernel)."""
    import bench_utils as bu
    plt = bu.pyplot()
    cfg = data["config"]
    wls = cfg["workloads"]
    fig, axes = plt.subplots(1, len(wls), figsize=(4 * len(wls), 3.8), sharey=True, squeeze=False)
    for ax, wl in zip(axes[0], wls):
        pts = [p for p in data["points"] if p["workload"] == wl]
        xs = [p["batch"] for p in pts]
        floor = [floor_us(p, data) for p in pts]
        best = [_best(p["modes"]) for p in pts]
        ax.plot(xs, [b[0] for b in best], "o-", color="#1f77b4", label="best mode (not cheat_bmm)")
        ax.plot(xs, floor, "k--", label="floor")
        ax.plot(xs, [2 * f for f in floor], ":", color="grey", label="2 x floor")
        for x, b in zip(xs, best):
            ax.annotate(b[1], (x, b[0]), fontsize=6, rotation=45)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(wl)
        ax.set_xlabel("batch size (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("time per layer call (µs)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"Is the best mode near its floor? {data['env']['gpu']}, {cfg['dtype']}, "
                 f"h {cfg['h_in']}->{cfg['h_out']}, r={cfg['rank']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def plot_mixed_rank(data: dict, path: str) -> None:
    import bench_utils as bu
    plt = bu.pyplot()
    cfg = data["config"]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    # One pair of bars per (mode, B layout): the row layout for every mode, then rank-major
    # B (to_rank_major) for the kernels, where the JSON has it.
    bars = []
    for suffix, tag in (("", ""), ("_rank_major", "\nrank-major B")):
        mixed = data.get("mixed" + suffix, {}).get("modes", {})
        padded = data.get("padded" + suffix, {}).get("modes", {})
        bars += [(m + tag, mixed[m]["median_us"], padded[m]["median_us"])
                 for m in cfg["modes"] if m != "none" and "median_us" in mixed.get(m, {})
                 and "median_us" in padded.get(m, {})]
    xs = range(len(bars))
    ax.bar([x - 0.2 for x in xs], [b[2] for b in bars], 0.4,
           label="all padded to rank 64", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [b[1] for b in bars], 0.4,
           label="mixed ranks {8,16,32,64}", color="#1f77b4")
    for x, (_, mixed_us, padded_us) in zip(xs, bars):
        ax.text(x + 0.2, mixed_us, f"{mixed_us / padded_us:.2f}x",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), [b[0] for b in bars], rotation=30, fontsize=7)
    ax.set_ylabel("time per layer call (µs)")
    ax.set_yscale("log")
    ax.set_title(f"Do mixed ranks cost only their own work? {data['env']['gpu']}, {cfg['dtype']},\n"
                 f"h {cfg['h_in']}, {cfg['num_adapters']} adapters, batch {cfg['batch']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


FIGURES = ("decode", "bandwidth", "mixed_rank", "punica")
KERNEL_MODES = ("bgmv_triton", "bgmv_cuda", "sgmv_triton")


def public_mode_names() -> tuple:
    """Modes of the public kernels we compare against (public_kernels.py): never 'ours'."""
    import public_kernels
    return public_kernels.MODE_NAMES


def register_public_modes() -> tuple[list, dict]:
    """--public: add the public kernels that can run here to MODES. Returns (the names
    added, the package and version loaded); says why the others cannot run."""
    import public_kernels as pk
    added = []
    for m in pk.lora_modes(only_available=True):
        MODES[m.name] = m
        added.append(m.name)
    missing = {k: v for k, v in pk.available().items() if v}
    if missing:
        print(f"public kernels not available here: {missing}")
    return added, pk.versions()


def _best(modes: dict, among=None) -> tuple[float, str]:
    """Fastest deployable mode of ours (cheat_bmm leaves its gather out of the timing and
    public kernels are not ours: both excluded)."""
    public = public_mode_names()
    return min((r["median_us"], m) for m, r in modes.items()
               if "median_us" in r and m not in ("none", "cheat_bmm") and m not in public
               and (among is None or m in among))


def report_public(points: list) -> None:
    """Target 6: at each (label, modes) point timed with public kernels too, our best mode
    against the best public one; prints the points we lose and the count."""
    public = public_mode_names()
    n = wins = 0
    for label, modes in points:
        pub = [(r["median_us"], m) for m, r in modes.items() if m in public and "median_us" in r]
        if not pub:
            continue
        t_pub, m_pub = min(pub)
        n += 1
        try:
            t_ours, m_ours = _best(modes)
        except ValueError:                     # none of ours was timed at this point
            print(f"[6] {label}: no mode of ours timed; {m_pub} {t_pub:.2f} us")
            continue
        wins += t_ours <= t_pub
        if t_ours > t_pub:
            print(f"[6] {label}: ours {m_ours} {t_ours:.2f} us > {m_pub} {t_pub:.2f} us "
                  f"({t_ours / t_pub:.2f}x)")
    if n:
        print(f"[6] ours at least as fast as the best public kernel at {wins} of {n} points "
              f"(target: all)")
    else:
        print("[6] no public kernels in these JSON files (run with --public)")


def markdown_table(out_dir: str, workload: str = "uniform") -> str:
    """README table (µs per layer call) from the decode figure's JSON, one row per batch."""
    import bench_utils as bu
    data = bu.read_json(os.path.join(out_dir, DECODE_FIG + ".json"))
    modes = [m for m in data["config"]["modes"] if m != "none"]
    rows = ["| batch | base GEMM | " + " | ".join(modes) + " |",
            "|---:|---:|" + "---:|" * len(modes)]
    for p in data["points"]:
        if p["workload"] != workload:
            continue
        cells = [f"{p['modes'][m]['median_us']:.1f}" if "median_us" in p["modes"].get(m, {})
                 else "-" for m in modes]
        rows.append(f"| {p['batch']} | {p['gemm'][0]:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def report_targets(out_dir: str) -> None:
    """Print the issue's performance figures from the JSON files in out_dir (no GPU)."""
    import bench_utils as bu

    def load(stem):
        path = os.path.join(out_dir, stem + ".json")
        return bu.read_json(path) if os.path.exists(path) else None
    dec = load(DECODE_FIG)
    if dec:
        pt = next((p for p in dec["points"] if p["workload"] == "uniform" and p["batch"] == 64), None)
        if pt:
            m = pt["modes"]
            loop = m.get("loop", {}).get("median_us")
            for k in KERNEL_MODES:
                if "median_us" in m.get(k, {}) and loop:
                    print(f"[1] decode bs=64 uniform L={pt['L']}: loop / {k} = "
                          f"{loop / m[k]['median_us']:.1f}x (target >= 20x)")
            t, k = _best(m)
            print(f"[1] best mode {k} {t:.2f} us / base GEMM {pt['gemm'][0]:.2f} us = "
                  f"{t / pt['gemm'][0]:.3f} (target <= 0.4)")
    bw = load("decode_bandwidth_r64_distinct128")
    if bw and bw["points"]:
        pt = max(bw["points"], key=lambda p: p["batch"])
        t, k = _best(pt["modes"])
        print(f"[2] decode bs={pt['batch']} L={pt['L']} r=64 distinct: {k} "
              f"{pt['modes'][k]['gbs']:.0f} GB/s = {pt['modes'][k]['gbs'] / bw['copy_gbs']:.2f} "
              f"of copy {bw['copy_gbs']:.0f} GB/s (target >= 0.75)")
    pre = load("prefill_lora_loop_vs_cheat_bmm_vs_gbmm_vs_bgmv_cuda_triton_vs_sgmv_triton")
    if pre:
        pt = next((p for p in pre["sweep_tokens"] if p["tokens_per_request"] == 512
                   and p["num_requests"] == 8), None)
        if pt and "median_us" in pt["modes"].get("sgmv_triton", {}):
            t = pt["modes"]["sgmv_triton"]["median_us"]
            print(f"[3] prefill 8x512 distinct: sgmv_triton {t:.1f} us / GEMM "
                  f"{pt['gemm'][0]:.1f} us = {t / pt['gemm'][0]:.3f} (target <= 0.2)")
    mr = load("decode_mixed_rank")
    if mr:
        for suffix, layout in (("", "row B"), ("_rank_major", "rank-major B")):
            for k in KERNEL_MODES:
                a = mr.get("mixed" + suffix, {}).get("modes", {}).get(k, {})
                b = mr.get("padded" + suffix, {}).get("modes", {}).get(k, {})
                if "median_us" in a and "median_us" in b:
                    print(f"[4] mixed ranks {k}, {layout}: {a['median_us']:.2f} / "
                          f"{b['median_us']:.2f} us = {a['median_us'] / b['median_us']:.2f} "
                          "(target <= 0.65)")
    pg = load("decode_punica_grid_vs_floor")
    if pg:
        worst = 0.0
        for p in pg["points"]:
            floor = floor_us(p, pg)
            t, k = _best(p["modes"])
            worst = max(worst, t / floor)
            print(f"[5] {p['workload']:9s} bs={p['batch']:3d}: best {k} {t:.2f} us, floor "
                  f"{floor:.2f} us, ratio {t / floor:.2f}")
        print(f"[5] worst best/floor over the grid: {worst:.2f} (target <= 2)")
    points = []
    if dec:
        points += [(f"decode {p['workload']} bs={p['batch']}", p["modes"]) for p in dec["points"]]
    if pre:
        points += [(f"prefill {p['num_requests']}x{p['tokens_per_request']}", p["modes"])
                   for p in pre["sweep_tokens"] + pre["sweep_requests"]]
    report_public(points)





def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(
        description="Decode microbenchmark (one token per request): validate every mode "
                    "against the float64 reference, then time it on the GPU and plot. "
                    "Defaults reproduce the standard figures in plots/.")
    p.add_argument("--figures", nargs="+", default=list(FIGURES), choices=FIGURES,
                   help="which figures: decode (latency vs batch, one panel per workload), "
                        "bandwidth (batch up to 256, 128 distinct adapters, r=64), mixed_rank "
                        "(ranks {8,16,32,64} over 32 adapters vs all padded to 64, batch 64; the kernels "
                        "again with B stored rank-major), "
                        "punica (h 4096->11008, r=16, batch 1..64, best mode vs its floor)")
    p.add_argument("--modes", nargs="+", default=DECODE_MODES, help="modes to run (registry names)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="x, y, A, B dtype")
    p.add_argument("--h-in", type=int, default=4096, help="input hidden size of the layer")
    p.add_argument("--h-out", type=int, default=4096, help="output hidden size of the layer")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    p.add_argument("--num-adapters", type=int, default=7,
                   help="adapters for uniform/skewed/identical (distinct uses one per request)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS,
                   help="request-to-adapter popularity shapes (Punica)")
    p.add_argument("--batch-sizes", nargs="+", type=int,
                   default=[1, 2, 4, 8, 16, 32, 64, 128, 256], help="decode batch sizes")
    p.add_argument("--no-lora-share", type=float, default=0.0,
                   help="share of requests with no adapter (idx = -1)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and workloads")
    p.add_argument("--out-dir", default="plots", help="where PNG and JSON go")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (CUDA-graph timing) or cpu (wall-clock timing, for tests only)")
    p.add_argument("--plot-only", action="store_true",
                   help="redraw the PNGs from the JSON files in --out-dir (no GPU needed)")
    p.add_argument("--report", action="store_true",
                   help="print the performance targets from the JSON in --out-dir and exit")
    p.add_argument("--public", action="store_true",
                   help="also time the public Triton LoRA kernels of public_kernels.py "
                        "(SGLang's and vLLM's, where available) at every point, for target 6")
    args = p.parse_args(argv)
    public = None
    if args.public and not args.plot_only and not args.report:
        added, public = register_public_modes()
        args.modes = list(args.modes) + [m for m in added if m not in args.modes]
    if args.report:
        report_targets(args.out_dir)
        for wl in ("uniform", "distinct"):
            print(f"\n{wl}:\n" + markdown_table(args.out_dir, wl))
        return
    os.makedirs(args.out_dir, exist_ok=True)
    import bench_utils as bu
    names = {"decode": DECODE_FIG, "bandwidth": "decode_bandwidth_r64_distinct128",
             "mixed_rank": "decode_mixed_rank", "punica": "decode_punica_grid_vs_floor"}
    plotters = {"decode": plot_decode, "bandwidth": plot_bandwidth,
                "mixed_rank": plot_mixed_rank, "punica": plot_floor}
    if not args.plot_only:
        bu.ceilings(args.device)    # the launch floor first, whichever figures run
    for fig in args.figures:
        path = os.path.join(args.out_dir, names[fig])
        if not args.plot_only:
            if fig == "decode":
                data = run_decode_sweep(args, args.workloads, args.batch_sizes, args.h_in,
                                        args.h_out, args.rank, args.num_adapters, name=fig)
            elif fig == "bandwidth":
                data = run_decode_sweep(args, ["distinct"], [b for b in args.batch_sizes if b >= 16],
                                        args.h_in, args.h_out, 64, 128, 128, name=fig)
            elif fig == "punica":
                data = run_decode_sweep(args, args.workloads, [b for b in args.batch_sizes if b <= 64],
                                        args.h_in, 11008, 16, args.num_adapters, name=fig)
            else:
                dtype = DTYPES[args.dtype]
                L, bs = 32, 64
                ranks = [(8, 16, 32, 64)[i % 4] for i in range(L)]
                idx = make_workload("uniform", bs, L, args.no_lora_share, seed=args.seed)
                data = {"env": bu.env_info(), "config": {
                    "kind": "mixed_rank", "dtype": args.dtype, "h_in": args.h_in,
                    "h_out": args.h_out, "num_adapters": L, "batch": bs, "ranks": ranks,
                    "modes": list(args.modes), "command": " ".join(sys.argv)}}
                data["mixed"] = bench_point(args.modes, idx, L, args.h_in, [args.h_out], 64,
                                            dtype, ranks, seed=args.seed, device=args.device)
                data["padded"] = bench_point(args.modes, idx, L, args.h_in, [args.h_out], 64,
                                             dtype, None, seed=args.seed, device=args.device)
                # The same two points with B stored rank-major (to_rank_major), the kernels
                # only: the layout a server takes once, when it loads the adapters.
                rm_modes = [m for m in args.modes if m in KERNEL_MODES]
                data["config"]["rank_major_modes"] = rm_modes
                data["mixed_rank_major"] = bench_point(
                    rm_modes, idx, L, args.h_in, [args.h_out], 64, dtype, ranks,
                    seed=args.seed, device=args.device, rank_major=True)
                data["padded_rank_major"] = bench_point(
                    rm_modes, idx, L, args.h_in, [args.h_out], 64, dtype, None,
                    seed=args.seed, device=args.device, rank_major=True)
            if public:
                data["config"]["public"] = public
            bu.write_json(path + ".json", data)
        plotters[fig](bu.read_json(path + ".json"), path + ".png")


if __name__ == "__main__":
    # Run through the importable module, so that its classes (LoraMeta, ...) are the ones
    # the kernel modules import, not copies living in __main__.
    import multilora_impl
    multilora_impl.main()
