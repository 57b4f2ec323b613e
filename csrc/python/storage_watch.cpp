// StorageWatch: whether tensors are still what they were when it was made: the
// same storage, seen at the same offset with the same shape, strides and dtype.
// Cached plans ask it before every reload (a model tensor given new storage,
// `p.data = ...`, or seen differently, makes a plan of views of it stale), and
// through torch.ops handing it a list of hundreds of tensors would cost about a
// microsecond each; this holds them and reads each one's metadata in place.

#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "../storage_ptr.h"

namespace fastreload {
namespace {

class StorageWatch {
 public:
  explicit StorageWatch(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) {
    starts_.reserve(tensors_.size() + 1);
    for (const at::Tensor& t : tensors_) {
      starts_.push_back(seen_.size());
      seen_.push_back(storage_ptr(t));
      if (!t.defined()) continue;
      seen_.push_back(t.storage_offset());
      seen_.push_back(static_cast<int64_t>(t.scalar_type()));
      seen_.push_back(t.dim());
      seen_.insert(seen_.end(), t.sizes().begin(), t.sizes().end());
      seen_.insert(seen_.end(), t.strides().begin(), t.strides().end());
    }
    starts_.push_back(seen_.size());
  }

  // Read in place: a reload asks before every call, for hundreds of tensors.
  bool unchanged() const {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const at::Tensor& t = tensors_[i];
      const int64_t* v = seen_.data() + starts_[i];
      if (v[0] != storage_ptr(t)) return false;
      if (!t.defined()) {
        if (starts_[i + 1] - starts_[i] != 1) return false;
        continue;
      }
      const int64_t dim = t.dim();
      if (static_cast<int64_t>(starts_[i + 1] - starts_[i]) != 4 + 2 * dim || v[1] != t.storage_offset() ||
          v[2] != static_cast<int64_t>(t.scalar_type()) || v[3] != dim) {
        return false;
      }
      const auto sizes = t.sizes();
      const auto strides = t.strides();
      if (!std::equal(sizes.begin(), sizes.end(), v + 4) || !std::equal(strides.begin(), strides.end(), v + 4 + dim)) {
        return false;
      }
    }
    return true;
  }

  size_t size() const { return tensors_.size(); }

 private:
  std::vector<at::Tensor> tensors_;
  // Per tensor: storage address, then (if defined) offset, dtype, dim, sizes, strides.
  std::vector<int64_t> seen_;
  std::vector<size_t> starts_;  // tensor i's values begin at starts_[i]; one more at the end
};

}  // namespace

void bind_storage_watch(pybind11::module& m) {
  pybind11::class_<StorageWatch>(m, "StorageWatch")
      .def(pybind11::init<std::vector<at::Tensor>>(), pybind11::arg("tensors"))
      .def("unchanged", &StorageWatch::unchanged)
      .def("__len__", &StorageWatch::size);
}

}  // namespace fastreload
