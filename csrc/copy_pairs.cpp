#include "copy_pairs.h"

#include <ATen/ATen.h>
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

// Whether src[i] is dst[i] itself: copying it is a no-op, not an overlap.
bool same_view(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() && a.dtype() == b.dtype() &&
         a.sizes() == b.sizes() && a.strides() == b.strides();
}

// Dense tensors whose strides agree on every dimension that has more than one
// element store their elements in the same order: one flat copy serves them.
bool same_dense_order(const at::Tensor& a, const at::Tensor& b) {
  if (!a.is_non_overlapping_and_dense() || !b.is_non_overlapping_and_dense()) return false;
  for (const auto d : c10::irange(a.dim())) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// Byte range [lo, hi) from a tensor's first to one past its last element.
struct Span {
  uintptr_t lo;
  uintptr_t hi;
  int64_t pair;
};

std::optional<Span> span_of(const at::Tensor& t, int64_t pair) {
  const int64_t numel = t.numel();
  if (numel == 0 || t.is_meta() || !t.has_storage()) return std::nullopt;
  const auto lo = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  if (lo == 0) return std::nullopt;
  int64_t elements = numel;
  if (!t.is_contiguous()) {
    elements = 1;
    for (const auto d : c10::irange(t.dim())) elements += (t.size(d) - 1) * t.stride(d);
  }
  return Span{lo, lo + static_cast<uintptr_t>(elements * t.element_size()), pair};
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

void find_overlaps(at::TensorList dst, at::TensorList src, std::vector<PairProblem>& problems) {
  SortedDestinations dsts;
  dsts.spans.reserve(dst.size());
  for (const auto i : c10::irange(dst.size())) {
    if (problems[i] != PairProblem::kNone) continue;
    if (auto s = span_of(dst[i], i)) dsts.spans.push_back(*s);
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
      problems[s.pair] = problems[o.pair] = PairProblem::kDestinationOverlap;
    });
  }
  for (const auto i : c10::irange(src.size())) {
    if (problems[i] != PairProblem::kNone || same_view(dst[i], src[i])) continue;
    const auto s = span_of(src[i], i);
    if (!s) continue;
    // A source may also overlap its own destination partially: that is refused too.
    if (const auto own = span_of(dst[i], i);
        own && own->lo < s->hi && s->lo < own->hi && bytes_overlap(src[i], *s, dst[i], *own)) {
      problems[i] = PairProblem::kSourceOverlap;
      continue;
    }
    overlapping_destinations(src[i], *s, dsts.spans.size(), [&](const Span&) {
      problems[i] = PairProblem::kSourceOverlap;
    });
  }
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
  TORCH_CHECK(dst.size() == src.size(), "batched_copy_: got ", dst.size(),
              " destinations but ", src.size(), " sources");
  std::vector<PairProblem> problems(dst.size(), PairProblem::kNone);
  bool any_sized = false;
  for (const auto i : c10::irange(dst.size())) {
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    if (d.device() != dst[0].device() || (s.device() != d.device() && !s.is_cpu())) {
      problems[i] = PairProblem::kDevice;
    } else if (d.sizes() != s.sizes()) {
      problems[i] = PairProblem::kShape;
    } else if (!convertible(s.scalar_type(), d.scalar_type())) {
      problems[i] = PairProblem::kDtype;
    }
    any_sized = any_sized || d.numel() > 0;
  }
  if (any_sized) find_overlaps(dst, src, problems);
  return problems;
}

void check_pairs(at::TensorList dst, at::TensorList src) {
  const auto problems = find_pair_problems(dst, src);
  for (const auto i : c10::irange(problems.size())) {
    TORCH_CHECK(problems[i] == PairProblem::kNone, "batched_copy_: pair ", i, ": ",
                describe(problems[i]), " (destination ", dst[i].scalar_type(), dst[i].sizes(),
                " on ", dst[i].device(), ", source ", src[i].scalar_type(), src[i].sizes(),
                " on ", src[i].device(), ")");
  }
}

DescribedBatch describe_pairs(at::TensorList dst, at::TensorList src) {
  DescribedBatch batch;
  batch.fused.reserve(dst.size());
  for (const auto i : c10::irange(dst.size())) {
    const at::Tensor& d = dst[i];
    const at::Tensor& s = src[i];
    if (d.numel() == 0 || same_view(d, s)) continue;
    if (!same_dense_order(d, s)) {
      batch.fallback.push_back(i);
      continue;
    }
    const bool same_dtype = d.scalar_type() == s.scalar_type();
    batch.fused.push_back(CopyDesc{
        static_cast<const char*>(s.const_data_ptr()),
        static_cast<char*>(d.data_ptr()),
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
