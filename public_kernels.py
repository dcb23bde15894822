"""Public Triton multi-LoRA kernels, called through our mode signature, to compare against.

Nothing here is a copy of public code: this module CALLS the Triton kernels of an installed
public package, translating our layouts and metadata into theirs. The package is optional
(absent in CI); `available()` says which adapters can run and, if not, why.

Package: SGLang, pinned to `sglang==0.5.10.post1` (PyPI wheel
`sglang-0.5.10.post1-py3-none-any.whl`, pure Python, about 6 MB; the last pure-Python
release: 0.5.11 and later ship compiled Rust extensions, 7-39 MB per Python version).
Kernels: `sglang/srt/lora/triton_ops/` of that release:
    chunked_sgmv_shrink.py  chunked_sgmv_lora_shrink_forward   backend "csgmv" (SGLang's
    chunked_sgmv_expand.py  chunked_sgmv_lora_expand_forward    default LoRA backend)
    sgemm_lora_a.py         sgemm_lora_a_fwd                   backend "triton" (the older
    sgemm_lora_b.py         sgemm_lora_b_fwd                    one, one segment per
    qkv_lora_b.py           qkv_lora_b_fwd                      request)
    gate_up_lora_b.py       gate_up_lora_b_fwd
Install without dependencies: `pip install --no-deps sglang==0.5.10.post1` (or, offline,
`pip install --no-index --no-deps --target /tmp/site .whl/sglang-*.whl` and put /tmp/site
on PYTHONPATH).

Import workaround (stated plainly). `import sglang...` runs sglang/__init__.py (the whole
frontend) and the kernel files import `sglang.srt.lora.utils` (which pulls the model
executor and transformers config code) and `sglang.srt.utils` (psutil, orjson, PIL,
starlette, torchvision, ...). So the six kernel files are loaded BY PATH from the installed
package (importlib.util.spec_from_file_location) while two names are stubbed in sys.modules
for the duration of that load only (removed afterwards, so a real `import sglang` later is
unaffected):
    sglang.srt.lora.utils.LoRABatchInfo  used by the kernel files only as a type annotation;
                                         the stub is our `SglangBatchInfo` dataclass with the
                                         same attribute names (the wrappers read attributes)
    sglang.srt.utils.cached_triton_kernel  a decorator on the two chunked kernels that caches
                                         the host-side launch dispatch (less Python launch
                                         overhead). The stub is the identity, which is
                                         exactly SGLang's own path when
                                         SGLANG_USE_CUSTOM_TRITON_KERNEL_CACHE=false: the
                                         same kernel through Triton's normal launcher. Device
                                         work is identical; under CUDA-graph replay (how the
                                         benchmarks time graph-safe modes) host launch cost
                                         does not exist at all.
If the real modules are already imported (a full SGLang install), they are used instead.

Modes (all take fn(y, x, A, B, idx, scale, ranks=None, meta=None), like multilora_impl):
    sglang_csgmv      chunked SGMV: tokens sorted by adapter (a permutation), cut into
                      chunks of at most C tokens of one adapter; one program per (chunk,
                      16 rank columns) for the shrink, per (chunk, slice, 64 output columns)
                      for the expand; C by SGLang's rule (16 below 64 tokens, 32 below 256,
                      else 128) with max_lora_chunk_size = 128, the largest SGLang allows
    sglang_csgmv_c16  the same with C = 16 always (SGLang's default max_lora_chunk_size=16)
    sglang_triton     SGLang's "triton" backend: one program per (segment, 16-token tile,
                      16 rank columns) / (segment, tile, 256 or 64 output columns); our
                      segments are runs of equal idx (a request, or several consecutive
                      requests with one adapter: never more programs than SGLang's per-request
                      segments)
prepare_<mode>(x, A, B, idx, scale, ranks) builds the metadata (`SglangMeta`) OUTSIDE the
timed call, as SGLang's `prepare_lora_batch` does once per batch on the host:
    csgmv:  stable argsort of the per-token adapter (permutation), the chunk list
            (seg_indptr, weight_indices), chunk size
    triton: the segments (seg_lens, seg_indptr, weight_indices, max_len)
    both:   lora_ranks [L+1] int32 and scalings [L+1] fp32 on the device; slot L is the
            "no adapter" slot (rank 0: the kernels return before reading any weight), which
            is how SGLang serves requests without LoRA; idx = -1 maps to it
    both, only when S > 1 output slices or non-contiguous weights: SGLang's memory-pool
            layout of the weights (A stacked per adapter as [L, S * r_max, h_in] with each
            adapter's S x ranks[i] rows packed first, B concatenated as [L, sum h_out, r_max]),
            which SGLang builds when it loads an adapter, not per call
The timed call is then exactly SGLang's two kernel launches (shrink allocates its output
with torch.empty, as in SGLang) plus our cheap host-side argument checks.

Contract differences (theirs, not ours):
    - the shrink result x @ A^T is rounded to x's dtype before the expand (ours keeps fp32);
      fine against the fp16 / bf16 bounds.
    - fp32 on the GPU: tl.dot uses TF32 by default, which fails our 1e-5 fp32 bound, so
      the adapters raise ValueError for fp32 CUDA inputs unless TRITON_F32_DEFAULT=ieee.
      (fp32 runs in the interpreter, where tl.dot is exact.)
    - x must be contiguous (their assert); csgmv also needs a contiguous y (its strides are
      compile-time constants). Otherwise ValueError.
    - at most 3 output slices (csgmv's static_assert); the triton backend takes 1 slice,
      3 slices (qkv_lora_b) or 2 slices of equal width (gate_up_lora_b). Otherwise ValueError.
    - idx is read on the host by prepare (as SGLang's scheduler knows its batch): values
      outside [-1, L) raise ValueError there. A meta is tied to the tensors it was built
      for: a call with other weights / scale / ranks / token count raises ValueError; a new
      idx needs a new meta (SGLang also rebuilds its batch info for every batch).
Supported: fp16 / bf16 (and fp32 as above), any h_in / h_out (masked), r_max 1..128, mixed
ranks (padded rows / columns never read), rank 0, idx = -1 rows left bit-identical.

Timing: `meta = prepare_sglang_csgmv(x, A, B, idx, scale, ranks)` once, then time
`sglang_csgmv_lora(y, x, A, B, idx, scale, ranks, meta)` (likewise for the others); or
register `lora_modes()` in multilora_impl.MODES and use bench_point, which builds metas
with the mode's prepare outside the timed region.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from multilora_impl import LoraMode, _fail, check_lora_args

SGLANG_PACKAGE = "sglang"
SGLANG_VERSION = "0.5.10.post1"
SGLANG_WHEEL = f"sglang-{SGLANG_VERSION}-py3-none-any.whl"
_SGLANG_KERNEL_FILES = ("chunked_sgmv_shrink", "chunked_sgmv_expand", "sgemm_lora_a",
                        "sgemm_lora_b", "qkv_lora_b", "gate_up_lora_b")
_SGLANG_KERNEL_DIR = ("srt", "lora", "triton_ops")

MODE_NAMES = ("sglang_csgmv", "sglang_csgmv_c16", "sglang_triton")
# SGLang's chunk size rule (ChunkedSgmvLoRABackend): 16 / 32 / 128 by token count, capped by
# --max-lora-chunk-size (a power of two in [16, 128], default 16).
MIN_CHUNK_SIZE = 16


def sglang_chunk_size(num_tokens: int, max_chunk_size: int = 128) -> int:
    """SGLang's chunk size for a batch of num_tokens tokens (our code, their rule)."""
    if max_chunk_size <= MIN_CHUNK_SIZE:
        return MIN_CHUNK_SIZE
    c = 128 if num_tokens >= 256 else 32 if num_tokens >= 64 else 16
    return min(max_chunk_size, c)


