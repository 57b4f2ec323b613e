#include "copy_pairs.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <optional>

namespace fastreload {
namespace {

std::optional<ElemKind> float_kind(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return ElemKind::kF64;
    case at::kFloat: return ElemKind::kF32;
    case at::kHalf: return ElemKind::kF16;
    case at::kBFloat16: return ElemKind::kBF16;
    case at::kFloat8_e4m3fn: return ElemKind::kF8E4M3;
    case at::kFloat8_e5m2: return ElemKind::kF8E5M2;
    default: return std::nullopt;
  }
}

Span span_of(const at::Tensor& t, int64_t pair, const void* data) {
  const int64_t numel = t.numel();
  if (numel == 0 || data == nullptr) return {};
  int64_t elements = numel;
  if (!t.is_contiguous()) {
    elements = 1;
    for (const auto d : c10::irange(t.dim())) elements += (t.size(d) - 1) * t.stride(d);
  }
  const auto lo = reinterpret_cast<uintptr_t>(data);
  return Span{lo, lo + static_cast<uintptr_t>(elements * t.element_size()), pair};
}

// The address of t's first element, nullptr where it has no bytes (meta, no
// storage). Read from the storage directly: this runs for every tensor of every
// reload, and const_data_ptr() checks more than it needs to here.
const void* data_of(const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  if (impl->is_meta() || !impl->has_storage()) return nullptr;
  const auto* base = static_cast<const char*>(impl->unsafe_storage().data());
  // No data but elements (a storage resized to nothing): let const_data_ptr() say so.
  if (base == nullptr) return impl->numel() == 0 ? nullptr : t.const_data_ptr();
  return base + impl->storage_offset() * static_cast<int64_t>(impl->itemsize());
}

// Pairs per task of the parallel metadata passes: touching tens of thousands of
// TensorImpls costs cache misses, which two threads overlap better than one.
constexpr int64_t kPairsPerTask = 2048;

// Calls fn(byte offset from data_ptr) for every element of t.
template <typename Fn>
void for_each_element_offset(const at::Tensor& t, Fn fn) {
  const int64_t dims = t.dim();
  std::vector<int64_t> index(dims, 0);
  const int64_t item = t.element_size();
  for (int64_t n = 0; n < t.numel(); ++n) {
    int64_t offset = 0;
    for (const auto d : c10::irange(dims)) offset += index[d] * t.stride(d);
    fn(offset * item);
    for (int64_t d = dims - 1; d >= 0; --d) {
      if (++index[d] < t.size(d)) break;
      index[d] = 0;
    }
  }
}

// Exact test for two tensors whose spans intersect. Dense tensors cover their
// whole span; strided ones may interleave without sharing a byte, so those are
// checked byte by byte over the common window (rare: views of one storage).
bool bytes_overlap(const at::Tensor& a, const Span& sa, const at::Tensor& b, const Span& sb) {
  if (a.is_non_overlapping_and_dense() && b.is_non_overlapping_and_dense()) return true;
  const uintptr_t lo = std::max(sa.lo, sb.lo);
  const uintptr_t hi = std::min(sa.hi, sb.hi);
  std::vector<bool> used(hi - lo, false);
  const auto mark = [&](const at::Tensor& t, uintptr_t base, bool test) {
    bool hit = false;
    for_each_element_offset(t, [&](int64_t offset) {
      const uintptr_t first = base + static_cast<uintptr_t>(offset);
      for (uintptr_t p = first; p < first + t.element_size(); ++p) {
        if (p < lo || p >= hi) continue;
        if (test) {
          hit = hit || used[p - lo];
        } else {
          used[p - lo] = true;
        }
      }
    });
    return hit;
  };
  mark(a, sa.lo, false);
  return mark(b, sb.lo, true);
}

bool intersect(const Span& a, const Span& b) { return a.lo < b.hi && b.lo < a.hi; }

DestinationFacts destination_facts(const at::Tensor& d, int64_t i, const at::Device& device) {
  DestinationFacts f;
  f.dense = d.is_non_overlapping_and_dense();
  if (d.device() != device) {
    f.problem = PairProblem::kDevice;
  } else if (!f.dense && at::has_internal_overlap(d) == at::MemOverlap::Yes) {
    // A destination whose elements share bytes (an expanded view) has no single result.
    f.problem = PairProblem::kDestinationOverlap;
  } else {
    f.span = span_of(d, i, data_of(d));
  }
  return f;
}

PairFacts source_facts(const DestinationFacts& df, const at::Tensor& d, const at::Tensor& s,
                       int64_t i, const at::Device& device) {
  PairFacts f;
  if (df.problem != PairProblem::kNone) {
    f.problem = df.problem;
    return f;
  }
  if (s.device() != device && !s.is_cpu()) {
    f.problem = PairProblem::kDevice;
    return f;
  }
  if (d.sizes() != s.sizes()) {
    f.problem = PairProblem::kShape;
    return f;
  }
  const at::ScalarType d_type = d.scalar_type();
  const at::ScalarType s_type = s.scalar_type();
  if (!convertible(s_type, d_type)) {
    f.problem = PairProblem::kDtype;
    return f;
  }
  const void* s_data = data_of(s);
  f.src = span_of(s, i, s_data);
  const bool same_strides = d.strides() == s.strides();
  // A conjugate or negative bit (a lazy view) changes what the bytes mean: such
  // pairs go to Tensor::copy_, which resolves them.
  const bool plain_bits = !d.is_conj() && !d.is_neg() && !s.is_conj() && !s.is_neg();
  f.noop = df.span.lo != 0 && df.span.lo == reinterpret_cast<uintptr_t>(s_data) &&
           d_type == s_type && same_strides && d.is_conj() == s.is_conj() && d.is_neg() == s.is_neg();
  // Dense tensors whose strides agree on every dimension of more than one element
  // store their elements in the same order: one flat copy serves them.
  f.fused = plain_bits && df.dense && s.is_non_overlapping_and_dense();
  for (int64_t k = 0; f.fused && !same_strides && k < d.dim(); ++k) {
    f.fused = d.size(k) <= 1 || d.stride(k) == s.stride(k);
  }
  if (f.fused && df.span.lo != 0) {
    // A dense destination's span is exactly its bytes.
    const int64_t bytes = static_cast<int64_t>(df.span.hi - df.span.lo);
    const bool same_dtype = d_type == s_type;
    f.desc = CopyDesc{
        static_cast<const char*>(s_data),
        reinterpret_cast<char*>(df.span.lo),
        same_dtype ? bytes : bytes / static_cast<int64_t>(d.element_size()),
        same_dtype ? ElemKind::kBytes : *float_kind(s_type),
        same_dtype ? ElemKind::kBytes : *float_kind(d_type),
    };
  }
  return f;
}

const char* describe(PairProblem p) {
  switch (p) {
    case PairProblem::kShape: return "shapes differ";
    case PairProblem::kDtype: return "no conversion between these dtypes";
    case PairProblem::kDevice: return "source is neither on the destination's device nor on the host, or destinations are on several devices";
    case PairProblem::kDestinationOverlap: return "destination overlaps another destination";
    case PairProblem::kSourceOverlap: return "source overlaps a destination it is not";
    default: return "ok";
  }
}

using FusedCopyTable = std::array<FusedCopyFn, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>;

FusedCopyTable& fused_copies() {
  static FusedCopyTable table{};
  return table;
}

}  // namespace

