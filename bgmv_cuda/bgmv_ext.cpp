// bgmv_ext.cpp -- torch binding of the BGMV kernels: input checks and launch functions.
//
// Python functions of the module (bgmv_cuda.py wraps each in a torch custom op of the same
// name, multilora::bgmv_cuda_*, with its fake impl; CUDA tensors only):
//   shrink(x, A, idx, ranks, v, pdl, chunks, work, work_rows) -> str   (chunks: rule "mma"'s
//       tokens grouped by adapter, bf16 on the tensor cores; work: rule "rank"'s token list,
//       grids of only the blocks the ranks need, see check_work)
//       v[t, s, :r] = x[t] @ A[s, idx[t], :r].T   (fp32; A [L, r_max, h_in] or
//       [S, L, r_max, h_in]; v [T, S, r_max] fp32; rows past r = ranks[idx[t]] untouched)
//   expand(y, v, B, idx, scale, ranks, pdl, tile_rule, chunks, work, work_rows) -> str
//       y[t, off_s:off_s + h_out_s] += scale[i] * v[t, s, :r] @ B[s][i, :, :r].T
//       tile_rule: outputs per lane, 0 = classic, 1 = residency (bgmv_kernel.cuh,
//       kBgmvExpandMaxBlocks), 2 = rank (residency, lanes per row from each token's rank);
//       the same values every way, only the grid and the tiles differ; 3 = mma (tensor
//       cores, bf16; the same values up to the order of the fp32 sum)
//   v may also be [n_split, T, S, r_max]: split-K partial sums (shrink writes, expand adds)
//   fused(y, x, A, B, idx, scale, ranks, v, counters) -> str
//       both in one launch (v [n_split, T, S, r_max] workspace, counters int32 [2T] zeroed)
//   pdl: launch with programmatic dependent launch (sm_90+; see bgmv_kernel.cuh).
// Each returns "" after launching, or a message naming the tensor and what it got, and then
// launches nothing; the Python op raises ValueError with it.  No C++ exception is thrown:
// on the H200 image (torch 2.11 + g++ 13.3) an exception thrown from an extension op
// (TORCH_CHECK with a built message, TORCH_CHECK_VALUE) ended the process with SIGSEGV,
// so errors travel as return values instead, built without any std::ostream (bgmv_str).
// A host-compiler (g++) translation unit: every torch header lives here, none in
// nvcc-compiled code; it sees the kernels only through the torch-free bgmv_params.h.
// bgmv_cuda.py runs the same checks in Python before calling the ops, so these are the
// defence for direct op calls.  Kernels run on the current torch stream of the inputs'
// device.  No host synchronisation: idx / ranks values are checked in the kernels.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <cstdint>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>

#include "bgmv_params.h"

// Error messages are concatenated std::strings (bgmv_str below), never streamed: on the
// H200 image (torch 2.11 + g++ 13.3) any std::ostream formatting in this extension
// (c10::str, which TORCH_CHECK uses to build its message) ended the process with SIGSEGV,
// with or without an exception; a literal message or std::runtime_error("...") did not.
namespace {
inline std::string bgmv_piece(const char* s) { return s; }
inline std::string bgmv_piece(const std::string& s) { return s; }
inline std::string bgmv_piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string bgmv_piece(const c10::Device& d) { return d.str(); }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
std::string bgmv_piece(T v) { return std::to_string(v); }
template <typename... Args>
std::string bgmv_str(const Args&... args) {
  std::string s;
  ((s += bgmv_piece(args)), ...);
  return s;
}
}  // namespace

// Return the message from the enclosing function when cond is false.
#define BGMV_CHECK(cond, ...)                                            \
  do {                                                                   \
    if (C10_UNLIKELY(!(cond))) return bgmv_str(__VA_ARGS__);             \
  } while (0)

// Return from the enclosing function with the message of a failed sub-check.
#define BGMV_TRY(expr)                                                   \
  do {                                                                   \
    std::string bgmv_err = (expr);                                       \
    if (!bgmv_err.empty()) return bgmv_err;                              \
  } while (0)

