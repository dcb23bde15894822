// bgmv_kernel.cuh -- multi-LoRA BGMV (Punica-style) shrink and expand kernels.
//
// Plain CUDA C++ (no torch include): copy this header and bgmv_params.h (its parameter
// blocks, included below) into any project.
// For every token t with adapter i = idx[t] (nothing at all when idx[t] == -1):
//
//   v[t, s, :r]            = x[t] @ A[s, i, :r, :].T              # shrink, fp32, r = ranks[i]
//   y[t, off_s : off_s+h_s] += scale[i] * v[t, s, :r] @ B_s[i, :, :r].T   # expand, in place
//
// Shapes and layouts (those of torch.nn.Linear / PEFT; strides in elements):
//   x   [T, h_in]               half / __nv_bfloat16 / float, unit stride along h_in
//   A   [S, L, r_max, h_in]     same dtype; S output slices share one shrink (q/k/v)
//   v   [T, S, r_max]           float, the shrink result kept in fp32 until the expand
//   B_s [L, h_out_s, r_max]     same dtype as x, one tensor (pointer) per slice, S <= 3;
//                               unit stride along r_max, or rank-major: unit stride along
//                               h_out (every slice alike; _bgmv_expand_rm_kernel, below)
//   y   [T, sum_s h_out_s]      same dtype; slice s owns columns [off_s, off_s + h_out_s)
//   idx [T]                     int32 or int64, -1 = row untouched (both kernels exit)
//   scale [L]                   float, per adapter
//   ranks [L] or nullptr        int32 or int64; adapter i uses its first ranks[i] rows of
//                               A and columns of B.  Padded rows / columns are never read
//                               (they may hold NaN); nullptr means every adapter has r_max.
// Stacked A / B are indexed by adapter x stride (no pointer tables).
//
// Supported: h_in a multiple of 8 elements (the shrink reads x and A with 16-byte vector
// loads, 8 halves / 4 floats, with 16-byte aligned base pointers and row strides), any
// h_out >= 1 (the expand vectorises along the rank, not along h_out; rank-major B along
// h_out where 16-byte aligned, else one element), 1 <= r_max <= 128,
// 1 <= S <= 3.  The launchers below reject anything else with a message.
// idx outside [-1, L) or ranks[i] outside [0, r_max] cannot be checked on the host
// without a sync, so the kernels check them: nothing out of bounds is read and the
// expand writes NaN into that token's output row (loud, and the CUDA context survives).
//
// Arithmetic: every load is upcast to fp32 right away, products accumulate in fp32,
// y is converted back once, at its store (tile rule "mma": bf16 operands on the tensor
// cores, v split in three bf16 parts, fp32 accumulation; see that section).  Deterministic: no atomics, fixed reduction
// order.  Bytes that must move (for GB/s): x (T h_in) + y read and written (2 T h_out)
// in the storage dtype, plus each distinct adapter's A rows (S r h_in) and B columns
// (h_out r), plus v (fp32, 2 T S r) between the two launches.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <type_traits>

#include "bgmv_params.h"  // limits, BgmvDtype, the parameter blocks, the dispatch functions

// ---------------------------------------------------------------------------------------
// Launch configuration, from ptxas (-Xptxas -v, CUDA 13.0, the flags of bgmv_cuda.py;
// `python bgmv_cuda/compile_check.py` prints the table): with __launch_bounds__(128, 8)
// the shrink and expand kernels use, on sm_80 / sm_90, shrink 56-64 registers + 64 bytes
// of shared memory, expand 40-64 (J = 8: + 2 KB of shared memory, 4 KB in fp32), 0 bytes
// of stack or spill.  Unbounded, the shrink would take 72 (half, bf16) and 114 (fp32) registers on
// sm_90; capped at 64 it still issues all 10 loads of a K step before its first FMA
// (checked in the SASS) and 8 blocks = 1024 threads (50% occupancy) fit per SM on both
// architectures, about 160 KB of loads in flight per SM, enough to cover HBM latency.
// Both kernels are memory bound: each token's adapter weights are read once, x and v are
// reused from registers, so the goal is bytes in flight, not arithmetic.
// ---------------------------------------------------------------------------------------
// Shrink: one block of 128 threads (4 warps) per (token t, slice s, tile of 4 rank rows).
//   Each thread owns 16-byte chunks of h_in, strided by the block: it loads the x chunk
//   once and reuses it for the 4 rows (x is read 4x less than A); 2 chunks are unrolled,
//   so 2 x + 8 A = 10 16-byte loads are in flight per thread.  Per-row partial sums are
//   reduced with warp shuffles, then across the 4 warps through 64 bytes of shared
//   memory.  4 rows per block keeps T = 1 decode spread over r_max / 4 blocks per slice.
//   Grids of at most 64 blocks run 256 threads (8 warps) per block instead: half the
//   steps along h_in per thread (PERF_LOG v31).
//   Grid: x = T (up to 2^31 - 1), y = S * ceil(r_max / 4).  With rule "rank"'s token list
//   (BgmvShrinkParams::work, half / bf16; PERF_LOG v41): x = only the blocks the listed
//   tokens' ranks need, S * ceil(rank / 4) per token, the ranks grouped by next_pow2.
constexpr int kBgmvShrinkThreads = 128;
constexpr int kBgmvShrinkRows = 4;     // rank rows per block
constexpr int kBgmvShrinkUnroll = 2;   // 16-byte chunks of h_in per thread per step
constexpr int kBgmvShrinkWideThreads = 256;  // small grids: 8 warps per block (PERF_LOG v31)
constexpr int kBgmvShrinkWideMaxBlocks = 64;  // ... up to this many blocks
// Expand: one block of 128 threads (4 warps) per (token t, tile of output columns).
//   A group of G lanes (G = a power of two, G * W >= r_max, W = elements per load)
//   reads one row B_s[i, j, :rank] (contiguous, r_max long) for output column j; the
//   32 / G groups of a warp take consecutive j, so a warp reads 32 / G adjacent rows of
//   B_s (one contiguous block when G * W == r_max) and stores adjacent y elements.  Each
//   lane handles J outputs (J B loads in flight), keeps its slice of v[t, s] in registers
//   for all of them, and the G partial sums are reduced with xor shuffles.  The y values
//   are loaded with B, before the wait for the shrink, so the store needs no third round
//   trip.  Tile = 4 warps * (32 / G) * J outputs; J = 4: 32 (r_max = 128 in half) to 512
//   (r_max <= 8) columns.  Small grids (T * tiles < kBgmvExpandSmallGrid blocks, e.g.
//   T = 1..16 at h_out 4096, r 16) take J = 1: 4x the blocks, so more SMs fetch B at
//   once (ncu, H200, T = 1, h 4096, r 16: 16 blocks of J = 4 took 4.6 us, the Triton
//   expand's 128 programs 2.8 us).  That is tile rule 0 ("classic"); rule 1 (the default
//   since PERF_LOG v5, BgmvExpandParams::tile_rule) sizes J by the grid instead, with
//   J = 8 for 16-byte loads (see kBgmvExpandMaxBlocks).
//   Grid: x = T, y = sum_s ceil(h_out_s / tile).  With rule "rank"'s token list
//   (BgmvExpandParams::work, half / bf16): x = only the tiles of each listed token's rank
//   (PERF_LOG v41: the mixed-rank point's x = T grids were half empty blocks).
constexpr int kBgmvExpandThreads = 128;
constexpr int kBgmvExpandOuts = 4;     // output columns per lane (loads in flight)
constexpr int kBgmvExpandSmallGrid = 512;  // rule 0: below this many J = 4 blocks, J = 1
// Rule 1 ("residency"): the smallest J in {1, 4, 8} whose grid T * tiles(J) has at most
// kBgmvExpandMaxBlocks blocks, else J = 8 ({1, 4} with 1-element loads).  Why, from the
// H200 (h 4096 -> 4096, r 16, bf16, uniform 7, PDL; plots/bgmv_cuda_vs_triton_h200.json):
// T 8 (J 1, 512 blocks) 4.2 us, T 16 (J 1, 1,024) 6.8, T 32 (J 4, 512) 4.9, T 64 (J 4,
// 1,024) 7.3, T 128 (2,048) 9.6; at h_out 11008, T 8 (J 1, 1,376 blocks) 6.2 us against
// T 16 (J 4, 688) 5.1.  Time follows the block count more than the work: our reading is
// that blocks beyond those that fit beside the still-running shrink cannot issue their
// B and y loads before its end (PDL), so a grid that fits keeps the prefetch.
// J = 16 is not built: its B vectors alone take 64 registers (ptxas spilled 100-196 bytes
// at the 64-register cap); so rule 1 takes J = 8 for grids it cannot bring under the cap.
constexpr int kBgmvExpandMaxBlocks = 640;
constexpr int kBgmvExpandOutsMax = 8;      // rule 1's largest J (16-byte loads only)
constexpr int kBgmvMinBlocksPerSM = 8;
// Rule "rank"'s token-list shrink (PERF_LOG v41): 7 blocks of 128 threads per SM (72
// registers).  Its row's token and adapter are loaded values, held in vector registers
// (blockIdx-derived ones live in uniform registers): at 64, ptxas split each K step's 10
// loads into two round trips (checked in the SASS).
constexpr int kBgmvWorkMinBlocksPerSM = 7;
// Fused kernel: shrink and expand code paths in one kernel; at 8 or 6 blocks / SM (64 / 80
// registers) the fp32 instances spilled, so 4 blocks / SM (ptxas: 72-86 registers in
// half / bf16, 110 in fp32, no spills).  It serves small T, where the grid is small anyway.
constexpr int kBgmvFusedMinBlocksPerSM = 4;
// kBgmvMaxRank (128), kBgmvMaxSlices (3), kBgmvMaxSplit (64) are in bgmv_params.h.

// ---------------------------------------------------------------------------------------
// Element types: fp32 conversion and unpacking of one 16-byte vector.
// ---------------------------------------------------------------------------------------
template <typename T> struct BgmvType;

template <> struct BgmvType<float> {
  static constexpr int kVec = 4;   // elements per 16-byte load
  __device__ __forceinline__ static float to_float(float v) { return v; }
  __device__ __forceinline__ static float from_float(float v) { return v; }
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
  }
};

template <> struct BgmvType<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      f[2 * q] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[q] & 0xffffu)));
      f[2 * q + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[q] >> 16)));
    }
  }
};

template <> struct BgmvType<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  // bf16 is the top half of an fp32: widening is a shift, exact.
  __device__ __forceinline__ static void unpack(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      f[2 * q] = __uint_as_float(w[q] << 16);
      f[2 * q + 1] = __uint_as_float(w[q] & 0xffff0000u);
    }
  }
};

__device__ __forceinline__ int64_t bgmv_load_int(const void* p, int is_64, int64_t i) {
  return is_64 ? static_cast<int64_t>(__ldg(static_cast<const long long*>(p) + i))
               : static_cast<int64_t>(__ldg(static_cast<const int*>(p) + i));
}

// Rank of adapter i, or -1 when it is out of [0, r_max] (the caller then skips / NaNs).
__device__ __forceinline__ int bgmv_rank(const void* ranks, int is_64, int64_t i, int r_max) {
  if (ranks == nullptr) return r_max;
  const int64_t r = bgmv_load_int(ranks, is_64, i);
  return (r < 0 || r > r_max) ? -1 : static_cast<int>(r);
}

// Token t's adapter i = idx[t] and its rank: 0 for i == -1 (no LoRA), -1 when i is outside
// [-1, L) or ranks[i] outside [0, r_max]; ranks is read only for a valid i.
template <typename P>
__device__ __forceinline__ int bgmv_token(const P& p, int64_t t, int64_t* i) {
  *i = bgmv_load_int(p.idx, p.idx_is_64, t);
  if (*i == -1) return 0;
  return (*i < -1 || *i >= p.L) ? -1 : bgmv_rank(p.ranks, p.ranks_is_64, *i, p.r_max);
}

// Rule "rank"'s token list (p.work; kBgmvRankGroups in bgmv_params.h): block b's group, the
// last g whose first block is <= b (empty groups share their successor's first block), and
// its row (token, adapter, rank), the same checks applied as bgmv_token's; a token outside
// [0, T) counts as no LoRA (rank 0: its blocks write nothing).
__device__ __forceinline__ int bgmv_work_group(const int* block_begin, int b) {
  int g = 0;
#pragma unroll
  for (int q = 1; q < kBgmvRankGroups; ++q)
    if (b >= block_begin[q]) g = q;
  return g;
}

