// bgmv_params.h -- host interface of the BGMV kernels: limits, parameter blocks, dispatch.
//
// Plain C++ with no torch and no device code (only <cuda_runtime_api.h>, for cudaStream_t),
// so both compilers include it: nvcc through bgmv_kernel.cuh in bgmv.cu, which defines the
// two dispatch functions below, and the host compiler in bgmv_ext.cpp, the torch binding
// that checks the tensors, fills these structs and calls them.  Keeping the binding out of
// nvcc keeps every torch header and every C++ exception (TORCH_CHECK) in host-compiled
// code, the usual layout of torch CUDA extensions.
// Shapes, layouts and what is supported: see bgmv_kernel.cuh.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

constexpr int kBgmvMaxRank = 128;     // r_max limit (MAX_RANK in bgmv_cuda.py)
constexpr int kBgmvMaxSlices = 3;     // output slices S (MAX_SLICES in bgmv_cuda.py)
constexpr int kBgmvMaxSplit = 64;     // split-K chunks of h_in (MAX_SPLIT in bgmv_cuda.py)
constexpr int kBgmvChunkTokens = 8;   // tokens per chunk of rule "mma" (CHUNK_TOKENS in bgmv_cuda.py)
// A chunk row: its kBgmvChunkTokens tokens (-1 padded), then the adapter id they share, so
// a kernel reads the adapter with the tokens instead of after them (PERF_LOG v26).
constexpr int kBgmvChunkStride = kBgmvChunkTokens + 1;
// Rule "rank"'s token list (`work`, PERF_LOG v41; multilora_impl.build_rank_work): rows
// (token, adapter, rank) of the tokens with a LoRA (idx != -1, rank != 0), in
// kBgmvRankGroups groups: group 0 the tokens whose index or rank is invalid (rank -1),
// group g >= 1 the ranks r with next_pow2(r) == 256 >> g (128, 64, ..., 1; ranks above 128
// in group 1).  Every rank of a group shares its blocks' shape (the lane groups of the
// expand, the row tiles of the shrink are those of its group rank min(256 >> g, r_max)).
constexpr int kBgmvRankGroups = 9;
constexpr int kBgmvWorkStride = 3;
// Expand tile rules, BgmvExpandParams::tile_rule (EXPAND_TILE_RULES in bgmv_cuda.py):
// "classic" (J = 1 for small grids, else 4), "residency" (J sized so the grid fits;
// bgmv_kernel.cuh, kBgmvExpandMaxBlocks), "rank" (residency's J, and each token's lanes
// per B row from its adapter's rank instead of r_max: mixed ranks; with 16-byte B loads
// only, 1-element loads run as residency), or "mma" (PERF_LOG v16-v22: the expand on the
// tensor cores, bf16, 16-byte B loads, sm_80+, anything else runs as "rank"; v split in
// three bf16 parts, fp32-exact; with `chunks`, per chunk of tokens of one adapter).
// (Rules "pairs", PERF_LOG v15, and "mma_il", v23, measured no faster, were removed.)
constexpr int kBgmvTileRuleClassic = 0;
constexpr int kBgmvTileRuleResidency = 1;
constexpr int kBgmvTileRuleRank = 2;
constexpr int kBgmvTileRuleMma = 3;

// Storage dtypes a dispatcher can name (bgmv.cu maps them to half / __nv_bfloat16 / float).
enum class BgmvDtype : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };

// ---------------------------------------------------------------------------------------
// Parameter blocks (passed by value to the kernels).  Strides are in elements; a dimension
// of size 1 may carry stride 0 (its stride is never used).
// ---------------------------------------------------------------------------------------
struct BgmvShrinkParams {
  const void* x;          // [T, h_in]
  const void* A;          // [S, L, r_max, h_in]
  const void* idx;        // [T] int32 / int64
  const void* ranks;      // [L] int32 / int64, or nullptr
  float* v;               // [n_split, T, S, r_max] fp32 (only rows < ranks[idx[t]] written)
  int64_t x_stride_t;
  int64_t a_stride_s, a_stride_l, a_stride_r;
  int64_t v_stride_t, v_stride_s;
  int T, h_in, r_max, L, S;
  int idx_is_64, ranks_is_64;
  // Split-K over h_in: n_split partial sums, one per chunk of h_in, stored at
  // v + c * v_stride_split (c < n_split); the expand adds them in a fixed order
  // (deterministic).  n_split = 1: v itself, the plain shrink.
  int n_split = 1;
  int64_t v_stride_split = 0;
  int pdl = 0;            // host only: launch with programmatic dependent launch (sm_90+)
  // Rule "mma" (bgmv_kernel.cuh): tokens grouped by adapter, [n_chunks, 9] int32 (8 tokens,
  // -1 padded, then their adapter id; nullptr: no grouping); with chunks the shrink runs on
  // the tensor cores (bf16 only).
  const int* chunks = nullptr;
  int n_chunks = 0;
  // Rule "rank" with a token list (nullptr: the grid x = T): work [n, 3] int32 as
  // kBgmvRankGroups says, work_rows[g] rows in group g; the launcher fills the rest and
  // launches a 1-D grid of the blocks those ranks need (group by group; within a group
  // tile by tile, the group's tokens side by side, as in the grid x = T).
  const int* work = nullptr;
  int work_rows[kBgmvRankGroups] = {};
  int work_block_begin[kBgmvRankGroups + 1];   // group g's first block; [G]: all blocks
  int work_row_begin[kBgmvRankGroups];         // group g's first row of work
  int work_tiles[kBgmvRankGroups];             // group g: rank-row tiles per slice
};