namespace {

// Sizes / strides as "[a, b, c]", built with std::to_string (no stream; see bgmv_str).
std::string dims_str(c10::IntArrayRef d) {
  std::string s = "[";
  for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
  return s + "]";
}

std::string to_bgmv_dtype(const char* op, const char* name, const at::Tensor& t, BgmvDtype* dt) {
  switch (t.scalar_type()) {
    case at::kHalf: *dt = BgmvDtype::kFloat16; return {};
    case at::kBFloat16: *dt = BgmvDtype::kBFloat16; return {};
    case at::kFloat: *dt = BgmvDtype::kFloat32; return {};
    default: break;
  }
  return bgmv_str(op, ": ", name, ": expected dtype float16, bfloat16 or float32, got ",
                  t.scalar_type());
}

std::string check_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  BGMV_CHECK(t.is_cuda(), op, ": ", name, ": expected a CUDA tensor, got device ",
                    t.device());
  BGMV_CHECK(t.device() == ref.device(), op, ": ", name, ": expected device ",
                    ref.device(), " (same as the first tensor), got ", t.device());
  return {};
}

// Stride in elements, or 0 where the dimension has one entry (its stride is never used,
// so a size-1 view with an odd stride does not fail the alignment check).
int64_t used_stride(const at::Tensor& t, int64_t d) { return t.size(d) == 1 ? 0 : t.stride(d); }

// 16-byte vector loads need a 16-byte aligned base and row strides.
std::string check_aligned16(const char* op, const char* name, const at::Tensor& t) {
  const int64_t es = t.element_size();
  bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (used_stride(t, d) * es) % 16 == 0;
  BGMV_CHECK(ok, op, ": ", name, ": 16-byte vector loads need a 16-byte aligned data_ptr "
                    "and row strides that are multiples of 16 bytes; got data_ptr % 16 = ",
                    reinterpret_cast<uintptr_t>(t.data_ptr()) % 16, ", strides ", dims_str(t.strides()),
                    " (elements of ", es, " bytes), sizes ", dims_str(t.sizes()),
                    ": pass a .contiguous() tensor that starts at its storage");
  return {};
}

std::string check_index(const char* op, const char* name, const at::Tensor& t, int64_t n,
                 const at::Tensor& ref) {
  BGMV_TRY(check_device(op, name, t, ref));
  BGMV_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
                    ": expected dtype int32 or int64, got ", t.scalar_type());
  BGMV_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, ": expected shape [", n,
                    "], got ", dims_str(t.sizes()));
  BGMV_CHECK(n <= 1 || t.stride(0) == 1, op, ": ", name,
                    ": expected a contiguous tensor, got strides ", dims_str(t.strides()));
  return {};
}

constexpr int64_t kIntMax = std::numeric_limits<int>::max();

}  // namespace

// chunks (rule "mma"): int32 [n_chunks, 9] on x's device, contiguous: 8 tokens (-1 padded)
// sharing one idx value, then that value; every token with idx != -1 is in one chunk (not
// checked here: bgmv_cuda.py builds and, with MULTILORA_CHECK=1, checks them).
static std::string check_chunks(const char* op, const std::optional<at::Tensor>& chunks,
                                const at::Tensor& like, const int** ptr, int* n) {
  *ptr = nullptr;
  *n = 0;
  if (!chunks.has_value()) return {};
  BGMV_TRY(check_device(op, "chunks", *chunks, like));
  BGMV_CHECK(chunks->scalar_type() == at::kInt && chunks->dim() == 2 &&
                 chunks->size(1) == kBgmvChunkStride && chunks->is_contiguous() &&
                 chunks->size(0) <= kIntMax, op,
             ": chunks: expected a contiguous int32 [n_chunks, ", kBgmvChunkStride,
             "] (8 tokens, then their adapter), got ",
             chunks->scalar_type(), " sizes ", dims_str(chunks->sizes()));
  *ptr = chunks->data_ptr<int>();
  *n = static_cast<int>(chunks->size(0));
  return {};
}

