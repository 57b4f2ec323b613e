// Which storage each tensor lives in: the facts the Python layer decides aliases,
// tied parameters and uninitialized tensors from. Metadata only, any device.

#include <ATen/ATen.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <unordered_set>

#include "storage_ptr.h"

namespace fastreload {
namespace {

at::Tensor storage_ptrs(at::TensorList tensors) {
  at::Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, at::kLong);
  int64_t* ptrs = out.data_ptr<int64_t>();
  for (const auto i : c10::irange(tensors.size())) ptrs[i] = storage_ptr(tensors[i]);
  return out;
}

// Host and device allocations share one address space (CUDA's unified virtual
// addressing), so a bare pointer identifies a storage across devices.
at::Tensor storage_alias_mask(at::TensorList tensors, at::TensorList against) {
  std::unordered_set<int64_t> owned;
  owned.reserve(against.size());
  for (const at::Tensor& t : against) {
    if (const int64_t p = storage_ptr(t)) owned.insert(p);
  }
  at::Tensor out = at::empty({static_cast<int64_t>(tensors.size())}, at::kBool);
  bool* mask = out.data_ptr<bool>();
  for (const auto i : c10::irange(tensors.size())) {
    const int64_t p = storage_ptr(tensors[i]);
    mask[i] = p != 0 && owned.count(p) > 0;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreload, CompositeExplicitAutograd, m) {
  m.impl("storage_ptrs", &storage_ptrs);
  m.impl("storage_alias_mask", &storage_alias_mask);
}

}  // namespace fastreload
