// fastreload._C: importing it loads the operator library (the registrations in
// ops.cpp, cpu/ and cuda/ run), and it holds what a call through torch.ops cannot
// do fast enough: BoundCopy here, CheckpointTensors, ValuesInOrder and StorageWatch
// beside it; and MappedFile, a mapped safetensors file that cannot crash the process.
//
// A reload of a large MoE copies tens of thousands of pairs into the same model
// tensors every time. Through batched_copy_, each call passes two Python lists
// as Tensor[] (every element boxed into an IValue, then unboxed: about 0.1 µs
// per tensor) and reads and checks every destination again. BoundCopy keeps the
// destinations, read and checked once, and on each call reads only the sources,
// straight out of a Python tuple, plus a fingerprint of each destination that
// tells whether it changed (then it reads them again). It also remembers the
// last few accepted calls' sources by fingerprint, with their pairs checked and
// described: sources seen again are only compared with them. Destinations and
// sources may also be frozen (frozen_tensors.h): then only their storages are
// compared. The checks are the ones batched_copy_ runs (copy_pairs.h), and the
// copy is its backend's own pass.

#include <torch/csrc/autograd/python_variable.h>
#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "../copy_pairs.h"
#include "frozen_tensors.h"

namespace fastreload {
namespace {

namespace py = pybind11;

// Tensors handed out without touching their reference counts: counting a
// Python-owned tensor's references costs more than checking its pair. Whoever
// owns the objects keeps them alive meanwhile.
struct Borrowed {
  std::vector<at::Tensor> tensors;
  ~Borrowed() {
    for (at::Tensor& t : tensors) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
};

// The tensors of a sequence, as a tuple held for the object's lifetime: a tuple
// cannot drop its items while the copy runs without the GIL; a list could.
class BorrowedSources {
 public:
  explicit BorrowedSources(py::handle sources)
      : tuple_(py::reinterpret_steal<py::object>(PySequence_Tuple(sources.ptr()))) {
    if (!tuple_) {
      PyErr_Clear();
      throw py::type_error(std::string("BoundCopy: sources must be a sequence of tensors, not ") +
                           Py_TYPE(sources.ptr())->tp_name);
    }
    const Py_ssize_t n = PyTuple_GET_SIZE(tuple_.ptr());
    borrowed_.tensors.reserve(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (i + kPrefetchAhead < n) __builtin_prefetch(PyTuple_GET_ITEM(tuple_.ptr(), i + kPrefetchAhead));
      PyObject* item = PyTuple_GET_ITEM(tuple_.ptr(), i);
      if (!THPVariable_Check(item)) {
        throw py::type_error("BoundCopy: source " + std::to_string(i) + " is a " +
                             Py_TYPE(item)->tp_name + ", not a tensor");
      }
      borrowed_.tensors.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(THPVariable_Unpack(item)));
    }
  }

  at::TensorList list() const { return borrowed_.tensors; }

 private:
  py::object tuple_;  // declared first: released after the borrows
  Borrowed borrowed_;
};

py::object as_problem_codes(const std::vector<PairProblem>& problems) {
  at::Tensor out = at::empty({static_cast<int64_t>(problems.size())}, at::kChar);
  std::copy(problems.begin(), problems.end(), reinterpret_cast<PairProblem*>(out.data_ptr<int8_t>()));
  return py::cast(out);
}

class BoundCopy {
 public:
  // batch_stops: the end index of each batch, increasing, the last one len(dst).
  // frozen: the destinations are views the caller made and hands out to no one,
  // of tensors it watches itself; they are copied frozen and each call checks
  // their storages only.
  BoundCopy(std::vector<at::Tensor> dst, std::vector<int64_t> batch_stops, bool frozen)
      : dst_(std::move(dst)), stops_(std::move(batch_stops)) {
    if (frozen) {
      frozen_dst_ = std::make_unique<const FrozenTensors>(dst_);
      dst_.assign(frozen_dst_->list().begin(), frozen_dst_->list().end());
    }
    TORCH_CHECK_VALUE(!stops_.empty() && stops_.back() == static_cast<int64_t>(dst_.size()),
                      "BoundCopy: the last batch must end at the last destination (", dst_.size(), ")");
    int64_t start = 0;
    for (const int64_t stop : stops_) {
      TORCH_CHECK_VALUE(stop > start || dst_.empty(), "BoundCopy: batch stops must increase, got ",
                        stop, " after ", start);
      int64_t bytes = 0;
      for (int64_t i = start; i < stop; ++i) bytes += dst_[i].numel() * dst_[i].element_size();
      batch_bytes_.push_back(bytes);
      start = stop;
    }
    read_destinations();
  }