// work (rule "rank"'s token list, PERF_LOG v41): int32 [n, 3] on x's device, contiguous,
// rows (token, adapter, rank) in the groups of bgmv_params.h (kBgmvRankGroups), with
// work_rows the rows per group (n in all, at most T).  Which tokens the rows name is not
// checked here (multilora_impl.build_rank_work builds them; MULTILORA_CHECK=1 checks them):
// a row's token outside [0, T) writes nothing, an adapter or rank out of range turns its
// output row into NaN, as idx and ranks do.
static std::string check_work(const char* op, const std::optional<at::Tensor>& work,
                              c10::IntArrayRef work_rows, int64_t T, const at::Tensor& like,
                              const int** ptr, int* rows) {
  *ptr = nullptr;
  if (!work.has_value()) return {};
  BGMV_TRY(check_device(op, "work", *work, like));
  BGMV_CHECK(work->scalar_type() == at::kInt && work->dim() == 2 &&
                 work->size(1) == kBgmvWorkStride && work->is_contiguous() && work->size(0) <= T,
             op, ": work: expected a contiguous int32 [n <= T = ", T, ", ", kBgmvWorkStride,
             "] (token, adapter, rank), got ", work->scalar_type(), " sizes ",
             dims_str(work->sizes()));
  BGMV_CHECK(static_cast<int64_t>(work_rows.size()) == kBgmvRankGroups, op,
             ": work_rows: expected ", kBgmvRankGroups, " group sizes, got ", work_rows.size());
  int64_t n = 0;
  for (int g = 0; g < kBgmvRankGroups; ++g) {
    BGMV_CHECK(work_rows[g] >= 0, op, ": work_rows: expected sizes >= 0, got ", dims_str(work_rows));
    n += work_rows[g];
    rows[g] = static_cast<int>(work_rows[g]);
  }
  BGMV_CHECK(n == work->size(0), op, ": work_rows: expected sizes that add up to work's ",
             work->size(0), " rows, got ", dims_str(work_rows));
  *ptr = work->data_ptr<int>();
  return {};
}

