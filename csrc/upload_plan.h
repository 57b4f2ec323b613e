#pragma once
// What the CUDA backend plans on the host before a batch's first launch: the
// descriptor tables of all its launches in one buffer (one upload), and the pinned
// buckets that carry its pageable host sources. Host code only, so that the C++
// tests check it on a machine without a GPU.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "copy_plan.h"

namespace fastreload {

constexpr size_t kTableAlign = 16;

inline size_t align_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

// One launch's part of a TableSet: its descriptors, then its chunks.
struct TablePart {
  size_t descs_offset = 0;
  size_t chunks_offset = 0;
  int64_t num_chunks = 0;
};

// The tables of several launches, each part starting on a kTableAlign boundary. A
// set of one part is the table batched_copy_table returns: descriptors from byte 0,
// chunks from the next boundary after them.
struct TableSet {
  std::vector<uint8_t> bytes;
  std::vector<TablePart> parts;

  // Adds the table of a launch over descs, chunked by chunk_bytes; returns its index.
  size_t add(const std::vector<CopyDesc>& descs, int64_t chunk_bytes) {
    const auto chunks = plan_chunks(descs.data(), static_cast<int64_t>(descs.size()), chunk_bytes);
    TablePart part;
    part.descs_offset = align_up(bytes.size(), kTableAlign);
    part.chunks_offset = align_up(part.descs_offset + descs.size() * sizeof(CopyDesc), kTableAlign);
    part.num_chunks = static_cast<int64_t>(chunks.size());
    bytes.resize(part.chunks_offset + chunks.size() * sizeof(CopyChunk));
    if (!descs.empty()) {
      std::memcpy(bytes.data() + part.descs_offset, descs.data(), descs.size() * sizeof(CopyDesc));
    }
    if (!chunks.empty()) {
      std::memcpy(bytes.data() + part.chunks_offset, chunks.data(), chunks.size() * sizeof(CopyChunk));
    }
    parts.push_back(part);
    return parts.size() - 1;
  }
};

// Consecutive pageable pairs [first, last) packed into one pinned bucket, sent to
// the device with one copy and scattered from there. Each source sits at
// offsets[k - first], at its destination's address modulo kTableAlign, so that the
// scatter keeps the vectorized path.
struct StagingBucket {
  size_t first = 0;
  size_t last = 0;
  std::vector<int64_t> offsets;
  int64_t bytes = 0;
};

// The buckets of descs in order, each at most bucket_bytes unless one source alone
// is larger (it then fills a bucket of its own size).
inline std::vector<StagingBucket> plan_staging(const std::vector<CopyDesc>& descs, int64_t bucket_bytes) {
  std::vector<StagingBucket> buckets;
  size_t first = 0;
  while (first < descs.size()) {
    StagingBucket bucket;
    bucket.first = first;
    size_t last = first;
    for (; last < descs.size(); ++last) {
      const CopyDesc& d = descs[last];
      const int64_t size = d.numel * elem_size(d.src_kind);
      const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(d.dst) % kTableAlign);
      const int64_t offset =
          static_cast<int64_t>(align_up(static_cast<size_t>(bucket.bytes), kTableAlign)) + misalign;
      if (last > first && offset + size > bucket_bytes) break;
      bucket.offsets.push_back(offset);
      bucket.bytes = offset + size;
    }
    bucket.last = last;
    buckets.push_back(std::move(bucket));
    first = last;
  }
  return buckets;
}

// The size of the largest of buckets[parity], buckets[parity + 2], ...: what the
// pinned buffer that packs every other bucket must hold.
inline int64_t largest_bucket(const std::vector<StagingBucket>& buckets, size_t parity) {
  int64_t most = 0;
  for (size_t b = parity; b < buckets.size(); b += 2) most = std::max(most, buckets[b].bytes);
  return most;
}

}  // namespace fastreload
