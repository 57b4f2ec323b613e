// The copy ops' CompositeExplicitAutograd kernels: what the dispatcher runs when no
// backend registered a kernel for the call, above all when the lists hold no
// tensor at all and there is no device to dispatch on. An empty batch is valid
// whoever calls the op (torch.compile, a user of torch.ops) and gets its empty
// result; tensors of a device this build has no kernel for are refused by name.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "copy_pairs.h"

namespace fastreload {
namespace {

void batched_copy_any(at::TensorList dst, at::TensorList src) {
  const DescribedBatch batch = checked_batch(dst, src);
  if (dst.empty()) return;
  // Refuses a device without a fused pass, naming it.
  fused_copy_for(dst[0].device().type())(batch, dst, src);
}

void refuse_non_cuda(const char* op, at::TensorList dst) {
  TORCH_CHECK(dst.empty(), op, ": copies between CUDA tensors only, got destinations on ",
              dst[0].device(), (dst[0].is_cuda() ? " (this build has no CUDA kernels)" : ""));
}

// The empty batch's tables: no descriptor, no chunk, and no device to hold the copy.
std::vector<at::Tensor> batched_copy_table_any(at::TensorList dst, at::TensorList src) {
  checked_batch(dst, src);
  refuse_non_cuda("batched_copy_table", dst);
  return {at::empty({0}, at::kByte), at::empty({0}, at::kByte)};
}

void batched_copy_with_table_any(at::TensorList dst, at::TensorList src, const at::Tensor& host_table,
                                 const at::Tensor& device_table) {
  checked_batch(dst, src);
  refuse_non_cuda("batched_copy_with_table_", dst);
  TORCH_CHECK(host_table.numel() == 0 && device_table.numel() == 0,
              "batched_copy_with_table_: the table was built for other tensors (", host_table.numel(),
              " bytes for an empty batch); build it again with batched_copy_table");
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreload, CompositeExplicitAutograd, m) {
  m.impl("batched_copy_", &batched_copy_any);
  m.impl("batched_copy_table", &batched_copy_table_any);
  m.impl("batched_copy_with_table_", &batched_copy_with_table_any);
}

}  // namespace fastreload
