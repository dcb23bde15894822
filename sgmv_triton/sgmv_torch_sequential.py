"""SGMV as a plain per-segment torch loop: the readable reference for the Triton kernels.

For every segment g (tokens seg_starts[g]:seg_starts[g+1], all with adapter a) and every
output slice s (columns off_s : off_s + h_out_s of y):

    v[rows, s, :r] = x[rows] @ A[s, a, :r].T            # fp32, r = ranks[a]
    y[rows, off_s:off_s + h_out_s] += scale[a] * v[rows, s, :r] @ B_s[a, :, :r].T

SGMV has no semantics of its own: this is BGMV's operation on idx rebuilt from the
segments (multilora_impl.idx_from_segments), checked against lora_reference in
tests/test_sgmv_triton.py. Slow (a Python loop with host reads), clear, any device.
"""
import os
import sys
from typing import Optional, Sequence, Union

if __name__ == "__main__":   # run as a script: the repo root holds multilora_impl
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch import Tensor

from multilora_impl import LoraMeta, check_lora_args, make_meta


def sgmv_shrink_sequential(x: Tensor, A: Tensor, seg_starts: Tensor, seg_adapter: Tensor,
                           ranks: Optional[Tensor] = None,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """v [T, S, r_max] in `dtype`: v[rows, s, :r] = x[rows] @ A[s, a, :r].T per segment,
    0 for -1 rows and padded ranks (what the Triton shrink writes). dtype=torch.float64
    makes it the validation reference of run_sgmv_shrink.py."""
    A4 = A if A.dim() == 4 else A.unsqueeze(0)                # [S, L, r_max, h_in]
    S, _, r_max, _ = A4.shape
    v = torch.zeros(x.shape[0], S, r_max, dtype=dtype, device=x.device)   # [T, S, r_max]
    starts = seg_starts.tolist()
    for g, a in enumerate(seg_adapter.tolist()):
        if a < 0:
            continue
        lo, hi = starts[g], starts[g + 1]
        r = int(ranks[a]) if ranks is not None else r_max
        for s in range(S):
            v[lo:hi, s, :r] = x[lo:hi].to(dtype) @ A4[s, a, :r].to(dtype).T      # [len, r]
    return v


def sgmv_expand_sequential(y: Tensor, v: Tensor, B: Union[Tensor, Sequence[Tensor]],
                           seg_starts: Tensor, seg_adapter: Tensor, scale: Tensor,
                           ranks: Optional[Tensor] = None) -> None:
    """y[rows, slice s] += scale[a] * v[rows, s, :r] @ B_s[a, :, :r].T in place, computed in
    v's dtype (fp32, or float64 for a reference), one conversion per output element."""
    Bs = [B] if isinstance(B, Tensor) else list(B)
    starts = seg_starts.tolist()
    r_max = Bs[0].shape[2]
    for g, a in enumerate(seg_adapter.tolist()):
        if a < 0:
            continue                                          # no LoRA: rows untouched
        lo, hi = starts[g], starts[g + 1]
        r = int(ranks[a]) if ranks is not None else r_max
        col = 0
        for s, B_s in enumerate(Bs):
            h_out = B_s.shape[1]
            delta = scale[a].to(v.dtype) * (v[lo:hi, s, :r] @ B_s[a, :, :r].to(v.dtype).T)
            y[lo:hi, col:col + h_out] = (y[lo:hi, col:col + h_out].to(v.dtype) + delta).to(y.dtype)
            col += h_out


def sgmv_torch_sequential(y: Tensor, x: Tensor, A: Tensor, B: Union[Tensor, Sequence[Tensor]],
                          seg_starts: Tensor, seg_adapter: Tensor, scale: Tensor,
                          ranks: Optional[Tensor] = None) -> None:
    """y += LoRA per segment, in place: shrink to fp32 v, then expand."""
    v = sgmv_shrink_sequential(x, A, seg_starts, seg_adapter, ranks)      # [T, S, r_max] fp32
    sgmv_expand_sequential(y, v, B, seg_starts, seg_adapter, scale, ranks)


def sgmv_sequential_lora(y: Tensor, x: Tensor, A: Tensor, B: Union[Tensor, Sequence[Tensor]],
                         idx: Tensor, scale: Tensor, ranks: Optional[Tensor] = None,
                         meta: Optional[LoraMeta] = None) -> None:
    """The registry signature: segments from meta (built from idx when None)."""
    check_lora_args(y, x, A, B, idx, scale, ranks)
    if meta is None:
        meta = make_meta(idx)
    sgmv_torch_sequential(y, x, A, B, meta.seg_starts, meta.seg_adapter, scale, ranks)


if __name__ == "__main__":
    from multilora_impl import build_segments, lora_reference, make_lora_inputs, relative_error
    inp = make_lora_inputs(29, 40, [24, 8], L=3, r_max=8, dtype=torch.float32, ranks=[8, 3, 5])
    idx = torch.tensor([1] * 10 + [-1] * 4 + [0] * 15, dtype=torch.int32)
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    y = inp["y"].clone()
    st, ad = build_segments(idx)
    sgmv_torch_sequential(y, inp["x"], inp["A"], inp["B"], st, ad, inp["scale"], inp["ranks"])
    print(f"sgmv_torch_sequential rel err {relative_error(y, ref):.2e}")
