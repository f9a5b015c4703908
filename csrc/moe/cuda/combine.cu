// CUDA combine (one launch), the gather-sum it shares with dispatch's backward, and combine's
// backward (one launch). One block per token row (grid-stride), threads across the row: the row
// loops are the ones in ../moe_kernel.h that the CPU kernels run with (lane, stride) = (0, 1).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>

#include "../checks.h"
#include "../moe_kernel.h"

namespace expertmesh {
namespace moe {
namespace {

constexpr int kThreads = 256;

int blocks_for(int64_t rows) {
  const int64_t max_blocks = 65535LL * 8;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(rows, max_blocks)));
}

// Any row index outside [-1, N) sets *error (the row itself is skipped: nothing is read out of bounds).
// `error` is null unless EXPERTMESH_MOE_CHECKS=1: reading the flag back is a host sync, and the row maps
// our dispatch makes are in range by construction.
__device__ __forceinline__ void flag_bad_rows(const int64_t* row_map_t, int64_t K, int64_t N, int* error) {
  if (error != nullptr && threadIdx.x == 0) {
    for (int64_t k = 0; k < K; ++k) {
      if (row_map_t[k] < -1 || row_map_t[k] >= N) atomicExch(error, 1);
    }
  }
}

constexpr int64_t kTile = 2048;  // columns accumulated per pass in shared memory

template <typename scalar_t>
__global__ void gather_sum_kernel(const scalar_t* __restrict__ y, const int64_t* __restrict__ row_map,
                                  const typename Acc<scalar_t>::type* __restrict__ w, int64_t T, int64_t K,
                                  int64_t N, int64_t D,
                                  scalar_t* __restrict__ out, int* error) {
  using A = typename Acc<scalar_t>::type;
  __shared__ A acc[kTile];
  for (int64_t t = blockIdx.x; t < T; t += gridDim.x) {
    flag_bad_rows(row_map + t * K, K, N, error);
    for (int64_t d0 = 0; d0 < D; d0 += kTile) {
      const int64_t d1 = d0 + kTile < D ? d0 + kTile : D;
      // Each thread touches only its own columns of acc, so no barrier is needed inside a tile.
      combine_tile<scalar_t>(y, N, row_map + t * K, w == nullptr ? nullptr : w + t * K, K, D, d0, d1, acc,
                             out + t * D, threadIdx.x, blockDim.x);
    }
  }
}

template <typename scalar_t>
__global__ void combine_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ y,
                                        const int64_t* __restrict__ row_map,
                                        const typename Acc<scalar_t>::type* __restrict__ w, int64_t TK, int64_t K,
                                        int64_t N, int64_t D, scalar_t* __restrict__ grad_y,
                                        typename Acc<scalar_t>::type* __restrict__ grad_w, int* error) {
  using A = typename Acc<scalar_t>::type;
  __shared__ A partial[kThreads / 32];
  for (int64_t s = blockIdx.x; s < TK; s += gridDim.x) {
    const int64_t r = row_map[s];
    if (r < -1 || r >= N) {
      if (error != nullptr && threadIdx.x == 0) atomicExch(error, 1);
      continue;
    }
    if (r < 0) {
      if (threadIdx.x == 0) grad_w[s] = A(0);
      continue;
    }
    const scalar_t* g = grad_out + (s / K) * D;
    scale_row<scalar_t>(g, w[s], D, grad_y + r * D, threadIdx.x, blockDim.x);
    A dot = dot_row<scalar_t>(g, y + r * D, D, threadIdx.x, blockDim.x);
    for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_down_sync(0xffffffffu, dot, offset);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      A total = A(0);
      for (int i = 0; i < kThreads / 32; ++i) total += partial[i];
      grad_w[s] = total;
    }
    __syncthreads();
  }
}

bool debug_checks() {
  static const bool on = [] {
    const char* v = std::getenv("EXPERTMESH_MOE_CHECKS");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

// An undefined tensor (no flag, no sync) unless EXPERTMESH_MOE_CHECKS=1.
at::Tensor new_error_flag(const at::Tensor& like) {
  if (!debug_checks()) return at::Tensor();
  auto flag = at::empty({1}, like.options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(flag.data_ptr<int>(), 0, sizeof(int), c10::cuda::getCurrentCUDAStream()));
  return flag;
}

int* flag_ptr(at::Tensor& flag) { return flag.defined() ? flag.data_ptr<int>() : nullptr; }

void check_error_flag(const at::Tensor& flag, const at::Tensor& row_map, int64_t N) {
  if (!flag.defined()) return;
  TORCH_CHECK(flag.item<int>() == 0, "row_map has entries outside [-1, ", N - 1, "] (y has ", N,
              " rows); min ", row_map.min().item<int64_t>(), ", max ", row_map.max().item<int64_t>());
}

}  // namespace

at::Tensor gather_sum_cuda(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor* w) {
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t T = row_map.size(0), K = row_map.size(1), N = y.size(0), D = y.size(1);
  auto out = at::empty({T, D}, y.options());
  if (T == 0) return out;
  auto flag = new_error_flag(y);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_gather_sum_cuda", [&] {
    gather_sum_kernel<scalar_t><<<blocks_for(T), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        y.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(),
        w == nullptr ? nullptr : w->data_ptr<typename Acc<scalar_t>::type>(), T, K, N, D, out.data_ptr<scalar_t>(),
        flag_ptr(flag));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  check_error_flag(flag, row_map, N);
  return out;
}

namespace {

at::Tensor combine_cuda(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
  check_combine(y_sorted, row_map, weights);
  return gather_sum_cuda(y_sorted, row_map, &weights);
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cuda(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                         const at::Tensor& row_map, const at::Tensor& weights) {
  check_combine(y_sorted, row_map, weights);
  const c10::cuda::CUDAGuard guard(y_sorted.device());
  const int64_t T = row_map.size(0), K = row_map.size(1), N = y_sorted.size(0), D = y_sorted.size(1);
  check_grad_rows(grad_out, "grad_out", T, D, y_sorted.scalar_type());
  auto grad_y = at::empty_like(y_sorted);
  auto grad_w = at::empty_like(weights);
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Rows no slot points at (only possible with a hand-made row_map) get zeros, not garbage.
  C10_CUDA_CHECK(cudaMemsetAsync(grad_y.data_ptr(), 0, grad_y.nbytes(), stream));
  if (T * K == 0) return {grad_y, grad_w};
  auto flag = new_error_flag(y_sorted);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_sorted.scalar_type(), "moe_combine_backward_cuda", [&] {
    combine_backward_kernel<scalar_t><<<blocks_for(T * K), kThreads, 0, stream>>>(
        grad_out.data_ptr<scalar_t>(), y_sorted.data_ptr<scalar_t>(), row_map.data_ptr<int64_t>(),
        weights.data_ptr<typename Acc<scalar_t>::type>(), T * K, K, N, D, grad_y.data_ptr<scalar_t>(),
        grad_w.data_ptr<typename Acc<scalar_t>::type>(),
        flag_ptr(flag));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  check_error_flag(flag, row_map, N);
  return {grad_y, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(expertmesh, CUDA, m) {
  m.impl("moe_combine", &combine_cuda);
  m.impl("moe_combine_backward", &combine_backward_cuda);
}

}  // namespace moe
}  // namespace expertmesh
