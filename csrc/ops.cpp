// The fastreload operator library: every schema, declared once. Kernels live
// beside it, one registration per backend (cpu/, cuda/) or, for metadata-only
// ops, one CompositeExplicitAutograd kernel for all devices. The Python module
// (python/module.cpp) adds what a dispatcher call cannot do fast enough.

#include <torch/library.h>

TORCH_LIBRARY(fastreload, m) {
  // [N] int64: each tensor's untyped storage address; 0 where there are no bytes (meta, empty).
  m.def("storage_ptrs(Tensor[] tensors) -> Tensor");
  // [N] bool: whether each tensor shares its storage with any tensor of `against`.
  m.def("storage_alias_mask(Tensor[] tensors, Tensor[] against) -> Tensor");
  // [N] int8: why batched_copy_ would refuse each pair (0: it would not); codes in copy_pairs.h.
  m.def("batched_copy_check(Tensor[] dst, Tensor[] src) -> Tensor");
  // dst[i] <- src[i] for every pair, dtype converted, in one fused pass; nothing written on error.
  m.def("batched_copy_(Tensor(a!)[] dst, Tensor[] src) -> ()");
  // [host table (CPU bytes), device table]: batched_copy_'s descriptors for these exact pairs.
  m.def("batched_copy_table(Tensor[] dst, Tensor[] src) -> Tensor[]");
  // batched_copy_ launched from a prebuilt table: no allocation or upload, so capturable.
  m.def("batched_copy_with_table_(Tensor(a!)[] dst, Tensor[] src, Tensor host_table, Tensor device_table) -> ()");
}