template <typename P>
__device__ __forceinline__ int bgmv_work_row(const P& p, int row, int* t, int* i) {
  const int* w = p.work + static_cast<int64_t>(row) * kBgmvWorkStride;
  *t = __ldg(w);
  *i = __ldg(w + 1);
  const int r = __ldg(w + 2);
  if (*i == -1 || *t < 0 || *t >= p.T) return 0;
  return (*i < -1 || *i >= p.L || r < 0 || r > p.r_max) ? -1 : r;
}

// Group g's rank (its blocks' shape), r_max for group 0.
__host__ __device__ __forceinline__ int bgmv_group_rank(int g, int r_max) {
  return g == 0 ? r_max : min(256 >> g, r_max);
}

// An expand's token-list block b (< p.work_block_begin[kBgmvRankGroups]): its row's token t,
// adapter i and rank (bgmv_work_row's), its group g, the token's q-th block (tile-major
// within the group, as the grid x = T: PERF_LOG v43) and that block's slice s; its tile
// within the slice is q - p.work_slice_begin[g][s].
__device__ __forceinline__ int bgmv_work_block(const BgmvExpandParams& p, int b, int* t, int* i,
                                               int* g, int* q, int* s) {
  *g = bgmv_work_group(p.work_block_begin, b);
  const int* sb = p.work_slice_begin[*g];
  const int n = p.work_rows[*g], local = b - p.work_block_begin[*g];
  const int rank = bgmv_work_row(p, p.work_row_begin[*g] + local % n, t, i);
  *q = local / n;
  int sl = 0;
#pragma unroll
  for (int k = 1; k < kBgmvMaxSlices; ++k)
    if (k < p.S && *q >= sb[k]) sl = k;
  *s = sl;
  return rank;
}

// ---------------------------------------------------------------------------------------
// Programmatic dependent launch (PDL, sm_90+).  A kernel launched with the programmatic
// stream-serialization attribute may start while the kernel before it in the stream is
// still running; griddepcontrol.wait then blocks until that kernel has completed and its
// writes are visible.  Without the attribute both are no-ops.  Code compiled for an
// architecture below sm_90 has no wait at all, so bgmv_launch sets the attribute only when
// the kernel's PTX is sm_90+ (a header built for sm_80 and JIT-run on a Hopper stays safe).
//   Shrink: wait first (x may come from the kernel just before), then let the expand launch.
//   Expand: load idx, ranks, scale, its B tile and y (the shrink writes none of them, and
//   everything before the shrink completed before the shrink let the expand launch), then
//   wait for the shrink, then read v.  So a PDL expand must come right after its shrink:
//   no kernel that writes y, B, scale, idx or ranks may run between the two.  Each token's
//   first output tile waits, also when it exits early, so the expand's completion implies
//   the shrink's; its other tiles return without waiting when they have nothing to do.
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ void bgmv_wait_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void bgmv_let_next_grid_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---------------------------------------------------------------------------------------
// Shrink: v[t, s, r] = sum_k x[t, k] * A[s, idx[t], r, k] for r < rank.
// ---------------------------------------------------------------------------------------
// One block's work: token t (adapter i, rank as bgmv_token returns them), slice s, rank rows
// [r0, r0 + ROWS), K chunk c of n_split.
// Returns true when token t has a LoRA to apply (valid idx, rank >= 1) -- the fused kernel
// signals its expand blocks only then -- whether or not this tile had rows to compute.
// Every early exit is uniform over the block (no __syncthreads is skipped by part of it).
template <typename T, int NT = kBgmvShrinkThreads, bool WORK = false>
__device__ __forceinline__ bool bgmv_shrink_block(const BgmvShrinkParams& p, const int64_t t,
                                                  const int64_t i, const int rank,
                                                  const int s, const int r0, const int c) {
  using Ty = BgmvType<T>;
  constexpr int VEC = Ty::kVec;
  constexpr int ROWS = kBgmvShrinkRows;
  constexpr int U = kBgmvShrinkUnroll;
  constexpr int NWARPS = NT / 32;

  // Early exits: no LoRA, an index or rank the expand will flag with NaN, or a tile past
  // this adapter's rank (the grid is sized by r_max; such tiles cost one idx/rank load).
  if (rank <= 0) return false;
  if (r0 >= rank) return true;
  const int nrows = min(ROWS, rank - r0); // rows past the rank are padding: never loaded
  // Token list (WORK, PERF_LOG v41): t, s and r0 are loaded values, not blockIdx; this
  // block's v row goes through shared memory (read back after the reduction's barrier)
  // rather than hold them in registers through the K loop.
  __shared__ int64_t v_row;
  if constexpr (WORK) {
    if (threadIdx.x == 0) v_row = c * p.v_stride_split + t * p.v_stride_t + s * p.v_stride_s + r0;
  }

  const uint4* xv = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) + t * p.x_stride_t);
  const T* a_tile = static_cast<const T*>(p.A) + s * p.a_stride_s + i * p.a_stride_l +
                    static_cast<int64_t>(r0) * p.a_stride_r;
  const uint4* av[ROWS];
#pragma unroll
  for (int q = 0; q < ROWS; ++q)  // rows past nrows point at row 0 but are never loaded
    av[q] = reinterpret_cast<const uint4*>(a_tile + (q < nrows ? q : 0) * p.a_stride_r);

  float acc[ROWS];
#pragma unroll
  for (int q = 0; q < ROWS; ++q) acc[q] = 0.f;

  // K loop over the 16-byte chunks [k_begin, nvec) of this split (h_in % VEC == 0, so no
  // element tail): U chunks per step, every load of a step issued before the first FMA.
  const int nvec_all = p.h_in / VEC;
  const int per_split = (nvec_all + p.n_split - 1) / p.n_split;
  const int k_begin = c * per_split;
  const int nvec = min(nvec_all, k_begin + per_split);
  int kv = k_begin + threadIdx.x;
  for (; kv + (U - 1) * NT < nvec; kv += U * NT) {
    uint4 xr[U], ar[U][ROWS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      xr[u] = __ldg(xv + kv + u * NT);
#pragma unroll
      for (int q = 0; q < ROWS; ++q)
        ar[u][q] = q < nrows ? __ldg(av[q] + kv + u * NT) : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float xf[VEC];
      Ty::unpack(xr[u], xf);
#pragma unroll
      for (int q = 0; q < ROWS; ++q) {
        float af[VEC];
        Ty::unpack(ar[u][q], af);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[q] = fmaf(xf[e], af[e], acc[q]);
      }
    }
  }
  for (; kv < nvec; kv += NT) {  // remaining chunks, one at a time
    float xf[VEC];
    Ty::unpack(__ldg(xv + kv), xf);
#pragma unroll
    for (int q = 0; q < ROWS; ++q) {
      if (q < nrows) {
        float af[VEC];
        Ty::unpack(__ldg(av[q] + kv), af);
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[q] = fmaf(xf[e], af[e], acc[q]);
      }
    }
  }

  // Reduce: xor shuffles within each warp, then the NWARPS partial sums via shared memory.
#pragma unroll
  for (int q = 0; q < ROWS; ++q)
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc[q] += __shfl_xor_sync(0xffffffffu, acc[q], o);
  __shared__ float partial[NWARPS][ROWS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int q = 0; q < ROWS; ++q) partial[warp][q] = acc[q];
  }
  __syncthreads();
  const int q = threadIdx.x;
  if (q < nrows) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) sum += partial[w][q];
    p.v[(WORK ? v_row : c * p.v_stride_split + t * p.v_stride_t + s * p.v_stride_s + r0) + q] = sum;
  }
  return true;
}

// Grid: x = token, y = (slice, tile of ROWS rank rows), z = K chunk (split-K).  NT = 256
// (kBgmvShrinkWideThreads) serves grids of at most 64 blocks: each thread then walks half
// as many 16-byte chunks of h_in (h_in 4096: one step of U instead of two, one DRAM round
// trip fewer per block; PERF_LOG v31), at the same registers per thread.
// WORK: rule "rank"'s token list (PERF_LOG v41): x = the blocks the listed ranks need,
// group by group, tile by tile (BgmvShrinkParams::work).  Its own instances, 16-bit
// types only: with the list's loaded token in the same kernel, ptxas no longer issued a
// K step's 10 loads before its first FMA, and the fp32 instance spilled.
template <typename T, int NT, bool WORK = false>
__global__ void __launch_bounds__(NT, (WORK ? kBgmvWorkMinBlocksPerSM : kBgmvMinBlocksPerSM) *
                                          kBgmvShrinkThreads / NT)
_bgmv_shrink_kernel(const BgmvShrinkParams p) {
  bgmv_wait_prior_grid();
  bgmv_let_next_grid_launch();
  if constexpr (WORK) {
    const int b = blockIdx.x;
    if (b >= p.work_block_begin[kBgmvRankGroups]) return;   // an empty list's one block
    const int g = bgmv_work_group(p.work_block_begin, b);
    const int row_tiles = p.work_tiles[g];
    // tile-major within the group, as the x = T grid orders its blocks (token-major was
    // slower where every rank is r_max: PERF_LOG v43)
    const int n = p.work_rows[g], local = b - p.work_block_begin[g];
    int t, i;
    const int rank = bgmv_work_row(p, p.work_row_begin[g] + local % n, &t, &i);
    const int y = local / n;
    bgmv_shrink_block<T, NT, true>(p, t, i, rank, y / row_tiles,
                                   (y % row_tiles) * kBgmvShrinkRows, blockIdx.z);
  } else {
    int64_t i;
    const int rank = bgmv_token(p, blockIdx.x, &i);
    const int row_tiles = (p.r_max + kBgmvShrinkRows - 1) / kBgmvShrinkRows;
    bgmv_shrink_block<T, NT>(p, blockIdx.x, i, rank, blockIdx.y / row_tiles,
                             (blockIdx.y % row_tiles) * kBgmvShrinkRows, blockIdx.z);
  }
}

// ---------------------------------------------------------------------------------------
// Expand: y[t, off_s + j] += scale[i] * sum_{r < rank} v[t, s, r] * B_s[i, j, r].
// W = elements per B load (16 bytes, or 1 when B's rows are not 16-byte aligned, e.g.
// r_max not a multiple of 8 in half); NCHUNK = W-wide chunks per lane per B row
// (1 for 16-byte loads, since G * W >= r_max; up to 4 for W = 1, G = 32, r_max = 128).
// ---------------------------------------------------------------------------------------
// FUSED: the block belongs to the single-launch kernel; it issues its B loads, then waits
// (thread 0 spinning on counters[t]) until the `need` shrink blocks of token t have
// published their partial sums, reads them from L2 (__ldcg: never a stale L1 line), and
// finally counts itself in counters[T + t]; the last expand block of the token resets
// both counters to 0 for the next call.
constexpr int kBgmvSpinLimit = 1 << 22;   // ~0.1-0.3 s: then NaN, never a hang

template <typename T, int W, int NCHUNK, int J, bool FUSED, bool RANK_TILES = false,
          bool WORK = false>