// Checks the shrink's tensors and fills *out; launches unless out_only.
static std::string shrink_impl(const at::Tensor& x, const at::Tensor& A, const at::Tensor& idx,
                        const std::optional<at::Tensor>& ranks, at::Tensor& v,
                        bool pdl, const std::optional<at::Tensor>& chunks,
                        const std::optional<at::Tensor>& work, c10::IntArrayRef work_rows,
                        BgmvShrinkParams* out, const char* op) {
  BGMV_CHECK(x.is_cuda(), op, ": x: expected a CUDA tensor, got device ", x.device());
  BgmvDtype dt;
  BGMV_TRY(to_bgmv_dtype(op, "x", x, &dt));
  BGMV_CHECK(x.dim() == 2, op, ": x: expected [T, h_in], got sizes ", dims_str(x.sizes()));
  const int64_t T = x.size(0), h_in = x.size(1);
  BGMV_CHECK(T <= kIntMax, op, ": x: T = ", T, " tokens, at most ", kIntMax);
  BGMV_CHECK(h_in >= 8 && h_in % 8 == 0 && h_in <= kIntMax, op,
                    ": x: h_in must be a positive multiple of 8 (16-byte vector loads), got ",
                    "sizes ", dims_str(x.sizes()));
  BGMV_CHECK(x.stride(1) == 1, op, ": x: expected unit stride along h_in, got strides ",
                    dims_str(x.strides()));
  BGMV_TRY(check_aligned16(op, "x", x));

  BGMV_TRY(check_device(op, "A", A, x));
  BGMV_CHECK(A.scalar_type() == x.scalar_type(), op, ": A: expected dtype ",
                    x.scalar_type(), " (same as x), got ", A.scalar_type());
  BGMV_CHECK(A.dim() == 3 || A.dim() == 4, op,
                    ": A: expected [L, r_max, h_in] or [S, L, r_max, h_in], got sizes ",
                    dims_str(A.sizes()));
  const at::Tensor A4 = A.dim() == 3 ? A.unsqueeze(0) : A;
  const int64_t S = A4.size(0), L = A4.size(1), r_max = A4.size(2);
  BGMV_CHECK(A4.size(3) == h_in, op, ": A: expected last dim h_in = ", h_in,
                    " (as x), got sizes ", dims_str(A.sizes()));
  BGMV_CHECK(S >= 1 && S <= kBgmvMaxSlices && L >= 1 && L <= kIntMax, op,
                    ": A: expected 1 <= S <= ", kBgmvMaxSlices, " slices and L >= 1 adapters, got "
                    "sizes ", dims_str(A.sizes()));
  BGMV_CHECK(r_max >= 1 && r_max <= kBgmvMaxRank, op, ": A: r_max must be in [1, ",
                    kBgmvMaxRank, "], got sizes ", dims_str(A.sizes()));
  BGMV_CHECK(A4.stride(3) == 1, op, ": A: expected unit stride along h_in, got strides ",
                    dims_str(A.strides()));
  BGMV_TRY(check_aligned16(op, "A", A4));

  BGMV_TRY(check_index(op, "idx", idx, T, x));
  if (ranks.has_value()) BGMV_TRY(check_index(op, "ranks", *ranks, L, x));

  BGMV_TRY(check_device(op, "v", v, x));
  BGMV_CHECK(v.scalar_type() == at::kFloat, op, ": v: expected dtype float32, got ",
                    v.scalar_type());
  // v [T, S, r_max], or [n_split, T, S, r_max]: split-K partial sums (the expand adds them)
  const at::Tensor v4 = v.dim() == 3 ? v.unsqueeze(0) : v;
  BGMV_CHECK(v4.dim() == 4 && v4.size(0) >= 1 && v4.size(0) <= kBgmvMaxSplit &&
                    v4.size(1) == T && v4.size(2) == S && v4.size(3) == r_max, op,
                    ": v: expected [T=", T, ", S=", S, ", r_max=", r_max, "] or [n_split <= ",
                    kBgmvMaxSplit, ", T, S, r_max], got sizes ", dims_str(v.sizes()));
  BGMV_CHECK(v4.stride(3) == 1, op, ": v: expected unit stride along r_max, got strides ",
                    dims_str(v.strides()));
  if (T == 0) return {};

  BgmvShrinkParams p{};
  p.x = x.data_ptr();
  p.A = A4.data_ptr();
  p.idx = idx.data_ptr();
  p.ranks = ranks.has_value() ? ranks->data_ptr() : nullptr;
  p.v = v4.data_ptr<float>();
  p.x_stride_t = used_stride(x, 0);
  p.a_stride_s = used_stride(A4, 0);
  p.a_stride_l = used_stride(A4, 1);
  p.a_stride_r = used_stride(A4, 2);
  p.v_stride_t = v4.stride(1);
  p.v_stride_s = v4.stride(2);
  p.n_split = static_cast<int>(v4.size(0));
  p.v_stride_split = v4.stride(0);
  p.T = static_cast<int>(T);
  p.h_in = static_cast<int>(h_in);
  p.r_max = static_cast<int>(r_max);
  p.L = static_cast<int>(L);
  p.S = static_cast<int>(S);
  p.idx_is_64 = idx.scalar_type() == at::kLong;
  p.ranks_is_64 = ranks.has_value() && ranks->scalar_type() == at::kLong;

  p.pdl = pdl;
  BGMV_TRY(check_chunks(op, chunks, x, &p.chunks, &p.n_chunks));
  BGMV_CHECK(!(chunks.has_value() && work.has_value()), op,
             ": chunks (rule mma) and work (rule rank) exclude each other");
  BGMV_TRY(check_work(op, work, work_rows, T, x, &p.work, p.work_rows));
  if (out != nullptr) { *out = p; return {}; }
  const c10::cuda::CUDAGuard guard(x.device());
  const std::string err = bgmv_shrink_dispatch(dt, p, c10::cuda::getCurrentCUDAStream().stream());
  BGMV_CHECK(err.empty(), op, ": ", err);
  return {};
}

