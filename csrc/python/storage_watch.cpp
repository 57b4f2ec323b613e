// StorageWatch: whether tensors are still what they were when it was made: the
// same storage, seen at the same offset with the same shape, strides and dtype.
// Cached plans ask it before every reload (a model tensor given new storage,
// `p.data = ...`, or seen differently, makes a plan of views of it stale), and
// through torch.ops handing it a list of hundreds of tensors would cost about a
// microsecond each; this holds them and reads each one's metadata in place.

#include <torch/extension.h>

#include <vector>

#include "../storage_ptr.h"

namespace fastreload {
namespace {

class StorageWatch {
 public:
  explicit StorageWatch(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) {
    seen_.reserve(tensors_.size());
    for (const at::Tensor& t : tensors_) seen_.push_back(Seen::of(t));
  }

  bool unchanged() const {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (!(Seen::of(tensors_[i]) == seen_[i])) return false;
    }
    return true;
  }

  size_t size() const { return tensors_.size(); }

 private:
  struct Seen {
    int64_t storage = 0;
    int64_t offset = 0;
    c10::ScalarType dtype = c10::ScalarType::Undefined;
    std::vector<int64_t> sizes;
    std::vector<int64_t> strides;

    static Seen of(const at::Tensor& t) {
      if (!t.defined()) return {};
      return {storage_ptr(t), t.storage_offset(), t.scalar_type(), t.sizes().vec(), t.strides().vec()};
    }
    bool operator==(const Seen& o) const {
      return storage == o.storage && offset == o.offset && dtype == o.dtype && sizes == o.sizes &&
             strides == o.strides;
    }
  };

  std::vector<at::Tensor> tensors_;
  std::vector<Seen> seen_;
};

}  // namespace

void bind_storage_watch(pybind11::module& m) {
  pybind11::class_<StorageWatch>(m, "StorageWatch")
      .def(pybind11::init<std::vector<at::Tensor>>(), pybind11::arg("tensors"))
      .def("unchanged", &StorageWatch::unchanged)
      .def("__len__", &StorageWatch::size);
}

}  // namespace fastreload
