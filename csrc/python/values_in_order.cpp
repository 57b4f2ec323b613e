// ValuesInOrder: a dict's values read by position, for source mappings reloaded
// again and again (fastreload/plan.py, Fetcher).
//
// Looking up tens of thousands of names costs, per name, the cache misses of its
// string (for the hash), of the dict's index slot and of its entry, one after the
// other. A dict whose keys come in the same order as last time has its values at
// the same positions: one walk over its entries finds them all, comparing each
// key with the one expected there: by address when it is the very same object
// (the same dict, or one built from the same names), else by its text, with the
// strings asked for some keys ahead so that their misses overlap. Any other dict
// (keys added, removed or reordered) is answered with None, and the caller looks
// the names up.

#include <torch/extension.h>

#include <cstring>
#include <string>
#include <vector>

namespace fastreload {
namespace {

namespace py = pybind11;

// Keys asked for this many entries ahead of their comparison.
constexpr Py_ssize_t kAhead = 8;

// a == b for two exact str objects (a short name's length, kind and text share
// its first cache lines); keys of other types are never taken for one another.
bool same_text(PyObject* a, PyObject* b) {
  if (!PyUnicode_CheckExact(a) || !PyUnicode_CheckExact(b)) return false;
  const Py_ssize_t length = PyUnicode_GET_LENGTH(a);
  return length == PyUnicode_GET_LENGTH(b) && PyUnicode_KIND(a) == PyUnicode_KIND(b) &&
         std::memcmp(PyUnicode_DATA(a), PyUnicode_DATA(b), length * PyUnicode_KIND(a)) == 0;
}

class ValuesInOrder {
 public:
  // keys: a dict's keys, in its order; positions: for each value wanted, the
  // position of its key among them.
  ValuesInOrder(py::tuple keys, std::vector<int64_t> positions)
      : keys_(std::move(keys)), positions_(std::move(positions)) {
    const auto n = static_cast<int64_t>(PyTuple_GET_SIZE(keys_.ptr()));
    for (const int64_t p : positions_) {
      TORCH_CHECK_INDEX(p >= 0 && p < n, "ValuesInOrder: position ", p, " is not one of ", n, " keys");
    }
  }

  // The values at the positions, as a tuple; None unless source is a dict whose
  // keys are these, in this order.
  py::object read(py::handle source) const {
    PyObject* dict = source.ptr();
    const Py_ssize_t n = PyTuple_GET_SIZE(keys_.ptr());
    if (!PyDict_CheckExact(dict) || PyDict_GET_SIZE(dict) != n) return py::none();
    // Made before any value is borrowed: making it may run a garbage collection,
    // and with it Python code that could change the dict.
    py::tuple out(positions_.size());
    std::vector<PyObject*> keys(static_cast<size_t>(n));
    std::vector<PyObject*> values(static_cast<size_t>(n));
    Py_ssize_t position = 0;
    PyObject* key = nullptr;
    PyObject* value = nullptr;
    PyObject* const* expected = &PyTuple_GET_ITEM(keys_.ptr(), 0);
    // The GIL is held: the dict cannot change size meanwhile.
    for (Py_ssize_t j = 0; PyDict_Next(dict, &position, &key, &value); ++j) {
      // Another dict of the same size usually differs from the start: said before the walk ends.
      if (j < kAhead && key != expected[j] && !same_text(key, expected[j])) return py::none();
      keys[j] = key;
      values[j] = value;
    }
    for (Py_ssize_t j = kAhead; j < n; ++j) {
      if (j + kAhead < n && keys[j + kAhead] != expected[j + kAhead]) {
        __builtin_prefetch(keys[j + kAhead]);
        __builtin_prefetch(expected[j + kAhead]);
      }
      if (keys[j] != expected[j] && !same_text(keys[j], expected[j])) return py::none();
    }
    for (size_t i = 0; i < positions_.size(); ++i) {
      PyObject* v = values[positions_[i]];
      Py_INCREF(v);
      PyTuple_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), v);
    }
    return std::move(out);
  }

 private:
  py::tuple keys_;  // held: a key object stays alive, so its address names it alone
  std::vector<int64_t> positions_;
};

}  // namespace

void bind_values_in_order(py::module& m) {
  py::class_<ValuesInOrder>(m, "ValuesInOrder")
      .def(py::init<py::tuple, std::vector<int64_t>>(), py::arg("keys"), py::arg("positions"))
      .def("read", &ValuesInOrder::read, py::arg("source"));
}

}  // namespace fastreload