__device__ __forceinline__ void bgmv_expand_block(const BgmvExpandParams& p, const int64_t t,
                                                  const int by, const int64_t i, const int rank,
                                                  int* counters, const int need) {
  using Ty = BgmvType<T>;
  static_assert(W == 1 || W == Ty::kVec, "W is one element or one 16-byte vector");
  constexpr int NWARPS = kBgmvExpandThreads / 32;

  // Program-id mapping: token t, output tile `by`; find its slice (S <= 3, uniform).
  int s = 0;
#pragma unroll
  for (int q = 1; q < kBgmvMaxSlices; ++q)
    if (q < p.S && by >= p.tile_begin[q]) s = q;
  int G = 1 << p.log2_group;                           // lanes per B row
  int groups = 32 >> p.log2_group;                     // B rows per warp per step
  int tile = NWARPS * groups * J;                      // output columns per block
  int j_tile = (by - p.tile_begin[s]) * tile;
  const int h_out = p.h_out[s];
  T* yrow = static_cast<T*>(p.y) + t * p.y_stride_t + p.col_off[s];

  // Early exits: no LoRA (i == -1 or rank 0); invalid index / rank (rank -1) -> NaN over
  // this tile (loud, no OOB read).  A block with nothing to compute returns at once,
  // freeing its slot for the blocks that stream B (PERF_LOG v33); only each token's first
  // tile (by == 0, never empty) waits for the shrink, so the expand's completion still
  // implies the shrink's.
  if constexpr (RANK_TILES) {
    // Rule "rank": the lanes per B row from this token's rank, not r_max, so a token of a
    // small adapter covers more columns per block and leaves the grid's later tiles (sized
    // for r_max) to exit at once. r_max's extra lanes would only add exact zeros: the same
    // bits as the other rules.
    if (rank > 0) {
      const int lanes = (rank + W - 1) / W;
      int log2g = 0;
      while ((1 << log2g) < lanes && log2g < 5) ++log2g;  // <= p.log2_group: rank <= r_max
      G = 1 << log2g;
      groups = 32 >> log2g;
      tile = NWARPS * groups * J;
      j_tile = (by - p.tile_begin[s]) * tile;
      if (j_tile >= h_out) return;                     // a tile this token does not need
    }
  }
  if (rank < 0) {
    if constexpr (!FUSED) bgmv_wait_prior_grid();     // y may still be in use before it
    for (int j = j_tile + threadIdx.x; j < min(j_tile + tile, h_out); j += kBgmvExpandThreads)
      yrow[j] = Ty::from_float(__int_as_float(0x7fffffff));
    return;
  }
  if (rank == 0) {   // also i == -1
    if constexpr (!FUSED) {
      if (by == 0) bgmv_wait_prior_grid();
    }
    return;
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int lig = lane & (G - 1);                     // lane within its group
  const int grp = RANK_TILES ? lane / G : lane >> p.log2_group;  // G: a power of two

  // This lane's rank positions r = (c * G + lig) * W + e.
  bool live[NCHUNK];                                   // chunk starts below the rank
#pragma unroll
  for (int c = 0; c < NCHUNK; ++c) live[c] = (c * G + lig) * W < rank;
  const float sc = p.scale[i];
  const T* b_rows = static_cast<const T*>(p.B[s]) + i * p.b_stride_l[s];
  const int64_t b_stride_o = p.b_stride_o[s];

  // Output columns of this lane: consecutive groups take consecutive columns.
  const int j_lane = j_tile + warp * groups * J + grp;

  // Issue every B load of the lane first (J * NCHUNK in flight), then v, then the FMAs.
  using Raw = typename std::conditional<W == 1, T, uint4>::type;
  Raw raw[J][NCHUNK];
#pragma unroll
  for (int u = 0; u < J; ++u) {
    const int j = j_lane + u * groups;
    const T* brow = b_rows + static_cast<int64_t>(j < h_out ? j : 0) * b_stride_o;
#pragma unroll
    for (int c = 0; c < NCHUNK; ++c) {
      const int rb = (c * G + lig) * W;
      if constexpr (W == 1) {
        raw[u][c] = (j < h_out && live[c]) ? brow[rb] : Ty::from_float(0.f);
      } else {
        raw[u][c] = (j < h_out && live[c]) ? __ldg(reinterpret_cast<const uint4*>(brow + rb))
                                           : make_uint4(0u, 0u, 0u, 0u);
      }
    }
  }

  // y of this lane's outputs (the group's lane 0 stores them), loaded with B: neither the
  // shrink nor the fused kernel's shrink blocks write y.  J >= 8 parks them in shared
  // memory, in T (one slot per thread and output, each thread reads back its own: no
  // sync): 8 B vectors (32 registers) + 8 y + 8 v do not fit the 64 registers of the
  // launch bounds (y in registers: ptxas spilled 24-88 bytes, and under register pressure
  // it also moved B loads past the PDL wait, checked in the SASS).  The thread then waits
  // for its y before the PDL wait, where the block idles anyway; without PDL that is one
  // more round trip before v.
  constexpr bool kStageY = J >= 8;
  __shared__ T y_stage[kStageY ? J : 1][kBgmvExpandThreads];     // 2 KB (fp32: 4 KB)
  float yv[kStageY ? 1 : J];
#pragma unroll
  for (int u = 0; u < J; ++u) {
    const int j = j_lane + u * groups;
    if constexpr (kStageY) {
      y_stage[u][threadIdx.x] = (lig == 0 && j < h_out) ? yrow[j] : Ty::from_float(0.f);
    } else {
      yv[u] = (lig == 0 && j < h_out) ? Ty::to_float(yrow[j]) : 0.f;
    }
  }

  // PDL: wait for the shrink's v (B and y in flight). J = 1: behind a branch the compiler
  // cannot fold (a launched grid has T >= 1): with the wait in the same basic block ptxas
  // scheduled the one B load after it in the 16-bit kernels (SASS, CUDA 13.0, sm_90:
  // LDG.E.128 after ACQBULK), so B's latency did not overlap the shrink; the branch keeps
  // it before in every J = 1 instance (checked in the SASS). J >= 4 already issue their B
  // loads first; their code is left as it was.
  // Token list (PERF_LOG v41): t, s and the tile come from the list's row, loaded values,
  // not blockIdx: rather than hold them in registers across the wait (the J = 8 instance
  // spilled them), thread 0 parks them in shared memory and every thread reads them back
  // after the wait.
  constexpr bool kPark = WORK;
  __shared__ int parked[3];
  if constexpr (kPark) {
    if (threadIdx.x == 0) {
      parked[0] = static_cast<int>(t);
      parked[1] = s;
      parked[2] = j_tile;
    }
  }
  if constexpr (!FUSED && J == 1) {
    if (p.T > 0) bgmv_wait_prior_grid();
  } else if constexpr (!FUSED) {
    bgmv_wait_prior_grid();
  }
  int64_t t_late = t;          // t, s, the tile from here on
  int s_late = s, j_tile_late = j_tile;
  if constexpr (kPark) {
    __syncthreads();
    t_late = parked[0];
    s_late = parked[1];
    j_tile_late = parked[2];
  }
  if constexpr (FUSED) {  // wait for this token's shrink blocks (the B loads are in flight)
    __shared__ int ready;
    if (threadIdx.x == 0) {
      const volatile int* cnt = counters + t;
      int n = 0;
      while (*cnt < need && ++n < kBgmvSpinLimit) __nanosleep(32);
      __threadfence();                                 // acquire: v after the counter
      ready = n < kBgmvSpinLimit;
    }
    __syncthreads();
    if (!ready) {                                      // never expected: loud, not a hang
      for (int j = j_tile + threadIdx.x; j < min(j_tile + tile, h_out); j += kBgmvExpandThreads)
        yrow[j] = Ty::from_float(__int_as_float(0x7fffffff));
      return;
    }
  }

  // v at this lane's rank positions (0 past the rank: those entries were never written),
  // the n_split partial sums added in a fixed order (deterministic).  16-byte loads of v
  // where aligned (p.v_vec; PERF_LOG v36: the scalar loads, each behind its own partial-sum
  // loop, were 129 of the 526 instructions per warp after the wait at bs 64), the same
  // sums in the same order.
  const float* vrow = p.v + t_late * p.v_stride_t + s_late * p.v_stride_s;
  float vr[NCHUNK][W];
  constexpr bool kVecV = !FUSED && W % 4 == 0;   // a 16-byte v load exists for this kernel
  const bool vec_v = kVecV && p.v_vec;           // ... and v is aligned for it
  if constexpr (kVecV) {
    if (vec_v) {
#pragma unroll
      for (int c = 0; c < NCHUNK; ++c) {
        const int rb = (c * G + lig) * W;
        float4 a[W / 4];
#pragma unroll
        for (int k = 0; k < W / 4; ++k) a[k] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (rb < rank) {   // rb + W <= r_max: the whole vector is inside v's row
          const float4* pv = reinterpret_cast<const float4*>(vrow + rb);
#pragma unroll
          for (int k = 0; k < W / 4; ++k) a[k] = pv[k];
#pragma unroll 1  // n_split > 1 only in the opt-in "split" variant; unrolled, it spilled
          for (int z = 1; z < p.n_split; ++z) {
            const float4* pz = reinterpret_cast<const float4*>(vrow + z * p.v_stride_split + rb);
#pragma unroll
            for (int k = 0; k < W / 4; ++k) {
              const float4 b = pz[k];
              a[k].x += b.x; a[k].y += b.y; a[k].z += b.z; a[k].w += b.w;
            }
          }
        }
#pragma unroll
        for (int k = 0; k < W / 4; ++k) {
          vr[c][4 * k + 0] = rb + 4 * k + 0 < rank ? a[k].x : 0.f;
          vr[c][4 * k + 1] = rb + 4 * k + 1 < rank ? a[k].y : 0.f;
          vr[c][4 * k + 2] = rb + 4 * k + 2 < rank ? a[k].z : 0.f;
          vr[c][4 * k + 3] = rb + 4 * k + 3 < rank ? a[k].w : 0.f;
        }
      }
    }
  }
  if (!vec_v) {
#pragma unroll
    for (int c = 0; c < NCHUNK; ++c) {
      const int rb = (c * G + lig) * W;
#pragma unroll
      for (int e = 0; e < W; ++e) {
        float a = 0.f;
        if (rb + e < rank) {
          const float* pv = vrow + rb + e;
          a = FUSED ? __ldcg(pv) : *pv;
#pragma unroll 4  // independent loads in flight, not one L2 round trip per partial
          for (int z = 1; z < p.n_split; ++z)
            a += FUSED ? __ldcg(pv + z * p.v_stride_split) : pv[z * p.v_stride_split];
        }
        vr[c][e] = a;
      }
    }
  }
  if constexpr (FUSED) {  // the last expand block of token t resets its counters
    if (threadIdx.x == 0 && atomicAdd(counters + p.T + t, 1) == p.tile_begin[p.S] - 1) {
      counters[t] = 0;
      counters[p.T + t] = 0;
    }
  }

  // B past the rank: chunks wholly past it were never loaded (zeros), so only a chunk
  // the rank ends inside needs the per-element select (padded B may hold NaN); with
  // rank % W == 0 (uniform per block: one token) there is none (PERF_LOG v36).
  const bool whole = rank % W == 0;
  float acc[J];
#pragma unroll
  for (int u = 0; u < J; ++u) {
    acc[u] = 0.f;
#pragma unroll
    for (int c = 0; c < NCHUNK; ++c) {
      float bf[W];
      if constexpr (W == 1) {
        bf[0] = Ty::to_float(raw[u][c]);
      } else {
        Ty::unpack(raw[u][c], bf);
      }
      const int rb = (c * G + lig) * W;
      if (whole) {
#pragma unroll
        for (int e = 0; e < W; ++e) acc[u] = fmaf(bf[e], vr[c][e], acc[u]);
      } else {
#pragma unroll
        for (int e = 0; e < W; ++e)  // select, not multiply: padded B may hold NaN
          acc[u] = fmaf(rb + e < rank ? bf[e] : 0.f, vr[c][e], acc[u]);
      }
    }
  }
  // Reduce over the G lanes of a group (xor stays inside aligned groups of G).
#pragma unroll
  for (int u = 0; u < J; ++u)
    for (int o = G >> 1; o > 0; o >>= 1) acc[u] += __shfl_xor_sync(0xffffffffu, acc[u], o);

  // Store: lane 0 of each group; fp32 add, one conversion.
  if (lig == 0) {
    // J >= 8: recompute the J columns here rather than keep them (and their 64-bit y
    // addresses) live from the y loads on: the opaque copy stops the compiler from reusing
    // them (it did: with y in shared memory but without this, ptxas spilled 80-104 bytes).
    // J <= 4: the same code as before (identical SASS).
    int j_store = kPark ? j_tile_late + warp * groups * J + grp : j_lane;
    if constexpr (J >= 8) asm volatile("" : "+r"(j_store));
    T* yrow_store = kPark ? static_cast<T*>(p.y) + t_late * p.y_stride_t + p.col_off[s_late] : yrow;
    const int h_out_store = kPark ? p.h_out[s_late] : h_out;
#pragma unroll
    for (int u = 0; u < J; ++u) {
      const int j = j_store + u * groups;
      float y;
      if constexpr (kStageY) {
        y = Ty::to_float(y_stage[u][threadIdx.x]);
      } else {
        y = yv[u];
      }
      if (j < h_out_store) yrow_store[j] = Ty::from_float(fmaf(sc, acc[u], y));
    }
  }
}

// Grid: x = token, y = output tile. RANK_TILES: tile rule "rank" (16-byte loads only).
// WORK (with RANK_TILES, 16-bit types): rule "rank"'s token list (PERF_LOG v41): x = the
// blocks the listed ranks need, each mapped to its token and to the tile of the grid above.
template <typename T, int W, int NCHUNK, int J, bool RANK_TILES = false, bool WORK = false>
__global__ void __launch_bounds__(kBgmvExpandThreads, kBgmvMinBlocksPerSM)
_bgmv_expand_kernel(const BgmvExpandParams p) {
  static_assert(!WORK || RANK_TILES, "the token list serves rule rank");
  bgmv_let_next_grid_launch();   // a PDL-launched next kernel still waits for this one
  if constexpr (WORK) {
    const int b = blockIdx.x;
    if (b >= p.work_block_begin[kBgmvRankGroups]) {   // an empty list's one block
      bgmv_wait_prior_grid();
      return;
    }
    int t, i, g, q, s;
    const int rank = bgmv_work_block(p, b, &t, &i, &g, &q, &s);
    bgmv_expand_block<T, W, NCHUNK, J, false, true, true>(   // that tile of x = T's grid
        p, t, p.tile_begin[s] + q - p.work_slice_begin[g][s], i, rank, nullptr, 0);
  } else {
    int64_t i;
    const int rank = bgmv_token(p, blockIdx.x, &i);
    bgmv_expand_block<T, W, NCHUNK, J, false, RANK_TILES>(p, blockIdx.x, blockIdx.y, i, rank,
                                                          nullptr, 0);
  }
}

// ---------------------------------------------------------------------------------------
// Tile rule "mma" (PERF_LOG v16-v22): bf16 on the tensor cores, per chunk of tokens that
// share an adapter.  Why: ncu (H200, 128 distinct adapters, r 64, T 256) found the FMA
// expand issue-bound (78% of issue slots, 32 M warp instructions for 2.4 M FMAs), and the
// batch-256 point (two tokens per adapter) 1.5x slower than batch 128 (one each) on the
// same DRAM bytes: every token re-reads its adapter from L2.  mma.sync m16n8k16 needs no
// unpacking, and its 8 columns serve several tokens from one load of the weights.
// Chunks (BgmvShrinkParams / BgmvExpandParams::chunks): chunks[c * 8 + k], k < 8, are the
// tokens of chunk c, all with one idx value, -1 padded (host-built, once per batch:
// multilora_impl.build_chunks); nullptr: chunk c is token c alone.
// Fragments: lane (g, q) (g = lane / 4, q = lane % 4) loads 16 bytes = elements 8q .. 8q+7
// of a 32-wide K step, of two rows (g and g + 8) of the MMA's A operand; these are its A
// fragments for two MMAs: the k slots 2q, 2q+1, 2q+8, 2q+9 (the ones this lane supplies)
// stand for elements 8q+0..3 in the first, 8q+4..7 in the second.  The sum over k does
// not care which element a slot stands for as long as the B operand uses the same map, and
// lane (g, q) supplies exactly those slots of B's column g: no shuffle, no shared memory.
// ---------------------------------------------------------------------------------------
constexpr int kBgmvMmaRowsPerWarp = 16;   // the MMA's 16 rows
// Launch bounds of 6 blocks / SM (80 registers): at 8 (64) the first mma expand (v16, 32
// registers of B fragments) spilled 36-44 bytes (ptxas, sm_90); the expand of KB = 4
// (two tiles of 32 registers in flight) takes 4 (128 registers).
// Also the wave mma_split sizes the chunked shrink's grid by (bgmv_cuda.MMA_BLOCKS_PER_SM).
constexpr int kBgmvMmaMinBlocksPerSM = 6;
constexpr int kBgmvMmaShrinkUnroll = 4;   // 32-wide K steps in flight per warp (12 loads)
constexpr int kBgmvMmaMaxSplit = 8;       // v partial sums the expand loads at once (MMA_MAX_SPLIT)

__device__ __forceinline__ void bgmv_mma_bf16_16816(float (&d)[4], uint32_t a0, uint32_t a1,
                                                    uint32_t a2, uint32_t a3, uint32_t b0,
                                                    uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
  __trap();  // never launched: the launchers require PTX >= sm_80 for these kernels
#endif
}

// Token k of chunk c (-1 past its count), and the count (>= 1 for chunk lists built by
// build_chunks; 0 for padding chunks).  Read where needed (L1 hits): an array indexed by
// lane-dependent k would live in local memory.
__device__ __forceinline__ int bgmv_chunk_token(const int* chunks, int c, int k) {
  return chunks ? __ldg(chunks + c * kBgmvChunkStride + k) : (k == 0 ? c : -1);
}

// The adapter of chunk c: the row's last entry (no load chain through idx), or idx[c]
// without chunks (one chunk per token).
__device__ __forceinline__ int64_t bgmv_chunk_adapter(const int* chunks, const void* idx,
                                                      int idx_is_64, int c) {
  return chunks ? static_cast<int64_t>(__ldg(chunks + c * kBgmvChunkStride + kBgmvChunkTokens))
                : bgmv_load_int(idx, idx_is_64, c);
}

__device__ __forceinline__ int bgmv_chunk_size(const int* chunks, int c) {
  int n = 0;
#pragma unroll
  for (int k = 0; k < kBgmvChunkTokens; ++k) n += bgmv_chunk_token(chunks, c, k) >= 0;
  return n;
}

// Shrink: v[t, s, r0 + row] for the tokens t of chunk c (the MMA's columns, x exact in
// bf16), 16 rank rows per block (the MMA's rows: A rows past the rank are never loaded);
// the 4 warps split the block's K range in 32-wide steps, their partial sums are added in
// warp order through shared memory.  Grid: x = chunk, y = (slice, 16-row tile), z = split.
__global__ void __launch_bounds__(kBgmvShrinkThreads, kBgmvMmaMinBlocksPerSM)
_bgmv_shrink_mma_kernel(const BgmvShrinkParams p) {
  bgmv_wait_prior_grid();
  bgmv_let_next_grid_launch();
  using T = __nv_bfloat16;
  constexpr int U = kBgmvMmaShrinkUnroll, NWARPS = kBgmvShrinkThreads / 32;
  const int row_tiles = (p.r_max + kBgmvMmaRowsPerWarp - 1) / kBgmvMmaRowsPerWarp;
  const int s = blockIdx.y / row_tiles, r0 = (blockIdx.y % row_tiles) * kBgmvMmaRowsPerWarp;
  const int c = blockIdx.x;
  const int n = bgmv_chunk_size(p.chunks, c);
  if (n == 0) return;
  const int64_t i = bgmv_chunk_adapter(p.chunks, p.idx, p.idx_is_64, c);
  if (i < 0 || i >= p.L) return;                       // the expand flags bad ones with NaN
  const int rank = bgmv_rank(p.ranks, p.ranks_is_64, i, p.r_max);
  if (rank <= r0) return;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const bool row0 = r0 + g < rank, row1 = r0 + g + 8 < rank;
  const T* a_tile = static_cast<const T*>(p.A) + s * p.a_stride_s + i * p.a_stride_l;
  const uint4* a0 = reinterpret_cast<const uint4*>(a_tile + (row0 ? r0 + g : 0) * p.a_stride_r);
  const uint4* a1 = reinterpret_cast<const uint4*>(a_tile + (row1 ? r0 + g + 8 : 0) * p.a_stride_r);
  const bool has_x = g < n;
  const uint4* xg = reinterpret_cast<const uint4*>(static_cast<const T*>(p.x) +
                                                   static_cast<int64_t>(has_x ? bgmv_chunk_token(p.chunks, c, g) : 0) * p.x_stride_t);

  // This split's 16-byte vectors [vb, ve) of h_in; warp w takes steps w, w + 4, ... of 4.
  const int nvec_all = p.h_in / 8;
  const int per_split = (nvec_all + p.n_split - 1) / p.n_split;
  const int vb = blockIdx.z * per_split, ve = min(nvec_all, vb + per_split);
  const int nsteps = (ve - vb + 3) / 4;
  float d[4] = {0.f, 0.f, 0.f, 0.f};
  for (int st = warp; st < nsteps; st += NWARPS * U) {
    uint4 ra0[U], ra1[U], rx[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = vb + 4 * (st + NWARPS * u) + q;
      const bool ok = st + NWARPS * u < nsteps && v < ve;
      const uint4 z = make_uint4(0u, 0u, 0u, 0u);
      ra0[u] = ok && row0 ? __ldg(a0 + v) : z;
      ra1[u] = ok && row1 ? __ldg(a1 + v) : z;
      rx[u] = ok && has_x ? __ldg(xg + v) : z;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      bgmv_mma_bf16_16816(d, ra0[u].x, ra1[u].x, ra0[u].y, ra1[u].y, rx[u].x, rx[u].y);
      bgmv_mma_bf16_16816(d, ra0[u].z, ra1[u].z, ra0[u].w, ra1[u].w, rx[u].z, rx[u].w);
    }
  }
  // d: rows g / g + 8, columns (tokens) 2q / 2q + 1.
  __shared__ float partial[NWARPS][kBgmvMmaRowsPerWarp][kBgmvChunkTokens];
  partial[warp][g][2 * q] = d[0];
  partial[warp][g][2 * q + 1] = d[1];
  partial[warp][g + 8][2 * q] = d[2];
  partial[warp][g + 8][2 * q + 1] = d[3];
  __syncthreads();
  const int row = threadIdx.x / kBgmvChunkTokens, k = threadIdx.x % kBgmvChunkTokens;
  if (r0 + row < rank && k < n) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) sum += partial[w][row][k];
    p.v[blockIdx.z * p.v_stride_split + static_cast<int64_t>(bgmv_chunk_token(p.chunks, c, k)) * p.v_stride_t +
        s * p.v_stride_s + r0 + row] = sum;
  }
}