void prefetch_tensor(const at::Tensor& t) {
  const char* impl = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
  for (int line = 0; line < 4; ++line) __builtin_prefetch(impl + 64 * line);  // a TensorImpl spans ~200 bytes
}

void prefetch_storage(const at::Tensor& t) {
  __builtin_prefetch(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
}

bool convertible(at::ScalarType from, at::ScalarType to) {
  return from == to || (float_kind(from) && float_kind(to));
}

Destinations::Destinations(at::TensorList dst) : facts_(dst.size()) {
  if (dst.empty()) return;
  device_ = dst[0].device();
  at::parallel_for(0, static_cast<int64_t>(dst.size()), kPairsPerTask, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) facts_[i] = destination_facts(dst[i], i, device_);
  });
  sorted_.reserve(facts_.size());
  for (const DestinationFacts& f : facts_) {
    if (f.span.lo != 0) sorted_.push_back(f.span);
  }
  // Model tensors are usually allocated in address order: then no sort is needed.
  const auto by_start = [](const Span& x, const Span& y) { return x.lo < y.lo; };
  if (!std::is_sorted(sorted_.begin(), sorted_.end(), by_start)) {
    std::sort(sorted_.begin(), sorted_.end(), by_start);
  }
  max_hi_.reserve(sorted_.size());
  for (const auto i : c10::irange(sorted_.size())) {
    const Span& s = sorted_[i];
    // A destination starting before an earlier one ends: find which ones it meets.
    if (i > 0 && s.lo < max_hi_.back()) {
      for (size_t j = first_reaching(s.lo); j < i; ++j) {
        const Span& o = sorted_[j];
        if (intersect(o, s) && bytes_overlap(dst[s.pair], s, dst[o.pair], o)) {
          facts_[s.pair].problem = facts_[o.pair].problem = PairProblem::kDestinationOverlap;
        }
      }
    }
    max_hi_.push_back(max_hi_.empty() ? s.hi : std::max(max_hi_.back(), s.hi));
  }
}

