// Index arithmetic and row loops shared by the CPU (cpu/*.cpp) and CUDA (cuda/*.cu) MoE kernels.
//
// Everything here is __host__ __device__ so the CPU tests exercise the same logic the GPU runs.
// Row functions take (lane, stride): a CPU caller passes (0, 1) and walks the whole row; a CUDA
// block passes (threadIdx.x, blockDim.x) and its threads share the row.
//
// Legend: T tokens, K experts per token, E experts, D row width, N routed rows, s = t * K + k a slot.
//
// Dispatch layout. Slots are cut into `chunks` contiguous ranges. hist[c * E + e] counts the slots
// of chunk c that chose expert e. Destination rows are ordered expert-major, then chunk, then slot
// order within the chunk, so inside each expert rows keep token order (stable, deterministic) no
// matter how many chunks ran in parallel.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define EM_HD __host__ __device__ __forceinline__
#else
#define EM_HD inline
#endif

namespace expertmesh {
namespace moe {

// fp32 accumulation for fp32/bf16/fp16 data, fp64 for fp64 data.
template <typename T>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// First slot of chunk c when n slots are cut into `chunks` near-equal ranges.
EM_HD int64_t chunk_begin(int64_t c, int64_t n, int64_t chunks) {
  return (n / chunks) * c + (c < n % chunks ? c : n % chunks);
}

// -1 marks a dropped slot; anything else outside [0, E) is an error.
EM_HD bool expert_in_range(int64_t e, int64_t num_experts) {
  return e >= -1 && e < num_experts;
}

// Total rows of expert e over all chunks.
EM_HD int64_t expert_total(const int64_t* hist, int64_t chunks, int64_t num_experts, int64_t e) {
  int64_t total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += hist[c * num_experts + e];
  return total;
}

// Given `base`, the first row of expert e (the sum of totals of experts < e), writes the first
// destination row of every chunk's slots for expert e.
EM_HD void expert_chunk_starts(const int64_t* hist, int64_t chunks, int64_t num_experts, int64_t e, int64_t base,
                               int64_t* start) {
  for (int64_t c = 0; c < chunks; ++c) {
    start[c * num_experts + e] = base;
    base += hist[c * num_experts + e];
  }
}

// Assigns destination rows to the slots [begin, end) of one chunk, in slot order. `cursor[e]` starts
// at the chunk's start row for expert e and is advanced here.
template <typename IdxT>
EM_HD void assign_rows(const IdxT* topk_idx, int64_t begin, int64_t end, int64_t* cursor, int64_t* row_map) {
  for (int64_t s = begin; s < end; ++s) {
    const int64_t e = static_cast<int64_t>(topk_idx[s]);
    row_map[s] = e < 0 ? -1 : cursor[e]++;
  }
}

template <typename T>
EM_HD void copy_row(const T* src, T* dst, int64_t D, int64_t lane, int64_t stride) {
  for (int64_t d = lane; d < D; d += stride) dst[d] = src[d];
}

// Columns [d0, d1) of out[t, :] = sum_k w[t, k] * y[row_map[t, k], :], accumulated in k order in
// `acc` (d1 - d0 accumulators; registers or shared memory on GPU, a buffer on CPU). A null `w`
// means weight 1 (the gradient of dispatch). Rows outside [0, N) are skipped: callers check them.
// The inner loop is a plain axpy over contiguous columns, so the CPU compiler vectorizes it.
// The weights are in the accumulation type (fp32, fp64 for fp64 rows): routing computes them in fp32.
template <typename T>
EM_HD void combine_tile(const T* y, int64_t N, const int64_t* row_map_t, const typename Acc<T>::type* w_t, int64_t K,
                        int64_t D,
                        int64_t d0, int64_t d1, typename Acc<T>::type* acc, T* out_t, int64_t lane,
                        int64_t stride) {
  using A = typename Acc<T>::type;
  for (int64_t d = d0 + lane; d < d1; d += stride) acc[d - d0] = A(0);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t r = row_map_t[k];
    if (r < 0 || r >= N) continue;
    const A w = w_t == nullptr ? A(1) : w_t[k];
    const T* y_r = y + r * D;
    for (int64_t d = d0 + lane; d < d1; d += stride) acc[d - d0] += w * static_cast<A>(y_r[d]);
  }
  for (int64_t d = d0 + lane; d < d1; d += stride) out_t[d] = static_cast<T>(acc[d - d0]);
}

// Backward of combine for one slot (t, k) routed to row r: grad_y[r, :] = w * grad_out[t, :].
template <typename T>
EM_HD void scale_row(const T* grad_out_t, typename Acc<T>::type w, int64_t D, T* grad_y_r, int64_t lane,
                     int64_t stride) {
  using A = typename Acc<T>::type;
  for (int64_t d = lane; d < D; d += stride) grad_y_r[d] = static_cast<T>(w * static_cast<A>(grad_out_t[d]));
}

// This lane's share of <a, b>, with eight independent partial sums (vectorizable on CPU, eight
// registers on GPU); the partials are added in a fixed tree order.
template <typename T>
EM_HD typename Acc<T>::type dot_row(const T* a, const T* b, int64_t D, int64_t lane, int64_t stride) {
  using A = typename Acc<T>::type;
  A p[8] = {A(0), A(0), A(0), A(0), A(0), A(0), A(0), A(0)};
  int64_t d = lane;
  for (; d + 7 * stride < D; d += 8 * stride) {
    for (int i = 0; i < 8; ++i) p[i] += static_cast<A>(a[d + i * stride]) * static_cast<A>(b[d + i * stride]);
  }
  for (; d < D; d += stride) p[0] += static_cast<A>(a[d]) * static_cast<A>(b[d]);
  return ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
}

}  // namespace moe
}  // namespace expertmesh
