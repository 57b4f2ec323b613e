#pragma once
// Host-side view of a batched copy: which pairs are acceptable, and the
// descriptors the fused pass runs on. Metadata only; no byte is touched here.
//
// The destination side (Destinations) is read on its own, so that BoundCopy can
// keep it across calls for a fixed list of model tensors and read only the
// sources each time; batched_copy_ reads both sides per call. Both run the same
// checks through the same code.

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>

#include <vector>

#include "copy_plan.h"

namespace fastreload {

// Why batched_copy_ refuses a pair. The values are the codes batched_copy_check
// returns and fastreload/ops.py names; keep the two in step.
enum class PairProblem : int8_t {
  kNone = 0,
  kShape = 1,               // dst and src shapes differ
  kDtype = 2,               // no conversion between the two dtypes
  kDevice = 3,              // src neither on dst's device nor on the host; dsts on several devices
  kDestinationOverlap = 4,  // dst shares bytes with another pair's dst, or with itself
  kSourceOverlap = 5,       // src shares bytes with a dst it is not the exact copy of
};

// Asks for the cache lines a check of t reads: its TensorImpl, then (once that has
// arrived) its StorageImpl. The passes over tens of thousands of tensors issue these
// some tensors ahead, so that the misses of several overlap instead of queueing.
void prefetch_tensor(const at::Tensor& t);
void prefetch_storage(const at::Tensor& t);
// How many tensors ahead the passes ask.
constexpr int64_t kPrefetchAhead = 8;

// Whether batched_copy_ converts `from` into `to`: same dtype, or both floating
// types it knows (fp64, fp32, fp16, bf16, fp8 e4m3fn and e5m2).
bool convertible(at::ScalarType from, at::ScalarType to);

// Byte range [lo, hi) from a tensor's first to one past its last element; lo == 0
// for tensors with no bytes to read or write (empty, meta).
struct Span {
  uintptr_t lo = 0;
  uintptr_t hi = 0;
  int64_t pair = 0;
};

struct DestinationFacts {
  PairProblem problem = PairProblem::kNone;  // kDevice or kDestinationOverlap
  Span span;
  bool dense = false;  // non-overlapping and dense
};

// Every destination of a batch, read once and checked against the others: one
// device, no destination sharing bytes with itself or with another.
class Destinations {
 public:
  explicit Destinations(at::TensorList dst);

  const DestinationFacts& operator[](size_t i) const { return facts_[i]; }
  size_t size() const { return facts_.size(); }
  bool empty() const { return facts_.empty(); }
  const at::Device& device() const { return device_; }
  // A source that shares bytes with a destination other than its own pair.
  bool overlaps_other(at::TensorList dst, const at::Tensor& src, const Span& span) const;

 private:
  size_t first_reaching(uintptr_t at) const;

  at::Device device_{at::kCPU};
  std::vector<DestinationFacts> facts_;
  std::vector<Span> sorted_;        // destinations with bytes, by start
  std::vector<uintptr_t> max_hi_;   // running maximum of sorted_ ends
};

// What the checks and descriptors of a tensor rest on: data address, dtype,
// device, conjugate and negative bits, sizes and strides. While every tensor
// matches its fingerprint, what was found about them still holds.
class Fingerprints {
 public:
  explicit Fingerprints(at::TensorList tensors);
  // Room for the fingerprints of as many tensors with the same dims as those of
  // `like`, each written by record(): how a pass over pairs fingerprints their
  // sources as it reads them.
  static Fingerprints with_dims_of(const Fingerprints& like);
  // Writes tensor i's fingerprint; t has the dims of the i-th tensor of `like`.
  void record(size_t i, const at::Tensor& t);
  bool matches(size_t i, const at::Tensor& t) const;
  // As many tensors as fingerprinted, each matching its own (one parallel pass).
  bool all_match(at::TensorList tensors) const;

 private:
  Fingerprints() = default;

  std::vector<int64_t> values_;
  std::vector<size_t> starts_;  // tensor i's values begin at starts_[i]; one more at the end
};

// Everything the descriptors need of one pair, from one read of its source: found
// in the parallel pass, so that describing the batches touches no tensor again.
struct PairFacts {
  PairProblem problem = PairProblem::kNone;
  Span src;
  bool noop = false;   // src is dst itself (same bytes, same view): nothing to copy
  bool fused = false;  // dense pair in one memory order: the fused pass copies it
  CopyDesc desc{};     // when fused: its descriptor
};

// The source side of every pair, checked against the destinations. With
// `expected`, each destination is first compared with its fingerprint; when one
// differs, *changed is set and the facts are not to be used: read the
// destinations again. With `sources` (room shaped like the destinations'
// fingerprints, Fingerprints::with_dims_of), the source of every pair found
// acceptable is fingerprinted into it.
std::vector<PairFacts> examine_sources(const Destinations& dsts, at::TensorList dst, at::TensorList src,
                                       const Fingerprints* expected = nullptr, bool* changed = nullptr,
                                       Fingerprints* sources = nullptr);

// The first problem of every pair, in pair order.
std::vector<PairProblem> find_pair_problems(at::TensorList dst, at::TensorList src);
std::vector<PairProblem> pair_problems(const std::vector<PairFacts>& facts);

struct DescribedBatch {
  std::vector<CopyDesc> fused;        // pairs sharing one dense memory order
  std::vector<int64_t> fused_pairs;   // the pair index of each of them
  std::vector<int64_t> fallback;      // other pairs (strided views): copied by Tensor::copy_
};

// Pairs [begin, end) of examined pairs without problems, sorted into the fused
// pass and the fallback. Empty pairs and pairs whose src is their dst (same bytes,
// same layout) are left out.
DescribedBatch describe_pairs(const Destinations& dsts, const std::vector<PairFacts>& facts, size_t begin,
                              size_t end);

// Checks every pair, raising a TORCH_CHECK error that names the first refused
// one, and describes them all: what every batched_copy_ kernel starts with.
DescribedBatch checked_batch(at::TensorList dst, at::TensorList src);

// The fused pass of a backend on a described batch, which the caller checked: each
// backend registers its own beside its batched_copy_ kernel (as ATen's
// DispatchStub does), so BoundCopy copies with exactly the kernels of batched_copy_.
using FusedCopyFn = void (*)(const DescribedBatch& batch, at::TensorList dst, at::TensorList src);
bool register_fused_copy(c10::DeviceType type, FusedCopyFn fn);
FusedCopyFn fused_copy_for(c10::DeviceType type);

}  // namespace fastreload
