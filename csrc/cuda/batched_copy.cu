// CUDA backend of batched_copy_: every device-readable pair of a batch in one
// kernel launch, whatever the mix of dtypes. The descriptor table (descs, then
// chunks) is built on the host, uploaded with one asynchronous copy, and walked
// by blocks, each copying one chunk with all its threads (copy_plan.h).
//
// Sources on the destination's device and pinned host sources are read directly
// (unified addressing). Pageable host sources are packed into pinned buckets on
// the CPU, sent with one host-to-device copy per bucket and scattered from there.
//
// Capture in a CUDA graph: batched_copy_ uploads a fresh table per call, which a
// graph cannot replay; batched_copy_table builds the table once and
// batched_copy_with_table_ launches it with no allocation, upload or host
// synchronization, so that call can be captured and replayed.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraphsUtils.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <unordered_map>
#include <vector>

#include "../copy_pairs.h"
#include "../copy_plan.h"

namespace fastreload {
namespace {

constexpr int kThreadsPerBlock = 256;
// One block's unit of work: big enough to amortize a chunk's bookkeeping, small
// enough that a batch of small tensors still fills every SM.
constexpr int64_t kCudaChunkBytes = int64_t{64} << 10;
// Enough resident blocks per SM to hide memory latency in a grid-stride loop.
constexpr int64_t kBlocksPerSm = 16;
// Pinned bucket size for pageable host sources.
constexpr int64_t kStagingBytes = int64_t{64} << 20;
constexpr size_t kTableAlign = 16;

__global__ void __launch_bounds__(kThreadsPerBlock)
    batched_copy_kernel(const CopyDesc* __restrict__ descs,  // [num_descs]
                        const CopyChunk* __restrict__ chunks,  // [num_chunks]
                        int64_t num_chunks) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const CopyChunk chunk = chunks[c];
    copy_chunk(descs[chunk.desc], chunk.begin, chunk.end, threadIdx.x, blockDim.x);
  }
}

// Descriptors then chunks, in one buffer: what one launch reads.
struct Table {
  std::vector<uint8_t> bytes;
  size_t chunks_offset = 0;
  int64_t num_chunks = 0;
};

Table pack_table(const std::vector<CopyDesc>& descs) {
  const auto chunks =
      plan_chunks(descs.data(), static_cast<int64_t>(descs.size()), kCudaChunkBytes);
  Table table;
  table.num_chunks = static_cast<int64_t>(chunks.size());
  table.chunks_offset = (descs.size() * sizeof(CopyDesc) + kTableAlign - 1) / kTableAlign * kTableAlign;
  table.bytes.resize(table.chunks_offset + chunks.size() * sizeof(CopyChunk));
  if (!descs.empty()) std::memcpy(table.bytes.data(), descs.data(), descs.size() * sizeof(CopyDesc));
  if (!chunks.empty()) {
    std::memcpy(table.bytes.data() + table.chunks_offset, chunks.data(), chunks.size() * sizeof(CopyChunk));
  }
  return table;
}

// Keeps a pinned buffer out of reuse until the stream has read it.
void hold_until_consumed(const at::Tensor& pinned, const at::cuda::CUDAStream& stream) {
  at::getHostAllocator(at::kCUDA)->record_event(
      pinned.data_ptr(), pinned.storage().data_ptr().get_context(), stream.unwrap());
}

at::Tensor pinned_bytes(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
}

at::Tensor device_bytes(int64_t n, const at::Device& device) {
  return at::empty({n}, at::TensorOptions().dtype(at::kByte).device(device));
}

// Host bytes to a fresh device buffer, asynchronously, through pinned memory.
at::Tensor upload(const std::vector<uint8_t>& bytes, const at::Device& device,
                  const at::cuda::CUDAStream& stream) {
  const auto n = static_cast<int64_t>(bytes.size());
  at::Tensor pinned = pinned_bytes(n);
  std::memcpy(pinned.data_ptr(), bytes.data(), bytes.size());
  at::Tensor on_device = device_bytes(n, device);
  C10_CUDA_CHECK(cudaMemcpyAsync(on_device.data_ptr(), pinned.const_data_ptr(), bytes.size(),
                                 cudaMemcpyHostToDevice, stream));
  hold_until_consumed(pinned, stream);
  return on_device;
}