  // dst[i] <- sources[i] for every pair, batch by batch, calling on_batch(bytes)
  // after each. Returns None when done or, having written nothing, the
  // PairProblem code of every pair when some pair is refused. sources: a sequence
  // of tensors, or FrozenTensors.
  py::object copy(py::handle sources, py::handle on_batch) {
    std::shared_ptr<const FrozenTensors> frozen;
    std::optional<BorrowedSources> borrowed;
    if (py::isinstance<FrozenTensors>(sources)) {
      frozen = sources.cast<std::shared_ptr<FrozenTensors>>();
    } else {
      borrowed.emplace(sources);
    }
    const at::TensorList src = frozen ? frozen->list() : borrowed->list();
    TORCH_CHECK_VALUE(src.size() == dst_.size(), "BoundCopy: got ", src.size(), " sources for ",
                      dst_.size(), " destinations");
    std::vector<PairProblem> refused;
    {
      const py::gil_scoped_release no_gil;
      // One call at a time: another thread's call waits here, without the GIL, rather
      // than replace what this one is reading.
      const std::lock_guard<std::mutex> one_at_a_time(mutex_);
      // Sources as they were at a recent accepted call, destinations unchanged since:
      // its checks and descriptors still hold (the common case: the same staging
      // tensors, or the same source mapping, reloaded again and again).
      TORCH_CHECK_VALUE(frozen_dst_ == nullptr || frozen_dst_->unchanged(),
                        "BoundCopy: the storage of a frozen destination was freed or resized");
      TORCH_CHECK_VALUE(frozen == nullptr || frozen->unchanged(),
                        "BoundCopy: the storage of a frozen source was freed or resized");
      const Accepted* accepted = recall(src, frozen);
      if (accepted != nullptr && frozen_dst_ == nullptr && !fingerprints_->all_match(dst_)) {
        accepted_.clear();  // every call remembered was checked against the old destinations
        accepted = nullptr;
      }
      if (accepted == nullptr) {
        bool changed = false;
        Fingerprints sources = Fingerprints::with_dims_of(*fingerprints_);
        std::vector<PairFacts> facts =
            examine_sources(*dsts_, dst_, src, fingerprints_.get(), &changed, &sources);
        if (changed) {
          read_destinations();
          sources = Fingerprints::with_dims_of(*fingerprints_);
          facts = examine_sources(*dsts_, dst_, src, nullptr, nullptr, &sources);
        }
        // Every pair is checked before any batch is written.
        const bool any_refused = std::any_of(facts.begin(), facts.end(), [](const PairFacts& f) {
          return f.problem != PairProblem::kNone;
        });
        if (any_refused) {
          refused = pair_problems(facts);
        } else {
          accepted = remember(std::move(sources), facts, frozen);
        }
      }
      if (refused.empty()) {
        const FusedCopyFn fused_copy = fused_copy_for(dsts_->device().type());
        for (const auto b : c10::irange(stops_.size())) {
          if (stops_[b] > (b == 0 ? 0 : stops_[b - 1])) fused_copy(accepted->batches[b], dst_, src);
          if (!on_batch.is_none()) {
            const py::gil_scoped_acquire gil;
            on_batch(batch_bytes_[b]);
          }
        }
      }
    }
    if (!refused.empty()) return as_problem_codes(refused);
    return py::none();
  }