// Expand: y[t, off_s + j] += scale[i] * v[t, s, :rank] @ B_s[i, j, :rank] for the tokens t
// of chunk c.  B's 16-row tiles are the MMA's A operand; each warp walks p.mma_tiles (MT)
// of them, the next tile's B loads in flight while the tensor cores take the current one
// (PERF_LOG v18: with one tile per warp each block paid its chain of dependent round trips
// -- chunk, idx, rank, B, v -- for 16 KB of B: ncu, 1.8 TB/s).  The tokens go through the
// B operand two at a time: v stays fp32-exact as three bf16 parts (bf16(v), bf16 of the
// remainder, bf16 of what is left: 3 x 8 bits of mantissa), columns 0-2 for the pair's
// first token, 4-6 for its second, 3 and 7 zero; the products are exact and the tensor
// core adds them in fp32.  So the result differs from the FMA rules only in the order and
// rounding of the fp32 sum.  (fp16 would overflow the split where |v| > 65504: half and
// float run as rule "rank".)  y of the whole block tile is staged in shared memory before
// the PDL wait; v's n_split partial sums are loaded all at once (one round trip).
// Grid: x = chunk, y = output tile of 64 MT columns.  KB: 32-wide rank blocks (r_max <=
// 32 KB); two tiles of B fragments take 16 KB registers, so KB = 4 runs 4 blocks / SM.
constexpr int kBgmvMmaMaxTiles = 16;      // MT <= 16: a block tile of at most 1,024 columns
constexpr int kBgmvMmaMaxBlockRows = kBgmvExpandThreads / 32 * kBgmvMmaRowsPerWarp * kBgmvMmaMaxTiles;

