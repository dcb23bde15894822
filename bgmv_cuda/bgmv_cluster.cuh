// bgmv_cluster.cuh -- the cluster-fused BGMV: shrink and expand in ONE launch, bf16, sm_90+.
//
// The operation, shapes and layouts are those of bgmv_kernel.cuh (included first, by
// bgmv.cu; this file uses its helpers).  Tokens come grouped by adapter: `chunks`
// [n_chunks, 8] int32 (multilora_impl.build_chunks), up to 8 tokens of one idx value per
// row, -1 padded.  Grid: x = C blocks (C = 8 or 16) forming one thread-block cluster,
// y = chunk c, z = slice s.  Block b of the cluster (8 warps):
//   1. issues cp.async copies of its first stages into a shared-memory ring: a stage is 128
//      output rows of B_s[i] (zero past the rank and past h_out) and y of the chunk's
//      tokens at those 128 columns; they stream from DRAM while the shrink runs;
//   2. shrink: the partial v over its 1/C of h_in, every rank row, on the tensor cores
//      (as _bgmv_shrink_mma_kernel: A's rows are the MMA rows, the tokens its columns);
//   3. cluster barrier; each block adds the C blocks' partials, read from their shared
//      memory (DSMEM), in block order, so all C hold the same fp32 v; split into three bf16
//      parts (fp32-exact products, as _bgmv_expand_mma_kernel);
//   4. expand: its 1/C of the output rows, stage by stage from the ring (each consumed
//      slot refilled with the stage NST ahead), one 16-row MMA tile per warp and stage;
//      y + scale * v @ B^T is stored directly.
// So v never reaches global memory, B streams while A does, and there is one launch: no
// drain between a shrink and an expand, no v round trip (PERF_LOG v24).
// Results: the FMA rules' values up to the order of the fp32 sums (v's K chunks are added
// in another order), within one bf16 step (tests/test_bgmv_cuda.py checks it).
// Needs: bf16, PTX for sm_90+ (clusters, DSMEM), 16-byte aligned x, A, B rows and y rows
// and slice offsets (cp.async of 16 bytes), 1 <= S <= 3, r_max <= 128; the launcher returns
// a message otherwise (bgmv_cuda.py then takes the two-launch path).
#pragma once

#include <cooperative_groups.h>

#include "bgmv_kernel.cuh"

// PERF_LOG v24, first version (4 warps, 64-row stages, 8 blocks): correct but 2x slower
// than the two launches (bs 64 u7 12.8 us, ncu: one warp per scheduler issuing every 6.3
// cycles through ~3.2 K dependent instructions); hence 8 warps and clusters of up to 16.
constexpr int kBgmvClusterThreads = 256;
constexpr int kBgmvClusterWarps = kBgmvClusterThreads / 32;
constexpr int kBgmvClusterStageRows = 16 * kBgmvClusterWarps;   // output rows per ring stage

// Shared memory of one block for KB 32-wide rank blocks (r_max <= 32 KB), in bytes: a ring
// of ~36-40 KB of B and y; the total lets 2 blocks (16 warps) share an SM.
template <int KB>
struct BgmvClusterSmem {
  static constexpr int kStages = KB == 1 ? 6 : (KB == 2 ? 4 : 2);
  static constexpr int kRows = 32 * KB;                                    // rank rows, padded
  static constexpr int kBChunks = kBgmvClusterStageRows * 4 * KB;          // 16-byte B chunks
  static constexpr int kYChunks = kBgmvChunkTokens * kBgmvClusterStageRows / 8;
  static constexpr int kStageU4 = kBChunks + kYChunks;
  static constexpr int kRing = kStages * kStageU4 * 16;
  static constexpr int kPart = kBgmvClusterWarps * kRows * kBgmvChunkTokens * 4;   // [warp][row][token]
  static constexpr int kVPart = kRows * kBgmvChunkTokens * 4;      // [row][token], read by peers
  static constexpr int kVFrag = kBgmvChunkTokens * 4 * 4 * KB * 16;  // [token][part][8 ranks]
  static constexpr int kBytes = kRing + kPart + kVPart + kVFrag;
};

