"""How fast can any LoRA call be at batch 1? (issue 3, target 5; PERF_LOG session 14)

Target 5 asks the best mode to be within 2x of max(bytes / copy bandwidth, the empty
kernel in a CUDA graph): 1.86 us at batch 1, where bgmv_cuda's pair takes ~3.0 us. A LoRA
call has a dependency that crosses SMs: v = x A^T is a sum over all of h_in, and every
output column needs all of v. This probe times skeletons that keep that dependency and the
bytes of batch 1 but do no other work (no idx, no ranks, one dependent load per thread),
with the benchmarks' method (bench_utils.time_graph: calls back to back in one CUDA graph,
cycling over as many input sets as the figure's point uses, so the weights sit where they
sit there), beside our pair at the same points:

  empty          one near-empty kernel (bench_utils.empty_graph_us: target 5's floor)
  shrink         the shrink skeleton alone: blocks of 256 threads, each thread one round of
                 16-byte loads of A (all in flight), a block sum, one float of v per block
  pair           shrink skeleton, then the expand skeleton by PDL (as bgmv_cuda): each
                 thread loads one 16-byte B vector and its y element before the wait, reads
                 v after it, stores y
  one launch     both in one kernel: every block loads its share of A, its B vector and y,
                 writes a partial sum of v, meets the others at a grid barrier (an atomic
                 counter and a generation word), reads all partials, stores y
  bgmv_cuda      our pair (multilora_impl.bench_point: validated, then timed the same way)

If the skeletons alone pass 1.86 us, no design of the same shape (two launches, or one with
a grid-wide exchange) can meet target 5 at batch 1.

    python notes/probes/chain_floor_probe.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch
from torch.utils.cpp_extension import load_inline

import bench_utils as bu
from multilora_impl import bench_point, make_workload

CUDA_SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_runtime.h>

__device__ __forceinline__ void wait_prior() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void let_next() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }

__device__ __forceinline__ float lanes(uint4 u) {   // something of every word, cheaply
  return __uint_as_float((u.x ^ u.y ^ u.z ^ u.w) & 0x3f7fffffu);
}

__device__ __forceinline__ float block_sum(float s, float* red) {
  for (int o = 16; o; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
  __syncthreads();
  float t = 0.f;
  if (threadIdx.x == 0)
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) t += red[w];
  return t;
}

// A: blocks x 256 threads x n vectors; v[block] = the block's sum.
__global__ void shrink_skel(const uint4* __restrict__ a, float* __restrict__ v, int n) {
  __shared__ float red[32];
  wait_prior();          // as bgmv_cuda's shrink: x may come from the kernel before
  let_next();
  const uint4* p = a + (size_t)blockIdx.x * blockDim.x * n + threadIdx.x;
  uint4 r[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) if (k < n) r[k] = __ldg(p + k * blockDim.x);
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) if (k < n) s += lanes(r[k]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) v[blockIdx.x] = s;
}

// One B vector and one y element per thread before the wait; v (nv floats) after it.
__global__ void expand_skel(const uint4* __restrict__ b, unsigned short* __restrict__ y,
                            const float* v, int nv, int n_y) {
  let_next();
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  const uint4 bb = __ldg(b + g);
  const unsigned short yy = g < n_y ? y[g] : 0;
  wait_prior();
  const float vv = v[threadIdx.x % nv];
  if (g < n_y) y[g] = (unsigned short)(yy + __float_as_uint(vv * lanes(bb)));
}

// Both in one launch: blocks x 128 threads; part[block] = the block's share of v; a grid
// barrier (bar[0] arrivals, bar[1] generation; every block is resident: a small grid).
__global__ void fused_skel(const uint4* __restrict__ a, const uint4* __restrict__ b,
                           unsigned short* __restrict__ y, float* part, unsigned* bar,
                           int n, int nb, int n_y) {
  __shared__ float red[32];
  wait_prior();
  let_next();
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  const uint4* p = a + (size_t)blockIdx.x * blockDim.x * n + threadIdx.x;
  uint4 r[8];
#pragma unroll
  for (int k = 0; k < 8; ++k) if (k < n) r[k] = __ldg(p + k * blockDim.x);
  uint4 bv[2];
#pragma unroll
  for (int m = 0; m < 2; ++m) if (m < nb) bv[m] = __ldg(b + g + (size_t)m * gridDim.x * blockDim.x);
  const unsigned short yy = g < n_y ? y[g] : 0;
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < 8; ++k) if (k < n) s += lanes(r[k]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) {
    part[blockIdx.x] = s;
    volatile unsigned* gen = bar + 1;
    const unsigned my_gen = *gen;
    __threadfence();
    if (atomicAdd(bar, 1u) == gridDim.x - 1) {
      bar[0] = 0;
      __threadfence();
      atomicAdd(bar + 1, 1u);
    } else {
      while (*gen == my_gen) {}
    }
    __threadfence();
  }
  __syncthreads();
  const float vv = __ldcg(part + threadIdx.x % gridDim.x);
  float bsum = 0.f;
#pragma unroll
  for (int m = 0; m < 2; ++m) if (m < nb) bsum += lanes(bv[m]);
  if (g < n_y) y[g] = (unsigned short)(yy + __float_as_uint(vv * bsum));
}

static void launch(const void* fn, dim3 grid, int threads, void** args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.stream = at::cuda::getCurrentCUDAStream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  TORCH_CHECK(cudaLaunchKernelExC(&cfg, fn, args) == cudaSuccess, "launch failed");
}

void shrink(torch::Tensor a, torch::Tensor v, int64_t blocks, int64_t n) {
  const uint4* pa = (const uint4*)a.data_ptr(); float* pv = v.data_ptr<float>(); int nn = n;
  void* args[] = {&pa, &pv, &nn};
  launch((const void*)shrink_skel, dim3(blocks), 256, args);
}
void expand(torch::Tensor b, torch::Tensor y, torch::Tensor v, int64_t blocks, int64_t nv) {
  const uint4* pb = (const uint4*)b.data_ptr();
  unsigned short* py = (unsigned short*)y.data_ptr(); const float* pv = v.data_ptr<float>();
  int nvv = nv, ny = y.numel();
  void* args[] = {&pb, &py, &pv, &nvv, &ny};
  launch((const void*)expand_skel, dim3(blocks), 128, args);
}
void fused(torch::Tensor a, torch::Tensor b, torch::Tensor y, torch::Tensor part,
           torch::Tensor bar, int64_t blocks, int64_t n, int64_t nb) {
  const uint4* pa = (const uint4*)a.data_ptr(); const uint4* pb = (const uint4*)b.data_ptr();
  unsigned short* py = (unsigned short*)y.data_ptr(); float* pp = part.data_ptr<float>();
  unsigned* pbar = (unsigned*)bar.data_ptr(); int nn = n, nbb = nb, ny = y.numel();
  void* args[] = {&pa, &pb, &py, &pp, &pbar, &nn, &nbb, &ny};
  launch((const void*)fused_skel, dim3(blocks), 128, args);
}
"""
CPP_SRC = """
void shrink(torch::Tensor a, torch::Tensor v, int64_t blocks, int64_t n);
void expand(torch::Tensor b, torch::Tensor y, torch::Tensor v, int64_t blocks, int64_t nv);
void fused(torch::Tensor a, torch::Tensor b, torch::Tensor y, torch::Tensor part,
           torch::Tensor bar, int64_t blocks, int64_t n, int64_t nb);
"""