struct BgmvExpandParams {
  void* y;                                  // [T, sum h_out_s]
  const float* v;                           // [T, S, r_max] fp32
  const void* B[kBgmvMaxSlices];            // B_s [L, h_out_s, r_max]
  const void* idx;                          // [T] int32 / int64
  const void* ranks;                        // [L] int32 / int64, or nullptr
  const float* scale;                       // [L] fp32
  int64_t y_stride_t;
  int64_t v_stride_t, v_stride_s;
  int64_t b_stride_l[kBgmvMaxSlices], b_stride_o[kBgmvMaxSlices];
  int h_out[kBgmvMaxSlices];
  int col_off[kBgmvMaxSlices];              // first column of slice s in y
  int T, r_max, L, S;
  int idx_is_64, ranks_is_64;
  int n_split = 1;                          // partial sums of v to add (see BgmvShrinkParams)
  int64_t v_stride_split = 0;
  int pdl = 0;                              // host only: launch with PDL (sm_90+)
  // Filled by bgmv_expand_launch: lanes per B row, and each slice's first tile.
  int log2_group;
  int tile_begin[kBgmvMaxSlices + 1];
  // Host only, last so the fields the kernels read keep their offsets (and their code):
  // outputs-per-lane rule of the two-launch expand (rule "rank" also picks the kernel
  // instance that sizes lane groups per token); the fused kernel ignores it.
  int tile_rule = kBgmvTileRuleResidency;
  // Rule "mma" only: tokens grouped by adapter, as in BgmvShrinkParams (nullptr: one chunk
  // per token), and 16-row tiles per warp (filled by the launcher).
  const int* chunks = nullptr;
  int n_chunks = 0;
  int mma_tiles = 1;
  int y_vec = 0;    // rule "mma": y staged in 16-byte vectors (filled by the launcher)
  int v_vec = 0;    // FMA expand: v read in 16-byte vectors (filled by bgmv_expand_prepare)
  // Rule "rank" with a token list, as in BgmvShrinkParams (16-byte B loads; other paths
  // ignore it).  work_slice_begin[g][s]: a group-g token's first block of slice s among its
  // work_slice_begin[g][S] blocks (tiles of its group's lane groups).
  const int* work = nullptr;
  int work_rows[kBgmvRankGroups] = {};
  int work_block_begin[kBgmvRankGroups + 1];
  int work_row_begin[kBgmvRankGroups];
  int work_slice_begin[kBgmvRankGroups][kBgmvMaxSlices + 1];
  // Rank-major B (PERF_LOG v45; bgmv_kernel.cuh, _bgmv_expand_rm_kernel): B_s stored
  // [L, r_max, h_out_s], unit stride along h_out (b_stride_o unused), b_stride_r[s]
  // between rank rows.  0: the row layout above (unit stride along r_max).
  int b_rank_major = 0;
  int64_t b_stride_r[kBgmvMaxSlices] = {};
};

// Fused single launch: the split-K shrink blocks, then the expand blocks of the same grid.
// counters [2 T] int32 must be zero before the launch and are left zero after it (the last
// expand block of each token resets them), so one zeroed buffer serves every call made
// in stream order (not two concurrent calls).
struct BgmvFusedParams {
  BgmvShrinkParams s;     // s.v == e.v, s.n_split == e.n_split
  BgmvExpandParams e;
  int* counters;          // [0, T): shrink blocks done per token; [T, 2T): expand blocks done
};

// ---------------------------------------------------------------------------------------
// Defined in bgmv.cu: launch on `stream` for dtype dt.  Return "" on success, else a
// message listing what is supported and the sizes received (nothing is launched then);
// no exception crosses this boundary.
// ---------------------------------------------------------------------------------------
std::string bgmv_shrink_dispatch(BgmvDtype dt, const BgmvShrinkParams& p, cudaStream_t stream);
std::string bgmv_expand_dispatch(BgmvDtype dt, const BgmvExpandParams& p, cudaStream_t stream);
std::string bgmv_fused_dispatch(BgmvDtype dt, const BgmvFusedParams& p, cudaStream_t stream);