// One 16-row tile of B fragments for lane (g, q): rows g and g + 8 at `row` (the lane's
// row g, its 8 ranks 8q.. of each 32-wide block already added), loop invariants hoisted
// by the caller (PERF_LOG v20: recomputed per tile they made ~350 instructions a tile):
// live[kb] = that block's 8 ranks start below the rank; tail: the rank ends inside one of
// them, whose words past it are masked (padded B may hold NaN).
template <int KB>
__device__ __forceinline__ void bgmv_mma_load_b(uint4 (&a)[KB][2], const __nv_bfloat16* row,
                                                int64_t row8, bool ok0, bool ok1,
                                                const bool (&live)[KB], bool tail,
                                                const uint32_t (&mask)[KB][4]) {
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) {
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    a[kb][0] = live[kb] && ok0 ? __ldg(reinterpret_cast<const uint4*>(row + 32 * kb)) : z;
    a[kb][1] = live[kb] && ok1 ? __ldg(reinterpret_cast<const uint4*>(row + row8 + 32 * kb)) : z;
  }
  if (tail) {
#pragma unroll
    for (int kb = 0; kb < KB; ++kb)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        a[kb][h].x &= mask[kb][0];
        a[kb][h].y &= mask[kb][1];
        a[kb][h].z &= mask[kb][2];
        a[kb][h].w &= mask[kb][3];
      }
  }
}

template <int KB>
__global__ void __launch_bounds__(kBgmvExpandThreads, KB == 4 ? 4 : kBgmvMmaMinBlocksPerSM)
_bgmv_expand_mma_kernel(const BgmvExpandParams p) {
  bgmv_let_next_grid_launch();
  using T = __nv_bfloat16;
  using Ty = BgmvType<T>;
  constexpr int NWARPS = kBgmvExpandThreads / 32;
  const int MT = p.mma_tiles;
  const int kTile = NWARPS * kBgmvMmaRowsPerWarp * MT;     // output columns per block
  const int by = blockIdx.y;
  int s = 0;
#pragma unroll
  for (int q = 1; q < kBgmvMaxSlices; ++q)
    if (q < p.S && by >= p.tile_begin[q]) s = q;
  const int j_tile = (by - p.tile_begin[s]) * kTile;
  const int h_out = p.h_out[s];
  T* y_s = static_cast<T*>(p.y) + p.col_off[s];

  // The early exits of the FMA rules (one idx value per chunk; only tile 0 waits when
  // there is nothing to compute, PERF_LOG v33).
  const int c = blockIdx.x;
  const int n = bgmv_chunk_size(p.chunks, c);
  const int64_t i = n ? bgmv_chunk_adapter(p.chunks, p.idx, p.idx_is_64, c) : -1;
  const int rank = (i < -1 || i >= p.L) ? -1 : i == -1 ? 0 : bgmv_rank(p.ranks, p.ranks_is_64, i, p.r_max);
  if (rank == 0) {
    if (by == 0) bgmv_wait_prior_grid();
    return;
  }
  if (rank < 0) {   // invalid index / rank: NaN over the chunk's tile
    bgmv_wait_prior_grid();
    for (int w = threadIdx.x; w < n * kTile; w += kBgmvExpandThreads) {
      const int j = j_tile + w % kTile;
      if (j < h_out)
        y_s[bgmv_chunk_token(p.chunks, c, w / kTile) * p.y_stride_t + j] =
            Ty::from_float(__int_as_float(0x7fffffff));
    }
    return;
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int jw = warp * kBgmvMmaRowsPerWarp * MT + g;   // block row, first tile
  constexpr int kStep = kBgmvMmaRowsPerWarp;                // next tile
  const T* b_rows = static_cast<const T*>(p.B[s]) + i * p.b_stride_l[s];
  const int64_t b_stride_o = p.b_stride_o[s];

  // Per-lane invariants of the B loads: the ranks this lane loads, the tail masks.
  bool live[KB];
  uint32_t mask[KB][4];
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) {
    const int keep = rank - (kb * 32 + 8 * q);          // elements of this vector to keep
    live[kb] = keep > 0;
#pragma unroll
    for (int e = 0; e < 4; ++e)
      mask[kb][e] = keep >= 2 * e + 2 ? 0xffffffffu : (keep == 2 * e + 1 ? 0xffffu : 0u);
  }
  const bool tail = rank % 8 != 0;                      // uniform over the block
  const int64_t row8 = 8 * b_stride_o, row_step = kStep * b_stride_o;
  const T* brow = b_rows + static_cast<int64_t>(j_tile + jw) * b_stride_o + 8 * q;
  int jrow = j_tile + jw;                               // column of this lane's row g
  uint4 cur[KB][2], nxt[KB][2];
  bgmv_mma_load_b<KB>(cur, brow, row8, jrow < h_out, jrow + 8 < h_out, live, tail, mask);
  // The chunk's tokens in shared memory (no load chain per use), then y of the tokens over
  // the block tile, staged before the wait: 16-byte loads where p.y_vec allows (PERF_LOG
  // v29: the 2-byte path cost 2 M instructions at the distinct point), else 2-byte loads,
  // 8 per thread in flight.
  __shared__ int tok[kBgmvChunkTokens];
  if (threadIdx.x < kBgmvChunkTokens) tok[threadIdx.x] = bgmv_chunk_token(p.chunks, c, threadIdx.x);
  __syncthreads();
  __shared__ __align__(16) T y_stage[kBgmvChunkTokens][kBgmvMmaMaxBlockRows];
  if (p.y_vec) {
    const int vecs = kTile / 8;                          // 16-byte vectors per token row
    for (int w = threadIdx.x; w < n * vecs; w += kBgmvExpandThreads) {
      const int k = w / vecs, j = 8 * (w % vecs);
      if (j_tile + j < h_out)                            // h_out % 8 == 0: whole vectors
        *reinterpret_cast<uint4*>(&y_stage[k][j]) =
            *reinterpret_cast<const uint4*>(y_s + tok[k] * p.y_stride_t + j_tile + j);
    }
  } else {
    constexpr int kYBatch = 8;
    int yk = threadIdx.x / kTile, yj = threadIdx.x % kTile;   // (token, row) of flat index w
    for (int w0 = 0; w0 < n * kTile; w0 += kYBatch * kBgmvExpandThreads) {
      T yv[kYBatch];
      int ks[kYBatch], js[kYBatch];
#pragma unroll
      for (int u = 0; u < kYBatch; ++u) {                // w = w0 + 128 u + threadIdx.x
        ks[u] = yk;
        js[u] = yj;
        yv[u] = (yk < n && j_tile + yj < h_out) ? y_s[tok[yk] * p.y_stride_t + j_tile + yj]
                                               : Ty::from_float(0.f);
        yj += kBgmvExpandThreads;                        // no division in the loop
        while (yj >= kTile) { yj -= kTile; ++yk; }
      }
#pragma unroll
      for (int u = 0; u < kYBatch; ++u)
        if (ks[u] < n) y_stage[ks[u]][js[u]] = yv[u];
    }
  }
  const float sc = p.scale[i];
  bgmv_wait_prior_grid();

  // v straight into fragments: thread (k, r) adds token k's n_split partial sums at rank r
  // in split order (the FMA rules' order) and writes the sum's three bf16 parts (and the
  // zero fourth) to its element of v_frag[k][part][r / 8].  Tokens of the chunk only, plus
  // the zero column of an odd count's last pair (PERF_LOG v29: all 8 slots through an fp32
  // staging array cost 1.8 M instructions at the distinct point).
  __shared__ uint4 v_frag[kBgmvChunkTokens][4][4 * KB];
  const int n_even = (n + 1) & ~1;
  for (int w = threadIdx.x; w < n_even * 32 * KB; w += kBgmvExpandThreads) {
    const int k = w / (32 * KB), r = w % (32 * KB);
    float f = 0.f;
    if (k < n && r < rank) {
      const float* pv = p.v + static_cast<int64_t>(tok[k]) * p.v_stride_t + s * p.v_stride_s + r;
      float part[kBgmvMmaMaxSplit];
#pragma unroll
      for (int z = 0; z < kBgmvMmaMaxSplit; ++z)
        part[z] = z < p.n_split ? pv[z * p.v_stride_split] : 0.f;
      f = part[0];
#pragma unroll
      for (int z = 1; z < kBgmvMmaMaxSplit; ++z)
        if (z < p.n_split) f += part[z];
      for (int z = kBgmvMmaMaxSplit; z < p.n_split; ++z) f += pv[z * p.v_stride_split];
    }
    __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&v_frag[k][0][0]) + r;
    constexpr int kPart = 4 * KB * 8;                   // bf16 elements per part
#pragma unroll
    for (int part = 0; part < 3; ++part) {
      const __nv_bfloat16 h = __float2bfloat16_rn(f);
      e[part * kPart] = h;
      f -= __bfloat162float(h);
    }
    e[3 * kPart] = __float2bfloat16_rn(0.f);
  }
  __syncthreads();

  // The warp's tiles: tile m + 1's B loads go out before tile m's MMAs.  Token pairs: lane
  // (g, q) supplies column g = part g % 4 of the pair's token g / 4.  Accumulators: rows
  // g / g + 8, columns 2q / 2q + 1; lanes q = 0, 1 hold the first token's parts, q = 2, 3
  // the second's: one xor shuffle adds them.
  uint4 bv0[KB];                                        // the first pair's v, kept
