"""Compile engine_kernels' Triton kernels ahead of time for sm_90 (no GPU needed: Triton's
own ptxas) and print each config's registers and stack bytes (spills) as JSON lines.

    python tests/triton_sm90_check.py            # the stacked kernels' configs
    python tests/triton_sm90_check.py --sgmv-expand-loads   # sgmv expand's load opcodes

Run without TRITON_INTERPRET (the interpreter's kernels have nothing to compile); the
test tests/test_engine_kernels.py::test_folded_kernels_compile_for_sm90_without_spills
calls it in a subprocess. Shapes: Llama-3-8B with 7 adapters of rank 16, bf16.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import engine_kernels as ek  # noqa: E402

P, I32 = "*bf16", "i32"


def cuobjdump() -> str:
    """The cuobjdump that ships with Triton's NVIDIA backend."""
    import triton.backends.nvidia as nv
    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def resources(fn, types: dict, consts: dict, num_warps: int) -> dict:
    """Registers and stack bytes of fn compiled for sm_90 with these constexprs."""
    sig = {n: "constexpr" if n in consts else types.get(n, I32) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    return dict(registers=int(re.search(r"REG:(\d+)", out).group(1)),
                stack=int(re.search(r"STACK:(\d+)", out).group(1)))


def configs() -> list:
    """(name, kernel, pointer / float argument types, constexprs, num_warps) as the
    wrappers launch them at Llama-3-8B shapes (decode batch 64)."""
    norm = dict(x_ptr=P, r_ptr=P, w_ptr=P, h_ptr=P, eps="fp32", v_ptr=P, bt_ptr=P,
                idx_ptr="*i32")
    silu = dict(gu_ptr=P, v_ptr=P, bt_ptr=P, idx_ptr="*i32", h_ptr=P)
    rope = dict(qkv_ptr=P, cos_ptr=P, sin_ptr=P, pos_ptr="*i64", q_ptr=P, kc_ptr=P, vc_ptr=P,
                slot_ptr="*i64", v_ptr=P, bt_ptr=P, idx_ptr="*i32")
    expand = dict(y_ptr=P, v_ptr=P, bt_ptr=P, idx_ptr="*i32")
    chunked = dict(BLOCK_T=64, BLOCK_E=128, PRECISION="tf32")
    return [
        # stacked_expand at its column tiles (reported; it spills with Triton 3.6)
        *[(f"stacked_expand_chunked_n{n}", ek._stacked_expand_kernel, expand,
           dict(chunked, BLOCK_N=n), 4) for n in (32, 64, 128)],
        ("add_rms_norm_lora", ek._add_rms_norm_kernel, norm,
         dict(HAS_R=True, HAS_LORA=True, RANK=16, RB=1, BLOCK=4096), ek.LORA_NORM_WARPS),
        ("stacked_silu_mul", ek._stacked_silu_mul_kernel, silu,
         dict(BLOCK_T=64, BLOCK_N=32, BLOCK_E=128, PRECISION="tf32"), 8),
        ("rope_qkv_lora", ek._rope_qkv_kernel, rope,
         dict(D=128, HAS_LORA=True, RANK=16, RB=16), 4),
    ]


def sgmv_expand_loads(has_ranks: bool) -> dict:
    """Global-load instructions (PTX opcode -> count) of sgmv_triton's expand compiled for
    sm_90 as it runs in decode (bf16, 16 x 256 tiles, rank step 16, r_max 64), with the
    divisibility and unit strides Triton's launcher specialises for contiguous tensors."""
    from sgmv_triton import sgmv_expand_triton as se
    fn = se._sgmv_expand_kernel
    consts = dict(stride_b0r=1, stride_b1r=1, stride_b2r=1, stride_vr=1, stride_yn=1,
                  NUM_SLICES=1, BLOCK_M=16, BLOCK_N=256, BLOCK_R=16, HAS_RANKS=has_ranks,
                  RANK8=True, SPLIT_V=True, UPCAST=False, PRECISION="tf32", N_PARTS=1)
    ptrs = dict(y_ptr=P, v_ptr="*fp32", b0_ptr=P, b1_ptr=P, b2_ptr=P, scale_ptr="*fp32",
                seg_starts_ptr="*i32", seg_adapter_ptr="*i32", ranks_ptr="*i32")
    aligned = list(ptrs) + ["r_max", "h_out0", "col_off0", "stride_yt", "stride_vt", "stride_vs", "stride_vk",
                            "stride_b0l", "stride_b0n", "stride_b1l", "stride_b1n",
                            "stride_b2l", "stride_b2n"]
    sig = {n: "constexpr" if n in consts else ptrs.get(n, I32) for n in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()},
                    attrs={(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in aligned})
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": 4, "num_stages": 2}).asm["ptx"]
    ops = re.findall(r"\b(ld\.global[.\w]*|cp\.async\.c[ag]\.shared\.global)\s*(?:\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+))?", ptx)
    counts: dict = {}
    for op, size in ops:
        key = f"{op} {int(size, 0)}" if size else op
        counts[key] = counts.get(key, 0) + 1
    return counts


def main() -> None:
    if "--sgmv-expand-loads" in sys.argv:
        for has_ranks in (False, True):
            print(json.dumps(dict(kernel="sgmv_expand", has_ranks=has_ranks,
                                  loads=sgmv_expand_loads(has_ranks))), flush=True)
        return
    for name, fn, types, consts, warps in configs():
        print(json.dumps(dict(kernel=name, num_warps=warps, **resources(fn, types, consts,
                                                                         warps))), flush=True)


if __name__ == "__main__":
    main()
