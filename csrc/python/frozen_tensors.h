#pragma once
// FrozenTensors: tensors as they are now, held as aliases that nobody else holds.
//
// Whoever holds a tensor can give it another shape, offset or storage (set_,
// resize_, as_strided_), so a copy that keeps tensors across calls checks every
// one of them before each call: tens of nanoseconds a tensor, about a millisecond
// for the 37,000 views of a reload of a large MoE from per-expert checkpoint
// tensors. An alias made here shares the storage of its tensor but not its
// metadata, and is never handed out: while every storage keeps its address and
// size, every alias is what it was, and that is all there is to check.

#include <ATen/core/Tensor.h>
#include <c10/core/StorageImpl.h>

#include <vector>

namespace fastreload {

class FrozenTensors {
 public:
  // Dense or strided tensors with storage, on any device but meta.
  explicit FrozenTensors(const std::vector<at::Tensor>& tensors);

  at::TensorList list() const { return aliases_; }
  size_t size() const { return aliases_.size(); }
  // Each storage at the address and of the size it had: every alias is unchanged
  // and lies within its storage.
  bool unchanged() const;

 private:
  struct Held {
    c10::intrusive_ptr<c10::StorageImpl> storage;
    const void* data;
    size_t nbytes;
  };

  std::vector<at::Tensor> aliases_;
  std::vector<Held> storages_;  // each distinct storage once
};

}  // namespace fastreload