std::string bgmv_cuda_shrink(const at::Tensor& x, const at::Tensor& A, const at::Tensor& idx,
                             const std::optional<at::Tensor>& ranks, at::Tensor& v, bool pdl,
                             const std::optional<at::Tensor>& chunks,
                             const std::optional<at::Tensor>& work,
                             const std::vector<int64_t>& work_rows) {
  return shrink_impl(x, A, idx, ranks, v, pdl, chunks, work, work_rows, nullptr,
                     "multilora::bgmv_cuda_shrink");
}

static std::string expand_impl(at::Tensor& y, const at::Tensor& v, at::TensorList B,
                        const at::Tensor& idx, const at::Tensor& scale,
                        const std::optional<at::Tensor>& ranks, bool pdl, int64_t tile_rule,
                        const std::optional<at::Tensor>& chunks,
                        const std::optional<at::Tensor>& work, c10::IntArrayRef work_rows,
                        BgmvExpandParams* out, const char* op) {
  BGMV_CHECK(y.is_cuda(), op, ": y: expected a CUDA tensor, got device ", y.device());
  BGMV_CHECK(tile_rule >= kBgmvTileRuleClassic && tile_rule <= kBgmvTileRuleMma, op,
             ": tile_rule: expected ", kBgmvTileRuleClassic, " (classic), ",
             kBgmvTileRuleResidency, " (residency), ", kBgmvTileRuleRank, " (rank) or ",
             kBgmvTileRuleMma, " (mma), got ", tile_rule);
  BgmvDtype dt;
  BGMV_TRY(to_bgmv_dtype(op, "y", y, &dt));
  BGMV_CHECK(y.dim() == 2, op, ": y: expected [T, sum h_out_s], got sizes ", dims_str(y.sizes()));
  BGMV_CHECK(y.stride(1) == 1 || y.size(1) == 1, op,
                    ": y: expected unit stride along h_out, got strides ", dims_str(y.strides()));
  const int64_t T = y.size(0);
  BGMV_CHECK(T <= kIntMax, op, ": y: T = ", T, " tokens, at most ", kIntMax);

  const int64_t S = static_cast<int64_t>(B.size());
  BGMV_CHECK(S >= 1 && S <= kBgmvMaxSlices, op, ": B: expected 1 to ", kBgmvMaxSlices,
                    " output slices, got ", S);
  BGMV_TRY(check_device(op, "v", v, y));
  BGMV_CHECK(v.scalar_type() == at::kFloat, op, ": v: expected dtype float32, got ",
                    v.scalar_type());
  const at::Tensor v4 = v.dim() == 3 ? v.unsqueeze(0) : v;      // [n_split, T, S, r_max]
  BGMV_CHECK(v4.dim() == 4 && v4.size(0) >= 1 && v4.size(0) <= kBgmvMaxSplit &&
                    v4.size(1) == T && v4.size(2) == S, op, ": v: expected [T=", T,
                    ", S=", S, ", r_max] or [n_split <= ", kBgmvMaxSplit,
                    ", T, S, r_max], got sizes ", dims_str(v.sizes()));
  BGMV_CHECK(v4.stride(3) == 1, op, ": v: expected unit stride along r_max, got strides ",
                    dims_str(v.strides()));
  const int64_t r_max = v4.size(3);
  BGMV_CHECK(r_max >= 1 && r_max <= kBgmvMaxRank, op, ": v: r_max must be in [1, ",
                    kBgmvMaxRank, "], got sizes ", dims_str(v.sizes()));

  BgmvExpandParams p{};
  const int64_t L = B[0].dim() == 3 ? B[0].size(0) : 0;
  int64_t col = 0;
  // B's layout (every slice the same): rows with unit stride along r_max (PEFT's), or
  // rank-major, unit stride along h_out (PERF_LOG v45); the row layout where both hold.
  const auto row_layout = [&](const at::Tensor& b) { return b.stride(2) == 1 || r_max == 1; };
  const auto rank_major = [&](const at::Tensor& b) {
    return !row_layout(b) && (b.stride(1) == 1 || b.size(1) == 1);
  };
  p.b_rank_major = B[0].dim() == 3 && rank_major(B[0]);
  for (int64_t s = 0; s < S; ++s) {
    const at::Tensor& b = B[s];
    const std::string name = "B[" + std::to_string(s) + "]";
    BGMV_TRY(check_device(op, name.c_str(), b, y));
    BGMV_CHECK(b.scalar_type() == y.scalar_type(), op, ": ", name, ": expected dtype ",
                      y.scalar_type(), " (same as y), got ", b.scalar_type());
    BGMV_CHECK(b.dim() == 3 && b.size(0) == L && L >= 1 && b.size(2) == r_max &&
                      b.size(1) >= 1 && b.size(1) <= kIntMax, op, ": ", name,
                      ": expected [L=", L, ", h_out >= 1, r_max=", r_max, "], got sizes ",
                      dims_str(b.sizes()));
    BGMV_CHECK(p.b_rank_major ? rank_major(b) : row_layout(b), op, ": ", name,
               p.b_rank_major ? ": expected unit stride along h_out (rank-major, as B[0]), got strides "
                              : ": expected unit stride along r_max (or along h_out: rank-major), got strides ",
               dims_str(b.strides()));
    p.B[s] = b.data_ptr();
    p.b_stride_l[s] = used_stride(b, 0);
    p.b_stride_o[s] = p.b_rank_major ? 1 : used_stride(b, 1);
    p.b_stride_r[s] = p.b_rank_major ? used_stride(b, 2) : 1;
    p.h_out[s] = static_cast<int>(b.size(1));
    p.col_off[s] = static_cast<int>(col);
    col += b.size(1);
  }
  BGMV_CHECK(L <= kIntMax, op, ": B: L = ", L, " adapters, at most ", kIntMax);
  BGMV_CHECK(y.size(1) == col && col <= kIntMax, op, ": y: expected [T=", T,
                    ", sum h_out_s=", col, "], got sizes ", dims_str(y.sizes()));
  BGMV_TRY(check_index(op, "idx", idx, T, y));
  if (ranks.has_value()) BGMV_TRY(check_index(op, "ranks", *ranks, L, y));
  BGMV_TRY(check_device(op, "scale", scale, y));
  BGMV_CHECK(scale.scalar_type() == at::kFloat && scale.dim() == 1 && scale.size(0) == L &&
                    (L == 1 || scale.stride(0) == 1), op,
                    ": scale: expected a contiguous float32 [L=", L, "], got ",
                    scale.scalar_type(), " sizes ", dims_str(scale.sizes()), " strides ", dims_str(scale.strides()));
  if (T == 0) return {};

  p.y = y.data_ptr();
  p.v = v4.data_ptr<float>();
  p.idx = idx.data_ptr();
  p.ranks = ranks.has_value() ? ranks->data_ptr() : nullptr;
  p.scale = scale.data_ptr<float>();
  p.y_stride_t = y.stride(0);
  p.v_stride_t = v4.stride(1);
  p.v_stride_s = v4.stride(2);
  p.n_split = static_cast<int>(v4.size(0));
  p.v_stride_split = v4.stride(0);
  p.T = static_cast<int>(T);
  p.r_max = static_cast<int>(r_max);
  p.L = static_cast<int>(L);
  p.S = static_cast<int>(S);
  p.idx_is_64 = idx.scalar_type() == at::kLong;
  p.ranks_is_64 = ranks.has_value() && ranks->scalar_type() == at::kLong;

  p.pdl = pdl;
  p.tile_rule = static_cast<int>(tile_rule);
  BGMV_CHECK(!chunks.has_value() || tile_rule == kBgmvTileRuleMma, op,
             ": chunks: only with tile_rule ", kBgmvTileRuleMma, " (mma), got ", tile_rule);
  BGMV_TRY(check_chunks(op, chunks, y, &p.chunks, &p.n_chunks));
  BGMV_CHECK(!work.has_value() || tile_rule == kBgmvTileRuleRank, op,
             ": work: only with tile_rule ", kBgmvTileRuleRank, " (rank), got ", tile_rule);
  BGMV_TRY(check_work(op, work, work_rows, T, y, &p.work, p.work_rows));
  if (out != nullptr) { *out = p; return {}; }
  const c10::cuda::CUDAGuard guard(y.device());
  const std::string err = bgmv_expand_dispatch(dt, p, c10::cuda::getCurrentCUDAStream().stream());
  BGMV_CHECK(err.empty(), op, ": ", err);
  return {};
}