@dataclass
class SglangBatchInfo:
    """The attributes SGLang's kernel wrappers read from their LoRABatchInfo."""
    use_cuda_graph: bool
    bs: int                        # grid size over segments (= num_segments here)
    num_segments: int
    seg_indptr: Tensor             # [num_segments + 1] int32
    weight_indices: Tensor         # [num_segments] int32, adapter slot per segment
    lora_ranks: Tensor             # [L + 1] int32, slot L = no adapter (rank 0)
    scalings: Tensor               # [L + 1] fp32
    max_len: int                   # csgmv: the chunk size (BLOCK_M); triton: longest segment
    seg_lens: Optional[Tensor]     # [num_segments] int32 (triton backend only)
    permutation: Optional[Tensor]  # [T] int32: logical (sorted) row -> token (csgmv only)


@dataclass
class SglangMeta:
    """Metadata of one batch for one adapter set (see prepare_*). `key` ties it to the
    tensors it was built for (data pointers and shapes, host ints only)."""
    kind: str                      # "csgmv" or "triton"
    batch_info: SglangBatchInfo
    num_slices: int
    slice_offsets: Tensor          # [S + 1] int32, device: output column of each slice
    max_slice: int                 # widest slice
    weights: Optional[tuple]       # (A [L, S*r_max, h_in], B [L, sum h_out, r_max]) or None
    key: tuple


