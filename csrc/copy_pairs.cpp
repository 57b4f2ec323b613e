#include "copy_pairs.h"

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
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

bool convertible(at::ScalarType from, at::ScalarType to) {
  return from == to || (float_kind(from) && float_kind(to));
}

// Byte range [lo, hi) from a tensor's first to one past its last element; lo == 0
// for tensors with no bytes to read or write (empty, meta).
struct Span {
  uintptr_t lo = 0;
  uintptr_t hi = 0;
  int64_t pair = 0;
};

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

const void* data_of(const at::Tensor& t) {
  return t.is_meta() || !t.has_storage() ? nullptr : t.const_data_ptr();
}

// Everything the checks and the descriptors need of one pair, read in one pass:
// touching tens of thousands of TensorImpls costs cache misses, not arithmetic.
struct PairFacts {
  PairProblem problem = PairProblem::kNone;
  Span dst;
  Span src;
  bool noop = false;   // src is dst itself (same bytes, same view): nothing to copy
  bool fused = false;  // dense pair in one memory order: the fused pass copies it
};

PairFacts facts_of(const at::Tensor& d, const at::Tensor& s, int64_t i, const at::Device& device) {
  PairFacts f;
  if (d.device() != device || (s.device() != device && !s.is_cpu())) {
    f.problem = PairProblem::kDevice;
    return f;
  }
  if (d.sizes() != s.sizes()) {
    f.problem = PairProblem::kShape;
    return f;
  }
  if (!convertible(s.scalar_type(), d.scalar_type())) {
    f.problem = PairProblem::kDtype;
    return f;
  }
  // A destination whose elements share bytes (an expanded view) has no single result.
  if (at::has_internal_overlap(d) == at::MemOverlap::Yes) {
    f.problem = PairProblem::kDestinationOverlap;
    return f;
  }
  const void* d_data = data_of(d);
  const void* s_data = data_of(s);
  f.dst = span_of(d, i, d_data);
  f.src = span_of(s, i, s_data);
  f.noop = d_data == s_data && d.dtype() == s.dtype() && d.strides() == s.strides();
  // Dense tensors whose strides agree on every dimension of more than one element
  // store their elements in the same order: one flat copy serves them.
  f.fused = d.is_non_overlapping_and_dense() && s.is_non_overlapping_and_dense();
  for (int64_t k = 0; f.fused && k < d.dim(); ++k) {
    f.fused = d.size(k) <= 1 || d.stride(k) == s.stride(k);
  }
  return f;
}

std::vector<PairFacts> gather_facts(at::TensorList dst, at::TensorList src) {
  TORCH_CHECK(dst.size() == src.size(), "batched_copy_: got ", dst.size(),
              " destinations but ", src.size(), " sources");
  std::vector<PairFacts> facts(dst.size());
  if (dst.empty()) return facts;
  const at::Device device = dst[0].device();
  at::parallel_for(0, static_cast<int64_t>(dst.size()), 2048, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) facts[i] = facts_of(dst[i], src[i], i, device);
  });
  return facts;
}

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

// Destinations sorted by start, with the running maximum of their ends: every
// destination that can reach past `at` has an index of at least first_reaching(at).
struct SortedDestinations {
  std::vector<Span> spans;
  std::vector<uintptr_t> max_hi;

  size_t first_reaching(uintptr_t at) const {
    return std::upper_bound(max_hi.begin(), max_hi.end(), at) - max_hi.begin();
  }
};

