// Input checks shared by the CPU and CUDA entry points: every violation names the tensor and the numbers.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

namespace expertmesh {
namespace moe {

inline void check_float(const at::Tensor& t, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble, name,
              " must be float32, float16, bfloat16 or float64, got ", s);
}

inline void check_2d_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (shape ", t.sizes(), ", strides ", t.strides(), ")");
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " is on ", a.device(), " but ", bn, " is on ", b.device());
}

inline void check_dispatch(const at::Tensor& x, const at::Tensor& topk_idx, int64_t num_experts) {
  check_2d_contiguous(x, "x");
  check_2d_contiguous(topk_idx, "topk_idx");
  check_float(x, "x");
  check_same_device(x, "x", topk_idx, "topk_idx");
  TORCH_CHECK(topk_idx.scalar_type() == at::kLong || topk_idx.scalar_type() == at::kInt,
              "topk_idx must be int32 or int64, got ", topk_idx.scalar_type());
  TORCH_CHECK(x.size(0) == topk_idx.size(0), "x has ", x.size(0), " tokens but topk_idx has ", topk_idx.size(0));
  TORCH_CHECK(num_experts >= 1, "num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(topk_idx.size(1) >= 1 && topk_idx.size(1) <= num_experts, "topk_idx has K=", topk_idx.size(1),
              " experts per token; K must be in [1, num_experts=", num_experts, "]");
}

inline void check_row_map(const at::Tensor& row_map) {
  check_2d_contiguous(row_map, "row_map");
  TORCH_CHECK(row_map.scalar_type() == at::kLong, "row_map must be int64, got ", row_map.scalar_type());
}

inline void check_combine(const at::Tensor& y, const at::Tensor& row_map, const at::Tensor& w) {
  check_2d_contiguous(y, "y_sorted");
  check_float(y, "y_sorted");
  check_row_map(row_map);
  check_2d_contiguous(w, "weights");
  check_same_device(y, "y_sorted", row_map, "row_map");
  check_same_device(y, "y_sorted", w, "weights");
  TORCH_CHECK(w.sizes() == row_map.sizes(), "weights shape ", w.sizes(), " != row_map shape ", row_map.sizes());
  const auto acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(w.scalar_type() == acc, "weights must be ", acc, " (the accumulation type of y_sorted's ",
              y.scalar_type(), "), got ", w.scalar_type());
}

inline void check_grad_rows(const at::Tensor& grad, const char* name, int64_t rows, int64_t width,
                            at::ScalarType dtype) {
  check_2d_contiguous(grad, name);
  TORCH_CHECK(grad.size(0) == rows && grad.size(1) == width, name, " has shape ", grad.sizes(), ", expected [",
              rows, ", ", width, "]");
  TORCH_CHECK(grad.scalar_type() == dtype, name, " dtype ", grad.scalar_type(), " != ", dtype);
}

}  // namespace moe
}  // namespace expertmesh
