// Read-bandwidth probe for the mma expand's access pattern (PERF_LOG v28).
//
// The expand streams each warp's own run of contiguous 2 KB tiles of B (16 rows x 64
// ranks x bf16) and keeps one tile in flight behind the one it computes on.  This probe
// reads 64 MB (beyond what one rep leaves in L2: four 64 MB regions in turn) in the same
// pattern with D tiles in flight per warp, through registers (D = 1, as the expand) or a
// cp.async ring in shared memory (D = 1..8), at a few blocks per SM, and prints GB/s
// beside a grid-stride read of the same bytes and a device-to-device copy.
//   nvcc -O3 -std=c++17 -arch=sm_90 stream_probe.cu -o stream_probe && ./stream_probe
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <cstdint>
#include <vector>

#define CHECK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { \
  printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); return 1; } } while (0)

constexpr int kTileBytes = 2048;            // one warp's 16-row tile of B at r = 64
constexpr int kVecPerLane = kTileBytes / 16 / 32;  // 4 x 16 B per lane

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(s), "l"(gmem) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory"); }

// Each warp reads tiles [t0, t0 + nt) of the region, one tile ahead in registers (the
// expand's pattern: load tile m + 1, compute on tile m).
__global__ void tiles_reg(const uint4* __restrict__ src, int tiles_per_warp, unsigned* sink) {
  const int lane = threadIdx.x & 31;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint4* p = src + warp * tiles_per_warp * (kTileBytes / 16) + lane;
  unsigned acc = 0;
  uint4 cur[kVecPerLane], nxt[kVecPerLane];
#pragma unroll
  for (int k = 0; k < kVecPerLane; ++k) cur[k] = __ldg(p + 32 * k);
  for (int m = 0; m < tiles_per_warp; ++m) {
    if (m + 1 < tiles_per_warp)
#pragma unroll
      for (int k = 0; k < kVecPerLane; ++k) nxt[k] = __ldg(p + (m + 1) * (kTileBytes / 16) + 32 * k);
#pragma unroll
    for (int k = 0; k < kVecPerLane; ++k) acc ^= cur[k].x ^ cur[k].y ^ cur[k].z ^ cur[k].w;
#pragma unroll
    for (int k = 0; k < kVecPerLane; ++k) cur[k] = nxt[k];
  }
  if (acc == 0x12345678u) sink[0] = acc;     // never true in practice; keeps the loads
}

