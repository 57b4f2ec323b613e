// FrozenTensors (frozen_tensors.h) and its Python binding.

#include "frozen_tensors.h"

#include <c10/core/TensorImpl.h>
#include <torch/extension.h>

#include <memory>
#include <string>
#include <unordered_map>

namespace fastreload {
namespace {

// One past the last byte t reads, from the start of its storage.
int64_t extent_bytes(const at::Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = t.storage_offset();
  for (const auto d : c10::irange(t.dim())) last += (t.size(d) - 1) * t.stride(d);
  return (last + 1) * static_cast<int64_t>(t.element_size());
}

// A tensor of t's storage, dtype, offset, sizes and strides, with a TensorImpl of
// its own, made without the dispatcher (as a view op makes one): t's dispatch keys
// but the Python ones, t's version counter, no autograd history, no Python object.
at::Tensor alias_of(const at::Tensor& t, size_t i) {
  TORCH_CHECK_VALUE(t.defined() && t.layout() == at::kStrided && t.has_storage() && !t.is_meta(),
                    "FrozenTensors: tensor ", i, " is not a strided tensor with storage");
  const c10::TensorImpl* of = t.unsafeGetTensorImpl();
  auto impl = c10::make_intrusive<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(t.storage()),
                                                   of->key_set(), t.dtype());
  impl->set_sizes_and_strides(t.sizes(), t.strides(), t.storage_offset());
  if (!impl->is_inference()) impl->set_version_counter(of->version_counter());
  return at::Tensor(std::move(impl));
}

}  // namespace

FrozenTensors::FrozenTensors(const std::vector<at::Tensor>& tensors) {
  aliases_.reserve(tensors.size());
  std::unordered_map<const c10::StorageImpl*, size_t> seen;
  for (const auto i : c10::irange(tensors.size())) {
    const at::Tensor& t = tensors[i];
    aliases_.push_back(alias_of(t, i));
    c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
    if (seen.emplace(storage, storages_.size()).second) {
      storages_.push_back({c10::intrusive_ptr<c10::StorageImpl>::reclaim_copy(storage), storage->data(),
                           storage->nbytes()});
    }
    TORCH_CHECK_VALUE(extent_bytes(t) <= static_cast<int64_t>(storage->nbytes()), "FrozenTensors: tensor ", i,
                      " reaches past the end of its storage");
  }
}

bool FrozenTensors::unchanged() const {
  for (const Held& h : storages_) {
    if (h.storage->data() != h.data || h.storage->nbytes() != h.nbytes) return false;
  }
  return true;
}

void bind_frozen_tensors(pybind11::module& m) {
  pybind11::class_<FrozenTensors, std::shared_ptr<FrozenTensors>>(m, "FrozenTensors")
      .def(pybind11::init<const std::vector<at::Tensor>&>(), pybind11::arg("tensors"))
      .def("unchanged", &FrozenTensors::unchanged)
      .def("__len__", &FrozenTensors::size);
}

}  // namespace fastreload
