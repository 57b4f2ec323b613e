// CPU backend of batched_copy_: every fused chunk of the batch in one parallel pass.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>

#include "../copy_pairs.h"
#include "../copy_plan.h"

namespace fastreload {
namespace {

// Large enough that a chunk's bookkeeping is noise, small enough to balance threads.
constexpr int64_t kCpuChunkBytes = int64_t{1} << 18;
// Below this much work a batch is copied on the calling thread.
constexpr int64_t kMinBytesPerThread = int64_t{1} << 20;
// What a chunk costs besides its bytes, counted as bytes: its bookkeeping and the
// cache misses of its first lines take about as long as copying a KiB. So a batch
// of many small tensors (norms, biases, scales) is split between threads too.
constexpr int64_t kChunkCostBytes = 1024;
// From this many bytes on, a batch is written with non-temporal stores: it would
// not stay in the caches anyway.
constexpr int64_t kStreamStoreMinBytes = int64_t{8} << 20;

void fused_copy_cpu(const DescribedBatch& batch, at::TensorList dst, at::TensorList src) {
  const std::vector<CopyChunk> chunks =
      plan_chunks(batch.fused.data(), static_cast<int64_t>(batch.fused.size()), kCpuChunkBytes);

  // Threads split the batch by cost (bytes, plus a fixed cost per chunk), not by
  // chunk count: a chunk belongs to the thread whose range holds its start.
  std::vector<int64_t> starts(chunks.size() + 1, 0);
  int64_t bytes = 0;
  for (const auto c : c10::irange(chunks.size())) {
    const CopyChunk& chunk = chunks[c];
    const int64_t chunk_bytes = (chunk.end - chunk.begin) * chunk_elem_bytes(batch.fused[chunk.desc]);
    bytes += chunk_bytes;
    starts[c + 1] = starts[c] + chunk_bytes + kChunkCostBytes;
  }
  const bool stream = bytes >= kStreamStoreMinBytes;
  at::parallel_for(0, starts.back(), kMinBytesPerThread, [&](int64_t lo, int64_t hi) {
    auto c = std::lower_bound(starts.begin(), starts.end() - 1, lo) - starts.begin();
    for (; c < static_cast<int64_t>(chunks.size()) && starts[c] < hi; ++c) {
      if (c + kPrefetchAhead < static_cast<int64_t>(chunks.size())) {
        // Small tensors: the copy itself is a few cache misses, overlapped this way.
        const CopyChunk& ahead = chunks[c + kPrefetchAhead];
        const CopyDesc& d = batch.fused[ahead.desc];
        __builtin_prefetch(d.src + ahead.begin * elem_size(d.src_kind));
        __builtin_prefetch(d.dst + ahead.begin * elem_size(d.dst_kind), /*rw=*/1);
      }
      const CopyChunk& chunk = chunks[c];
      copy_chunk(batch.fused[chunk.desc], chunk.begin, chunk.end, /*lane=*/0, /*lanes=*/1, stream);
    }
    finish_host_stores();
  });

  for (const int64_t i : batch.fallback) dst[i].copy_(src[i]);
}

void batched_copy_cpu(at::TensorList dst, at::TensorList src) {
  fused_copy_cpu(checked_batch(dst, src), dst, src);
}

[[maybe_unused]] const bool registered = register_fused_copy(c10::DeviceType::CPU, &fused_copy_cpu);

}  // namespace

TORCH_LIBRARY_IMPL(fastreload, CPU, m) {
  m.impl("batched_copy_", &batched_copy_cpu);
}

}  // namespace fastreload
