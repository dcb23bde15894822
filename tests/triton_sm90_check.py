"""Compile engine_kernels' Triton kernels ahead of time for sm_90 (no GPU needed: Triton's
own ptxas) and print each config's registers and stack bytes (spills) as JSON lines.

    python tests/triton_sm90_check.py            # the stacked kernels' configs

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


def main() -> None:
    for name, fn, types, consts, warps in configs():
        print(json.dumps(dict(kernel=name, num_warps=warps, **resources(fn, types, consts,
                                                                         warps))), flush=True)


if __name__ == "__main__":
    main()
