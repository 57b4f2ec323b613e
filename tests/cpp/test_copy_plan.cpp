// Host tests of the batched copy's planner and per-chunk routine: the code the
// CUDA kernel runs, executed here one lane at a time, and the CUDA backend's
// upload plan (tables, staging buckets). Also drives the registered op through the
// dispatcher, as a C++ caller would.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "copy_pairs.h"
#include "copy_plan.h"
#include "upload_plan.h"

namespace {

int failures = 0;

#define EXPECT(cond, ...)                                              \
  do {                                                                 \
    if (!(cond)) {                                                     \
      ++failures;                                                      \
      std::fprintf(stderr, "%s:%d: expected %s ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                               \
      std::fprintf(stderr, "\n");                                      \
    }                                                                  \
  } while (0)

using fastreload::CopyChunk;
using fastreload::CopyDesc;
using fastreload::ElemKind;

// Runs a chunk the way a CUDA block does: every lane of `lanes` over the same chunk.
// With one lane, `stream` takes the CPU backend's non-temporal store path.
void run_chunk(const CopyDesc& d, const CopyChunk& c, int64_t lanes, bool stream = false) {
  for (int64_t lane = 0; lane < lanes; ++lane) {
    fastreload::copy_chunk(d, c.begin, c.end, lane, lanes, stream);
  }
  fastreload::finish_host_stores();
}

void test_plan_covers_every_element_once() {
  std::mt19937 rng(0);
  for (int64_t count : {0, 1, 7, 1000, 100000}) {
    std::vector<CopyDesc> descs(count);
    for (auto& d : descs) {
      const bool convert = rng() % 3 == 0;
      d = CopyDesc{nullptr, nullptr, static_cast<int64_t>(rng() % 5000),
                   convert ? ElemKind::kF32 : ElemKind::kBytes,
                   convert ? ElemKind::kBF16 : ElemKind::kBytes};
    }
    for (int64_t budget : {1, 16, 1000, 1 << 16}) {
      if (count == 100000 && budget < 1000) continue;  // tens of millions of chunks: no new case
      const auto chunks = fastreload::plan_chunks(descs.data(), count, budget);
      std::vector<int64_t> next(count, 0);
      bool ordered = true;
      for (const CopyChunk& c : chunks) {
        ordered = ordered && c.begin == next[c.desc] && c.end > c.begin &&
                  (c.end - c.begin) * fastreload::chunk_elem_bytes(descs[c.desc]) <=
                      std::max<int64_t>(budget, fastreload::chunk_elem_bytes(descs[c.desc]));
        next[c.desc] = c.end;
      }
      bool complete = true;
      for (int64_t i = 0; i < count; ++i) complete = complete && next[i] == descs[i].numel;
      EXPECT(ordered, "chunks in order, non-empty and within budget (count %ld, budget %ld)",
             (long)count, (long)budget);
      EXPECT(complete, "every element planned (count %ld, budget %ld)", (long)count, (long)budget);
    }
  }
}

void test_joined_pairs() {
  // Two experts' gate and up projections, stored back to back in a checkpoint and
  // held back to back by the model, then one whose destination is elsewhere, one
  // that converts, and one that continues only on the source side.
  std::vector<char> src(1000), dst(1000);
  const auto bytes = [&](int64_t s, int64_t d, int64_t n) {
    return CopyDesc{src.data() + s, dst.data() + d, n, ElemKind::kBytes, ElemKind::kBytes};
  };
  const std::vector<CopyDesc> descs = {
      bytes(0, 0, 100), bytes(100, 100, 100), bytes(200, 200, 50),
      bytes(250, 500, 50),
      CopyDesc{src.data() + 300, dst.data() + 550, 10, ElemKind::kF32, ElemKind::kBF16},
      CopyDesc{src.data() + 340, dst.data() + 570, 10, ElemKind::kF32, ElemKind::kBF16},
      bytes(380, 900, 20)};
  const auto joined = fastreload::joined_pairs(descs.data(), static_cast<int64_t>(descs.size()));
  EXPECT(joined.size() == 4, "4 pairs after joining, got %zu", joined.size());
  if (joined.size() == 4) {
    EXPECT(joined[0].src == src.data() && joined[0].numel == 250, "the first three joined");
    EXPECT(joined[1].dst == dst.data() + 500 && joined[1].numel == 50, "a jump on the destination side");
    EXPECT(joined[2].src_kind == ElemKind::kF32 && joined[2].numel == 20,
           "converting pairs joined in elements");
    EXPECT(joined[3].dst == dst.data() + 900, "a jump on the destination side after a conversion");
  }
  EXPECT(fastreload::joined_pairs(descs.data(), 0).empty(), "no pairs, none joined");
}

void test_byte_copies_every_alignment() {
  // The host path aligns its stores to cache lines (64 bytes) and reads at any
  // offset: every destination offset within a line, against every source offset
  // within 16 bytes, whole and in 48-byte chunks.
  constexpr int64_t kSize = 1024;
  std::vector<char> src(kSize), dst(kSize);
  std::iota(src.begin(), src.end(), 1);
  for (int src_offset = 0; src_offset < 16; ++src_offset) {
    for (int dst_offset = 0; dst_offset < 64; ++dst_offset) {
      for (int64_t n : {0, 1, 3, 15, 16, 17, 31, 64, 100, 127, 128, 129, 200, 300, 700}) {
        for (const int64_t budget : {int64_t{48}, kSize}) {
          for (const auto [lanes, stream] : {std::pair<int64_t, bool>{1, false}, {1, true},
                                             {4, false}, {32, false}}) {
            std::fill(dst.begin(), dst.end(), 0);
            // Aligned bases (vector storage is 16-aligned on every supported libstdc++).
            const CopyDesc d{src.data() + src_offset, dst.data() + dst_offset, n,
                             ElemKind::kBytes, ElemKind::kBytes};
            for (const auto& c : fastreload::plan_chunks(&d, 1, budget)) run_chunk(d, c, lanes, stream);
            const bool same = std::memcmp(dst.data() + dst_offset, src.data() + src_offset, n) == 0;
            bool untouched = true;
            for (int64_t i = 0; i < kSize; ++i) {
              if (i < dst_offset || i >= dst_offset + n) untouched = untouched && dst[i] == 0;
            }
            EXPECT(same && untouched,
                   "exact copy (src+%d, dst+%d, %ld bytes, chunks of %ld, %ld lanes, stream %d)",
                   src_offset, dst_offset, (long)n, (long)budget, (long)lanes, stream);
          }
        }
      }
    }
  }
}

const std::vector<std::pair<ElemKind, at::ScalarType>> kFloatKinds = {
    {ElemKind::kF64, at::kDouble},   {ElemKind::kF32, at::kFloat},
    {ElemKind::kF16, at::kHalf},     {ElemKind::kBF16, at::kBFloat16},
    {ElemKind::kF8E4M3, at::kFloat8_e4m3fn}, {ElemKind::kF8E5M2, at::kFloat8_e5m2},
};

// Equal values, signed zeros told apart; any NaN matches any NaN (ATen's own
// vectorized and scalar paths disagree on NaN payloads and signs).
bool same_values(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kDouble), y = b.to(at::kDouble);
  const at::Tensor equal = x.eq(y).logical_and(x.signbit().eq(y.signbit()));
  return equal.logical_or(x.isnan().logical_and(y.isnan())).all().item<bool>();
}

// Conversions must match Tensor::to, special values included.
void test_conversions_match_aten() {
  at::Tensor values = at::cat({at::randn({997}, at::kDouble) * 300,
                               at::tensor({0.0, -0.0, 1e-40, -1e-7, 1e30, 65504.0, 448.0, 449.0,
                                           57344.0, 1e6, std::numeric_limits<double>::infinity(),
                                           -std::numeric_limits<double>::infinity(),
                                           std::numeric_limits<double>::quiet_NaN()},
                                          at::kDouble)});
  for (const auto& [src_kind, src_type] : kFloatKinds) {
    for (const auto& [dst_kind, dst_type] : kFloatKinds) {
      if (src_kind == dst_kind) continue;
      at::Tensor src = values.to(src_type);
      at::Tensor expected = src.to(dst_type);
      at::Tensor got = at::zeros_like(expected);
      const CopyDesc d{static_cast<const char*>(src.const_data_ptr()),
                       static_cast<char*>(got.data_ptr()), src.numel(), src_kind, dst_kind};
      for (const auto& c : fastreload::plan_chunks(&d, 1, 64)) run_chunk(d, c, 3);
      EXPECT(same_values(got, expected), "%s -> %s equals Tensor::to", c10::toString(src_type), c10::toString(dst_type));
    }
  }
}

// A whole batch executed as the CUDA kernel does it: 64 KiB chunks, 256 lanes
// per chunk, every kind pair, sizes from 0 up, start offsets at every element
// position modulo 16 bytes, 1 to 100,000 pairs.
void test_batches_with_device_lanes() {
  std::mt19937 rng(7);
  for (int64_t count : {1, 10, 1000, 100000}) {
    std::vector<at::Tensor> sources, targets, expected;
    std::vector<CopyDesc> descs;
    for (int64_t i = 0; i < count; ++i) {
      const auto& [src_kind, src_type] = kFloatKinds[rng() % kFloatKinds.size()];
      const auto& [dst_kind, dst_type] = kFloatKinds[rng() % kFloatKinds.size()];
      const int64_t numel = count == 100000 ? rng() % 40 : (i % 7 == 0 ? 0 : rng() % 3000);
      const int64_t src_offset = rng() % 16, dst_offset = rng() % 16;
      at::Tensor src = (at::randn({numel + src_offset}, at::kDouble) * 100).to(src_type).slice(0, src_offset);
      at::Tensor dst = at::zeros({numel + dst_offset}, dst_type).slice(0, dst_offset);
      const bool same = src_kind == dst_kind;
      descs.push_back(CopyDesc{static_cast<const char*>(src.const_data_ptr()),
                               static_cast<char*>(dst.data_ptr()),
                               same ? numel * src.element_size() : numel,
                               same ? ElemKind::kBytes : src_kind, same ? ElemKind::kBytes : dst_kind});
      expected.push_back(src.to(dst_type));
      sources.push_back(src);
      targets.push_back(dst);
    }
    const auto chunks = fastreload::plan_chunks(descs.data(), count, 64 << 10);
    for (const CopyChunk& c : chunks) run_chunk(descs[c.desc], c, 256);
    bool equal = true;
    for (int64_t i = 0; i < count; ++i) equal = equal && same_values(targets[i], expected[i]);
    EXPECT(equal, "%ld pairs copied by 256-lane chunks equal Tensor::to", (long)count);
  }
}

void test_pair_checks() {
  at::Tensor buffer = at::zeros({64});
  at::Tensor a = buffer.slice(0, 0, 32), b = buffer.slice(0, 16, 48), c = buffer.slice(0, 48, 64);
  auto problems = fastreload::find_pair_problems({a, b, c}, {at::ones({32}), at::ones({32}), at::ones({16})});
  EXPECT(problems[0] == fastreload::PairProblem::kDestinationOverlap &&
             problems[1] == fastreload::PairProblem::kDestinationOverlap &&
             problems[2] == fastreload::PairProblem::kNone,
         "overlapping destinations refused, the disjoint one accepted");

  at::Tensor grid = at::zeros({4, 8});
  problems = fastreload::find_pair_problems({grid.slice(1, 0, 8, 2), grid.slice(1, 1, 8, 2)},
                                            {at::ones({4, 4}), at::ones({4, 4})});
  EXPECT(problems[0] == fastreload::PairProblem::kNone && problems[1] == fastreload::PairProblem::kNone,
         "interleaved strided destinations do not overlap");

  problems = fastreload::find_pair_problems({at::zeros({3}), at::zeros({3}), at::zeros({2})},
                                            {at::ones({4}), at::ones({3}, at::kInt), at::ones({2}, at::kInt)});
  EXPECT(problems[0] == fastreload::PairProblem::kShape && problems[1] == fastreload::PairProblem::kDtype &&
             problems[2] == fastreload::PairProblem::kDtype,
         "shape and dtype problems found per pair");

  at::Tensor x = at::arange(8, at::kFloat);
  at::Tensor y = at::zeros({8});
  problems = fastreload::find_pair_problems({x, y}, {x, x});
  EXPECT(problems[0] == fastreload::PairProblem::kNone && problems[1] == fastreload::PairProblem::kSourceOverlap,
         "a tensor copied onto itself is fine, read by another pair while written is not");
}

void test_op_through_dispatcher() {
  const auto op = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("fastreload::batched_copy_", "")
                      .typed<void(at::TensorList, at::TensorList)>();
  std::vector<at::Tensor> dst, src;
  for (int64_t i = 0; i < 2000; ++i) {
    src.push_back(at::randn({i % 37 + 1, 3}));
    dst.push_back(at::zeros({i % 37 + 1, 3}, i % 2 ? at::kBFloat16 : at::kFloat));
  }
  dst.push_back(at::zeros({5, 3}).t());  // strided destination: the fallback path
  src.push_back(at::randn({3, 5}));
  // Past the non-temporal store threshold, misaligned by one element on both sides.
  dst.push_back(at::zeros({3'000'001}).slice(0, 1));
  src.push_back(at::randn({3'000'001}).slice(0, 1));
  op.call(dst, src);
  bool equal = true;
  for (size_t i = 0; i < dst.size(); ++i) equal = equal && at::equal(dst[i], src[i].to(dst[i].scalar_type()));
  EXPECT(equal, "every pair copied and converted");

  at::Tensor before = dst[0].clone();
  bool threw = false;
  try {
    op.call({dst[0], dst[1]}, {at::ones_like(src[0]), at::ones({99})});
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("pair 1") != std::string::npos;
  }
  EXPECT(threw && at::equal(dst[0], before), "a refused batch names the pair and writes nothing");
}

void test_empty_lists_through_dispatcher() {
  auto& dispatcher = c10::Dispatcher::singleton();
  const std::vector<at::Tensor> none;
  dispatcher.findSchemaOrThrow("fastreload::batched_copy_", "")
      .typed<void(at::TensorList, at::TensorList)>()
      .call(none, none);
  const auto tables = dispatcher.findSchemaOrThrow("fastreload::batched_copy_table", "")
                          .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList)>()
                          .call(none, none);
  EXPECT(tables.size() == 2 && tables[0].numel() == 0 && tables[1].numel() == 0,
         "the empty batch has empty tables");
  dispatcher.findSchemaOrThrow("fastreload::batched_copy_with_table_", "")
      .typed<void(at::TensorList, at::TensorList, const at::Tensor&, const at::Tensor&)>()
      .call(none, none, tables[0], tables[1]);
  const auto check = dispatcher.findSchemaOrThrow("fastreload::batched_copy_check", "")
                         .typed<at::Tensor(at::TensorList, at::TensorList)>()
                         .call(none, none);
  EXPECT(check.numel() == 0, "no pair, no problem code");
}

// Byte pairs of these sizes, with destinations (never written) at every alignment.
std::vector<CopyDesc> pageable_descs(const std::vector<int64_t>& bytes) {
  std::vector<CopyDesc> descs;
  uintptr_t at = 4096;
  for (const int64_t b : bytes) {
    descs.push_back(CopyDesc{nullptr, reinterpret_cast<char*>(at), b, ElemKind::kBytes, ElemKind::kBytes});
    at += static_cast<uintptr_t>(b) + 3;
  }
  return descs;
}

void test_staging_buckets() {
  std::mt19937 rng(1);
  for (const int64_t budget : {int64_t{64}, int64_t{1000}, int64_t{1} << 20}) {
    std::vector<int64_t> sizes;
    for (int i = 0; i < 300; ++i) sizes.push_back(rng() % 3 == 0 ? rng() % 3000 + 1 : rng() % 40 + 1);
    const auto descs = pageable_descs(sizes);
    const auto buckets = fastreload::plan_staging(descs, budget);
    size_t next = 0;
    bool ok = true;
    for (const auto& bucket : buckets) {
      ok = ok && bucket.first == next && bucket.last > bucket.first &&
           bucket.offsets.size() == bucket.last - bucket.first;
      ok = ok && (bucket.bytes <= budget || bucket.last == bucket.first + 1);
      int64_t end = 0;
      for (size_t i = bucket.first; i < bucket.last; ++i) {
        const int64_t offset = bucket.offsets[i - bucket.first];
        const auto dst_misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(descs[i].dst) % 16);
        ok = ok && offset >= end && offset % 16 == dst_misalign;
        end = offset + descs[i].numel;
      }
      ok = ok && end == bucket.bytes;
      next = bucket.last;
    }
    EXPECT(ok && next == descs.size(), "budget %lld: buckets cover every pair in order, apart, aligned",
           static_cast<long long>(budget));
    int64_t largest[2] = {0, 0};
    for (size_t b = 0; b < buckets.size(); ++b) largest[b % 2] = std::max(largest[b % 2], buckets[b].bytes);
    EXPECT(fastreload::largest_bucket(buckets, 0) == largest[0] && fastreload::largest_bucket(buckets, 1) == largest[1],
           "the two pinned buffers hold the largest of their buckets");
  }
  EXPECT(fastreload::plan_staging({}, 64).empty(), "no pageable pair, no bucket");
}

void test_table_set_parts() {
  const auto first = pageable_descs({10, 300000, 7});
  const auto second = pageable_descs({1, 2, 3, 4, 5});
  fastreload::TableSet set;
  set.add(first, 1 << 16);
  set.add({}, 1 << 16);
  set.add(second, 1 << 16);
  fastreload::TableSet alone;
  alone.add(first, 1 << 16);
  EXPECT(alone.parts[0].descs_offset == 0 && alone.parts[0].chunks_offset % 16 == 0,
         "a table of one part starts with its descriptors");
  bool ok = set.parts.size() == 3;
  for (size_t p = 0; ok && p < set.parts.size(); ++p) {
    const auto& part = set.parts[p];
    const auto& descs = p == 0 ? first : p == 2 ? second : std::vector<CopyDesc>{};
    const auto chunks = fastreload::plan_chunks(descs.data(), static_cast<int64_t>(descs.size()), 1 << 16);
    ok = ok && part.descs_offset % 16 == 0 && part.chunks_offset % 16 == 0 &&
         part.num_chunks == static_cast<int64_t>(chunks.size()) &&
         part.chunks_offset + chunks.size() * sizeof(CopyChunk) <= set.bytes.size();
    ok = ok && (descs.empty() ||
                std::memcmp(set.bytes.data() + part.descs_offset, descs.data(), descs.size() * sizeof(CopyDesc)) == 0);
    ok = ok && (chunks.empty() || std::memcmp(set.bytes.data() + part.chunks_offset, chunks.data(),
                                              chunks.size() * sizeof(CopyChunk)) == 0);
    if (p > 0) ok = ok && part.descs_offset >= set.parts[p - 1].chunks_offset;
  }
  EXPECT(ok, "each part holds its descriptors and chunks, aligned, after the one before");
}

}  // namespace

int main() {
  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"plan covers every element once", test_plan_covers_every_element_once},
      {"pairs that continue one another joined", test_joined_pairs},
      {"byte copies at every alignment", test_byte_copies_every_alignment},
      {"conversions match ATen", test_conversions_match_aten},
      {"batches with device lanes", test_batches_with_device_lanes},
      {"pair checks", test_pair_checks},
      {"op through the dispatcher", test_op_through_dispatcher},
      {"empty lists through the dispatcher", test_empty_lists_through_dispatcher},
      {"staging buckets", test_staging_buckets},
      {"table set parts", test_table_set_parts},
  };
  for (const auto& [name, test] : tests) {
    const int before = failures;
    test();
    std::printf("%s: %s\n", failures == before ? "PASS" : "FAIL", name);
  }
  std::printf("%d failures\n", failures);
  return failures == 0 ? 0 : 1;
}