  int64_t size() const { return static_cast<int64_t>(dst_.size()); }

 private:
  // What an accepted call found: its sources' fingerprints and its batches described.
  struct Accepted {
    Fingerprints sources;
    std::vector<DescribedBatch> batches;
    // The sources, when they were frozen: not kept alive here (they may hold mapped
    // files that were deleted since); a freed one is never seen again.
    std::weak_ptr<const FrozenTensors> frozen;
  };

  // The remembered call whose sources are these tensors again (moved to the front),
  // or nullptr. Frozen sources seen before are known by identity; seen first, they
  // are compared like any, and known from then on.
  const Accepted* recall(at::TensorList src, const std::shared_ptr<const FrozenTensors>& frozen) {
    size_t k = 0;
    while (frozen != nullptr && k < accepted_.size() && accepted_[k]->frozen.lock() != frozen) ++k;
    if (frozen == nullptr || k == accepted_.size()) {
      for (k = 0; k < accepted_.size() && !accepted_[k]->sources.all_match(src); ++k) {
      }
      if (k == accepted_.size()) return nullptr;
      if (frozen != nullptr) accepted_[k]->frozen = frozen;
    }
    std::rotate(accepted_.begin(), accepted_.begin() + k, accepted_.begin() + k + 1);
    return accepted_.front().get();
  }

  const Accepted* remember(Fingerprints sources, const std::vector<PairFacts>& facts,
                           const std::shared_ptr<const FrozenTensors>& frozen) {
    auto accepted = std::make_unique<Accepted>(Accepted{std::move(sources), {}, frozen});
    int64_t start = 0;
    for (const int64_t stop : stops_) {
      accepted->batches.push_back(describe_pairs(*dsts_, facts, start, stop));
      start = stop;
    }
    if (accepted_.size() == kRememberedCalls) accepted_.pop_back();
    accepted_.insert(accepted_.begin(), std::move(accepted));
    return accepted_.front().get();
  }

  void read_destinations() {
    dsts_ = std::make_unique<const Destinations>(dst_);
    fingerprints_ = std::make_unique<const Fingerprints>(dst_);
    accepted_.clear();
  }

  // A server may alternate between a few sources (two checkpoints, double-buffered
  // staging tensors, a mapping and a file): each keeps its checks. About 100 bytes
  // per pair each.
  static constexpr size_t kRememberedCalls = 4;

  std::unique_ptr<const FrozenTensors> frozen_dst_;  // holds dst_ when frozen
  std::vector<at::Tensor> dst_;
  std::vector<int64_t> stops_;
  std::vector<int64_t> batch_bytes_;
  std::unique_ptr<const Destinations> dsts_;
  std::unique_ptr<const Fingerprints> fingerprints_;
  // The last accepted calls, most recent first.
  std::vector<std::unique_ptr<Accepted>> accepted_;
  std::mutex mutex_;
};

}  // namespace

void bind_checkpoint_tensors(pybind11::module& m);  // checkpoint_tensors.cpp
void bind_values_in_order(pybind11::module& m);     // values_in_order.cpp
void bind_mapped_file(pybind11::module& m);         // mapped_file.cpp
void bind_storage_watch(pybind11::module& m);       // storage_watch.cpp
void bind_frozen_tensors(pybind11::module& m);      // frozen_tensors.cpp

}  // namespace fastreload

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using fastreload::BoundCopy;
  pybind11::class_<BoundCopy>(m, "BoundCopy")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<int64_t>, bool>(), pybind11::arg("dst"),
           pybind11::arg("batch_stops"), pybind11::arg("frozen") = false)
      .def("copy", &BoundCopy::copy, pybind11::arg("sources"), pybind11::arg("on_batch") = pybind11::none())
      .def("__len__", &BoundCopy::size);
  fastreload::bind_checkpoint_tensors(m);
  fastreload::bind_values_in_order(m);
  fastreload::bind_mapped_file(m);
  fastreload::bind_storage_watch(m);
  fastreload::bind_frozen_tensors(m);
}
