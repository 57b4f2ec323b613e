// CheckpointTensors: the checkpoint-format tensors a replay builds for recorded
// modules (fastreload/replay.py), made fast.
//
// Replaying a unit means fresh tensors of the recorded shapes, dtypes and classes
// (nn.Parameter, mostly) for every checkpoint tensor of it: tens of thousands per
// reload of a large MoE. One torch.empty plus Parameter() each costs about 3 µs
// in Python, and so does checking each source against what was recorded. Here
// both take one call: `fits` checks a tuple of sources in one pass without the
// GIL, and `make` carves the tensors of a range of entries out of one buffer the
// caller allocated (one allocation per batch, not per tensor) and wraps each in
// its recorded Python class.

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <string>
#include <vector>

#include "../copy_pairs.h"

namespace fastreload {
namespace {

namespace py = pybind11;

// Every tensor starts on a cache line: vector loads and stores stay aligned.
constexpr int64_t kAlignment = 64;

int64_t aligned(int64_t bytes) { return (bytes + kAlignment - 1) / kAlignment * kAlignment; }

class CheckpointTensors {
 public:
  // One entry per checkpoint tensor. classes[i]: the Python type to make (a
  // torch.Tensor subclass, or torch.Tensor). checked[i] false: any tensor fits
  // (a weight_loader decides what it takes).
  CheckpointTensors(std::vector<std::vector<int64_t>> shapes, std::vector<at::ScalarType> dtypes,
                    std::vector<at::Device> devices, py::list classes, std::vector<bool> requires_grad,
                    std::vector<bool> checked)
      : shapes_(std::move(shapes)),
        dtypes_(std::move(dtypes)),
        devices_(std::move(devices)),
        requires_grad_(std::move(requires_grad)),
        checked_(std::move(checked)) {
    const size_t n = shapes_.size();
    TORCH_CHECK_VALUE(dtypes_.size() == n && devices_.size() == n && classes.size() == n &&
                          requires_grad_.size() == n && checked_.size() == n,
                      "CheckpointTensors: every list must have one item per entry (", n, ")");
    offsets_.reserve(n + 1);
    offsets_.push_back(0);
    for (const auto i : c10::irange(n)) {
      PyObject* cls = classes[i].ptr();
      TORCH_CHECK_TYPE(PyType_Check(cls) && PyObject_IsSubclass(cls, THPVariableClass) == 1,
                       "CheckpointTensors: class of entry ", i, " is not a torch.Tensor subclass");
      classes_.push_back(py::reinterpret_borrow<py::object>(cls));
      const int64_t numel = c10::multiply_integers(shapes_[i]);
      offsets_.push_back(offsets_.back() + aligned(numel * static_cast<int64_t>(c10::elementSize(dtypes_[i]))));
    }
  }

  int64_t size() const { return static_cast<int64_t>(shapes_.size()); }

  // Bytes of a buffer holding entries [begin, end), each at an aligned offset.
  int64_t nbytes(int64_t begin, int64_t end) const {
    check_range(begin, end);
    return offsets_[end] - offsets_[begin];
  }

  // Whether sources[k] fits entry begin + k for every k: a tensor of the recorded
  // shape, of a dtype that converts into the recorded one, on its device or on the
  // host. False also for anything not a tensor: the caller names what is wrong.
  bool fits(py::handle sources, int64_t begin) const {
    TORCH_CHECK_TYPE(PyTuple_Check(sources.ptr()), "CheckpointTensors.fits: sources must be a tuple");
    const auto tuple = py::reinterpret_borrow<py::tuple>(sources);
    const auto n = static_cast<int64_t>(PyTuple_GET_SIZE(tuple.ptr()));
    check_range(begin, begin + n);
    std::vector<const at::Tensor*> tensors(n);
    for (const auto k : c10::irange(n)) {
      PyObject* item = PyTuple_GET_ITEM(tuple.ptr(), k);
      if (!THPVariable_Check(item)) return false;
      tensors[k] = &THPVariable_Unpack(item);
    }
    const py::gil_scoped_release no_gil;  // the tuple keeps every tensor alive
    for (const auto k : c10::irange(n)) {
      const int64_t i = begin + k;
      if (!checked_[i]) continue;
      const at::Tensor& s = *tensors[k];
      if (s.sizes() != c10::IntArrayRef(shapes_[i])) return false;
      if (!convertible(s.scalar_type(), dtypes_[i])) return false;
      if (s.device() != devices_[i] && !s.is_cpu()) return false;
    }
    return true;
  }

