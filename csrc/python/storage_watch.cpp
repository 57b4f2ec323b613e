// StorageWatch: whether tensors still live in the storage they lived in when it
// was made. Cached plans ask it before every reload (a model tensor given new
// storage, `p.data = ...`, makes a plan of views of the old one stale), and
// through torch.ops handing it a list of hundreds of tensors would cost about a
// microsecond each; this holds them and reads each storage's address in place.

#include <torch/extension.h>

#include <vector>

#include "../storage_ptr.h"

namespace fastreload {
namespace {

class StorageWatch {
 public:
  explicit StorageWatch(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) {
    ptrs_.reserve(tensors_.size());
    for (const at::Tensor& t : tensors_) ptrs_.push_back(storage_ptr(t));
  }

  bool unchanged() const {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (storage_ptr(tensors_[i]) != ptrs_[i]) return false;
    }
    return true;
  }

  size_t size() const { return tensors_.size(); }

 private:
  std::vector<at::Tensor> tensors_;
  std::vector<int64_t> ptrs_;
};

}  // namespace

void bind_storage_watch(pybind11::module& m) {
  pybind11::class_<StorageWatch>(m, "StorageWatch")
      .def(pybind11::init<std::vector<at::Tensor>>(), pybind11::arg("tensors"))
      .def("unchanged", &StorageWatch::unchanged)
      .def("__len__", &StorageWatch::size);
}

}  // namespace fastreload