void launch(const Table& table, const uint8_t* on_device, const at::cuda::CUDAStream& stream) {
  if (table.num_chunks == 0) return;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>(table.num_chunks, sms * kBlocksPerSm);
  batched_copy_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(
      reinterpret_cast<const CopyDesc*>(on_device),
      reinterpret_cast<const CopyChunk*>(on_device + table.chunks_offset), table.num_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Which fused pairs read pageable host memory, and the pinned host storages the
// kernel reads directly. Pinned-ness is a property of the storage: asking the
// driver once per storage keeps many views of one pinned buffer cheap.
struct HostSources {
  std::vector<bool> pageable;               // by fused pair
  std::vector<c10::Storage> pinned;         // distinct storages
};

HostSources host_sources(at::TensorList src, const std::vector<int64_t>& pairs) {
  std::unordered_map<const void*, bool> is_pinned;
  HostSources host;
  host.pageable.assign(pairs.size(), false);
  for (const auto k : c10::irange(pairs.size())) {
    const at::Tensor& s = src[pairs[k]];
    if (!s.is_cpu()) continue;
    const void* storage = s.storage().data();
    auto found = is_pinned.find(storage);
    if (found == is_pinned.end()) {
      found = is_pinned.emplace(storage, s.is_pinned()).first;
      if (found->second) host.pinned.push_back(s.storage());
    }
    host.pageable[k] = !found->second;
  }
  return host;
}

// Like Tensor.copy_ from pinned memory: the caching host allocator must not hand a
// source's block out again before the launch that reads it has run.
void hold_pinned_sources(const HostSources& host, const at::cuda::CUDAStream& stream) {
  for (const c10::Storage& storage : host.pinned) {
    at::getHostAllocator(at::kCUDA)->record_event(
        const_cast<void*>(storage.data()), storage.data_ptr().get_context(), stream.unwrap());
  }
}

bool capturing() {
  return at::cuda::currentStreamCaptureStatus() != at::cuda::CaptureStatus::None;
}

// Pageable sources: packed into pinned buckets by CPU threads, one host-to-device
// copy per bucket, then scattered by a launch reading the device-side bucket.
void copy_pageable(const std::vector<CopyDesc>& descs, const at::Device& device,
                   const at::cuda::CUDAStream& stream) {
  size_t first = 0;
  while (first < descs.size()) {
    // Each source lands at its destination's address modulo 16, so the scatter
    // keeps the vectorized path.
    std::vector<int64_t> offsets;
    int64_t bucket_bytes = 0;
    size_t last = first;
    for (; last < descs.size(); ++last) {
      const CopyDesc& d = descs[last];
      const int64_t bytes = d.numel * elem_size(d.src_kind);
      const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(d.dst) % kTableAlign);
      const int64_t offset = (bucket_bytes + 15) / 16 * 16 + misalign;
      if (last > first && offset + bytes > kStagingBytes) break;
      offsets.push_back(offset);
      bucket_bytes = offset + bytes;
    }
    at::Tensor pinned = pinned_bytes(bucket_bytes);
    auto* packed = static_cast<char*>(pinned.data_ptr());
    at::parallel_for(first, last, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const CopyDesc& d = descs[i];
        std::memcpy(packed + offsets[i - first], d.src, d.numel * elem_size(d.src_kind));
      }
    });
    at::Tensor staged = device_bytes(bucket_bytes, device);
    C10_CUDA_CHECK(cudaMemcpyAsync(staged.data_ptr(), pinned.const_data_ptr(), bucket_bytes,
                                   cudaMemcpyHostToDevice, stream));
    hold_until_consumed(pinned, stream);

    std::vector<CopyDesc> scatter(descs.begin() + first, descs.begin() + last);
    for (const auto k : c10::irange(scatter.size())) {
      scatter[k].src = static_cast<const char*>(staged.const_data_ptr()) + offsets[k];
    }
    const Table table = pack_table(scatter);
    const at::Tensor on_device = upload(table.bytes, device, stream);
    launch(table, on_device.const_data_ptr<uint8_t>(), stream);
    // `staged` and `on_device` go back to the caching allocator on this stream:
    // later work on it runs after the scatter.
    first = last;
  }
}

void copy_fallback(at::TensorList dst, at::TensorList src, const DescribedBatch& batch) {
  for (const int64_t i : batch.fallback) dst[i].copy_(src[i], /*non_blocking=*/true);
}