  // Fresh tensors for entries [begin, end): contiguous views of `buffer` (a 1-D
  // uint8 tensor of at least nbytes(begin, end) bytes after `offset`, on the
  // entries' device) as their recorded class, dtype, shape and requires_grad.
  // Uninitialized: the caller loads them.
  py::list make(const at::Tensor& buffer, int64_t offset, int64_t begin, int64_t end) const {
    check_range(begin, end);
    TORCH_CHECK_VALUE(buffer.scalar_type() == at::kByte && buffer.dim() == 1 && buffer.is_contiguous(),
                      "CheckpointTensors.make: the buffer must be a contiguous 1-D uint8 tensor");
    const int64_t base = buffer.storage_offset() + offset;
    TORCH_CHECK_VALUE(offset >= 0 && base % kAlignment == 0 || buffer.numel() == 0,
                      "CheckpointTensors.make: offset ", offset, " is not a multiple of ", kAlignment);
    TORCH_CHECK_VALUE(offset + nbytes(begin, end) <= buffer.numel(), "CheckpointTensors.make: ",
                      nbytes(begin, end), " bytes needed after offset ", offset, ", the buffer has ",
                      buffer.numel());
    const c10::Storage& storage = buffer.storage();
    const c10::DispatchKeySet keys(c10::computeDispatchKey(std::nullopt, at::kStrided, buffer.device()));
    py::list out(end - begin);
    for (const auto i : c10::irange(begin, end)) {
      TORCH_CHECK_VALUE(devices_[i] == buffer.device(), "CheckpointTensors.make: entry ", i, " is on ",
                        devices_[i], ", the buffer on ", buffer.device());
      auto impl = c10::make_intrusive<c10::TensorImpl>(c10::Storage(storage), keys,
                                                       caffe2::TypeMeta::fromScalarType(dtypes_[i]));
      const int64_t itemsize = static_cast<int64_t>(c10::elementSize(dtypes_[i]));
      impl->set_storage_offset((base + offsets_[i] - offsets_[begin]) / itemsize);
      impl->set_sizes_contiguous(shapes_[i]);
      at::Tensor t(std::move(impl));
      if (requires_grad_[i]) t.set_requires_grad(true);
      PyObject* cls = classes_[i].ptr();
      PyObject* wrapped = cls == THPVariableClass ? THPVariable_Wrap(std::move(t))
                                                  : THPVariable_Wrap(t, reinterpret_cast<PyTypeObject*>(cls));
      if (wrapped == nullptr) throw py::error_already_set();
      PyList_SET_ITEM(out.ptr(), i - begin, wrapped);
    }
    return out;
  }

 private:
  void check_range(int64_t begin, int64_t end) const {
    TORCH_CHECK_INDEX(0 <= begin && begin <= end && end <= size(), "CheckpointTensors: entries [", begin,
                      ", ", end, ") out of ", size());
  }

  std::vector<std::vector<int64_t>> shapes_;
  std::vector<at::ScalarType> dtypes_;
  std::vector<at::Device> devices_;
  std::vector<py::object> classes_;
  std::vector<bool> requires_grad_;
  std::vector<bool> checked_;
  std::vector<int64_t> offsets_;  // entry i at offsets_[i] of a buffer holding all; one more at the end
};

}  // namespace

void bind_checkpoint_tensors(py::module& m) {
  py::class_<CheckpointTensors>(m, "CheckpointTensors")
      .def(py::init<std::vector<std::vector<int64_t>>, std::vector<at::ScalarType>, std::vector<at::Device>,
                    py::list, std::vector<bool>, std::vector<bool>>(),
           py::arg("shapes"), py::arg("dtypes"), py::arg("devices"), py::arg("classes"),
           py::arg("requires_grad"), py::arg("checked"))
      .def("nbytes", &CheckpointTensors::nbytes, py::arg("begin"), py::arg("end"))
      .def("fits", &CheckpointTensors::fits, py::arg("sources"), py::arg("begin") = 0)
      .def("make", &CheckpointTensors::make, py::arg("buffer"), py::arg("offset"), py::arg("begin"),
           py::arg("end"))
      .def("__len__", &CheckpointTensors::size);
}

}  // namespace fastreload
