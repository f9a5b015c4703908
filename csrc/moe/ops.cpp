// Schemas of the expertmesh MoE ops (implementations: cpu/*.cpp, cuda/*.cu; autograd and fake
// tensors: expertmesh/moe/ops.py). Importing expertmesh._C registers them.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// A module with no methods: `import expertmesh._C` only has to load this library so the
// TORCH_LIBRARY registrations below run.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(expertmesh, m) {
  // x[T,D], topk_idx[T,K] (int32/int64, -1 = dropped) -> x_sorted[N,D], tokens_per_expert[E], row_map[T,K]
  m.def("moe_dispatch(Tensor x, Tensor topk_idx, int num_experts) -> (Tensor, Tensor, Tensor)");
  // grad_x_sorted[N,D], row_map[T,K] -> grad_x[T,D] (un-permute and sum over k)
  m.def("moe_dispatch_backward(Tensor grad_x_sorted, Tensor row_map) -> Tensor");
  // y_sorted[N,D], row_map[T,K], weights[T,K] -> out[T,D] = sum_k w * y[row_map]
  m.def("moe_combine(Tensor y_sorted, Tensor row_map, Tensor weights) -> Tensor");
  // grad_out[T,D], y_sorted[N,D], row_map[T,K], weights[T,K] -> grad_y_sorted[N,D], grad_weights[T,K]
  m.def("moe_combine_backward(Tensor grad_out, Tensor y_sorted, Tensor row_map, Tensor weights) -> (Tensor, Tensor)");
}
