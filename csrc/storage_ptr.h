#pragma once
// The storage a tensor lives in, by address: what aliases, tied parameters and
// "still the same tensor" are decided from. Metadata only, any device.

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastreload {

// 0 for tensors with no bytes behind them (meta, zero-byte storage): those never alias.
inline int64_t storage_ptr(const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return 0;
  const c10::Storage& storage = t.storage();
  if (storage.nbytes() == 0) return 0;
  return reinterpret_cast<int64_t>(storage.data());
}

}  // namespace fastreload
