// MappedFile: a safetensors file mapped into memory so that the fused copy reads its
// pages straight into the model, and so that another process shrinking the file
// meanwhile cannot kill this one.
//
// Reading a mapped page past the end of a file that was truncated after it was
// mapped raises SIGBUS, whose default action ends the process. A process-wide
// SIGBUS handler (installed by guard_mapped_files) looks at the faulting address:
// inside a registered mapping, it maps anonymous zero pages over the rest of that
// mapping and records the file offset of the first page lost, then returns, so the
// faulting read (in any thread, an OpenMP copy thread included) runs again and
// reads zeros. The reload checks first_lost() after the copy and reports the file.
// Any other SIGBUS goes to the handler that was there before, as if this one were
// not. The copy's hot path is unchanged: no check runs unless a fault happens.

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <torch/extension.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <string>

namespace fastreload {
namespace {

namespace py = pybind11;

// Mappings the handler may repair. A slot is in use while begin is nonzero; the
// handler reads slots without locks (only atomics are safe in a signal handler).
struct Slot {
  std::atomic<uintptr_t> begin{0};
  std::atomic<uintptr_t> end{0};
  std::atomic<int64_t> first_lost{-1};  // offset of the first page read as zeros
};
constexpr int kSlots = 4096;
Slot slots[kSlots];
std::mutex slots_mutex;  // taken to register, unregister and install, never in the handler

struct sigaction previous_action;
std::atomic<bool> passed_on{false};
uintptr_t page_size = 4096;  // read once, outside the handler (sysconf is not signal-safe)

void record_lost(Slot& slot, int64_t offset) {
  int64_t seen = slot.first_lost.load();
  while ((seen < 0 || offset < seen) && !slot.first_lost.compare_exchange_weak(seen, offset)) {
  }
}

void pass_on(int signal, const siginfo_t* info) {
  // Not ours: the previous handler takes it. Put back, it sees the fault again when
  // the faulting instruction reruns on return (or, for a signal sent by a process,
  // when it is sent again). Twice in one fault means the handlers send it back and
  // forth: the default action ends it.
  if (passed_on.exchange(true)) {
    struct sigaction fallback {};
    fallback.sa_handler = SIG_DFL;
    sigemptyset(&fallback.sa_mask);
    sigaction(signal, &fallback, nullptr);
  } else {
    sigaction(signal, &previous_action, nullptr);
  }
  if (info->si_code <= 0) raise(signal);
}

void on_sigbus(int signal, siginfo_t* info, void*) {
  if (info->si_code > 0) {  // raised by the kernel for a memory access
    const uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
    for (Slot& slot : slots) {
      const uintptr_t begin = slot.begin.load(std::memory_order_acquire);
      if (begin == 0 || address < begin || address >= slot.end.load(std::memory_order_acquire)) continue;
      const uintptr_t page = address & ~(page_size - 1);
      const uintptr_t end = slot.end.load(std::memory_order_acquire);
      // Zeros from the faulting page to the end of the mapping: the pages after it
      // are past the file's new end too, and each would fault on its own.
      void* zeros = mmap(reinterpret_cast<void*>(page), end - page, PROT_READ | PROT_WRITE,
                         MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (zeros == MAP_FAILED) break;
      record_lost(slot, static_cast<int64_t>(page - begin));
      return;
    }
  }
  pass_on(signal, info);
}

// Installs the handler unless it is the one in place: another library (Python's
// faulthandler, say) may have put its own over it since.
void guard_mapped_files() {
  std::lock_guard<std::mutex> lock(slots_mutex);
  page_size = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  struct sigaction current {};
  sigaction(SIGBUS, nullptr, &current);
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return;
  struct sigaction ours {};
  ours.sa_sigaction = on_sigbus;
  ours.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&ours.sa_mask);
  TORCH_CHECK(sigaction(SIGBUS, &ours, &previous_action) == 0,
              "fastreload: cannot install the SIGBUS handler: ", std::strerror(errno));
  passed_on.store(false);
}

class MappedFile {
 public:
  // Maps the first `size` bytes of the open file `fd` (the caller may close it).
  MappedFile(int fd, int64_t size, std::string path) : size_(size), path_(std::move(path)) {
    TORCH_CHECK(size > 0, path_, ": nothing to map in an empty file");
    guard_mapped_files();
    // Private and writable as far as torch.frombuffer is concerned: never written,
    // so never copied.
    void* data = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    TORCH_CHECK(data != MAP_FAILED, path_, ": cannot be mapped: ", std::strerror(errno));
    data_ = static_cast<uint8_t*>(data);
    const uintptr_t page = page_size;
    const uintptr_t begin = reinterpret_cast<uintptr_t>(data_);
    std::lock_guard<std::mutex> lock(slots_mutex);
    for (Slot& slot : slots) {
      if (slot.begin.load() != 0) continue;
      slot_ = &slot;
      slot.first_lost.store(-1);
      slot.end.store(begin + (size + page - 1) / page * page, std::memory_order_release);
      slot.begin.store(begin, std::memory_order_release);
      return;
    }
    munmap(data_, size_);
    TORCH_CHECK(false, path_, ": cannot be mapped: ", kSlots, " files are mapped already");
  }

  ~MappedFile() {
    {
      // Forgotten before it is unmapped: the address range may be reused at once.
      std::lock_guard<std::mutex> lock(slots_mutex);
      slot_->begin.store(0, std::memory_order_release);
      slot_->end.store(0, std::memory_order_release);
    }
    munmap(data_, size_);
  }

  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  // The file offset from which its bytes were read as zeros, the file having been
  // cut short (or its pages unreadable) while mapped; -1 if none was.
  int64_t first_lost() const { return slot_->first_lost.load(); }
  int64_t size() const { return size_; }
  uint8_t* data() const { return data_; }

 private:
  uint8_t* data_ = nullptr;
  int64_t size_;
  std::string path_;
  Slot* slot_ = nullptr;
};

}  // namespace

void bind_mapped_file(py::module& m) {
  py::class_<MappedFile>(m, "MappedFile", py::buffer_protocol())
      .def(py::init<int, int64_t, std::string>(), py::arg("fd"), py::arg("size"), py::arg("path"))
      .def_buffer([](MappedFile& f) {
        return py::buffer_info(f.data(), 1, py::format_descriptor<uint8_t>::format(), 1, {f.size()}, {1},
                               /*readonly=*/false);
      })
      .def("first_lost", &MappedFile::first_lost)
      .def("__len__", &MappedFile::size);
  m.def("guard_mapped_files", &guard_mapped_files);
}

}  // namespace fastreload