# ---------------------------------------------------------------------------------------
# Loading SGLang's kernel files by path
# ---------------------------------------------------------------------------------------
_loaded: Optional[types.SimpleNamespace] = None
_load_error: Optional[str] = None


def _sglang_dir() -> Optional[str]:
    """Directory of the installed sglang package, found without importing it."""
    spec = importlib.util.find_spec(SGLANG_PACKAGE)   # top level: does not run __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _identity_cached_triton_kernel(key_fn=None):
    """Stand-in for sglang.srt.utils.cached_triton_kernel: Triton's own launcher (what
    SGLang itself does with SGLANG_USE_CUSTOM_TRITON_KERNEL_CACHE=false)."""
    return lambda fn: fn


def _load_sglang() -> types.SimpleNamespace:
    """Load the six kernel files by path (once). Raises ImportError with the reason."""
    global _loaded, _load_error
    if _loaded is not None:
        return _loaded
    if _load_error is not None:
        raise ImportError(_load_error)
    try:
        root = _sglang_dir()
        if root is None:
            raise ImportError(f"{SGLANG_PACKAGE} is not installed (pip install --no-deps "
                              f"{SGLANG_PACKAGE}=={SGLANG_VERSION})")
        from importlib.metadata import PackageNotFoundError, version
        try:
            got = version(SGLANG_PACKAGE)
        except PackageNotFoundError:
            got = "unknown"
        if got != SGLANG_VERSION:
            raise ImportError(f"{SGLANG_PACKAGE} {got} is installed; these adapters are "
                              f"written for {SGLANG_VERSION}")
        kdir = os.path.join(root, *_SGLANG_KERNEL_DIR)
        stubs = {}
        if "sglang.srt.lora.utils" not in sys.modules:
            m = types.ModuleType("sglang.srt.lora.utils")
            m.LoRABatchInfo = SglangBatchInfo
            stubs[m.__name__] = m
        if "sglang.srt.utils" not in sys.modules:
            m = types.ModuleType("sglang.srt.utils")
            m.cached_triton_kernel = _identity_cached_triton_kernel
            stubs[m.__name__] = m
        ns = types.SimpleNamespace(root=root, version=got)
        sys.modules.update(stubs)
        try:
            for name in _SGLANG_KERNEL_FILES:
                path = os.path.join(kdir, name + ".py")
                if not os.path.isfile(path):
                    raise ImportError(f"{path} not found in the installed {SGLANG_PACKAGE}")
                modname = f"_public_sglang_{SGLANG_VERSION.replace('.', '_')}.{name}"
                spec = importlib.util.spec_from_file_location(modname, path)
                mod = importlib.util.module_from_spec(spec)
                sys.modules[modname] = mod      # triton / inspect look functions up by module
                spec.loader.exec_module(mod)
                setattr(ns, name, mod)
        finally:
            for k in stubs:
                sys.modules.pop(k, None)
        ns.shrink_csgmv = ns.chunked_sgmv_shrink.chunked_sgmv_lora_shrink_forward
        ns.expand_csgmv = ns.chunked_sgmv_expand.chunked_sgmv_lora_expand_forward
        ns.lora_a = ns.sgemm_lora_a.sgemm_lora_a_fwd
        ns.lora_b = ns.sgemm_lora_b.sgemm_lora_b_fwd
        ns.qkv_b = ns.qkv_lora_b.qkv_lora_b_fwd
        ns.gate_up_b = ns.gate_up_lora_b.gate_up_lora_b_fwd
    except Exception as e:   # noqa: BLE001 - any failure makes the adapters unavailable
        _load_error = f"{type(e).__name__}: {e}" if not isinstance(e, ImportError) else str(e)
        raise ImportError(_load_error) from e
    _loaded = ns
    return ns