#pragma unroll
  for (int kb = 0; kb < KB; ++kb) bv0[kb] = v_frag[g >> 2][g & 3][4 * kb + q];
  for (int m = 0; m < MT; ++m) {
    if (m + 1 < MT) {
      brow += row_step;
      jrow += kStep;
      bgmv_mma_load_b<KB>(nxt, brow, row8, jrow < h_out, jrow + 8 < h_out, live, tail, mask);
    }
    const int jb = jw + m * kStep;                        // block row of this lane's half 0
    for (int k0 = 0; k0 < n; k0 += 2) {
      float d[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
      for (int kb = 0; kb < KB; ++kb) {
        const uint4 bv = k0 == 0 ? bv0[kb] : v_frag[k0 + (g >> 2)][g & 3][4 * kb + q];  // k0 + 1 < 8
        bgmv_mma_bf16_16816(d, cur[kb][0].x, cur[kb][1].x, cur[kb][0].y, cur[kb][1].y, bv.x, bv.y);
        bgmv_mma_bf16_16816(d, cur[kb][0].z, cur[kb][1].z, cur[kb][0].w, cur[kb][1].w, bv.z, bv.w);
      }
      float s0 = d[0] + d[1], s1 = d[2] + d[3];
      s0 += __shfl_xor_sync(0xffffffffu, s0, 1);
      s1 += __shfl_xor_sync(0xffffffffu, s1, 1);
      const int k = k0 + (q >> 1);
      if ((q & 1) == 0 && k < n) {
        T* yrow = y_s + tok[k] * p.y_stride_t + j_tile;
        if (j_tile + jb < h_out)
          yrow[jb] = Ty::from_float(fmaf(sc, s0, Ty::to_float(y_stage[k][jb])));
        if (j_tile + jb + 8 < h_out)
          yrow[jb + 8] = Ty::from_float(fmaf(sc, s1, Ty::to_float(y_stage[k][jb + 8])));
      }
    }
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
      cur[kb][0] = nxt[kb][0];
      cur[kb][1] = nxt[kb][1];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Fused single launch (decode, small T): one 1-D grid of 128-thread blocks,
//   [0, T * P)            split-K shrink blocks, P = S * ceil(r_max / 4) * n_split per token
//                         (token-major), each publishing its partial v then counters[t] += 1
//   [T * P, T * (P + E))  expand blocks, E = output tiles per token: B loads first, then
//                         wait for counters[t] == P, then v (sum of partials) and y.
// Blocks are dispatched in increasing index order, so every shrink block is resident or
// done before an expand block can spin (the order decoupled look-back scans rely on);
// should it ever not hold, the bounded spin turns the tile into NaN instead of hanging.
// Latency model: launches 2 -> 1 (~1.3 us of graph launch and drain saved), and the
// expand's B loads overlap the shrink, so a call costs ~ launch + max(shrink, B) + one
// L2 round trip for the counter; bytes as the two-launch path plus the n_split partials.
// ---------------------------------------------------------------------------------------
template <typename T, int W, int NCHUNK>
__global__ void __launch_bounds__(kBgmvExpandThreads, kBgmvFusedMinBlocksPerSM)
_bgmv_fused_kernel(const BgmvFusedParams p) {
  static_assert(kBgmvShrinkThreads == kBgmvExpandThreads, "one block shape for both phases");
  const int row_tiles = (p.s.r_max + kBgmvShrinkRows - 1) / kBgmvShrinkRows;
  const int per_token = p.s.S * row_tiles * p.s.n_split;
  const int64_t shrink_blocks = static_cast<int64_t>(p.s.T) * per_token;
  int64_t b = blockIdx.x;
  if (b < shrink_blocks) {
    const int64_t t = b / per_token;
    const int rem = static_cast<int>(b % per_token);
    const int c = rem % p.s.n_split, st = rem / p.s.n_split;
    int64_t i;
    const int rank = bgmv_token(p.s, t, &i);
    if (bgmv_shrink_block<T>(p.s, t, i, rank, st / row_tiles, (st % row_tiles) * kBgmvShrinkRows, c)) {
      __threadfence();                                 // release: v before the counter
      __syncthreads();
      if (threadIdx.x == 0) atomicAdd(p.counters + t, 1);
    }
    return;
  }
  b -= shrink_blocks;
  const int tiles = p.e.tile_begin[p.e.S];
  int64_t i;
  const int rank = bgmv_token(p.e, b / tiles, &i);
  bgmv_expand_block<T, W, NCHUNK, kBgmvExpandOuts, true>(p.e, b / tiles, static_cast<int>(b % tiles),
                                                         i, rank, p.counters, per_token);
}

// ---------------------------------------------------------------------------------------
// Rank-major B (PERF_LOG v45): B_s stored as [L, r_max, h_out_s] with unit stride along
// h_out, i.e. the contract's tensor [L, h_out_s, r_max] with strides (l, 1, h_out_s), what
// B.transpose(1, 2).contiguous().transpose(1, 2) returns (same shape, same values).  A
// rank-r adapter's B is then r whole rows of h_out, read densely at any rank; stored
// row-wise in r_max-64 padding a rank-8 adapter reads 16 of every 128-byte row (PERF_LOG
// v42: 2.9 us of the mixed point's expand at rank 8, 2.0 at 16, 1.2 at 32).
// One block of 256 threads (8 warps) per (token, tile of output columns).  A lane owns W
// consecutive columns (one 16-byte load per rank row, or one element when B or h_out is
// not 16-byte aligned).  The 8 warps split into KS = min(8, next_pow2(ceil(rank / 8)))
// groups along the rank and 8 / KS along the columns, so a warp takes at most 8 rows of a
// rank <= 64, all in flight before the PDL wait (ranks above 64 loop, 8 rows per step,
// after it): tile = 32 W 8 / KS columns (16-bit, rank 8: 2,048; rank 64: 256).  Warp w
// takes column group w / KS and the contiguous rows [g m, g m + m), g = w % KS,
// m = ceil(rank / KS); after the wait lane l loads v at row l % 8 of the step and each
// row's value reaches the warp by a shuffle (PERF_LOG v47).  The KS partial sums meet in
// shared memory in a fixed order (deterministic); the rank group's first warp scales them,
// adds y (loaded before the wait) and stores.  64 registers at (256, 4), no spills (the
// token, adapter, slice and tile parked in shared memory across the wait).  Tile rules do
// not apply: this one kernel serves every rule.  Grid: x = T, y = sum_s ceil(h_out_s /
// tile(r_max)) (a token of a smaller rank takes its own wider tiles; the later ones exit
// at once), or with the token list 1-D over only the tiles each listed token's rank needs
// (as the FMA expand's; bitwise the same values as the grid x = T, since KS depends on the
// rank's group alone).  PERF_LOG v48: prefetching the later blocks' B into L2 from the
// first ones, beside the shrink, made every pair slower (not kept).
// ---------------------------------------------------------------------------------------
constexpr int kBgmvRmThreads = 256;
constexpr int kBgmvRmWarps = kBgmvRmThreads / 32;
constexpr int kBgmvRmRows = 8;             // rank rows per warp per step (loads in flight)
constexpr int kBgmvRmMinBlocksPerSM = 4;

// log2 KS for a rank: the fewest rank groups (a power of two <= 8) with at most
// kBgmvRmRows rows per warp (PERF_LOG v47: 4 rows per warp, twice the warps at ranks 8-32,
// measured 0.2-3.3 us slower).
__host__ __device__ __forceinline__ int bgmv_rm_log2_ks(int rank) {
  int l = 0;
  while (l < 3 && (kBgmvRmRows << l) < rank) ++l;
  return l;
}

// Rows per warp for a rank split in KS groups: ceil(rank / KS).
__device__ __forceinline__ int bgmv_rm_warp_rows(int rank, int log2ks) {
  return (rank + (1 << log2ks) - 1) >> log2ks;
}

template <typename T, int W, bool WORK>
__global__ void __launch_bounds__(kBgmvRmThreads, kBgmvRmMinBlocksPerSM)
_bgmv_expand_rm_kernel(const BgmvExpandParams p) {
  using Ty = BgmvType<T>;
  static_assert(W == 1 || W == Ty::kVec, "W is one element or one 16-byte vector");
  using Raw = typename std::conditional<W == 1, T, uint4>::type;
  constexpr int U = kBgmvRmRows;
  bgmv_let_next_grid_launch();   // a PDL-launched next kernel still waits for this one

  // Block -> token t (adapter i, rank), slice s, tile q of the slice, KS (log2).
  int64_t t, i;
  int rank, s = 0, q, log2ks;
  if constexpr (WORK) {
    const int b = blockIdx.x;
    if (b >= p.work_block_begin[kBgmvRankGroups]) {   // an empty list's one block
      bgmv_wait_prior_grid();
      return;
    }
    int tt, ii, g, qq;
    rank = bgmv_work_block(p, b, &tt, &ii, &g, &qq, &s);
    t = tt;
    i = ii;
    q = qq - p.work_slice_begin[g][s];
    log2ks = bgmv_rm_log2_ks(bgmv_group_rank(g, p.r_max));
  } else {
    t = blockIdx.x;
    rank = bgmv_token(p, t, &i);
#pragma unroll
    for (int k = 1; k < kBgmvMaxSlices; ++k)
      if (k < p.S && static_cast<int>(blockIdx.y) >= p.tile_begin[k]) s = k;
    q = blockIdx.y - p.tile_begin[s];
    log2ks = bgmv_rm_log2_ks(rank > 0 ? rank : p.r_max);
  }
  const int tile = 32 * W * (kBgmvRmWarps >> log2ks);
  const int j0 = q * tile;
  const int h_out = p.h_out[s];
  T* yrow = static_cast<T*>(p.y) + t * p.y_stride_t + p.col_off[s];

  // Early exits, uniform over the block.  Invalid index / rank: NaN over the tile (loud,
  // nothing out of bounds read).  Only each token's first tile waits when it has nothing
  // to do (the list's blocks always wait), so the expand's completion implies the shrink's.
  if (rank < 0) {
    bgmv_wait_prior_grid();   // y may still be in use before it
    for (int j = j0 + threadIdx.x; j < min(j0 + tile, h_out); j += kBgmvRmThreads)
      yrow[j] = Ty::from_float(__int_as_float(0x7fffffff));
    return;
  }
  if (rank == 0 || j0 >= h_out) {
    if (WORK || blockIdx.y == 0) bgmv_wait_prior_grid();
    return;
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int kg = warp & ((1 << log2ks) - 1);           // rank group
  const int rw = bgmv_rm_warp_rows(rank, log2ks);
  const int k_begin = kg * rw;                         // this warp's rows [k_begin, k_end)
  const int k_end = min(k_begin + rw, rank);
  const int j = j0 + ((warp >> log2ks) * 32 + lane) * W;   // this lane's first column
  const bool jin = j < h_out;                          // W divides h_out on the vector path
  const int64_t bsr = p.b_stride_r[s];

  // B rows first (before the wait: the shrink writes no B), then y, then wait, then v.
  Raw raw[U];
  // B rows [k0, k0 + U) of this warp; past k_end nothing is loaded (zeros).
  auto load_b = [&](const T* b, int k0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int k = k0 + u;
      if constexpr (W == 1) {
        raw[u] = (jin && k < k_end) ? b[k * bsr] : Ty::from_float(0.f);
      } else {
        raw[u] = (jin && k < k_end) ? __ldg(reinterpret_cast<const uint4*>(b + k * bsr))
                                    : make_uint4(0u, 0u, 0u, 0u);
      }
    }
  };
  load_b(static_cast<const T*>(p.B[s]) + i * p.b_stride_l[s] + (jin ? j : 0), k_begin);
  const bool storer = kg == 0 && jin;                  // the rank group's first warp
  const float sc = p.scale[i];
  const T* yp = yrow + (jin ? j : 0);                  // this lane's y (stored through yq)
  union { Raw raw; T e[W]; } yb = {};                  // y kept packed across the wait
  const bool y_vec = W > 1 && p.y_vec;
  if (storer) {
    if constexpr (W == 1) {
      yb.raw = *yp;
    } else if (y_vec) {
      yb.raw = *reinterpret_cast<const uint4*>(yp);
    } else {
#pragma unroll
      for (int e = 0; e < W; ++e) yb.e[e] = yp[e];
    }
  }
  // Rather than hold i, s, the tile and the pointers built from them across the wait (the
  // 16-bit 16-byte instances spilled 48 bytes at 64 registers: the token list's on sm_90,
  // both on sm_80), thread 0 parks them in shared memory and every thread rebuilds its
  // pointers after the wait (the block's warps reach it together: a short barrier).
  __shared__ int64_t parked[3];
  if (threadIdx.x == 0) {
    parked[0] = t;
    parked[1] = i;
    parked[2] = (static_cast<int64_t>(s) << 32) | static_cast<uint32_t>(j0);
  }
  // After the wait, from the parked values: this lane's first column, B rows, y, v row.
  auto parked_j = [&]() {
    return static_cast<int>(parked[2] & 0xffffffff) + ((warp >> log2ks) * 32 + lane) * W;
  };
  auto parked_s = [&]() { return static_cast<int>(parked[2] >> 32); };

  // v at rows [k0, k0 + U) (0 past k_end: padded B has no v), the n_split partial sums in
  // a fixed order: lane l loads row k0 + l % U, and each row's value reaches the warp by a
  // shuffle (per-lane v for all U rows took registers that spilled).
  auto load_v = [&](int k0) {
    const float* vrow = p.v + parked[0] * p.v_stride_t + parked_s() * p.v_stride_s;
    const int k = k0 + (lane & (U - 1));
    float a = 0.f;
    if (k < k_end) {
      a = vrow[k];
#pragma unroll 1  // n_split > 1 only in the opt-in "split" variant
      for (int z = 1; z < p.n_split; ++z) a += vrow[z * p.v_stride_split + k];
    }
    return a;
  };
  float acc[W];
#pragma unroll
  for (int e = 0; e < W; ++e) acc[e] = 0.f;
  auto fma_rows = [&](float v_lane) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float bf[W];
      if constexpr (W == 1) {
        bf[0] = Ty::to_float(raw[u]);
      } else {
        Ty::unpack(raw[u], bf);
      }
      const float v_u = __shfl_sync(0xffffffffu, v_lane, u);
#pragma unroll
      for (int e = 0; e < W; ++e) acc[e] = fmaf(v_u, bf[e], acc[e]);
    }
  };

  bgmv_wait_prior_grid();
  __syncthreads();   // parked
  fma_rows(load_v(k_begin));
  // More than U rows per warp (rank > 8 KS: r_max > 64): further steps, loaded after the wait.
#pragma unroll 1
  for (int k0 = k_begin + U; k0 < k_end; k0 += U) {
    const int sl = parked_s();
    load_b(static_cast<const T*>(p.B[sl]) + parked[1] * p.b_stride_l[sl] + (jin ? parked_j() : 0), k0);
    fma_rows(load_v(k0));
  }

  // The KS partial sums of a column group, added in rank-group order by its first warp.
  if (log2ks > 0) {
    __shared__ float red[kBgmvRmWarps][W][32];   // [warp][element][lane]: no bank conflicts
    if (kg != 0) {
#pragma unroll
      for (int e = 0; e < W; ++e) red[warp][e][lane] = acc[e];
    }
    __syncthreads();
    if (kg == 0) {
      for (int m = 1; m < (1 << log2ks); ++m)
#pragma unroll
        for (int e = 0; e < W; ++e) acc[e] += red[warp + m][e][lane];
    }
  }
  if (!storer) return;
  T* yq = static_cast<T*>(p.y) + parked[0] * p.y_stride_t + p.col_off[parked_s()] + parked_j();
  if constexpr (W == 1) {
    *yq = Ty::from_float(fmaf(sc, acc[0], Ty::to_float(yb.raw)));
  } else {
    float ys[W];
    Ty::unpack(yb.raw, ys);
    alignas(16) T out[W];
#pragma unroll
    for (int e = 0; e < W; ++e) out[e] = Ty::from_float(fmaf(sc, acc[e], ys[e]));
    if (y_vec) {
      *reinterpret_cast<uint4*>(yq) = *reinterpret_cast<const uint4*>(out);
    } else {
#pragma unroll
      for (int e = 0; e < W; ++e) yq[e] = out[e];
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host launchers: validate what the kernels rely on, launch, report launch errors.
// Return nullptr on success, else a message saying what is supported.
// ---------------------------------------------------------------------------------------
// PTX version of Kernel's code (e.g. 90), queried once; 0 if the query fails.
template <auto Kernel>
int bgmv_kernel_ptx() {
  static const int ptx_version = [] {
    cudaFuncAttributes fa{};
    if (cudaFuncGetAttributes(&fa, Kernel) == cudaSuccess) return fa.ptxVersion;
    (void)cudaGetLastError();
    return 0;
  }();
  return ptx_version;
}

// Launch Kernel, with PDL when asked (p.pdl) and Kernel's code has the waits: PTX for
// sm_90+, queried once per kernel (on the first call, which runs eagerly before any CUDA
// graph captures it; a failed query means no PDL and leaves no error behind).
template <auto Kernel, typename Params>
cudaError_t bgmv_launch(dim3 grid, int threads, cudaStream_t stream, const Params& p) {
  const int ptx_version = bgmv_kernel_ptx<Kernel>();
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = (p.pdl && ptx_version >= 90) ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, Kernel, p);
}

inline int bgmv_num_sms() {
  int dev = 0, n = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n < 1) {
    (void)cudaGetLastError();
    return 132;
  }
  return n;
}

inline bool bgmv_aligned16(const void* ptr) {
  return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0;
}


// Shared by the shrink and fused launchers: what the shrink blocks rely on.
template <typename T>
const char* bgmv_shrink_check(const BgmvShrinkParams& p) {
  constexpr int VEC = BgmvType<T>::kVec;
  constexpr int64_t es = sizeof(T);
  if (p.T < 0 || p.L < 1 || p.S < 1)
    return "bgmv_shrink: need T >= 0, L >= 1, S >= 1";
  if (p.h_in < 8 || p.h_in % 8 != 0)
    return "bgmv_shrink: h_in must be a positive multiple of 8 (16-byte vector loads)";
  if (p.r_max < 1 || p.r_max > kBgmvMaxRank)
    return "bgmv_shrink: r_max must be in [1, 128]";
  if (!bgmv_aligned16(p.x) || !bgmv_aligned16(p.A) || (p.x_stride_t * es) % 16 ||
      (p.a_stride_s * es) % 16 || (p.a_stride_l * es) % 16 || (p.a_stride_r * es) % 16)
    return "bgmv_shrink: x and A need 16-byte aligned pointers and row strides";
  static_assert(8 % VEC == 0, "h_in % 8 == 0 implies h_in % VEC == 0");
  if (p.n_split < 1 || p.n_split > kBgmvMaxSplit || p.n_split > p.h_in / VEC)
    return "bgmv_shrink: n_split (split-K) must be in [1, min(64, h_in / 16 bytes)]";
  const int row_tiles = (p.r_max + kBgmvShrinkRows - 1) / kBgmvShrinkRows;
  if (static_cast<int64_t>(p.S) * row_tiles > 65535)
    return "bgmv_shrink: S * ceil(r_max / 4) must be <= 65535";
  return nullptr;
}

// log2 of the expand's lanes per B row for a rank: the next power of two of the W-wide
// chunks it spans, at most 32 lanes (the kernel's rule-"rank" loop computes the same).
inline int bgmv_log2_group(int rank, int w) {
  const int lanes = (rank + w - 1) / w;
  int log2g = 0;
  while ((1 << log2g) < lanes && log2g < 5) ++log2g;
  return log2g;
}

// Checks the list's group sizes and fills each group's first row and block for per_token(g)
// blocks per token; returns nullptr, or a message.
template <typename P, typename F>
const char* bgmv_fill_work_blocks(P& p, F per_token) {
  int64_t rows = 0, blocks = 0;
  for (int g = 0; g < kBgmvRankGroups; ++g) {
    if (p.work_rows[g] < 0) return "rank work list: negative group size";
    p.work_row_begin[g] = static_cast<int>(rows);
    p.work_block_begin[g] = static_cast<int>(blocks);
    rows += p.work_rows[g];
    blocks += static_cast<int64_t>(p.work_rows[g]) * per_token(g);
    if (rows > p.T || blocks > 2147483647LL)
      return "rank work list: more rows than tokens, or more than 2^31 - 1 blocks";
  }
  p.work_block_begin[kBgmvRankGroups] = static_cast<int>(blocks);
  return nullptr;
}

// The shrink's: S * ceil(group rank / ROWS) blocks per token, none for group 0 (invalid).
inline const char* bgmv_fill_work(BgmvShrinkParams& p) {
  for (int g = 0; g < kBgmvRankGroups; ++g)
    p.work_tiles[g] = g == 0 ? 0 : (bgmv_group_rank(g, p.r_max) + kBgmvShrinkRows - 1) / kBgmvShrinkRows;
  return bgmv_fill_work_blocks(p, [&](int g) { return p.S * p.work_tiles[g]; });
}

template <typename T>
const char* bgmv_shrink_launch(const BgmvShrinkParams& p, cudaStream_t stream) {
  if (const char* err = bgmv_shrink_check<T>(p)) return err;
  if (p.T == 0) return nullptr;
  if (std::is_same<T, __nv_bfloat16>::value && p.chunks != nullptr &&
      bgmv_kernel_ptx<_bgmv_shrink_mma_kernel>() >= 80) {   // rule "mma" with chunks
    if (p.n_chunks == 0) return nullptr;
    const int tiles = (p.r_max + kBgmvMmaRowsPerWarp - 1) / kBgmvMmaRowsPerWarp;
    const cudaError_t err = bgmv_launch<_bgmv_shrink_mma_kernel>(
        dim3(p.n_chunks, p.S * tiles, p.n_split), kBgmvShrinkThreads, stream, p);
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  }
  const int row_tiles = (p.r_max + kBgmvShrinkRows - 1) / kBgmvShrinkRows;
  dim3 grid(p.T, p.S * row_tiles, p.n_split);
  BgmvShrinkParams q = p;
  // Token list (16-bit types; fp32 keeps the grid x = T): one block per row tile its rank
  // needs (PERF_LOG v41).
  const bool work = sizeof(T) == 2 && p.work != nullptr;
  if (work) {
    if (const char* err = bgmv_fill_work(q)) return err;
    grid = dim3(std::max(q.work_block_begin[kBgmvRankGroups], 1), 1, p.n_split);
  }
  // Small grids take the wide blocks (each walks h_in in half the steps): measured on the
  // H200 (PERF_LOG v31) faster up to 64 blocks (bs 1-16 at r 16: 0.3-0.45 us), slower
  // from 256 (bs 64: 5.99 -> 7.31 us, the wide blocks crowd out the expand's early ones).
  const int64_t blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  const bool wide = blocks <= kBgmvShrinkWideMaxBlocks;
  constexpr int kN = kBgmvShrinkThreads, kW = kBgmvShrinkWideThreads;
  constexpr bool k16 = sizeof(T) == 2;   // the list's instances: 16-bit types only
  cudaError_t err;
  if (work) {
    err = wide ? bgmv_launch<_bgmv_shrink_kernel<T, kW, k16>>(grid, kW, stream, q)
               : bgmv_launch<_bgmv_shrink_kernel<T, kN, k16>>(grid, kN, stream, q);
  } else {
    err = wide ? bgmv_launch<_bgmv_shrink_kernel<T, kW>>(grid, kW, stream, q)
               : bgmv_launch<_bgmv_shrink_kernel<T, kN>>(grid, kN, stream, q);
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Fills tile_begin for tiles of `tile` output columns; returns the total tile count.
inline int bgmv_fill_tiles_of(BgmvExpandParams& p, int tile) {
  p.tile_begin[0] = 0;
  for (int s = 0; s < p.S; ++s) p.tile_begin[s + 1] = p.tile_begin[s] + (p.h_out[s] + tile - 1) / tile;
  for (int s = p.S; s < kBgmvMaxSlices; ++s) p.tile_begin[s + 1] = p.tile_begin[s];
  return p.tile_begin[p.S];
}

// The same for J = outs output columns per lane of the FMA expand.
inline int bgmv_fill_tiles(BgmvExpandParams& p, int outs) {
  return bgmv_fill_tiles_of(p, (kBgmvExpandThreads / 32) * (32 >> p.log2_group) * outs);
}

// The checks every expand launcher makes.
inline const char* bgmv_expand_check(const BgmvExpandParams& p) {
  if (p.T < 0 || p.L < 1) return "bgmv_expand: need T >= 0, L >= 1";
  if (p.S < 1 || p.S > kBgmvMaxSlices) return "bgmv_expand: S (output slices) must be 1, 2 or 3";
  if (p.r_max < 1 || p.r_max > kBgmvMaxRank) return "bgmv_expand: r_max must be in [1, 128]";
  if (p.n_split < 1 || p.n_split > kBgmvMaxSplit)
    return "bgmv_expand: n_split (partial sums of v) must be in [1, 64]";
  if (p.tile_rule < kBgmvTileRuleClassic || p.tile_rule > kBgmvTileRuleMma)
    return "bgmv_expand: tile_rule must be 0 (classic), 1 (residency), 2 (rank) or 3 (mma)";
  for (int s = 0; s < p.S; ++s)
    if (p.h_out[s] < 1) return "bgmv_expand: every h_out_s must be >= 1";
  return nullptr;
}

// Shared by the row-layout expand and fused launchers: checks, then fills log2_group and
// tile_begin (for J = kBgmvExpandOuts); *vec tells whether B rows take 16-byte loads.
template <typename T>
const char* bgmv_expand_prepare(BgmvExpandParams& p, bool* vec_out) {
  constexpr int VEC = BgmvType<T>::kVec;
  constexpr int64_t es = sizeof(T);
  if (const char* err = bgmv_expand_check(p)) return err;
  if (p.b_rank_major) return "bgmv_expand: this path needs B with unit stride along r_max";
  // 16-byte loads along the rank when every B_s row is 16-byte aligned, else one element.
  bool vec = true;
  for (int s = 0; s < p.S; ++s) {
    vec = vec && bgmv_aligned16(p.B[s]) && (p.b_stride_l[s] * es) % 16 == 0 &&
          (p.b_stride_o[s] * es) % 16 == 0 && p.r_max % VEC == 0;
  }
  p.log2_group = bgmv_log2_group(p.r_max, vec ? VEC : 1);   // G for r_max
  p.v_vec = bgmv_aligned16(p.v) && p.v_stride_t % 4 == 0 && p.v_stride_s % 4 == 0 &&
            (p.n_split == 1 || p.v_stride_split % 4 == 0);
  if (bgmv_fill_tiles(p, kBgmvExpandOuts) > 65535) return "bgmv_expand: too many output tiles (sum h_out_s / tile > 65535)";
  *vec_out = vec;
  return nullptr;
}

// An expand's token list: group g's tiles of tile_of(g) output columns per slice.
template <typename F>
inline const char* bgmv_fill_work_tiles(BgmvExpandParams& p, F tile_of) {
  for (int g = 0; g < kBgmvRankGroups; ++g) {
    const int tile = tile_of(g);
    int* sb = p.work_slice_begin[g];
    sb[0] = 0;
    for (int s = 0; s < p.S; ++s) sb[s + 1] = sb[s] + (p.h_out[s] + tile - 1) / tile;
    for (int s = p.S; s < kBgmvMaxSlices; ++s) sb[s + 1] = sb[s];
  }
  return bgmv_fill_work_blocks(p, [&](int g) { return p.work_slice_begin[g][p.S]; });
}

// The rank-tile expand's: 4 warps x (32 / G) lane groups x J outputs with G lanes per B row
// for group g's rank (group 0: r_max's, p.log2_group).
inline const char* bgmv_fill_work(BgmvExpandParams& p, int vec, int outs) {
  return bgmv_fill_work_tiles(p, [&](int g) {
    const int log2g = bgmv_log2_group(bgmv_group_rank(g, p.r_max), vec);  // any rank of g's
    return (kBgmvExpandThreads / 32) * (32 >> log2g) * outs;
  });
}

// Rank-major B (_bgmv_expand_rm_kernel): 16-byte loads along h_out when every B_s and its
// rank rows are 16-byte aligned and W divides every h_out_s (no vector straddles a slice's
// end), else one element; y in 16-byte vectors when also aligned.
template <typename T>
const char* bgmv_expand_rm_launch(BgmvExpandParams p, cudaStream_t stream) {
  constexpr int VEC = BgmvType<T>::kVec;
  constexpr int64_t es = sizeof(T);
  bool vec = true;
  for (int s = 0; s < p.S; ++s)
    vec = vec && bgmv_aligned16(p.B[s]) && (p.b_stride_l[s] * es) % 16 == 0 &&
          (p.b_stride_r[s] * es) % 16 == 0 && p.h_out[s] % VEC == 0;
  const int w = vec ? VEC : 1;
  p.y_vec = vec && bgmv_aligned16(p.y) && p.y_stride_t % VEC == 0;
  for (int s = 0; s < p.S; ++s) p.y_vec = p.y_vec && p.col_off[s] % VEC == 0;
  auto tile_of_rank = [&](int rank) { return 32 * w * (kBgmvRmWarps >> bgmv_rm_log2_ks(rank)); };
  if (bgmv_fill_tiles_of(p, tile_of_rank(p.r_max)) > 65535)
    return "bgmv_expand: too many output tiles (sum h_out_s / tile > 65535)";
  if (p.T == 0) return nullptr;
  dim3 grid(p.T, p.tile_begin[p.S]);
  const bool work = p.work != nullptr;
  if (work) {   // the token list: one block per tile its rank needs
    if (const char* e = bgmv_fill_work_tiles(
            p, [&](int g) { return tile_of_rank(bgmv_group_rank(g, p.r_max)); }))
      return e;
    grid = dim3(std::max(p.work_block_begin[kBgmvRankGroups], 1));
  }
  constexpr int kT = kBgmvRmThreads;
  cudaError_t err;
  if (vec) {
    err = work ? bgmv_launch<_bgmv_expand_rm_kernel<T, VEC, true>>(grid, kT, stream, p)
               : bgmv_launch<_bgmv_expand_rm_kernel<T, VEC, false>>(grid, kT, stream, p);
  } else {
    err = work ? bgmv_launch<_bgmv_expand_rm_kernel<T, 1, true>>(grid, kT, stream, p)
               : bgmv_launch<_bgmv_expand_rm_kernel<T, 1, false>>(grid, kT, stream, p);
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Outputs per lane J of a two-launch expand by p.tile_rule (see kBgmvExpandSmallGrid and
// kBgmvExpandMaxBlocks), filling tile_begin for it; after bgmv_expand_prepare, so the J = 4
// tiles fit grid.y (any larger J has fewer tiles, a smaller one is taken only when its
// tiles fit).  vec: 16-byte B loads, the only path with a J = 8 kernel.
inline int bgmv_expand_outs(BgmvExpandParams& p, bool vec) {
  const int64_t T = p.T;
  if (p.tile_rule == kBgmvTileRuleResidency || p.tile_rule == kBgmvTileRuleRank) {
    constexpr int kOuts[] = {1, kBgmvExpandOuts, kBgmvExpandOutsMax};
    const int n = vec ? 3 : 2;
    for (int k = 0; k < n; ++k) {
      const int64_t blocks = T * bgmv_fill_tiles(p, kOuts[k]);
      if (blocks <= kBgmvExpandMaxBlocks || k == n - 1) return kOuts[k];
    }
  }
  // Rule 0: a small grid takes one output per lane, 4x the blocks (if they fit grid.y).
  if (T * bgmv_fill_tiles(p, kBgmvExpandOuts) < kBgmvExpandSmallGrid &&
      bgmv_fill_tiles(p, 1) <= 65535)
    return 1;
  bgmv_fill_tiles(p, kBgmvExpandOuts);
  return kBgmvExpandOuts;
}

// Rule "mma": bf16 with 16-byte B loads on sm_80+ code; anything else runs as rule "rank".
// KB = 32-wide rank blocks of r_max; NT (16-row tiles per warp, <= 4 / KB: 32 registers of
// B fragments) as rule "residency" sizes J: the smallest whose grid has at most
// kBgmvExpandMaxBlocks blocks, else the largest.
// Rule "mma"'s tiles per warp MT: the smallest MT <= kBgmvMmaMaxTiles whose grid (chunks x
// tiles) fits one wave of per_sm blocks per SM, else the largest: every
// block resident at once (a partial second wave idles most SMs), as many warps as fit
// streaming B.  Any integer: powers of two left the distinct point's wave 65% full
// (512 of 792 blocks; PERF_LOG v19).
inline int bgmv_mma_pick_tiles(BgmvExpandParams& p, int num_sms, int per_sm) {
  const int64_t rows = p.chunks ? p.n_chunks : p.T;      // grid.x: chunks, or tokens
  int mt = 1;
  while (mt < kBgmvMmaMaxTiles &&
         rows * bgmv_fill_tiles_of(p, (kBgmvExpandThreads / 32) * kBgmvMmaRowsPerWarp * mt) >
             static_cast<int64_t>(per_sm) * num_sms)
    ++mt;
  bgmv_fill_tiles_of(p, (kBgmvExpandThreads / 32) * kBgmvMmaRowsPerWarp * mt);
  return mt;
}

template <int KB>
const char* bgmv_expand_mma_run(BgmvExpandParams& p, cudaStream_t stream) {
  // The wave: the kernel's own occupancy (its registers and shared memory on this GPU; on
  // the H200 7 blocks / SM for KB = 2, 72 registers, where the launch bounds promise 6),
  // queried once.
  static const int per_sm = [] {
    int n = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, _bgmv_expand_mma_kernel<KB>,
                                                      kBgmvExpandThreads, 0) != cudaSuccess || n < 1) {
      (void)cudaGetLastError();
      return KB == 4 ? 4 : kBgmvMmaMinBlocksPerSM;
    }
    return n;
  }();
  p.mma_tiles = bgmv_mma_pick_tiles(p, bgmv_num_sms(), per_sm);
  // y in 16-byte vectors (8 bf16): aligned base, row stride and slice offsets, whole
  // vectors in every slice.
  p.y_vec = bgmv_aligned16(p.y) && p.y_stride_t % 8 == 0;
  for (int s = 0; s < p.S; ++s) p.y_vec = p.y_vec && p.col_off[s] % 8 == 0 && p.h_out[s] % 8 == 0;
  const dim3 grid(static_cast<unsigned>(p.chunks ? p.n_chunks : p.T), p.tile_begin[p.S]);
  const cudaError_t err = bgmv_launch<_bgmv_expand_mma_kernel<KB>>(grid, kBgmvExpandThreads, stream, p);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* bgmv_expand_mma_launch(BgmvExpandParams& p, bool vec, cudaStream_t stream,
                                   bool* launched) {
  *launched = false;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    if (!vec || bgmv_kernel_ptx<_bgmv_expand_mma_kernel<1>>() < 80) return nullptr;
    *launched = true;
    if (p.r_max <= 32) return bgmv_expand_mma_run<1>(p, stream);
    if (p.r_max <= 64) return bgmv_expand_mma_run<2>(p, stream);
    return bgmv_expand_mma_run<4>(p, stream);
  }
  return nullptr;
}

template <typename T>
const char* bgmv_expand_launch(BgmvExpandParams p, cudaStream_t stream) {
  constexpr int VEC = BgmvType<T>::kVec;
  if (p.b_rank_major) {   // one kernel for every tile rule
    if (const char* err = bgmv_expand_check(p)) return err;
    return bgmv_expand_rm_launch<T>(p, stream);
  }
  bool vec = false;
  if (const char* err = bgmv_expand_prepare<T>(p, &vec)) return err;
  if (p.T == 0) return nullptr;
  if (p.tile_rule == kBgmvTileRuleMma) {
    bool launched = false;
    const char* err = bgmv_expand_mma_launch<T>(p, vec, stream, &launched);
    if (launched || err) return err;
    p.tile_rule = kBgmvTileRuleRank;
  }
  const int outs = bgmv_expand_outs(p, vec);
  dim3 grid(p.T, p.tile_begin[p.S]);
  constexpr int kJ = kBgmvExpandOuts, kN = kBgmvMaxRank / 32;  // 1-element loads: NCHUNK
  const int threads = kBgmvExpandThreads;
  cudaError_t err;
  constexpr bool k16 = sizeof(T) == 2;   // the list's instances: 16-bit types only
  constexpr int kJm = kBgmvExpandOutsMax;
  if (vec && p.tile_rule == kBgmvTileRuleRank && k16 && p.work != nullptr) {
    // Token list: one block per tile its rank's lanes need (PERF_LOG v41).
    if (const char* e = bgmv_fill_work(p, VEC, outs)) return e;
    grid = dim3(std::max(p.work_block_begin[kBgmvRankGroups], 1));
    err = outs == 1  ? bgmv_launch<_bgmv_expand_kernel<T, VEC, 1, 1, true, k16>>(grid, threads, stream, p)
        : outs == kJ ? bgmv_launch<_bgmv_expand_kernel<T, VEC, 1, kJ, true, k16>>(grid, threads, stream, p)
                     : bgmv_launch<_bgmv_expand_kernel<T, VEC, 1, kJm, true, k16>>(grid, threads, stream, p);
  } else if (vec && p.tile_rule == kBgmvTileRuleRank) {
    err = outs == 1  ? bgmv_launch<_bgmv_expand_kernel<T, VEC, 1, 1, true>>(grid, threads, stream, p)
        : outs == kJ ? bgmv_launch<_bgmv_expand_kernel<T, VEC, 1, kJ, true>>(grid, threads, stream, p)
                     : bgmv_launch<_bgmv_expand_kernel<T, VEC, 1, kJm, true>>(grid, threads, stream, p);
  } else if (vec) {
    err = outs == 1    ? bgmv_launch<_bgmv_expand_kernel<T, VEC, 1, 1>>(grid, threads, stream, p)
        : outs == kJ   ? bgmv_launch<_bgmv_expand_kernel<T, VEC, 1, kJ>>(grid, threads, stream, p)
                       : bgmv_launch<_bgmv_expand_kernel<T, VEC, 1, kBgmvExpandOutsMax>>(
                             grid, threads, stream, p);
  } else {
    err = outs == 1 ? bgmv_launch<_bgmv_expand_kernel<T, 1, kN, 1>>(grid, threads, stream, p)
                    : bgmv_launch<_bgmv_expand_kernel<T, 1, kN, kJ>>(grid, threads, stream, p);
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* bgmv_fused_launch(BgmvFusedParams p, cudaStream_t stream) {
  constexpr int VEC = BgmvType<T>::kVec;
  if (const char* err = bgmv_shrink_check<T>(p.s)) return err;
  bool vec = false;
  if (const char* err = bgmv_expand_prepare<T>(p.e, &vec)) return err;
  if (p.s.T != p.e.T || p.s.S != p.e.S || p.s.r_max != p.e.r_max || p.s.n_split != p.e.n_split ||
      p.s.v != p.e.v || p.counters == nullptr)
    return "bgmv_fused: shrink and expand halves disagree (T, S, r_max, n_split, v) or no counters";
  if (p.s.T == 0) return nullptr;
  const int row_tiles = (p.s.r_max + kBgmvShrinkRows - 1) / kBgmvShrinkRows;
  const int64_t blocks = static_cast<int64_t>(p.s.T) *
                         (static_cast<int64_t>(p.s.S) * row_tiles * p.s.n_split + p.e.tile_begin[p.e.S]);
  if (blocks > 2147483647LL) return "bgmv_fused: too many blocks (use the two-launch path)";
  if (vec) {
    _bgmv_fused_kernel<T, VEC, 1><<<static_cast<unsigned>(blocks), kBgmvExpandThreads, 0, stream>>>(p);
  } else {
    _bgmv_fused_kernel<T, 1, kBgmvMaxRank / 32><<<static_cast<unsigned>(blocks), kBgmvExpandThreads, 0,
                                                  stream>>>(p);
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}
