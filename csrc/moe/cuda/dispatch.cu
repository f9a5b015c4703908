// CUDA dispatch (one cooperative kernel launch) and its backward (one launch).
//
// Dispatch runs as one cooperative grid, block c owning chunk c of the slots:
//   1. each block counts its chunk per expert (shared-memory atomics) and notes the first bad index;
//   2. grid sync; block 0 turns the per-chunk counts into start rows (one thread per expert, with
//      the same expert_total / expert_chunk_starts the CPU uses);
//   3. grid sync; each block assigns rows to its slots in slot order (assign_rows, as on CPU) and
//      copies its rows. Row order is therefore identical to the CPU kernel's: stable within experts.
// x_sorted is allocated for all T*K slots before launch (its true length N is only known after the
// kernel); the op returns the first N rows, read back with the per-expert counts in one copy.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>

#include "../checks.h"
#include "../moe_kernel.h"

namespace cg = cooperative_groups;

namespace expertmesh {
namespace moe {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kSlotsPerChunk = 256;

// Workspace layout (int64): counts[E] | bad[chunks] | hist[chunks*E] | start[chunks*E]
template <typename scalar_t, typename IdxT>
__global__ void dispatch_kernel(const scalar_t* __restrict__ x, const IdxT* __restrict__ idx, int64_t T, int64_t K,
                                int64_t D, int64_t E, int64_t* __restrict__ ws, int64_t* __restrict__ row_map,
                                scalar_t* __restrict__ out) {
  cg::grid_group grid = cg::this_grid();
  extern __shared__ unsigned long long shared[];  // E counters, then E cursors
  const int64_t TK = T * K, chunks = gridDim.x, c = blockIdx.x;
  int64_t* counts = ws;
  int64_t* bad = ws + E;
  int64_t* hist = bad + chunks;
  int64_t* start = hist + chunks * E;
  const int64_t begin = chunk_begin(c, TK, chunks), end = chunk_begin(c + 1, TK, chunks);
  __shared__ unsigned long long first_bad;

  // 1. Count this chunk.
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) shared[e] = 0ULL;
  if (threadIdx.x == 0) first_bad = static_cast<unsigned long long>(TK);
  __syncthreads();
  for (int64_t s = begin + threadIdx.x; s < end; s += blockDim.x) {
    const int64_t e = static_cast<int64_t>(idx[s]);
    if (!expert_in_range(e, E)) {
      atomicMin(&first_bad, static_cast<unsigned long long>(s));
    } else if (e >= 0) {
      atomicAdd(&shared[e], 1ULL);
    }
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) hist[c * E + e] = static_cast<int64_t>(shared[e]);
  if (threadIdx.x == 0) bad[c] = static_cast<int64_t>(first_bad);
  grid.sync();

  // 2. Start rows: block 0, one thread per expert; exclusive scan of totals in shared memory.
  if (c == 0) {
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      counts[e] = expert_total(hist, chunks, E, e);
      shared[e] = static_cast<unsigned long long>(counts[e]);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      unsigned long long base = 0;
      for (int64_t e = 0; e < E; ++e) {
        const unsigned long long n = shared[e];
        shared[e] = base;
        base += n;
      }
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < E; e += blockDim.x) {
      expert_chunk_starts(hist, chunks, E, e, static_cast<int64_t>(shared[e]), start);
    }
  }
  grid.sync();
  bool any_bad = false;
  for (int64_t b = 0; b < chunks; ++b) any_bad |= bad[b] < TK;
  if (any_bad) return;  // the host reports it; nothing is copied

  // 3. Assign rows in slot order, then copy this chunk's rows.
  int64_t* cursor = reinterpret_cast<int64_t*>(shared + E);
  for (int64_t e = threadIdx.x; e < E; e += blockDim.x) cursor[e] = start[c * E + e];
  __syncthreads();
  if (threadIdx.x == 0) assign_rows(idx, begin, end, cursor, row_map);
  __syncthreads();
  for (int64_t s = begin; s < end; ++s) {
    const int64_t r = row_map[s];
    if (r >= 0) copy_row(x + (s / K) * D, out + r * D, D, threadIdx.x, blockDim.x);
  }
}