def available() -> dict[str, Optional[str]]:
    """{mode name: None if it can run here, else the reason}. Never raises."""
    try:
        import triton  # noqa: F401
        _load_sglang()
        reason = None
    except ImportError as e:
        reason = str(e)
    return {name: reason for name in MODE_NAMES}


def versions() -> dict:
    """Package and version actually loaded (for benchmark JSON), or the reason it is not."""
    try:
        ns = _load_sglang()
        return {"package": SGLANG_PACKAGE, "version": ns.version, "path": ns.root}
    except ImportError as e:
        return {"package": SGLANG_PACKAGE, "pinned": SGLANG_VERSION, "unavailable": str(e)}


# ---------------------------------------------------------------------------------------
# Metadata (host side, outside the timed call)
# ---------------------------------------------------------------------------------------
def _key(x: Tensor, A4: Tensor, Bs: Sequence[Tensor], scale: Tensor,
         ranks: Optional[Tensor]) -> tuple:
    return (x.shape[0], x.device, A4.data_ptr(), tuple(A4.shape), tuple(A4.stride()),
            tuple((b.data_ptr(), tuple(b.shape), tuple(b.stride())) for b in Bs),
            scale.data_ptr(), None if ranks is None else ranks.data_ptr())


def _check_common(y: Tensor, x: Tensor, A: Tensor, B, idx: Tensor, scale: Tensor,
                  ranks: Optional[Tensor], kind: str):
    """Our contract checks plus what SGLang's kernels cannot do (ValueError names it)."""
    A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks)
    S = len(Bs)
    if S > 3:
        _fail("B", "at most 3 output slices (SGLang's kernels)", S)
    if kind == "triton" and S == 2 and Bs[0].shape[1] != Bs[1].shape[1]:
        _fail("B", "2 slices of equal width (SGLang's gate_up_lora_b)",
              [b.shape[1] for b in Bs])
    if x.is_cuda and x.dtype == torch.float32 and \
            os.environ.get("TRITON_F32_DEFAULT", "") != "ieee":
        _fail("x", "float16 or bfloat16 on the GPU (SGLang's tl.dot runs fp32 as TF32, "
              "which misses the fp32 bound; set TRITON_F32_DEFAULT=ieee to force IEEE)",
              x.dtype)
    if not x.is_contiguous():
        _fail("x", "a contiguous tensor (SGLang's kernels assert it)", tuple(x.stride()))
    if kind == "csgmv" and not y.is_contiguous():
        _fail("y", "a contiguous tensor (SGLang's chunked expand has constant strides)",
              tuple(y.stride()))
    return A4, Bs


def _pack_weights(A4: Tensor, Bs: Sequence[Tensor], ranks_l: list[int]):
    """SGLang's memory-pool layout, or None when A, B can be passed as they are (one slice,
    contiguous). A: [L, S * r_max, h_in], adapter i's rows are [A_0[i, :r]; A_1[i, :r]; ...]
    (r = ranks[i]) then zeros; B: [L, sum h_out, r_max], the slices one after the other."""
    S, L, r_max, h_in = A4.shape
    if S == 1 and A4.is_contiguous() and Bs[0].is_contiguous():
        return None
    Ap = torch.zeros((L, S * r_max, h_in), dtype=A4.dtype, device=A4.device)
    for i, r in enumerate(ranks_l):
        r = max(0, min(r, r_max))
        for s in range(S):
            Ap[i, s * r:(s + 1) * r] = A4[s, i, :r]
    Bp = torch.cat(list(Bs), dim=1).contiguous()
    return Ap, Bp