// The same tiles through a per-warp cp.async ring of D tiles in shared memory.
template <int D>
__global__ void tiles_ring(const uint4* __restrict__ src, int tiles_per_warp, unsigned* sink) {
  extern __shared__ uint4 ring[];             // [warps][D][128 vectors]
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const uint4* p = src + warp * tiles_per_warp * (kTileBytes / 16) + lane;
  uint4* my = ring + static_cast<int64_t>(w) * D * (kTileBytes / 16) + lane;
  unsigned acc = 0;
#pragma unroll
  for (int d = 0; d < D - 1; ++d) {           // prologue: D - 1 tiles in flight
    if (d < tiles_per_warp)
#pragma unroll
      for (int k = 0; k < kVecPerLane; ++k) cp_async16(my + d * 128 + 32 * k, p + d * 128 + 32 * k);
    cp_async_commit();
  }
  for (int m = 0; m < tiles_per_warp; ++m) {
    const int nx = m + D - 1;                 // keep D - 1 tiles ahead
    if (nx < tiles_per_warp)
#pragma unroll
      for (int k = 0; k < kVecPerLane; ++k)
        cp_async16(my + (nx % D) * 128 + 32 * k, p + static_cast<int64_t>(nx) * 128 + 32 * k);
    cp_async_commit();
    cp_async_wait<D - 1>();                   // tile m has landed (each lane reads its own)
#pragma unroll
    for (int k = 0; k < kVecPerLane; ++k) {
      const uint4 v = my[(m % D) * 128 + 32 * k];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  if (acc == 0x12345678u) sink[0] = acc;
}

// Grid-stride read, 4 independent 16 B loads per thread per step.
__device__ __forceinline__ void read_stride_body(const uint4* __restrict__ src, int64_t n_vec, unsigned* sink) {
  unsigned acc = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vec; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = i + u * stride < n_vec ? __ldg(src + i + u * stride) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  if (acc == 0x12345678u) sink[0] = acc;
}
__global__ void read_stride(const uint4* __restrict__ src, int64_t n_vec, unsigned* sink) {
  read_stride_body(src, n_vec, sink);
}

// The same read as the second kernel of a PDL pair: waits for the kernel before it first.
__global__ void read_stride_pdl(const uint4* __restrict__ src, int64_t n_vec, unsigned* sink) {
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  read_stride_body(src, n_vec, sink);
}

int main() {
  const int64_t region = 64ll << 20, n_regions = 4;
  int num_sms = 0;
  CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0));
  char* buf;
  unsigned* sink;
  CHECK(cudaMalloc(&buf, region * n_regions));
  CHECK(cudaMalloc(&sink, 4));
  CHECK(cudaMemset(buf, 1, region * n_regions));
  cudaEvent_t e0, e1;
  cudaEventCreate(&e0);
  cudaEventCreate(&e1);
  const int reps = 40;
  // Median over reps of one launch, each rep on the next region (cold L2).
  auto time_us = [&](auto launch) {
    std::vector<float> t;
    for (int r = 0; r < reps + 4; ++r) {
      const char* src = buf + (r % n_regions) * region;
      cudaEventRecord(e0);
      launch(src);
      cudaEventRecord(e1);
      cudaEventSynchronize(e1);
      float ms;
      cudaEventElapsedTime(&ms, e0, e1);
      if (r >= 4) t.push_back(ms * 1e3f);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  auto report = [&](const char* name, float us, int64_t bytes) {
    printf("%-34s %8.2f us  %7.0f GB/s\n", name, us, bytes / (us * 1e3));
  };
  char* dst;
  CHECK(cudaMalloc(&dst, region));
  report("copy D2D 64 MB (read + write)", time_us([&](const char* s) {
           cudaMemcpyAsync(dst, s, region, cudaMemcpyDeviceToDevice); }), 2 * region);
  report("read grid-stride 64 MB", time_us([&](const char* s) {
           read_stride<<<num_sms * 8, 256>>>(reinterpret_cast<const uint4*>(s), region / 16, sink); }), region);
  for (int per_sm : {4, 7, 8}) {
    const int blocks = num_sms * per_sm, warps = blocks * 4;
    const int tpw = static_cast<int>(region / kTileBytes / warps);  // tiles per warp (floor)
    const int64_t bytes = static_cast<int64_t>(tpw) * warps * kTileBytes;
    char name[64];
    snprintf(name, sizeof name, "reg D=1, %d blk/SM, %d tiles/warp", per_sm, tpw);
    report(name, time_us([&](const char* s) {
             tiles_reg<<<blocks, 128>>>(reinterpret_cast<const uint4*>(s), tpw, sink); }), bytes);
    auto ring = [&](auto kernel, int D) {
      const int smem = 4 * D * kTileBytes;
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      int fit = 0;
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit, kernel, 128, smem);
      snprintf(name, sizeof name, "ring D=%d, %d blk/SM (fit %d)", D, per_sm, fit);
      if (fit < per_sm) return;
      report(name, time_us([&](const char* s) {
               kernel<<<blocks, 128, smem>>>(reinterpret_cast<const uint4*>(s), tpw, sink); }), bytes);
    };
    ring(tiles_ring<1>, 1);
    ring(tiles_ring<2>, 2);
    ring(tiles_ring<3>, 3);
    ring(tiles_ring<4>, 4);
    ring(tiles_ring<6>, 6);
    ring(tiles_ring<8>, 8);
  }
  CHECK(cudaGetLastError());

  // Graph timing, as bench_utils.time_graph: kCalls calls back to back in one CUDA graph,
  // each on the next region; graph time / kCalls.  A "pair" is two kernels of 64 MB each
  // (two regions), the second launched with PDL (its blocks wait for the first to end).
  cudaStream_t st;
  CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
  constexpr int kCalls = 20;
  auto graph_us = [&](auto call) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal);
    for (int c = 0; c < kCalls; ++c) call(c);
    cudaStreamEndCapture(st, &g);
    cudaGraphInstantiate(&ge, g, 0);
    std::vector<float> t;
    for (int r = 0; r < 24; ++r) {
      cudaEventRecord(e0, st);
      cudaGraphLaunch(ge, st);
      cudaEventRecord(e1, st);
      cudaEventSynchronize(e1);
      float ms;
      cudaEventElapsedTime(&ms, e0, e1);
      if (r >= 4) t.push_back(ms * 1e3f / kCalls);
    }
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
  };
  auto launch_read = [&](bool pdl, const char* s, int64_t bytes, int blocks) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(blocks);
    cfg.blockDim = dim3(256);
    cfg.stream = st;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = at;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaLaunchKernelEx(&cfg, pdl ? read_stride_pdl : read_stride, reinterpret_cast<const uint4*>(s),
                       bytes / 16, sink);
  };
  for (int per_sm : {4, 8}) {
    const int blocks = num_sms * per_sm;
    char name[64];
    snprintf(name, sizeof name, "graph: read 64 MB, %d blk/SM", per_sm);
    report(name, graph_us([&](int c) { launch_read(false, buf + (c % 4) * region, region, blocks); }), region);
    snprintf(name, sizeof name, "graph: read 128 MB, %d blk/SM", per_sm);
    report(name, graph_us([&](int c) { launch_read(false, buf + (c % 2) * 2 * region, 2 * region, blocks); }),
           2 * region);
    snprintf(name, sizeof name, "graph: pair 2x64 MB, PDL, %d blk/SM", per_sm);
    report(name, graph_us([&](int c) {
             launch_read(false, buf + (c % 2) * 2 * region, region, blocks);
             launch_read(true, buf + (c % 2) * 2 * region + region, region, blocks); }), 2 * region);
    snprintf(name, sizeof name, "graph: pair 2x64 MB, no PDL, %d blk/SM", per_sm);
    report(name, graph_us([&](int c) {
             launch_read(false, buf + (c % 2) * 2 * region, region, blocks);
             launch_read(false, buf + (c % 2) * 2 * region + region, region, blocks); }), 2 * region);
  }
  float big_us = time_us([&](const char* s) { cudaMemcpyAsync(dst, s, region, cudaMemcpyDeviceToDevice); });
  (void)big_us;
  char* big;
  CHECK(cudaMalloc(&big, 2ll << 30));
  std::vector<float> t;
  for (int r = 0; r < 12; ++r) {
    cudaEventRecord(e0);
    cudaMemcpyAsync(big + (1ll << 30), big, 1ll << 30, cudaMemcpyDeviceToDevice);
    cudaEventRecord(e1);
    cudaEventSynchronize(e1);
    float ms;
    cudaEventElapsedTime(&ms, e0, e1);
    if (r >= 2) t.push_back(ms * 1e3f);
  }
  std::sort(t.begin(), t.end());
  report("copy D2D 1 GiB (read + write)", t[t.size() / 2], 2ll << 30);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  return 0;
}
