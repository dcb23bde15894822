"""The `sgmv_triton` mode: Punica's SGMV for prefill, shrink then expand, in Triton.

    v = sgmv_shrink(x, A, seg_starts, seg_adapter, ranks, partials=True)  # [(n,) T, S, r_max] fp32
    sgmv_expand(y, v, B, seg_starts, seg_adapter, scale, ranks)           # y += scale * v B^T

Segments (one per run of tokens with the same adapter, -1 runs skipped) come from
meta = multilora_impl.make_meta(idx), built on the host where the request-to-adapter
assignment is known. The kernels and their custom ops (multilora::sgmv_shrink,
multilora::sgmv_expand) live in sgmv_shrink_triton.py and sgmv_expand_triton.py.

CUDA graphs: multilora_impl.make_static_meta(T, device) allocates segment buffers at their
maximum size (T segments); fill_static_meta(meta, idx) writes a new assignment into the
same buffers (padding: empty segments with adapter -1) before each replay. Both are
re-exported here.
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
from torch import Tensor

from multilora_impl import (LoraMeta, check_lora_args, debug_checks,
                            fill_static_meta, make_meta, make_static_meta)
from sgmv_triton.sgmv_expand_triton import sgmv_expand
from sgmv_triton.sgmv_shrink_triton import _fail, check_segments, sgmv_shrink

__all__ = ["sgmv_lora", "sgmv_shrink", "sgmv_expand", "make_static_meta", "fill_static_meta",
           "lora_shrink", "lora_expand"]


def sgmv_lora(y: Tensor, x: Tensor, A: Tensor, B: Union[Tensor, Sequence[Tensor]], idx: Tensor,
              scale: Tensor, ranks: Optional[Tensor] = None, meta: Optional[LoraMeta] = None,
              *, check: bool = False) -> None:
    """y += LoRA(x) in place, registry signature. Without meta, builds it from idx and
    checks the index values (a host sync: fine for tests, not inside a CUDA graph). With
    meta nothing is read from the device unless check=True or MULTILORA_CHECK=1 (then the
    index values and the segments are checked against idx)."""
    check = check or debug_checks()
    if meta is None:
        A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks, check_idx_range=True)
        meta = make_meta(idx)
    else:
        A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks, check_idx_range=check)
        if not isinstance(meta, LoraMeta):
            _fail("meta", "a multilora_impl.LoraMeta or None", type(meta).__name__)
        if check:   # segment values first (ValueError naming them), then against idx
            check_segments(meta.seg_starts, meta.seg_adapter, x.shape[0], A4.shape[1], x.device,
                           meta.max_seg_len, check=True)
            st = meta.seg_starts.to("cpu", torch.int64)
            ad = meta.seg_adapter.to("cpu", torch.int64)
            seg_idx = torch.repeat_interleave(ad, st[1:] - st[:-1])
            if seg_idx.shape != idx.shape or not torch.equal(seg_idx, idx.to("cpu", torch.int64)):
                _fail("meta", "segments that rebuild idx", "a different assignment")
    # [T, S, r_max] fp32, or its split-K partials, which the expand adds (one launch fewer)
    v = sgmv_shrink(x, A4, meta.seg_starts, meta.seg_adapter, ranks,
                    max_seg_len=meta.max_seg_len, partials=True, check=check)
    sgmv_expand(y, v, Bs, meta.seg_starts, meta.seg_adapter, scale, ranks,
                max_seg_len=meta.max_seg_len, check=check)


def lora_shrink(x: Tensor, A: Tensor, idx: Tensor, ranks: Optional[Tensor] = None,
                meta: Optional[LoraMeta] = None) -> Tensor:
    """Registry half (engine lora_overlap="shrink"): v [T, S, r_max] fp32 (or its split-K
    partials, as sgmv_lora passes them: the same bits) over the segments of meta (built from
    idx when None: a host sync)."""
    meta = meta if meta is not None else make_meta(idx)
    A4 = A if A.dim() == 4 else A.unsqueeze(0)
    return sgmv_shrink(x, A4, meta.seg_starts, meta.seg_adapter, ranks,
                       max_seg_len=meta.max_seg_len, partials=True, check=debug_checks())


def lora_expand(y: Tensor, v: Tensor, B: Union[Tensor, Sequence[Tensor]], idx: Tensor,
                scale: Tensor, ranks: Optional[Tensor] = None,
                meta: Optional[LoraMeta] = None) -> None:
    """Registry half: y += the expand of v over the segments of meta."""
    meta = meta if meta is not None else make_meta(idx)
    sgmv_expand(y, v, B, meta.seg_starts, meta.seg_adapter, scale, ranks,
                max_seg_len=meta.max_seg_len, check=debug_checks())


if __name__ == "__main__":   # the registry's check on one small mixed batch
    from multilora_impl import check_mode, make_lora_inputs
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    inp = make_lora_inputs(45, 64, [48, 16, 16], L=4, r_max=16, dtype=torch.bfloat16,
                           device=dev, ranks=[16, 4, 9, 1])
    idx = torch.tensor([3] * 9 + [-1] * 7 + [0] * 20 + [2] * 9, dtype=torch.int32)
    print(f"sgmv_triton rel err {check_mode('sgmv_triton', inp, idx):.2e}")