// Every destination that can reach past `at` has a sorted index of at least this:
// the first whose running maximum end exceeds it. A branch-free binary search: one
// runs per source on every reload.
size_t Destinations::first_reaching(uintptr_t at) const {
  if (max_hi_.empty()) return 0;
  const uintptr_t* base = max_hi_.data();
  for (size_t n = max_hi_.size(); n > 1; n -= n / 2) {
    base = base[n / 2] <= at ? base + n / 2 : base;
  }
  return static_cast<size_t>(base - max_hi_.data()) + (*base <= at ? 1 : 0);
}

bool Destinations::overlaps_other(at::TensorList dst, const at::Tensor& src, const Span& span) const {
  for (size_t j = first_reaching(span.lo); j < sorted_.size() && sorted_[j].lo < span.hi; ++j) {
    const Span& o = sorted_[j];
    if (o.hi <= span.lo || o.pair == span.pair) continue;
    const at::Tensor& d = dst[o.pair];
    if (src.device() == d.device() && bytes_overlap(src, span, d, o)) return true;
  }
  return false;
}

namespace {

// What a fingerprint holds besides sizes and strides: dtype, device, lazy bits.
int64_t kind_of(const c10::TensorImpl* impl) {
  const at::Device device = impl->device();
  return static_cast<int64_t>(c10::typeMetaToScalarType(impl->dtype())) << 32 |
         static_cast<int64_t>(impl->is_conj()) << 25 |
         static_cast<int64_t>(impl->is_neg()) << 24 | static_cast<int64_t>(device.type()) << 8 |
         static_cast<uint8_t>(device.index());
}

}  // namespace

// Per tensor: data address, kind, dim, then its sizes and its strides.
Fingerprints::Fingerprints(at::TensorList tensors) {
  starts_.reserve(tensors.size() + 1);
  size_t end = 0;
  for (const at::Tensor& t : tensors) {
    starts_.push_back(end);
    end += 3 + 2 * t.dim();
  }
  starts_.push_back(end);
  values_.resize(end);
  for (const auto i : c10::irange(tensors.size())) record(i, tensors[i]);
}

Fingerprints Fingerprints::with_dims_of(const Fingerprints& like) {
  Fingerprints room;
  room.starts_ = like.starts_;
  room.values_.resize(like.values_.size());
  return room;
}

void Fingerprints::record(size_t i, const at::Tensor& t) {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  int64_t* v = values_.data() + starts_[i];
  const int64_t dim = impl->dim();
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(starts_[i + 1] - starts_[i]) == 3 + 2 * dim,
                        "Fingerprints: tensor ", i, " has another number of dims");
  v[0] = reinterpret_cast<int64_t>(data_of(t));
  v[1] = kind_of(impl);
  v[2] = dim;
  const auto sizes = impl->sizes();
  const auto strides = impl->strides();
  std::copy(sizes.begin(), sizes.end(), v + 3);
  std::copy(strides.begin(), strides.end(), v + 3 + dim);
}

bool Fingerprints::matches(size_t i, const at::Tensor& t) const {
  const c10::TensorImpl* impl = t.unsafeGetTensorImpl();
  const int64_t* v = values_.data() + starts_[i];
  const int64_t dim = impl->dim();
  if (static_cast<int64_t>(starts_[i + 1] - starts_[i]) != 3 + 2 * dim || v[2] != dim ||
      v[0] != reinterpret_cast<int64_t>(data_of(t)) || v[1] != kind_of(impl)) {
    return false;
  }
  const auto sizes = impl->sizes();
  const auto strides = impl->strides();
  return std::equal(sizes.begin(), sizes.end(), v + 3) && std::equal(strides.begin(), strides.end(), v + 3 + dim);
}

bool Fingerprints::all_match(at::TensorList tensors) const {
  if (tensors.size() + 1 != starts_.size()) return false;
  // Other tensors usually differ from the first: say so without a parallel pass.
  if (!tensors.empty() && !matches(0, tensors[0])) return false;
  std::atomic<bool> all{true};
  at::parallel_for(0, static_cast<int64_t>(tensors.size()), kPairsPerTask, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi && all.load(std::memory_order_relaxed); ++i) {
      if (i + 2 * kPrefetchAhead < hi) prefetch_tensor(tensors[i + 2 * kPrefetchAhead]);
      if (i + kPrefetchAhead < hi) prefetch_storage(tensors[i + kPrefetchAhead]);
      if (!matches(i, tensors[i])) all = false;
    }
  });
  return all;
}