def main() -> None:
    dev = "cuda"
    floor = bu.empty_graph_us(dev)   # first, as the figures do (the lower, stricter floor)
    ext = load_inline("chain_floor_probe", CPP_SRC, cuda_sources=CUDA_SRC,
                      functions=["shrink", "expand", "fused"],
                      extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"])
    print(f"{torch.cuda.get_device_name()}: empty kernel in a graph {floor:.2f} us "
          f"(target 5 at batch 1: <= {2 * floor:.2f} us); us per call, median of graph replays")
    h_in, r, L = 4096, 16, 7
    for name, h_out in (("h 4096 -> 4096", 4096), ("Punica 4096 -> 11008", 11008)):
        # bytes of one batch-1 call (bf16): A r x h_in, B h_out x r, y h_out; input sets as
        # many as the figure's point (bench_point: pool_size of all L adapters' weights)
        set_bytes = 2 * (L * r * (h_in + h_out) + h_in + h_out)
        n_sets = bu.pool_size(set_bytes, max_sets=128)
        a_vec, b_vec = r * h_in * 2 // 16, h_out * r * 2 // 16
        sh_blocks, n = a_vec // (256 * 8), 8               # 4 blocks x 256 threads x 8 vectors
        ex_blocks = b_vec // 128                           # one B vector per thread
        fu_blocks = min(ex_blocks, 128)                    # resident at once: one per SM
        fu_n = max(1, a_vec // (fu_blocks * 128))          # A vectors per thread
        fu_nb = -(-b_vec // (fu_blocks * 128))             # B vectors per thread (1 or 2)
        assert fu_n <= 8 and fu_nb <= 2
        u8 = dict(dtype=torch.uint8, device=dev)
        sets = [dict(a=torch.randint(0, 255, (a_vec * 16,), **u8),
                     b=torch.randint(0, 255, (max(b_vec, fu_nb * fu_blocks * 128) * 16,), **u8),
                     y=torch.zeros(h_out, dtype=torch.int16, device=dev),
                     v=torch.zeros(128, dtype=torch.float32, device=dev)) for _ in range(n_sets)]
        bar = torch.zeros(2, dtype=torch.int32, device=dev)
        t_sh = bu.time_graph(lambda k: ext.shrink(sets[k]["a"], sets[k]["v"], sh_blocks, n), n_sets)[0]

        def pair(k):
            s = sets[k]
            ext.shrink(s["a"], s["v"], sh_blocks, n)
            ext.expand(s["b"], s["y"], s["v"], ex_blocks, sh_blocks)
        t_pair = bu.time_graph(pair, n_sets)[0]
        t_fu = bu.time_graph(lambda k: ext.fused(sets[k]["a"], sets[k]["b"], sets[k]["y"],
                                                 sets[k]["v"], bar, fu_blocks, fu_n, fu_nb), n_sets)[0]
        sets = None
        torch.cuda.empty_cache()
        idx = make_workload("uniform", 1, L, seed=0)
        rec = bench_point(["bgmv_cuda"], idx, L, h_in, [h_out], r, torch.bfloat16)
        ours = rec["modes"]["bgmv_cuda"].get("median_us", float("nan"))
        print(f"{name}, batch 1, r {r}, {n_sets} input sets: shrink {t_sh:.2f} ({sh_blocks} blocks), "
              f"pair {t_pair:.2f} ({sh_blocks} + {ex_blocks} blocks), one launch {t_fu:.2f} "
              f"({fu_blocks} blocks), bgmv_cuda {ours:.2f} ({rec['n_sets']} sets)", flush=True)


if __name__ == "__main__":
    main()