template <typename scalar_t, typename IdxT>
void launch_dispatch(const at::Tensor& x, const at::Tensor& idx, int64_t E, at::Tensor& ws, at::Tensor& row_map,
                        at::Tensor& out, int64_t chunks) {
  const int64_t T = x.size(0), D = x.size(1), K = idx.size(1);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const IdxT* ip = idx.data_ptr<IdxT>();
  int64_t* wp = ws.data_ptr<int64_t>();
  int64_t* rp = row_map.data_ptr<int64_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  void* args[] = {&xp, &ip, const_cast<int64_t*>(&T), const_cast<int64_t*>(&K), const_cast<int64_t*>(&D), &E, &wp,
                  &rp, &op};
  const size_t smem = 2 * E * sizeof(unsigned long long);
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<void*>(dispatch_kernel<scalar_t, IdxT>),
                                             dim3(chunks), dim3(kThreads), args, smem,
                                             c10::cuda::getCurrentCUDAStream()));
}

template <typename scalar_t, typename IdxT>
int64_t max_coresident_blocks(int64_t E) {
  int per_sm = 0, device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, dispatch_kernel<scalar_t, IdxT>, kThreads, 2 * E * sizeof(unsigned long long)));
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return static_cast<int64_t>(per_sm) * sms;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cuda(const at::Tensor& x, const at::Tensor& topk_idx,
                                                             int64_t num_experts) {
  check_dispatch(x, topk_idx, num_experts);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t T = x.size(0), D = x.size(1), K = topk_idx.size(1), TK = T * K, E = num_experts;
  auto row_map = at::empty({T, K}, topk_idx.options().dtype(at::kLong));
  if (TK == 0) {
    return {at::empty({0, D}, x.options()), at::zeros({E}, row_map.options()), row_map};
  }
  auto out = at::empty({TK, D}, x.options());
  at::Tensor ws;
  int64_t chunks = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "moe_dispatch_cuda", [&] {
    AT_DISPATCH_INDEX_TYPES(topk_idx.scalar_type(), "moe_dispatch_cuda_idx", [&] {
      const int64_t limit = max_coresident_blocks<scalar_t, index_t>(E);
      TORCH_CHECK(limit > 0, "moe_dispatch: num_experts=", E, " needs more shared memory than a block can have");
      chunks = std::min<int64_t>((TK + kSlotsPerChunk - 1) / kSlotsPerChunk, limit);
      ws = at::empty({E + chunks + 2 * chunks * E}, row_map.options());
      launch_dispatch<scalar_t, index_t>(x, topk_idx, E, ws, row_map, out, chunks);
    });
  });
  // One device-to-host copy: per-expert counts and per-chunk first bad slot.
  auto head = ws.narrow(0, 0, E + chunks).cpu();
  const int64_t* h = head.data_ptr<int64_t>();
  for (int64_t c = 0; c < chunks; ++c) {
    if (h[E + c] < TK) {
      const int64_t s = h[E + c];
      const int64_t bad_value = topk_idx.view(-1)[s].item<int64_t>();
      TORCH_CHECK(false, "topk_idx[", s / K, ", ", s % K, "] = ", bad_value, " is outside [-1, ", E - 1,
                  "] (num_experts=", E, ")");
    }
  }
  int64_t N = 0;
  for (int64_t e = 0; e < E; ++e) N += h[e];
  return {out.narrow(0, 0, N), ws.narrow(0, 0, E), row_map};
}

}  // namespace

at::Tensor gather_sum_cuda(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor* w);

namespace {

at::Tensor dispatch_backward_cuda(const at::Tensor& grad_sorted, const at::Tensor& row_map) {
  check_2d_contiguous(grad_sorted, "grad_x_sorted");
  check_float(grad_sorted, "grad_x_sorted");
  check_row_map(row_map);
  return gather_sum_cuda(grad_sorted, row_map, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(expertmesh, CUDA, m) {
  m.impl("moe_dispatch", &dispatch_cuda);
  m.impl("moe_dispatch_backward", &dispatch_backward_cuda);
}

}  // namespace moe
}  // namespace expertmesh