std::vector<PairFacts> examine_sources(const Destinations& dsts, at::TensorList dst, at::TensorList src,
                                       const Fingerprints* expected, bool* changed, Fingerprints* sources) {
  TORCH_CHECK(dst.size() == src.size() && dst.size() == dsts.size(), "batched_copy_: got ",
              dst.size(), " destinations but ", src.size(), " sources");
  std::vector<PairFacts> facts(src.size());
  if (src.empty()) return facts;
  const at::Device device = dsts.device();
  std::atomic<bool> moved{false};
  at::parallel_for(0, static_cast<int64_t>(src.size()), kPairsPerTask, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      if (i + 2 * kPrefetchAhead < hi) {
        prefetch_tensor(dst[i + 2 * kPrefetchAhead]);
        prefetch_tensor(src[i + 2 * kPrefetchAhead]);
      }
      if (i + kPrefetchAhead < hi) {
        prefetch_storage(dst[i + kPrefetchAhead]);
        prefetch_storage(src[i + kPrefetchAhead]);
      }
      // Compared in the same pass: the destination's TensorImpl is read once.
      if (expected != nullptr && !expected->matches(i, dst[i])) {
        moved = true;
        return;
      }
      PairFacts& f = facts[i];
      f = source_facts(dsts[i], dst[i], src[i], i, device);
      if (f.problem == PairProblem::kNone && sources != nullptr) sources->record(i, src[i]);
      if (f.problem != PairProblem::kNone || f.noop || f.src.lo == 0) continue;
      // A source may also overlap its own destination partially: that is refused too.
      const Span& own = dsts[i].span;
      if ((own.lo != 0 && intersect(own, f.src) && bytes_overlap(src[i], f.src, dst[i], own)) ||
          dsts.overlaps_other(dst, src[i], f.src)) {
        f.problem = PairProblem::kSourceOverlap;
      }
    }
  });
  if (changed != nullptr) *changed = moved;
  return facts;
}

std::vector<PairProblem> pair_problems(const std::vector<PairFacts>& facts) {
  std::vector<PairProblem> problems(facts.size());
  for (const auto i : c10::irange(facts.size())) problems[i] = facts[i].problem;
  return problems;
}

std::vector<PairProblem> find_pair_problems(at::TensorList dst, at::TensorList src) {
  TORCH_CHECK(dst.size() == src.size(), "batched_copy_: got ", dst.size(), " destinations but ",
              src.size(), " sources");
  const Destinations dsts(dst);
  return pair_problems(examine_sources(dsts, dst, src));
}

DescribedBatch describe_pairs(const Destinations& dsts, const std::vector<PairFacts>& facts, size_t begin,
                              size_t end) {
  DescribedBatch batch;
  batch.fused.reserve(end - begin);
  batch.fused_pairs.reserve(end - begin);
  for (size_t i = begin; i < end; ++i) {
    const PairFacts& f = facts[i];
    TORCH_INTERNAL_ASSERT(f.problem == PairProblem::kNone, "describe_pairs: pair ", i, " was refused");
    if (f.noop || dsts[i].span.lo == 0) continue;
    if (f.fused) {
      batch.fused_pairs.push_back(static_cast<int64_t>(i));
      batch.fused.push_back(f.desc);
    } else {
      batch.fallback.push_back(static_cast<int64_t>(i));
    }
  }
  return batch;
}

DescribedBatch checked_batch(at::TensorList dst, at::TensorList src) {
  TORCH_CHECK(dst.size() == src.size(), "batched_copy_: got ", dst.size(), " destinations but ",
              src.size(), " sources");
  const Destinations dsts(dst);
  const std::vector<PairFacts> facts = examine_sources(dsts, dst, src);
  for (const auto i : c10::irange(facts.size())) {
    const PairFacts& f = facts[i];
    TORCH_CHECK(f.problem == PairProblem::kNone, "batched_copy_: pair ", i, ": ",
                describe(f.problem), " (destination ", dst[i].scalar_type(), dst[i].sizes(),
                " on ", dst[i].device(), ", source ", src[i].scalar_type(), src[i].sizes(),
                " on ", src[i].device(), ")");
  }
  return describe_pairs(dsts, facts, 0, facts.size());
}

bool register_fused_copy(c10::DeviceType type, FusedCopyFn fn) {
  fused_copies()[static_cast<size_t>(type)] = fn;
  return true;
}

FusedCopyFn fused_copy_for(c10::DeviceType type) {
  const FusedCopyFn fn = fused_copies()[static_cast<size_t>(type)];
  TORCH_CHECK(fn != nullptr, "batched_copy_: this build has no kernel for ", type, " tensors");
  return fn;
}

namespace {

at::Tensor batched_copy_check(at::TensorList dst, at::TensorList src) {
  const auto problems = find_pair_problems(dst, src);
  at::Tensor out = at::empty({static_cast<int64_t>(problems.size())}, at::kChar);
  std::copy(problems.begin(), problems.end(), reinterpret_cast<PairProblem*>(out.data_ptr<int8_t>()));
  return out;
}

}  // namespace

// Metadata only, so one kernel serves every device.
TORCH_LIBRARY_IMPL(fastreload, CompositeExplicitAutograd, m) {
  m.impl("batched_copy_check", &batched_copy_check);
}

}  // namespace fastreload