void find_overlaps(at::TensorList dst, at::TensorList src, std::vector<PairFacts>& facts) {
  SortedDestinations dsts;
  dsts.spans.reserve(facts.size());
  for (const PairFacts& f : facts) {
    if (f.problem == PairProblem::kNone && f.dst.lo != 0) dsts.spans.push_back(f.dst);
  }
  // Model tensors are usually allocated in address order: then no sort is needed.
  const auto by_start = [](const Span& x, const Span& y) { return x.lo < y.lo; };
  if (!std::is_sorted(dsts.spans.begin(), dsts.spans.end(), by_start)) {
    std::sort(dsts.spans.begin(), dsts.spans.end(), by_start);
  }
  dsts.max_hi.reserve(dsts.spans.size());
  for (const Span& s : dsts.spans) {
    dsts.max_hi.push_back(dsts.max_hi.empty() ? s.hi : std::max(dsts.max_hi.back(), s.hi));
  }

  // Each span against the destinations that start before it ends and end after it starts.
  const auto overlapping_destinations = [&](const at::Tensor& t, const Span& s, size_t stop,
                                            auto on_overlap) {
    for (size_t j = dsts.first_reaching(s.lo); j < stop && dsts.spans[j].lo < s.hi; ++j) {
      const Span& o = dsts.spans[j];
      if (o.hi <= s.lo || o.pair == s.pair) continue;
      const at::Tensor& u = dst[o.pair];
      if (t.device() == u.device() && bytes_overlap(t, s, u, o)) on_overlap(o);
    }
  };
  for (const auto i : c10::irange(dsts.spans.size())) {
    const Span& s = dsts.spans[i];
    overlapping_destinations(dst[s.pair], s, i, [&](const Span& o) {
      facts[s.pair].problem = facts[o.pair].problem = PairProblem::kDestinationOverlap;
    });
  }
  for (const auto i : c10::irange(src.size())) {
    PairFacts& f = facts[i];
    if (f.problem != PairProblem::kNone || f.noop || f.src.lo == 0) continue;
    // A source may also overlap its own destination partially: that is refused too.
    if (f.dst.lo != 0 && f.dst.lo < f.src.hi && f.src.lo < f.dst.hi &&
        bytes_overlap(src[i], f.src, dst[i], f.dst)) {
      f.problem = PairProblem::kSourceOverlap;
      continue;
    }
    overlapping_destinations(src[i], f.src, dsts.spans.size(), [&](const Span&) {
      f.problem = PairProblem::kSourceOverlap;
    });
  }
}

std::vector<PairFacts> examine(at::TensorList dst, at::TensorList src) {
  std::vector<PairFacts> facts = gather_facts(dst, src);
  find_overlaps(dst, src, facts);
  return facts;
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

}  // namespace

std::vector<PairProblem> find_pair_problems(at::TensorList dst, at::TensorList src) {
  const std::vector<PairFacts> facts = examine(dst, src);
  std::vector<PairProblem> problems(facts.size());
  for (const auto i : c10::irange(facts.size())) problems[i] = facts[i].problem;
  return problems;
}

DescribedBatch checked_batch(at::TensorList dst, at::TensorList src) {
  const std::vector<PairFacts> facts = examine(dst, src);
  DescribedBatch batch;
  batch.fused.reserve(facts.size());
  batch.fused_pairs.reserve(facts.size());
  for (const auto i : c10::irange(facts.size())) {
    const PairFacts& f = facts[i];
    TORCH_CHECK(f.problem == PairProblem::kNone, "batched_copy_: pair ", i, ": ",
                describe(f.problem), " (destination ", dst[i].scalar_type(), dst[i].sizes(),
                " on ", dst[i].device(), ", source ", src[i].scalar_type(), src[i].sizes(),
                " on ", src[i].device(), ")");
  }
  for (const auto i : c10::irange(facts.size())) {
    const PairFacts& f = facts[i];
    if (f.noop || f.dst.lo == 0) continue;
    if (!f.fused) {
      batch.fallback.push_back(i);
      continue;
    }
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    const bool same_dtype = d.scalar_type() == s.scalar_type();
    batch.fused_pairs.push_back(i);
    batch.fused.push_back(CopyDesc{
        reinterpret_cast<const char*>(f.src.lo),
        static_cast<char*>(d.mutable_data_ptr()),
        same_dtype ? d.numel() * d.element_size() : d.numel(),
        same_dtype ? ElemKind::kBytes : *float_kind(s.scalar_type()),
        same_dtype ? ElemKind::kBytes : *float_kind(d.scalar_type()),
    });
  }
  return batch;
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