std::string bgmv_cuda_expand(at::Tensor& y, const at::Tensor& v, const std::vector<at::Tensor>& B,
                             const at::Tensor& idx, const at::Tensor& scale,
                             const std::optional<at::Tensor>& ranks, bool pdl,
                             int64_t tile_rule, const std::optional<at::Tensor>& chunks,
                             const std::optional<at::Tensor>& work,
                             const std::vector<int64_t>& work_rows) {
  return expand_impl(y, v, B, idx, scale, ranks, pdl, tile_rule, chunks, work, work_rows,
                     nullptr, "multilora::bgmv_cuda_expand");
}

// One launch: split-K shrink into v [n_split, T, S, r_max], then the expand, in one grid
// (see _bgmv_fused_kernel).  counters: int32 [>= 2 T], zero before, zero after.
std::string bgmv_cuda_fused(at::Tensor& y, const at::Tensor& x, const at::Tensor& A,
                            const std::vector<at::Tensor>& B,
                     const at::Tensor& idx, const at::Tensor& scale,
                     const std::optional<at::Tensor>& ranks, at::Tensor& v, at::Tensor& counters) {
  const char* op = "multilora::bgmv_cuda_fused";
  BgmvFusedParams p{};
  BGMV_TRY(shrink_impl(x, A, idx, ranks, v, false, std::nullopt, std::nullopt, {}, &p.s, op));
  BGMV_TRY(expand_impl(y, v, B, idx, scale, ranks, false, kBgmvTileRuleClassic, std::nullopt,
                       std::nullopt, {}, &p.e, op));
  BGMV_CHECK(!p.e.b_rank_major, op, ": B: expected unit stride along r_max (the fused kernel "
             "reads B by rows), got rank-major B");
  BGMV_TRY(check_device(op, "counters", counters, x));
  BGMV_CHECK(counters.scalar_type() == at::kInt && counters.dim() == 1 &&
                    counters.size(0) >= 2 * x.size(0) && counters.stride(0) == 1, op,
                    ": counters: expected a contiguous int32 [>= 2 T = ", 2 * x.size(0),
                    "] (zeroed once), got ", counters.scalar_type(), " sizes ", dims_str(counters.sizes()));
  BGMV_CHECK(y.size(0) == x.size(0), op, ": y: expected T = ", x.size(0), " rows (as x), got ",
                    dims_str(y.sizes()));
  if (x.size(0) == 0) return {};
  p.counters = counters.data_ptr<int>();
  const c10::cuda::CUDAGuard guard(x.device());
  BgmvDtype dt;
  BGMV_TRY(to_bgmv_dtype(op, "x", x, &dt));
  const std::string err = bgmv_fused_dispatch(dt, p, c10::cuda::getCurrentCUDAStream().stream());
  BGMV_CHECK(err.empty(), op, ": ", err);
  return {};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("shrink", &bgmv_cuda_shrink, "BGMV shrink; returns '' or the error message");
  m.def("expand", &bgmv_cuda_expand, "BGMV expand; returns '' or the error message");
  m.def("fused", &bgmv_cuda_fused, "BGMV shrink + expand in one launch; '' or the error");
}