__device__ __forceinline__ void bgmv_cp_async16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(gmem), "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void bgmv_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void bgmv_cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// 16-byte chunk cidx of stage row `row`, swizzled: lanes (g, q) and (g + 1, q) read rows of
// 64 KB bytes at the same offsets, so odd rows trade halves (no 2-way bank conflict).
template <int KB>
__device__ __forceinline__ int bgmv_cluster_swizzle(int row, int cidx) {
  return KB >= 2 ? cidx ^ ((row & 1) << 2) : cidx;
}

// Stage `st` (output rows [64 st, 64 st + 64) of slice s) into ring slot `slot`: B rows
// up to the rank (the rest zero-filled: padded B may hold NaN), y of the chunk's tokens.
template <int KB>
__device__ __forceinline__ void bgmv_cluster_load_stage(
    uint4* slot, int st, const __nv_bfloat16* b_rows, int64_t b_stride_o, int h_out, int rank,
    const __nv_bfloat16* y_s, int64_t y_stride_t, const int* tok, int n) {
  using S = BgmvClusterSmem<KB>;
  const int j0 = st * kBgmvClusterStageRows;
  for (int e = threadIdx.x; e < S::kBChunks; e += kBgmvClusterThreads) {
    const int row = e / (4 * KB), cidx = e % (4 * KB);
    const int j = j0 + row;
    const int bytes = j < h_out ? min(16, max(0, 2 * (rank - 8 * cidx))) : 0;
    const __nv_bfloat16* src = bytes ? b_rows + j * b_stride_o + 8 * cidx : b_rows;
    bgmv_cp_async16(slot + row * 4 * KB + bgmv_cluster_swizzle<KB>(row, cidx), src, bytes);
  }
  if (threadIdx.x < S::kYChunks) {
    constexpr int kPerToken = kBgmvClusterStageRows / 8;
    const int k = threadIdx.x / kPerToken, col = j0 + 8 * (threadIdx.x % kPerToken);
    const int bytes = k < n ? min(16, max(0, 2 * (h_out - col))) : 0;
    const __nv_bfloat16* src = bytes ? y_s + tok[k] * y_stride_t + col : y_s;
    bgmv_cp_async16(slot + S::kBChunks + threadIdx.x, src, bytes);
  }
}