def _prepare(kind: str, x: Tensor, A: Tensor, B, idx: Tensor, scale: Tensor,
             ranks: Optional[Tensor], chunk_size: Optional[int] = None,
             max_chunk_size: int = 128) -> SglangMeta:
    A4, Bs = check_lora_args(torch.empty((x.shape[0], sum(b.shape[1] for b in
                                          ([B] if isinstance(B, Tensor) else B))),
                                         dtype=x.dtype, device=x.device),
                             x, A, B, idx, scale, ranks)
    S, L, r_max, _ = A4.shape
    dev = x.device
    idx_h = idx.detach().to("cpu", torch.int64)               # the host knows its batch
    T = idx_h.numel()
    if T and (int(idx_h.min()) < -1 or int(idx_h.max()) >= L):
        _fail("idx", f"values in [-1, {L - 1}]",
              f"range [{int(idx_h.min())}, {int(idx_h.max())}]")
    ranks_l = ranks.tolist() if ranks is not None else [r_max] * L
    if any(r < 0 or r > r_max for r in ranks_l):
        _fail("ranks", f"values in [0, r_max={r_max}]", ranks_l)
    slot = torch.where(idx_h < 0, L, idx_h)                  # -1 -> the rank-0 slot L
    lora_ranks = torch.tensor(ranks_l + [0], dtype=torch.int32, device=dev)      # [L+1]
    scalings = torch.cat([scale.detach().float().cpu(), torch.zeros(1)]).to(dev)  # [L+1]

    if kind == "csgmv":
        C = chunk_size if chunk_size is not None else sglang_chunk_size(T, max_chunk_size)
        perm = torch.argsort(slot, stable=True)               # group tokens by adapter
        sorted_slot = slot[perm]
        adapters, counts = torch.unique_consecutive(sorted_slot, return_counts=True)
        w_list, lens = [], []
        for a, n in zip(adapters.tolist(), counts.tolist()):
            k = -(-n // C)
            w_list += [a] * k
            lens += [C] * (k - 1) + [n - C * (k - 1)]
        seg_indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
        seg_indptr[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
        bi = SglangBatchInfo(
            use_cuda_graph=False, bs=len(w_list), num_segments=len(w_list),
            seg_indptr=seg_indptr.to(dev),
            weight_indices=torch.tensor(w_list, dtype=torch.int32, device=dev),
            lora_ranks=lora_ranks, scalings=scalings, max_len=C, seg_lens=None,
            permutation=perm.to(torch.int32).to(dev))
    elif kind == "triton":
        change = torch.ones(T, dtype=torch.bool)
        change[1:] = slot[1:] != slot[:-1]
        starts = torch.nonzero(change).flatten()
        seg_indptr = torch.cat([starts, torch.tensor([T])]).to(torch.int32)
        seg_lens = seg_indptr[1:] - seg_indptr[:-1]
        bi = SglangBatchInfo(
            use_cuda_graph=False, bs=int(starts.numel()), num_segments=int(starts.numel()),
            seg_indptr=seg_indptr.to(dev), seg_lens=seg_lens.to(dev),
            weight_indices=slot[starts].to(torch.int32).to(dev),
            lora_ranks=lora_ranks, scalings=scalings, max_len=int(seg_lens.max()),
            permutation=None)
    else:
        raise ValueError(f"kind: expected 'csgmv' or 'triton', got {kind!r}")
    offs = [0]
    for b in Bs:
        offs.append(offs[-1] + b.shape[1])
    return SglangMeta(kind=kind, batch_info=bi, num_slices=S,
                      slice_offsets=torch.tensor(offs, dtype=torch.int32, device=dev),
                      max_slice=max(b.shape[1] for b in Bs),
                      weights=_pack_weights(A4, Bs, ranks_l),
                      key=_key(x, A4, Bs, scale, ranks))


def prepare_sglang_csgmv(x, A, B, idx, scale, ranks=None) -> SglangMeta:
    """Metadata for sglang_csgmv (chunk size by SGLang's rule, max_lora_chunk_size=128)."""
    return _prepare("csgmv", x, A, B, idx, scale, ranks, max_chunk_size=128)


def prepare_sglang_csgmv_c16(x, A, B, idx, scale, ranks=None) -> SglangMeta:
    """Metadata for sglang_csgmv_c16 (chunk size 16, SGLang's default setting)."""
    return _prepare("csgmv", x, A, B, idx, scale, ranks, chunk_size=16)


def prepare_sglang_triton(x, A, B, idx, scale, ranks=None) -> SglangMeta:
    """Metadata for sglang_triton (segments = runs of equal idx)."""
    return _prepare("triton", x, A, B, idx, scale, ranks)


# ---------------------------------------------------------------------------------------
# The modes: SGLang's two launches
# ---------------------------------------------------------------------------------------
def _weights_for(meta: SglangMeta, A4: Tensor, Bs: Sequence[Tensor], x, scale, ranks,
                 kind: str):
    if not isinstance(meta, SglangMeta) or meta.kind != kind:
        _fail("meta", f"an SglangMeta from prepare_sglang_{kind}(...) or None",
              type(meta).__name__ if not isinstance(meta, SglangMeta) else meta.kind)
    if meta.key != _key(x, A4, Bs, scale, ranks):
        _fail("meta", "metadata built for these x (token count), A, B, scale and ranks "
              "tensors (call prepare again)", "a meta built for other tensors")
    if meta.weights is not None:
        return meta.weights
    return A4[0], Bs[0]


def _run_csgmv(y, x, A, B, idx, scale, ranks, meta, prepare) -> None:
    A4, Bs = _check_common(y, x, A, B, idx, scale, ranks, "csgmv")
    k = _load_sglang()
    if meta is None:
        meta = prepare(x, A, B, idx, scale, ranks)     # host sync: tests, not graphs
    Aw, Bw = _weights_for(meta, A4, Bs, x, scale, ranks, "csgmv")
    v = k.shrink_csgmv(x=x, weights=Aw, batch_info=meta.batch_info, num_slices=meta.num_slices)
    k.expand_csgmv(x=v, weights=Bw, batch_info=meta.batch_info,
                   slice_offsets=meta.slice_offsets, max_slice_size=meta.max_slice,
                   base_output=y)


def sglang_csgmv_lora(y, x, A, B, idx, scale, ranks=None, meta=None) -> None:
    """Mode sglang_csgmv: SGLang's chunked SGMV shrink + expand (chunk size by its rule)."""
    _run_csgmv(y, x, A, B, idx, scale, ranks, meta, prepare_sglang_csgmv)


def sglang_csgmv_c16_lora(y, x, A, B, idx, scale, ranks=None, meta=None) -> None:
    """Mode sglang_csgmv_c16: the same, chunks of 16 tokens (SGLang's default)."""
    _run_csgmv(y, x, A, B, idx, scale, ranks, meta, prepare_sglang_csgmv_c16)


def sglang_triton_lora(y, x, A, B, idx, scale, ranks=None, meta=None) -> None:
    """Mode sglang_triton: SGLang's sgemm_lora_a then sgemm_lora_b / qkv_lora_b /
    gate_up_lora_b (by the number of slices), one segment per run of equal idx."""
    A4, Bs = _check_common(y, x, A, B, idx, scale, ranks, "triton")
    k = _load_sglang()
    if meta is None:
        meta = prepare_sglang_triton(x, A, B, idx, scale, ranks)
    Aw, Bw = _weights_for(meta, A4, Bs, x, scale, ranks, "triton")
    bi, S = meta.batch_info, meta.num_slices
    v = k.lora_a(x, Aw, bi, stack_num=S)
    if S == 1:
        k.lora_b(v, Bw, bi, base_output=y)
    elif S == 2:
        k.gate_up_b(v, Bw, bi, Bs[0].shape[1], base_output=y)
    else:
        k.qkv_b(v, Bw, bi, meta.slice_offsets, meta.max_slice, base_output=y)


_MODE_TABLE = {
    "sglang_csgmv": (sglang_csgmv_lora, prepare_sglang_csgmv,
                     f"SGLang {SGLANG_VERSION} chunked SGMV (csgmv, its default backend), "
                     "chunk size by its rule up to 128"),
    "sglang_csgmv_c16": (sglang_csgmv_c16_lora, prepare_sglang_csgmv_c16,
                         f"SGLang {SGLANG_VERSION} chunked SGMV, 16-token chunks "
                         "(its default max_lora_chunk_size)"),
    "sglang_triton": (sglang_triton_lora, prepare_sglang_triton,
                      f"SGLang {SGLANG_VERSION} 'triton' backend: sgemm_lora_a + "
                      "sgemm_lora_b / qkv_lora_b / gate_up_lora_b per segment"),
}


def lora_modes(only_available: bool = False) -> list[LoraMode]:
    """LoraMode entries for multilora_impl.MODES (graph-safe given a meta from prepare;
    Triton, so they run on the CPU only under TRITON_INTERPRET=1)."""
    avail = available() if only_available else {}
    return [LoraMode(name, fn, prepare=prep, description=desc, is_triton=True)
            for name, (fn, prep, desc) in _MODE_TABLE.items()
            if not only_available or avail[name] is None]
