// CPU backend of batched_copy_: every fused chunk of the batch in one parallel pass.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>

#include "../copy_pairs.h"
#include "../copy_plan.h"

namespace fastreload {
namespace {

// Large enough that a chunk's bookkeeping is noise, small enough to balance threads.
constexpr int64_t kCpuChunkBytes = int64_t{1} << 18;
// Below this much work per thread, fewer threads (a small batch: the calling thread).
constexpr int64_t kMinBytesPerThread = int64_t{1} << 20;
// Threads claim the batch in runs of consecutive chunks of about this cost, each
// the next run not yet claimed: a thread slowed by a neighbour (or by a part of
// the batch made of many small tensors) leaves more runs to the others, instead of
// the others waiting for it at the end.
constexpr int64_t kRunCostBytes = int64_t{1} << 20;
// What a chunk costs besides its bytes, counted as bytes: its bookkeeping and the
// cache misses of its first lines take about as long as copying a KiB.
constexpr int64_t kChunkCostBytes = 1024;
// From this many bytes on, a batch is written with non-temporal stores: it would
// not stay in the caches anyway.
constexpr int64_t kStreamStoreMinBytes = int64_t{8} << 20;

void fused_copy_cpu(const DescribedBatch& batch, at::TensorList dst, at::TensorList src) {
  const std::vector<CopyDesc> fused = joined_pairs(batch.fused.data(), static_cast<int64_t>(batch.fused.size()));
  const std::vector<CopyChunk> chunks =
      plan_chunks(fused.data(), static_cast<int64_t>(fused.size()), kCpuChunkBytes);

  // runs[r]: the first chunk of run r; one more entry, the chunk count, at the end.
  std::vector<int64_t> runs{0};
  int64_t bytes = 0, cost = 0, run_cost = 0;
  for (const auto c : c10::irange(chunks.size())) {
    const CopyChunk& chunk = chunks[c];
    const int64_t chunk_bytes = (chunk.end - chunk.begin) * chunk_elem_bytes(fused[chunk.desc]);
    bytes += chunk_bytes;
    cost += chunk_bytes + kChunkCostBytes;
    run_cost += chunk_bytes + kChunkCostBytes;
    if (run_cost >= kRunCostBytes) {
      runs.push_back(static_cast<int64_t>(c) + 1);
      run_cost = 0;
    }
  }
  if (runs.back() != static_cast<int64_t>(chunks.size())) runs.push_back(static_cast<int64_t>(chunks.size()));
  const int64_t run_count = static_cast<int64_t>(runs.size()) - 1;
  const bool stream = bytes >= kStreamStoreMinBytes;

  std::atomic<int64_t> next_run{0};
  const auto copy_runs = [&](int64_t, int64_t) {
    for (int64_t r = next_run.fetch_add(1, std::memory_order_relaxed); r < run_count;
         r = next_run.fetch_add(1, std::memory_order_relaxed)) {
      for (int64_t c = runs[r]; c < runs[r + 1]; ++c) {
        if (c + kPrefetchAhead < static_cast<int64_t>(chunks.size())) {
          // Small tensors: the copy itself is a few cache misses, overlapped this way.
          const CopyChunk& ahead = chunks[c + kPrefetchAhead];
          const CopyDesc& d = fused[ahead.desc];
          __builtin_prefetch(d.src + ahead.begin * elem_size(d.src_kind));
          __builtin_prefetch(d.dst + ahead.begin * elem_size(d.dst_kind), /*rw=*/1);
        }
        const CopyChunk& chunk = chunks[c];
        copy_chunk(fused[chunk.desc], chunk.begin, chunk.end, /*lane=*/0, /*lanes=*/1, stream);
      }
    }
    finish_host_stores();
  };
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, cost / kMinBytesPerThread));
  if (threads <= 1 || at::in_parallel_region()) {
    copy_runs(0, 1);
  } else {
    at::parallel_for(0, threads, 1, copy_runs);
  }

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