void check_not_capturing() {
  TORCH_CHECK(!capturing(),
              "batched_copy_: cannot upload a descriptor table during CUDA graph capture; build it "
              "before capture with batched_copy_table and capture batched_copy_with_table_ "
              "(fastreload.ops.ReplayableCopy)");
}

void fused_copy_cuda(const DescribedBatch& batch, at::TensorList dst, at::TensorList src) {
  check_not_capturing();
  if (dst.empty()) return;
  const c10::cuda::CUDAGuard guard(dst[0].device());
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();

  const HostSources host = host_sources(src, batch.fused_pairs);
  std::vector<CopyDesc> direct, staged;
  for (const auto k : c10::irange(batch.fused.size())) {
    (host.pageable[k] ? staged : direct).push_back(batch.fused[k]);
  }

  const Table table = pack_table(direct);
  if (table.num_chunks > 0) {
    const at::Tensor on_device = upload(table.bytes, dst[0].device(), stream);
    launch(table, on_device.const_data_ptr<uint8_t>(), stream);
    hold_pinned_sources(host, stream);
  }
  copy_pageable(staged, dst[0].device(), stream);
  copy_fallback(dst, src, batch);
}

void batched_copy_cuda(at::TensorList dst, at::TensorList src) {
  // Checked first: the host-source probes are driver calls capture forbids.
  check_not_capturing();
  fused_copy_cuda(checked_batch(dst, src), dst, src);
}

[[maybe_unused]] const bool registered = register_fused_copy(c10::DeviceType::CUDA, &fused_copy_cuda);

// [host table, device table] for a fixed batch whose sources the device reads directly.
std::vector<at::Tensor> batched_copy_table(at::TensorList dst, at::TensorList src) {
  TORCH_CHECK(!dst.empty(), "batched_copy_table: needs at least one pair");
  const DescribedBatch batch = checked_batch(dst, src);
  const c10::cuda::CUDAGuard guard(dst[0].device());
  const HostSources host = host_sources(src, batch.fused_pairs);
  for (const auto k : c10::irange(batch.fused.size())) {
    TORCH_CHECK(!host.pageable[k], "batched_copy_table: the source of pair ", batch.fused_pairs[k],
                " is in pageable host memory; a replayable copy reads its sources on the device "
                "or in pinned host memory (Tensor.pin_memory())");
  }
  const Table table = pack_table(batch.fused);
  at::Tensor host_table = at::empty({static_cast<int64_t>(table.bytes.size())}, at::kByte);
  std::memcpy(host_table.data_ptr(), table.bytes.data(), table.bytes.size());
  at::Tensor device_table = device_bytes(host_table.numel(), dst[0].device());
  device_table.copy_(host_table);
  return {host_table, device_table};
}

// The launch of a table built by batched_copy_table: no allocation, no upload.
void batched_copy_with_table_(at::TensorList dst, at::TensorList src, const at::Tensor& host_table,
                              const at::Tensor& device_table) {
  const DescribedBatch batch = checked_batch(dst, src);
  if (dst.empty()) return;
  const c10::cuda::CUDAGuard guard(dst[0].device());
  const Table table = pack_table(batch.fused);
  TORCH_CHECK(host_table.is_cpu() && host_table.scalar_type() == at::kByte &&
                  host_table.is_contiguous() &&
                  host_table.numel() == static_cast<int64_t>(table.bytes.size()) &&
                  std::memcmp(host_table.const_data_ptr(), table.bytes.data(), table.bytes.size()) == 0,
              "batched_copy_with_table_: the table was built for other tensors (addresses, sizes "
              "or dtypes differ); build it again with batched_copy_table");
  TORCH_CHECK(device_table.device() == dst[0].device() && device_table.numel() == host_table.numel(),
              "batched_copy_with_table_: the device table must be the one batched_copy_table "
              "returned with this host table");
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  launch(table, device_table.const_data_ptr<uint8_t>(), stream);
  copy_fallback(dst, src, batch);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreload, CUDA, m) {
  m.impl("batched_copy_", &batched_copy_cuda);
  m.impl("batched_copy_table", &batched_copy_table);
  m.impl("batched_copy_with_table_", &batched_copy_with_table_);
}

}  // namespace fastreload
