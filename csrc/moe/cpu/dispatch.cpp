// CPU dispatch and its backward. OpenMP over chunks of slots for counting and row assignment, over
// slots for the contiguous row copies. Index arithmetic: ../moe_kernel.h (shared with CUDA).
#include <ATen/Parallel.h>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "../moe_kernel.h"

namespace expertmesh {
namespace moe {
namespace {

constexpr int64_t kSlotsPerChunk = 4096;

template <typename IdxT>
void layout(const IdxT* idx, int64_t TK, int64_t K, int64_t E, int64_t chunks, int64_t* tokens_per_expert,
            int64_t* row_map) {
  std::vector<int64_t> hist(chunks * E, 0), start(chunks * E);
  std::vector<int64_t> bad(chunks, -1);  // first out-of-range slot per chunk
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t s = chunk_begin(c, TK, chunks); s < chunk_begin(c + 1, TK, chunks); ++s) {
        const int64_t e = static_cast<int64_t>(idx[s]);
        if (!expert_in_range(e, E)) {
          bad[c] = s;
          break;
        }
        if (e >= 0) ++hist[c * E + e];
      }
    }
  });
  for (int64_t c = 0; c < chunks; ++c) {
    if (bad[c] >= 0) {
      const int64_t s = bad[c];
      TORCH_CHECK(false, "topk_idx[", s / K, ", ", s % K, "] = ", static_cast<int64_t>(idx[s]),
                  " is outside [-1, ", E - 1, "] (num_experts=", E, ")");
    }
  }
  int64_t base = 0;
  for (int64_t e = 0; e < E; ++e) {
    tokens_per_expert[e] = expert_total(hist.data(), chunks, E, e);
    expert_chunk_starts(hist.data(), chunks, E, e, base, start.data());
    base += tokens_per_expert[e];
  }
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      std::vector<int64_t> cursor(start.begin() + c * E, start.begin() + (c + 1) * E);
      assign_rows(idx, chunk_begin(c, TK, chunks), chunk_begin(c + 1, TK, chunks), cursor.data(), row_map);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_cpu(const at::Tensor& x, const at::Tensor& topk_idx,
                                                            int64_t num_experts) {
  check_dispatch(x, topk_idx, num_experts);
  const int64_t T = x.size(0), D = x.size(1), K = topk_idx.size(1), TK = T * K, E = num_experts;
  const int64_t chunks = std::max<int64_t>(1, (TK + kSlotsPerChunk - 1) / kSlotsPerChunk);
  auto tokens_per_expert = at::empty({E}, topk_idx.options().dtype(at::kLong));
  auto row_map = at::empty({T, K}, topk_idx.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(topk_idx.scalar_type(), "moe_dispatch_layout", [&] {
    layout<index_t>(topk_idx.data_ptr<index_t>(), TK, K, E, chunks, tokens_per_expert.data_ptr<int64_t>(),
                    row_map.data_ptr<int64_t>());
  });
  int64_t N = 0;
  for (int64_t e = 0; e < E; ++e) N += tokens_per_expert.data_ptr<int64_t>()[e];
  auto x_sorted = at::empty({N, D}, x.options());
  const int64_t row_bytes = D * x.element_size();
  const char* src = static_cast<const char*>(x.data_ptr());
  char* dst = static_cast<char*>(x_sorted.data_ptr());
  const int64_t* rm = row_map.data_ptr<int64_t>();
  at::parallel_for(0, TK, 256, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      if (rm[s] >= 0) std::memcpy(dst + rm[s] * row_bytes, src + (s / K) * row_bytes, row_bytes);
    }
  });
  return {x_sorted, tokens_per_expert, row_map};
}

// Shared by dispatch backward (w = nullptr) and combine: out[t] = sum_k w[t,k] * y[row_map[t,k]].
at::Tensor gather_sum(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor* w) {
  const int64_t T = row_map.size(0), K = row_map.size(1), N = y.size(0), D = y.size(1);
  const int64_t* rm = row_map.data_ptr<int64_t>();
  for (int64_t s = 0; s < T * K; ++s) {
    TORCH_CHECK(rm[s] >= -1 && rm[s] < N, "row_map[", s / K, ", ", s % K, "] = ", rm[s], " is outside [-1, ",
                N - 1, "] (y has ", N, " rows)");
  }
  auto out = at::empty({T, D}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "moe_gather_sum", [&] {
    const scalar_t* yp = y.data_ptr<scalar_t>();
    using A = typename Acc<scalar_t>::type;
    const A* wp = w == nullptr ? nullptr : w->data_ptr<A>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, T, 16, [&](int64_t t0, int64_t t1) {
      std::vector<A> acc(D);
      for (int64_t t = t0; t < t1; ++t) {
        combine_tile<scalar_t>(yp, N, rm + t * K, wp == nullptr ? nullptr : wp + t * K, K, D, 0, D, acc.data(),
                               op + t * D, 0, 1);
      }
    });
  });
  return out;
}

at::Tensor dispatch_backward_cpu(const at::Tensor& grad_sorted, const at::Tensor& row_map) {
  check_2d_contiguous(grad_sorted, "grad_x_sorted");
  check_float(grad_sorted, "grad_x_sorted");
  check_row_map(row_map);
  return gather_sum(grad_sorted, row_map, nullptr);
}

}  // namespace

// Used by cpu/combine.cpp.
at::Tensor gather_sum_cpu(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor& w) {
  return gather_sum(y, row_map, &w);
}

TORCH_LIBRARY_IMPL(expertmesh, CPU, m) {
  m.impl("moe_dispatch", &dispatch_cpu);
  m.impl("moe_dispatch_backward", &dispatch_backward_cpu);
}

}  // namespace moe
}  // namespace expertmesh