template <int KB, int C>
__global__ void __launch_bounds__(kBgmvClusterThreads, 2)
_bgmv_cluster_kernel(const BgmvFusedParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  using T = __nv_bfloat16;
  using Ty = BgmvType<T>;
  using Sm = BgmvClusterSmem<KB>;
  constexpr int NST = Sm::kStages, RP = Sm::kRows, NT = kBgmvChunkTokens;
  constexpr int NW = kBgmvClusterWarps, U = KB == 4 ? 1 : 2;   // U: K steps in flight per warp
  cg::cluster_group cluster = cg::this_cluster();
  const int b = static_cast<int>(cluster.block_rank());
  const int c = blockIdx.y, s = blockIdx.z;

  extern __shared__ uint4 bgmv_cluster_smem[];
  uint4* ring = bgmv_cluster_smem;
  float* part = reinterpret_cast<float*>(reinterpret_cast<char*>(ring) + Sm::kRing);
  float* v_part = part + NW * RP * NT;
  uint4* v_frag = reinterpret_cast<uint4*>(v_part + RP * NT);
  __shared__ int tok[NT];

  // The chunk, its adapter, rank and scale: the same for every block of the cluster, so
  // every exit below is taken by the whole cluster (no block waits at a barrier alone).
  if (threadIdx.x < NT) tok[threadIdx.x] = bgmv_chunk_token(p.s.chunks, c, threadIdx.x);
  __syncthreads();
  int n = 0;
#pragma unroll
  for (int k = 0; k < NT; ++k) n += tok[k] >= 0;
  if (n == 0) return;
  const int64_t i = bgmv_load_int(p.s.idx, p.s.idx_is_64, tok[0]);
  if (i == -1) return;
  const int rank = (i < -1 || i >= p.s.L) ? -1 : bgmv_rank(p.s.ranks, p.s.ranks_is_64, i, p.s.r_max);
  const int h_out = p.e.h_out[s];
  T* y_s = static_cast<T*>(p.e.y) + p.e.col_off[s];
  const int n_stages = (h_out + kBgmvClusterStageRows - 1) / kBgmvClusterStageRows;
  const int per_block = (n_stages + C - 1) / C;
  const int m0 = b * per_block, my_stages = max(0, min(n_stages, m0 + per_block) - m0);
  if (rank <= 0) {                  // rank 0: y unchanged; bad idx / rank: NaN rows
    if (rank < 0) {
      const int cols = my_stages * kBgmvClusterStageRows;
      for (int w = threadIdx.x; w < n * cols; w += kBgmvClusterThreads) {
        const int j = m0 * kBgmvClusterStageRows + w % cols;
        if (j < h_out) y_s[tok[w / cols] * p.e.y_stride_t + j] = Ty::from_float(__int_as_float(0x7fffffff));
      }
    }
    return;
  }

  // 1. The ring's first stages: B and y stream while the shrink runs.
  const T* b_rows = static_cast<const T*>(p.e.B[s]) + i * p.e.b_stride_l[s];
  const int64_t b_stride_o = p.e.b_stride_o[s];
#pragma unroll 1
  for (int m = 0; m < NST; ++m) {
    if (m < my_stages)
      bgmv_cluster_load_stage<KB>(ring + m * Sm::kStageU4, m0 + m, b_rows, b_stride_o, h_out, rank,
                                  y_s, p.e.y_stride_t, tok, n);
    bgmv_cp_async_commit();         // one group per stage, empty or not: uniform counting
  }
  const float sc = p.e.scale[i];

  // 2. Shrink over this block's 1/C of h_in, all 2 KB row tiles (tiles past the rank load
  // nothing and skip their MMAs); warp w takes the 32-wide K steps w, w + NW, ...
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const T* a_g = static_cast<const T*>(p.s.A) + s * p.s.a_stride_s + i * p.s.a_stride_l +
                 g * p.s.a_stride_r;
  const int64_t a_row8 = 8 * p.s.a_stride_r;
  const bool has_x = g < n;
  const uint4* xg = reinterpret_cast<const uint4*>(static_cast<const T*>(p.s.x) +
                                                   static_cast<int64_t>(has_x ? tok[g] : 0) * p.s.x_stride_t);
  const int nvec = p.s.h_in / 8;
  const int per_vec = (nvec + C - 1) / C;
  const int vb = min(nvec, b * per_vec), ve = min(nvec, vb + per_vec);
  const int nsteps = (ve - vb + 3) / 4;
  float d[2 * KB][4];
#pragma unroll
  for (int rt = 0; rt < 2 * KB; ++rt) d[rt][0] = d[rt][1] = d[rt][2] = d[rt][3] = 0.f;
  for (int st = warp; st < nsteps; st += NW * U) {
    uint4 ra[U][2 * KB][2], rx[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = vb + 4 * (st + NW * u) + q;
      const bool ok = st + NW * u < nsteps && v < ve;
      const uint4 z = make_uint4(0u, 0u, 0u, 0u);
      rx[u] = ok && has_x ? __ldg(xg + v) : z;
#pragma unroll
      for (int rt = 0; rt < 2 * KB; ++rt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = 16 * rt + 8 * h + g;
          ra[u][rt][h] = ok && row < rank
                             ? __ldg(reinterpret_cast<const uint4*>(a_g + (2 * rt + h) * a_row8) + v)
                             : z;
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int rt = 0; rt < 2 * KB; ++rt) {
        if (16 * rt >= rank) continue;            // uniform: the tile is past the rank
        bgmv_mma_bf16_16816(d[rt], ra[u][rt][0].x, ra[u][rt][1].x, ra[u][rt][0].y, ra[u][rt][1].y,
                            rx[u].x, rx[u].y);
        bgmv_mma_bf16_16816(d[rt], ra[u][rt][0].z, ra[u][rt][1].z, ra[u][rt][0].w, ra[u][rt][1].w,
                            rx[u].z, rx[u].w);
      }
  }
  // d[rt]: rows 16 rt + g / + 8, tokens 2q / 2q + 1; the warps' sums added in warp order.
#pragma unroll
  for (int rt = 0; rt < 2 * KB; ++rt) {
    float* pw = part + (warp * RP + 16 * rt + g) * NT + 2 * q;
    pw[0] = d[rt][0];
    pw[1] = d[rt][1];
    pw[8 * NT] = d[rt][2];
    pw[8 * NT + 1] = d[rt][3];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < RP * NT; e += kBgmvClusterThreads) {
    float f = part[e];
#pragma unroll
    for (int w = 1; w < NW; ++w) f += part[w * RP * NT + e];
    v_part[e] = f;
  }

  // 3. The cluster's sum of partials, in block order (every block gets the same bits).
  cluster.sync();
  float* v_sum = part;                            // part is free now ([row][token])
  for (int e = threadIdx.x; e < RP * NT; e += kBgmvClusterThreads) {
    float f[C];                                   // C remote loads in flight, then the sum
#pragma unroll
    for (int r = 0; r < C; ++r) f[r] = cluster.map_shared_rank(v_part, r)[e];
    float sum = f[0];
#pragma unroll
    for (int r = 1; r < C; ++r) sum += f[r];
    v_sum[e] = sum;
  }
  // Done reading the peers' shared memory: they may exit once all have arrived here.
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
  __syncthreads();
  for (int w = threadIdx.x; w < NT * 4 * 4 * KB; w += kBgmvClusterThreads) {
    const int k = w / (16 * KB), pt = (w / (4 * KB)) % 4, e8 = w % (4 * KB);
    float f[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      f[e] = (k < n && pt < 3) ? v_sum[(8 * e8 + e) * NT + k] : 0.f;
      for (int pp = 0; pp < pt; ++pp) f[e] -= __bfloat162float(__float2bfloat16_rn(f[e]));
    }
    v_frag[w] = make_uint4(bgmv_pack_bf16x2(f[0], f[1]), bgmv_pack_bf16x2(f[2], f[3]),
                           bgmv_pack_bf16x2(f[4], f[5]), bgmv_pack_bf16x2(f[6], f[7]));
  }
  __syncthreads();

  // 4. Expand, stage by stage: warp w takes stage rows 16 w + g and + 8 (the MMA's rows),
  // the tokens go through the B operand two at a time (see _bgmv_expand_mma_kernel).
  const int r0 = 16 * warp + g, r1 = r0 + 8;
  for (int m = 0; m < my_stages; ++m) {
    bgmv_cp_async_wait<NST - 1>();                // this thread's copies of stage m landed
    __syncthreads();                              // and everyone's
    const uint4* slot = ring + (m % NST) * Sm::kStageU4;
    const T* ys = reinterpret_cast<const T*>(slot + Sm::kBChunks);   // [token][64]
    uint4 a[KB][2];
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
      a[kb][0] = slot[r0 * 4 * KB + bgmv_cluster_swizzle<KB>(r0, 4 * kb + q)];
      a[kb][1] = slot[r1 * 4 * KB + bgmv_cluster_swizzle<KB>(r1, 4 * kb + q)];
    }
    const int j0 = (m0 + m) * kBgmvClusterStageRows;
    for (int k0 = 0; k0 < n; k0 += 2) {
      float dd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kb = 0; kb < KB; ++kb) {
        const uint4 bv = v_frag[((k0 + (g >> 2)) * 4 + (g & 3)) * 4 * KB + 4 * kb + q];
        bgmv_mma_bf16_16816(dd, a[kb][0].x, a[kb][1].x, a[kb][0].y, a[kb][1].y, bv.x, bv.y);
        bgmv_mma_bf16_16816(dd, a[kb][0].z, a[kb][1].z, a[kb][0].w, a[kb][1].w, bv.z, bv.w);
      }
      float s0 = dd[0] + dd[1], s1 = dd[2] + dd[3];
      s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
      s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
      const int k = k0 + (q >> 1);
      if ((q & 1) == 0 && k < n) {
        T* yrow = y_s + tok[k] * p.e.y_stride_t;
        if (j0 + r0 < h_out)
          yrow[j0 + r0] = Ty::from_float(fmaf(sc, s0, Ty::to_float(ys[k * kBgmvClusterStageRows + r0])));
        if (j0 + r1 < h_out)
          yrow[j0 + r1] = Ty::from_float(fmaf(sc, s1, Ty::to_float(ys[k * kBgmvClusterStageRows + r1])));
      }
    }
    __syncthreads();                              // slot m % NST consumed by every warp
    if (m + NST < my_stages)
      bgmv_cluster_load_stage<KB>(ring + (m % NST) * Sm::kStageU4, m0 + m + NST, b_rows, b_stride_o,
                                  h_out, rank, y_s, p.e.y_stride_t, tok, n);
    bgmv_cp_async_commit();
  }
  bgmv_cp_async_wait<0>();
  asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __trap();  // never launched: the launcher requires PTX >= sm_90 for this kernel
