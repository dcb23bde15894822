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

Package 2: vLLM, pinned to `vllm==0.33.0`, its Triton LoRA ops (what vLLM runs for LoRA on
CUDA: PunicaWrapperGPU -> lora_shrink / lora_expand), `vllm/lora/ops/triton_ops/` of that
release:
    kernel_utils.py     do_shrink_kernel / do_expand_kernel (the shared Triton bodies)
    utils.py            get_lora_op_configs (tile sizes; its defaults: vLLM ships no tuned
                        tables, they are user-supplied), the weight-pointer tables
    lora_shrink_op.py   _lora_shrink: zero the fp32 output, one launch (split-K atomics)
    lora_expand_op.py   _lora_expand: one launch, adds into y (add_inputs=True)
The wheel is 336 MB of mostly compiled code; only these four source files are used. They
are read from MULTILORA_VLLM_DIR, else from an installed vllm package (found without
importing it), else from .whl/vllm-0.33.0/ where `.ci/setup` extracts them from the wheel
(`python public_kernels.py --extract-vllm WHEEL`). Loaded by path like SGLang's, with these
names stubbed in sys.modules during the load only (vLLM's own values where they have one):
    vllm.envs            VLLM_BATCH_INVARIANT False, VLLM_TUNED_CONFIG_FOLDER None,
                         VLLM_LORA_DISABLE_PDL False, VLLM_LORA_ENABLE_DUAL_STREAM False
                         (vLLM's defaults; without dual streams vLLM launches without PDL)
    vllm.triton_utils    triton, triton.language
    vllm.utils.torch_utils  direct_register_custom_op raises AttributeError, so both files
                         take their own fallback (`lora_shrink = _lora_shrink`, the same
                         function without the torch.ops wrapper); async_tensor_h2d copies
    vllm.utils.math_utils   next_power_of_2; vllm.logger: logging; vllm.platforms:
                         current_platform.is_cuda / has_device_capability / is_device_capability
Mode `vllm_triton`: prepare builds, outside the timed call, what vLLM holds per batch and per
loaded adapter: LoRAKernelMeta.prepare_tensors's tensors (tokens sorted stably by adapter,
the active ids with -1 for no LoRA, counts, start offsets; our code, its rule; the active
count exact, as vLLM's specialize_active_lora), the fp32 shrink buffer [S, T, r_max], and
the weights as vLLM's LoRA layers store them: A and B per slice zero-padded past each
adapter's rank, each adapter's scale folded into B (vLLM's optimize()), so the shrink's
`scaling` is 1.0. The timed call: vLLM's shrink (a memset and one launch) and expand.
Its contract differences: fp16 / bf16 weights only (ValueError for fp32), a contiguous y,
v rounded to B's dtype before the expand (its CAST_TYPE); idx = -1 rows untouched.

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

SGLang modes (all take fn(y, x, A, B, idx, scale, ranks=None, meta=None), like multilora_impl):
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

import functools
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

VLLM_PACKAGE = "vllm"
VLLM_VERSION = "0.33.0"
VLLM_WHEEL = f"vllm-{VLLM_VERSION}-cp38-abi3-manylinux_2_28_x86_64.whl"
VLLM_DIR_ENV = "MULTILORA_VLLM_DIR"
_VLLM_KERNEL_FILES = ("kernel_utils", "utils", "lora_shrink_op", "lora_expand_op")  # deps first
_VLLM_KERNEL_DIR = ("vllm", "lora", "ops", "triton_ops")
_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VLLM_DIR = os.path.join(_ROOT, ".whl", f"vllm-{VLLM_VERSION}")

SGLANG_MODE_NAMES = ("sglang_csgmv", "sglang_csgmv_c16", "sglang_triton")
VLLM_MODE_NAMES = ("vllm_triton",)
MODE_NAMES = SGLANG_MODE_NAMES + VLLM_MODE_NAMES
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
# Loading the packages' kernel files by path (SGLang's, vLLM's below)
# ---------------------------------------------------------------------------------------
def _load_once(load):
    """load() runs once: its result, or the ImportError saying why it failed (any exception
    counts as a failure), is kept and returned / raised again on every later call."""
    state: dict = {}

    def wrapper():
        if "error" not in state and "ns" not in state:
            try:
                state["ns"] = load()
            except Exception as e:   # noqa: BLE001 - any failure makes the adapters unavailable
                state["error"] = str(e) if isinstance(e, ImportError) else f"{type(e).__name__}: {e}"
        if "error" in state:
            raise ImportError(state["error"])
        return state["ns"]
    return functools.wraps(load)(wrapper)


def _load_by_path(kdir: str, files: Sequence[str], prefix: str, stubs: dict,
                  also_as: Optional[str] = None) -> dict:
    """Load kdir/<name>.py for each name, in order, as module prefix.<name> (kept in
    sys.modules: triton / inspect look functions up by module), with the stub modules in
    sys.modules during the loads only; also_as: the package the files import each other
    from (each module is also listed as also_as.<name> while the files load)."""
    mods, aliases = {}, []
    sys.modules.update(stubs)
    try:
        for name in files:
            path = os.path.join(kdir, name + ".py")
            if not os.path.isfile(path):
                raise ImportError(f"{path} not found")
            spec = importlib.util.spec_from_file_location(f"{prefix}.{name}", path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            if also_as:
                aliases.append(f"{also_as}.{name}")
                sys.modules[aliases[-1]] = mod
            spec.loader.exec_module(mod)
            mods[name] = mod
    finally:
        for k in list(stubs) + aliases:
            sys.modules.pop(k, None)
    return mods


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


@_load_once
def _load_sglang() -> types.SimpleNamespace:
    """Load the six kernel files by path (once). Raises ImportError with the reason."""
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
    ns.__dict__.update(_load_by_path(kdir, _SGLANG_KERNEL_FILES,
                                     f"_public_sglang_{SGLANG_VERSION.replace('.', '_')}", stubs))
    ns.shrink_csgmv = ns.chunked_sgmv_shrink.chunked_sgmv_lora_shrink_forward
    ns.expand_csgmv = ns.chunked_sgmv_expand.chunked_sgmv_lora_expand_forward
    ns.lora_a = ns.sgemm_lora_a.sgemm_lora_a_fwd
    ns.lora_b = ns.sgemm_lora_b.sgemm_lora_b_fwd
    ns.qkv_b = ns.qkv_lora_b.qkv_lora_b_fwd
    ns.gate_up_b = ns.gate_up_lora_b.gate_up_lora_b_fwd
    return ns


def available() -> dict[str, Optional[str]]:
    """{mode name: None if it can run here, else the reason}. Never raises."""
    out = {}
    for names, load in ((SGLANG_MODE_NAMES, _load_sglang), (VLLM_MODE_NAMES, _load_vllm)):
        try:
            import triton  # noqa: F401
            load()
            reason = None
        except ImportError as e:
            reason = str(e)
        out.update({name: reason for name in names})
    return out


def versions() -> dict:
    """{package: what was loaded (version, path) or why not} (for benchmark JSON)."""
    out = {}
    for pkg, pinned, load in ((SGLANG_PACKAGE, SGLANG_VERSION, _load_sglang),
                              (VLLM_PACKAGE, VLLM_VERSION, _load_vllm)):
        try:
            ns = load()
            out[pkg] = {"version": ns.version, "path": ns.root}
        except ImportError as e:
            out[pkg] = {"pinned": pinned, "unavailable": str(e)}
    return out


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


# ---------------------------------------------------------------------------------------
# vLLM: loading its four kernel files by path
# ---------------------------------------------------------------------------------------


def _vllm_dir() -> tuple[Optional[str], str]:
    """(directory holding vllm/lora/ops/triton_ops, the version found there) or (None, why)."""
    d = os.environ.get(VLLM_DIR_ENV)
    if d:
        return d, VLLM_VERSION + f" ({VLLM_DIR_ENV})"
    spec = importlib.util.find_spec(VLLM_PACKAGE)       # top level: does not run __init__
    if spec is not None and spec.submodule_search_locations:
        from importlib.metadata import PackageNotFoundError, version
        try:
            got = version(VLLM_PACKAGE)
        except PackageNotFoundError:
            got = "unknown"
        return os.path.dirname(list(spec.submodule_search_locations)[0]), got
    if os.path.isdir(DEFAULT_VLLM_DIR):
        return DEFAULT_VLLM_DIR, VLLM_VERSION
    return None, (f"vllm {VLLM_VERSION} kernels not found: no {VLLM_DIR_ENV}, no installed vllm, "
                  f"no {DEFAULT_VLLM_DIR} (python public_kernels.py --extract-vllm {VLLM_WHEEL})")


class _Platform:
    """Stand-in for vllm.platforms.current_platform: the three questions the files ask."""

    @staticmethod
    def is_cuda() -> bool:
        return torch.cuda.is_available() and torch.version.cuda is not None

    @staticmethod
    def _cap() -> int:
        if not torch.cuda.is_available():
            return -1
        major, minor = torch.cuda.get_device_capability()
        return 10 * major + minor

    def has_device_capability(self, cap: int) -> bool:
        return self._cap() >= cap

    def is_device_capability(self, cap: int) -> bool:
        return self._cap() == cap


class _OnceLogger:
    """Stand-in for vllm.logger's logger: logging plus its *_once methods."""

    def __init__(self, name: str):
        import logging
        self._log = logging.getLogger(name)
        self._seen: set = set()

    def __getattr__(self, attr):
        if attr.endswith("_once"):
            level = attr[:-len("_once")]

            def once(msg, *args, **kwargs):
                if msg not in self._seen:
                    self._seen.add(msg)
                    getattr(self._log, level)(msg, *args)
            return once
        return getattr(self._log, attr)


def _no_custom_op(*args, **kwargs):
    raise AttributeError("not registered (public_kernels): the files' own fallback runs")


def _vllm_stubs() -> dict:
    import triton
    import triton.language as tl

    def mod(name, **attrs):
        m = types.ModuleType(name)
        m.__path__ = []            # a package, so submodules can be looked up under it
        for k, v in attrs.items():
            setattr(m, k, v)
        return m
    envs = mod("vllm.envs", VLLM_BATCH_INVARIANT=False, VLLM_TUNED_CONFIG_FOLDER=None,
               VLLM_LORA_DISABLE_PDL=False, VLLM_LORA_ENABLE_DUAL_STREAM=False)
    stubs = [mod("vllm", envs=envs), envs,
             mod("vllm.triton_utils", triton=triton, tl=tl),
             mod("vllm.utils"),
             mod("vllm.utils.torch_utils", direct_register_custom_op=_no_custom_op,
                 async_tensor_h2d=lambda data, device=None, dtype=None, out=None:
                 torch.tensor(data, dtype=dtype, device=device)),
             mod("vllm.utils.math_utils",
                 next_power_of_2=lambda n: 1 if n < 1 else 1 << (n - 1).bit_length()),
             mod("vllm.logger", init_logger=_OnceLogger),
             mod("vllm.platforms", current_platform=_Platform()),
             mod("vllm.lora"), mod("vllm.lora.ops"), mod("vllm.lora.ops.triton_ops")]
    return {m.__name__: m for m in stubs}


@_load_once
def _load_vllm() -> types.SimpleNamespace:
    """Load vLLM's four kernel files by path (once). Raises ImportError with the reason."""
    root, got = _vllm_dir()
    if root is None:
        raise ImportError(got)
    if not got.startswith(VLLM_VERSION):
        raise ImportError(f"{VLLM_PACKAGE} {got} is installed; these adapters are "
                          f"written for {VLLM_VERSION}")
    kdir = os.path.join(root, *_VLLM_KERNEL_DIR)
    stubs = _vllm_stubs()
    clash = [k for k in stubs if k in sys.modules]
    if clash:   # a real vllm is imported: its modules, not ours, would be found
        raise ImportError(f"vllm modules already imported ({clash[0]}, ...): load these "
                          "adapters in a process without vllm")
    ns = types.SimpleNamespace(root=root, version=got)
    ns.__dict__.update(_load_by_path(kdir, _VLLM_KERNEL_FILES,
                                     f"_public_vllm_{VLLM_VERSION.replace('.', '_')}", stubs,
                                     also_as="vllm.lora.ops.triton_ops"))
    ns.shrink = ns.lora_shrink_op.lora_shrink
    ns.expand = ns.lora_expand_op.lora_expand
    return ns


def extract_vllm_kernels(wheel: str, dest: str = DEFAULT_VLLM_DIR) -> list[str]:
    """Copy the four kernel files out of vLLM's wheel into dest (what .ci/setup does)."""
    import zipfile
    names = ["/".join(_VLLM_KERNEL_DIR) + f"/{n}.py" for n in _VLLM_KERNEL_FILES]
    with zipfile.ZipFile(wheel) as z:
        for n in names:
            z.extract(n, dest)
    return [os.path.join(dest, n) for n in names]


# ---------------------------------------------------------------------------------------
# vLLM: metadata and the mode
# ---------------------------------------------------------------------------------------
@dataclass
class VllmMeta:
    """What vLLM holds for one batch and one adapter set (see prepare_vllm_triton)."""
    lora_a: list                   # S x [L, r_max, h_in], zero past each adapter's rank
    lora_b: list                   # S x [L, h_out_s, r_max], scale folded in, zero past the rank
    buffer: Tensor                 # [S, T, r_max] fp32: the shrink's output
    token_lora_mapping: Tensor     # [T] int32, -1 = no LoRA
    sorted_tokens: Tensor          # [T] int32: tokens sorted (stably) by adapter
    num_tokens_per_lora: Tensor    # [L + 1] int32
    lora_token_start_loc: Tensor   # [L + 2] int32
    lora_ids: Tensor               # [L + 1] int32: the active ids (-1 first if present), then -1
    no_lora_flag_cpu: Tensor       # [1] bool, CPU
    num_active_loras_cpu: Tensor   # [1] int32, CPU
    key: tuple

    def args(self) -> tuple:
        return (self.token_lora_mapping, self.sorted_tokens, self.num_tokens_per_lora,
                self.lora_token_start_loc, self.lora_ids, self.no_lora_flag_cpu,
                self.num_active_loras_cpu)


def _check_vllm(y, x, A, B, idx, scale, ranks):
    A4, Bs = check_lora_args(y, x, A, B, idx, scale, ranks)
    if x.dtype not in (torch.float16, torch.bfloat16):
        _fail("x", "float16 or bfloat16 (vLLM's LoRA kernels assert it)", x.dtype)
    if not y.is_contiguous():
        _fail("y", "a contiguous tensor (vLLM's expand asserts it)", tuple(y.stride()))
    return A4, Bs


def prepare_vllm_triton(x, A, B, idx, scale, ranks=None) -> VllmMeta:
    """Metadata and weights for vllm_triton (host side, once per batch / adapter set)."""
    Bl = [B] if isinstance(B, Tensor) else list(B)
    y0 = torch.empty((x.shape[0], sum(b.shape[1] for b in Bl)), dtype=x.dtype, device=x.device)
    A4, Bs = _check_vllm(y0, x, A, B, idx, scale, ranks)
    S, L, r_max, _ = A4.shape
    dev, T = x.device, x.shape[0]
    idx_h = idx.detach().to("cpu", torch.int64)
    if T and (int(idx_h.min()) < -1 or int(idx_h.max()) >= L):
        _fail("idx", f"values in [-1, {L - 1}]", f"range [{int(idx_h.min())}, {int(idx_h.max())}]")
    rk = (ranks.detach().to("cpu", torch.int64) if ranks is not None
          else torch.full((L,), r_max, dtype=torch.int64))
    if L and (int(rk.min()) < 0 or int(rk.max()) > r_max):
        _fail("ranks", f"values in [0, r_max={r_max}]", rk.tolist())
    used = (torch.arange(r_max)[None, :] < rk[:, None]).to(dev)          # [L, r_max]
    lora_a = [torch.where(used[:, :, None], A4[s], 0).contiguous() for s in range(S)]
    sc = scale.detach().float().to(dev)[:, None, None]
    lora_b = [torch.where(used[:, None, :], b.float() * sc, 0).to(b.dtype).contiguous()
              for b in Bs]
    # vLLM caches each weight list's pointer table and strides by data pointers alone (its
    # weights never move); ours are new tensors, so an entry under their addresses is a
    # freed list's: drop it.
    k = _load_vllm()
    k.utils._LORA_A_PTR_DICT.pop(tuple(w.data_ptr() for w in lora_a), None)
    k.utils._LORA_B_PTR_DICT.pop(tuple(w.data_ptr() for w in lora_b), None)
    # LoRAKernelMeta.prepare_tensors's tensors, for this batch (its rule, our code)
    mapping = idx_h.to(torch.int32)
    order = torch.sort(mapping, stable=True)[1].to(torch.int32)
    ids, counts = torch.unique(mapping, sorted=True, return_counts=True)
    n = ids.numel()
    lora_ids = torch.full((L + 1,), -1, dtype=torch.int32)
    lora_ids[:n] = ids
    per = torch.zeros(L + 1, dtype=torch.int32)
    per[:n] = counts
    start = torch.zeros(L + 2, dtype=torch.int32)
    start[1:n + 1] = torch.cumsum(counts, 0)
    return VllmMeta(lora_a=lora_a, lora_b=lora_b,
                    buffer=torch.zeros((S, T, r_max), dtype=torch.float32, device=dev),
                    token_lora_mapping=mapping.to(dev), sorted_tokens=order.to(dev),
                    num_tokens_per_lora=per.to(dev), lora_token_start_loc=start.to(dev),
                    lora_ids=lora_ids.to(dev),
                    no_lora_flag_cpu=torch.tensor([bool((mapping == -1).all())]),
                    num_active_loras_cpu=torch.tensor([n], dtype=torch.int32),
                    key=_key(x, A4, Bs, scale, ranks))


def vllm_triton_lora(y, x, A, B, idx, scale, ranks=None, meta=None) -> None:
    """Mode vllm_triton: vLLM's lora_shrink (into its fp32 buffer) then lora_expand (adds
    into y), on the weights as vLLM stores them (prepare_vllm_triton)."""
    A4, Bs = _check_vllm(y, x, A, B, idx, scale, ranks)
    k = _load_vllm()
    if meta is None:
        meta = prepare_vllm_triton(x, A, B, idx, scale, ranks)    # host sync: tests, not graphs
    if not isinstance(meta, VllmMeta):
        _fail("meta", "a VllmMeta from prepare_vllm_triton(...) or None", type(meta).__name__)
    if meta.key != _key(x, A4, Bs, scale, ranks):
        _fail("meta", "metadata built for these x (token count), A, B, scale and ranks "
              "tensors (call prepare again)", "a meta built for other tensors")
    k.shrink(x, meta.lora_a, meta.buffer, *meta.args(), 1.0)
    k.expand(meta.buffer, meta.lora_b, y, *meta.args(), offset_start=0, add_inputs=True)


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
    "vllm_triton": (vllm_triton_lora, prepare_vllm_triton,
                    f"vLLM {VLLM_VERSION} Triton LoRA ops: lora_shrink (split-K, atomics) + "
                    "lora_expand, its default configs"),
}


def lora_modes(only_available: bool = False) -> list[LoraMode]:
    """LoraMode entries for multilora_impl.MODES (graph-safe given a meta from prepare;
    Triton, so they run on the CPU only under TRITON_INTERPRET=1)."""
    avail = available() if only_available else {}
    return [LoraMode(name, fn, prepare=prep, description=desc, is_triton=True)
            for name, (fn, prep, desc) in _MODE_TABLE.items()
            if not only_available or avail[name] is None]


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="Public kernels: what can run here; vLLM's kernel files.")
    ap.add_argument("--extract-vllm", metavar="WHEEL",
                    help=f"copy vLLM's four kernel files out of {VLLM_WHEEL} into {DEFAULT_VLLM_DIR}")
    a = ap.parse_args()
    if a.extract_vllm:
        for path in extract_vllm_kernels(a.extract_vllm):
            print(path)
    for name, reason in available().items():
        print(f"{name}: {'available' if reason is None else reason}")
