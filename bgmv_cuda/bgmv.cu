// bgmv.cu -- dtype dispatch for the BGMV kernels of bgmv_kernel.cuh.
//
// Torch-free on purpose: this is the one translation unit that instantiates every kernel
// (3 dtypes x {shrink; expand with 16-byte B loads x 1 / 4 / 8 outputs per lane and with
// 1-element B loads x 1 / 4; fused with 16-byte / 1-element B loads} = 24 kernels), so the
// CI compile check (bgmv_cuda/compile_check.py) builds exactly this file with exactly the
// loader's flags, on a machine without a CUDA build of torch.  bgmv_ext.cpp (the torch
// binding, compiled by the host compiler) checks the tensors and calls the two functions
// below, declared in bgmv_params.h.  Each returns "" on success, else a message that lists
// what is supported and the sizes it got: errors are returned, never thrown, from here.
#include <cstdio>
#include <string>

#include "bgmv_kernel.cuh"  // includes bgmv_params.h (declarations of the functions below)

namespace {

const char* dtype_name(BgmvDtype dt) {
  switch (dt) {
    case BgmvDtype::kFloat16: return "float16";
    case BgmvDtype::kBFloat16: return "bfloat16";
    case BgmvDtype::kFloat32: return "float32";
  }
  return "unknown";
}

std::string unsupported_dtype(const char* op, BgmvDtype dt) {
  char buf[256];
  std::snprintf(buf, sizeof(buf), "%s: dtype code %d is not supported; supported: float16, "
                "bfloat16, float32", op, static_cast<int>(dt));
  return buf;
}

}  // namespace

std::string bgmv_shrink_dispatch(BgmvDtype dt, const BgmvShrinkParams& p, cudaStream_t stream) {
  const char* err = nullptr;
  switch (dt) {
    case BgmvDtype::kFloat16: err = bgmv_shrink_launch<__half>(p, stream); break;
    case BgmvDtype::kBFloat16: err = bgmv_shrink_launch<__nv_bfloat16>(p, stream); break;
    case BgmvDtype::kFloat32: err = bgmv_shrink_launch<float>(p, stream); break;
    default: return unsupported_dtype("bgmv_shrink", dt);
  }
  if (err == nullptr) return {};
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%s (got dtype %s, T=%d, h_in=%d, r_max=%d, L=%d, S=%d)", err,
                dtype_name(dt), p.T, p.h_in, p.r_max, p.L, p.S);
  return buf;
}

std::string bgmv_expand_dispatch(BgmvDtype dt, const BgmvExpandParams& p, cudaStream_t stream) {
  const char* err = nullptr;
  switch (dt) {
    case BgmvDtype::kFloat16: err = bgmv_expand_launch<__half>(p, stream); break;
    case BgmvDtype::kBFloat16: err = bgmv_expand_launch<__nv_bfloat16>(p, stream); break;
    case BgmvDtype::kFloat32: err = bgmv_expand_launch<float>(p, stream); break;
    default: return unsupported_dtype("bgmv_expand", dt);
  }
  if (err == nullptr) return {};
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%s (got dtype %s, T=%d, r_max=%d, L=%d, S=%d, h_out=[%d, %d, %d])",
                err, dtype_name(dt), p.T, p.r_max, p.L, p.S, p.h_out[0], p.S > 1 ? p.h_out[1] : 0,
                p.S > 2 ? p.h_out[2] : 0);
  return buf;
}

std::string bgmv_fused_dispatch(BgmvDtype dt, const BgmvFusedParams& p, cudaStream_t stream) {
  const char* err = nullptr;
  switch (dt) {
    case BgmvDtype::kFloat16: err = bgmv_fused_launch<__half>(p, stream); break;
    case BgmvDtype::kBFloat16: err = bgmv_fused_launch<__nv_bfloat16>(p, stream); break;
    case BgmvDtype::kFloat32: err = bgmv_fused_launch<float>(p, stream); break;
    default: return unsupported_dtype("bgmv_fused", dt);
  }
  if (err == nullptr) return {};
  char buf[512];
  std::snprintf(buf, sizeof(buf), "%s (got dtype %s, T=%d, h_in=%d, r_max=%d, L=%d, S=%d, n_split=%d)",
                err, dtype_name(dt), p.s.T, p.s.h_in, p.s.r_max, p.s.L, p.s.S, p.s.n_split);
  return buf;
}