#endif
}

// Host launcher: checks what the kernel relies on (beyond the shrink's and the expand's own
// checks), then one cluster launch.  Returns nullptr on success, else a message.
template <int KB, int C>
cudaError_t bgmv_cluster_run(const BgmvFusedParams& p, cudaStream_t stream) {
  constexpr int kBytes = BgmvClusterSmem<KB>::kBytes;
  static const cudaError_t attr_err = [] {
    cudaError_t e = cudaFuncSetAttribute(_bgmv_cluster_kernel<KB, C>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, kBytes);
    if (e == cudaSuccess && C > 8)                // 16: beyond the portable cluster size
      e = cudaFuncSetAttribute(_bgmv_cluster_kernel<KB, C>,
                               cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    return e;
  }();
  if (attr_err != cudaSuccess) return attr_err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(C, static_cast<unsigned>(p.s.n_chunks), static_cast<unsigned>(p.s.S));
  cfg.blockDim = dim3(kBgmvClusterThreads);
  cfg.dynamicSmemBytes = kBytes;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = C;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cudaLaunchKernelEx(&cfg, _bgmv_cluster_kernel<KB, C>, p);
}

// cluster_blocks: C, 8 or 16 (the K split of the shrink and the row split of the expand).
inline const char* bgmv_cluster_launch(BgmvFusedParams p, int cluster_blocks, cudaStream_t stream) {
  using T = __nv_bfloat16;
  if (const char* err = bgmv_shrink_check<T>(p.s)) return err;
  bool vec = false;
  if (const char* err = bgmv_expand_prepare<T>(p.e, &vec)) return err;
  if (p.s.T != p.e.T || p.s.S != p.e.S || p.s.r_max != p.e.r_max)
    return "bgmv_cluster: shrink and expand halves disagree (T, S, r_max)";
  if (p.s.chunks == nullptr) return "bgmv_cluster: needs chunks (tokens grouped by adapter)";
  if (cluster_blocks != 8 && cluster_blocks != 16) return "bgmv_cluster: cluster_blocks must be 8 or 16";
  if (bgmv_kernel_ptx<_bgmv_cluster_kernel<1, 8>>() < 90)
    return "bgmv_cluster: needs a GPU of compute capability 9.0+ (thread-block clusters)";
  bool y_ok = bgmv_aligned16(p.e.y) && (p.e.y_stride_t * 2) % 16 == 0;
  for (int s = 0; s < p.e.S; ++s) y_ok = y_ok && p.e.col_off[s] % 8 == 0;
  if (!vec || !y_ok)
    return "bgmv_cluster: needs 16-byte aligned B rows (r_max % 8 == 0), y rows and slice offsets";
  if (p.s.n_chunks > 65535) return "bgmv_cluster: at most 65535 chunks";
  if (p.s.T == 0 || p.s.n_chunks == 0) return nullptr;
  const bool c16 = cluster_blocks == 16;
  const cudaError_t err =
      p.s.r_max <= 32   ? (c16 ? bgmv_cluster_run<1, 16>(p, stream) : bgmv_cluster_run<1, 8>(p, stream))
      : p.s.r_max <= 64 ? (c16 ? bgmv_cluster_run<2, 16>(p, stream) : bgmv_cluster_run<2, 8>(p, stream))
                        : (c16 ? bgmv_cluster_run<4, 16>(p, stream) : bgmv_cluster_run<4, 8>(p, stream));
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
