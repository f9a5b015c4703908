// CPU combine and its backward. Row loops: ../moe_kernel.h (shared with CUDA).
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>

#include "../checks.h"
#include "../moe_kernel.h"

namespace expertmesh {
namespace moe {

at::Tensor gather_sum_cpu(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor& w);

namespace {

at::Tensor combine_cpu(const at::Tensor& y_sorted, const at::Tensor& row_map, const at::Tensor& weights) {
  check_combine(y_sorted, row_map, weights);
  return gather_sum_cpu(y_sorted, row_map, weights);
}

std::tuple<at::Tensor, at::Tensor> combine_backward_cpu(const at::Tensor& grad_out, const at::Tensor& y_sorted,
                                                        const at::Tensor& row_map, const at::Tensor& weights) {
  check_combine(y_sorted, row_map, weights);
  const int64_t T = row_map.size(0), K = row_map.size(1), N = y_sorted.size(0), D = y_sorted.size(1);
  check_grad_rows(grad_out, "grad_out", T, D, y_sorted.scalar_type());
  const int64_t* rm = row_map.data_ptr<int64_t>();
  for (int64_t s = 0; s < T * K; ++s) {
    TORCH_CHECK(rm[s] >= -1 && rm[s] < N, "row_map[", s / K, ", ", s % K, "] = ", rm[s], " is outside [-1, ",
                N - 1, "]");
  }
  // Rows are written by the slots that point at them; rows no slot points at (only possible with a
  // hand-made row_map) are zeroed afterwards instead of zero-filling everything first.
  auto grad_y = at::empty_like(y_sorted);
  auto grad_w = at::empty_like(weights);
  std::vector<uint8_t> covered(N, 0);
  for (int64_t s = 0; s < T * K; ++s) {
    if (rm[s] >= 0) covered[rm[s]] = 1;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y_sorted.scalar_type(), "moe_combine_backward", [&] {
    const scalar_t* g = grad_out.data_ptr<scalar_t>();
    const scalar_t* y = y_sorted.data_ptr<scalar_t>();
    using A = typename Acc<scalar_t>::type;
    const A* w = weights.data_ptr<A>();
    scalar_t* gy = grad_y.data_ptr<scalar_t>();
    A* gw = grad_w.data_ptr<A>();
    at::parallel_for(0, T * K, 64, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t r = rm[s];
        if (r < 0) {
          gw[s] = A(0);
          continue;
        }
        const int64_t t = s / K;
        scale_row<scalar_t>(g + t * D, w[s], D, gy + r * D, 0, 1);
        gw[s] = dot_row<scalar_t>(g + t * D, y + r * D, D, 0, 1);
      }
    });
    at::parallel_for(0, N, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (!covered[r]) std::fill(gy + r * D, gy + (r + 1) * D, scalar_t(0));
      }
    });
  });
  return {grad_y, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) {
  m.impl("moe_combine", &combine_cpu);
  m.impl("moe_combine_backward", &combine_backward_cpu);
}

}  // namespace moe
}  // namespace expertmesh
