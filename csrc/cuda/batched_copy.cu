// CUDA backend of batched_copy_: every device-readable pair of a batch in one
// kernel launch, whatever the mix of dtypes. The descriptor table (descs, then
// chunks) is built on the host, uploaded with one asynchronous copy, and walked
// by blocks, each copying one chunk with all its threads (copy_plan.h).
//
// Sources on the destination's device and pinned host sources are read directly
// (unified addressing). Pageable host sources are packed into pinned buckets on
// the CPU, sent with one host-to-device copy per bucket and scattered from there.
// Every buffer a batch needs is allocated before its first launch (PreparedBatch):
// running out of memory refuses the batch with nothing written.
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
#include <memory>
#include <unordered_map>
#include <vector>

#include "../copy_pairs.h"
#include "../copy_plan.h"
#include "../upload_plan.h"

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

__global__ void __launch_bounds__(kThreadsPerBlock)
    batched_copy_kernel(const CopyDesc* __restrict__ descs,  // [num_descs]
                        const CopyChunk* __restrict__ chunks,  // [num_chunks]
                        int64_t num_chunks) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const CopyChunk chunk = chunks[c];
    copy_chunk(descs[chunk.desc], chunk.begin, chunk.end, threadIdx.x, blockDim.x);
  }
}

TableSet single_table(const std::vector<CopyDesc>& descs) {
  TableSet table;
  table.add(descs, kCudaChunkBytes);
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

void launch(const TablePart& part, const uint8_t* tables_on_device, const at::cuda::CUDAStream& stream) {
  if (part.num_chunks == 0) return;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min<int64_t>(part.num_chunks, sms * kBlocksPerSm);
  batched_copy_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(
      reinterpret_cast<const CopyDesc*>(tables_on_device + part.descs_offset),
      reinterpret_cast<const CopyChunk*>(tables_on_device + part.chunks_offset), part.num_chunks);
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

// A CUDA event made up front, so that the launch phase creates nothing.
class Event {
 public:
  Event() { C10_CUDA_CHECK(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming)); }
  ~Event() { C10_CUDA_IGNORE_ERROR(cudaEventDestroy(event_)); }
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  void record(const at::cuda::CUDAStream& stream) { C10_CUDA_CHECK(cudaEventRecord(event_, stream)); }
  void wait_on_host() const { C10_CUDA_CHECK(cudaEventSynchronize(event_)); }

 private:
  cudaEvent_t event_ = nullptr;
};

// Everything a batch needs, allocated before its first launch: an allocation that
// fails (device or pinned memory) then leaves every destination as it was.
//
// Pageable sources travel in buckets (plan_staging): each is packed by CPU threads
// into one of two pinned buffers, in turn, sent with one copy into the device
// staging buffer, and scattered from there by a launch. The staging buffer serves
// every bucket, one after the other on the stream; a pinned buffer is packed again
// once the copy out of it, two buckets earlier, has run.
struct PreparedBatch {
  TableSet tables;  // part 0: the directly read pairs; then one scatter per bucket
  at::Tensor device_tables;
  std::vector<CopyDesc> staged;  // the pageable pairs, sources in host memory
  std::vector<StagingBucket> buckets;
  at::Tensor staging;  // on the device: the largest bucket
  at::Tensor pinned[2];
  std::unique_ptr<Event> packed_sent[2];  // recorded after the copy out of pinned[b % 2]
  std::vector<at::Tensor> fallback_sources;  // by batch.fallback: on the destinations' device
};

PreparedBatch prepare(const DescribedBatch& batch, const HostSources& host, at::TensorList src,
                      const at::Device& device, const at::cuda::CUDAStream& stream) {
  PreparedBatch prepared;
  std::vector<CopyDesc> direct;
  for (const auto k : c10::irange(batch.fused.size())) {
    (host.pageable[k] ? prepared.staged : direct).push_back(batch.fused[k]);
  }
  prepared.tables.add(direct, kCudaChunkBytes);

  prepared.buckets = plan_staging(prepared.staged, kStagingBytes);
  if (!prepared.buckets.empty()) {
    prepared.staging = device_bytes(std::max(largest_bucket(prepared.buckets, 0),
                                             largest_bucket(prepared.buckets, 1)), device);
    for (const size_t parity : {0, 1}) {
      if (parity >= prepared.buckets.size()) break;
      prepared.pinned[parity] = pinned_bytes(largest_bucket(prepared.buckets, parity));
      prepared.packed_sent[parity] = std::make_unique<Event>();
    }
    const auto* staging = static_cast<const char*>(prepared.staging.const_data_ptr());
    for (const StagingBucket& bucket : prepared.buckets) {
      std::vector<CopyDesc> scatter(prepared.staged.begin() + bucket.first,
                                    prepared.staged.begin() + bucket.last);
      for (const auto k : c10::irange(scatter.size())) scatter[k].src = staging + bucket.offsets[k];
      prepared.tables.add(scatter, kCudaChunkBytes);
    }
  }
  if (!prepared.tables.bytes.empty()) prepared.device_tables = upload(prepared.tables.bytes, device, stream);

  // Tensor::copy_ from the host may allocate (a contiguous or converted temporary):
  // the fallback pairs' sources come to the device now, and the copies that write
  // the destinations run between tensors on one device.
  for (const int64_t i : batch.fallback) {
    prepared.fallback_sources.push_back(
        src[i].to(at::TensorOptions().device(device), /*non_blocking=*/true));
  }
  return prepared;
}

void copy_prepared(const PreparedBatch& prepared, const DescribedBatch& batch, at::TensorList dst,
                   const at::cuda::CUDAStream& stream) {
  const auto* tables =
      prepared.device_tables.defined() ? prepared.device_tables.const_data_ptr<uint8_t>() : nullptr;
  launch(prepared.tables.parts[0], tables, stream);
  for (const auto b : c10::irange(prepared.buckets.size())) {
    const StagingBucket& bucket = prepared.buckets[b];
    const at::Tensor& pinned = prepared.pinned[b % 2];
    Event& sent = *prepared.packed_sent[b % 2];
    if (b >= 2) sent.wait_on_host();
    auto* packed = static_cast<char*>(pinned.data_ptr());
    at::parallel_for(bucket.first, bucket.last, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const CopyDesc& d = prepared.staged[i];
        std::memcpy(packed + bucket.offsets[i - bucket.first], d.src, d.numel * elem_size(d.src_kind));
      }
    });
    C10_CUDA_CHECK(cudaMemcpyAsync(prepared.staging.data_ptr(), pinned.const_data_ptr(), bucket.bytes,
                                   cudaMemcpyHostToDevice, stream));
    sent.record(stream);
    launch(prepared.tables.parts[b + 1], tables, stream);
  }
  for (const at::Tensor& pinned : prepared.pinned) {
    if (pinned.defined()) hold_until_consumed(pinned, stream);
  }
  for (const auto k : c10::irange(batch.fallback.size())) {
    dst[batch.fallback[k]].copy_(prepared.fallback_sources[k], /*non_blocking=*/true);
  }
  // The staging and table buffers go back to the caching allocator on this stream:
  // later work on it runs after the launches that read them.
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
  const PreparedBatch prepared = prepare(batch, host, src, dst[0].device(), stream);
  copy_prepared(prepared, batch, dst, stream);
  hold_pinned_sources(host, stream);
}

void batched_copy_cuda(at::TensorList dst, at::TensorList src) {
  // Checked first: the host-source probes are driver calls capture forbids.
  check_not_capturing();
  fused_copy_cuda(checked_batch(dst, src), dst, src);
}

[[maybe_unused]] const bool registered = register_fused_copy(c10::DeviceType::CUDA, &fused_copy_cuda);

// [host table, device table] for a fixed batch whose sources the device reads directly.
std::vector<at::Tensor> batched_copy_table(at::TensorList dst, at::TensorList src) {
  const DescribedBatch batch = checked_batch(dst, src);
  if (dst.empty()) return {at::empty({0}, at::kByte), at::empty({0}, at::kByte)};
  const c10::cuda::CUDAGuard guard(dst[0].device());
  const HostSources host = host_sources(src, batch.fused_pairs);
  for (const auto k : c10::irange(batch.fused.size())) {
    TORCH_CHECK(!host.pageable[k], "batched_copy_table: the source of pair ", batch.fused_pairs[k],
                " is in pageable host memory; a replayable copy reads its sources on the device "
                "or in pinned host memory (Tensor.pin_memory())");
  }
  const TableSet table = single_table(batch.fused);
  at::Tensor host_table = at::empty({static_cast<int64_t>(table.bytes.size())}, at::kByte);
  std::memcpy(host_table.data_ptr(), table.bytes.data(), table.bytes.size());
  at::Tensor device_table = device_bytes(host_table.numel(), dst[0].device());
  device_table.copy_(host_table);
  return {host_table, device_table};
}

// The replayable copy's strided pairs, read where they are (on the device or pinned).
void copy_fallback_pairs(at::TensorList dst, at::TensorList src, const DescribedBatch& batch) {
  for (const int64_t i : batch.fallback) dst[i].copy_(src[i], /*non_blocking=*/true);
}

// The launch of a table built by batched_copy_table: no allocation, no upload.
void batched_copy_with_table_(at::TensorList dst, at::TensorList src, const at::Tensor& host_table,
                              const at::Tensor& device_table) {
  const DescribedBatch batch = checked_batch(dst, src);
  const TableSet table = single_table(batch.fused);
  TORCH_CHECK(host_table.is_cpu() && host_table.scalar_type() == at::kByte &&
                  host_table.is_contiguous() &&
                  host_table.numel() == static_cast<int64_t>(table.bytes.size()) &&
                  (table.bytes.empty() ||
                   std::memcmp(host_table.const_data_ptr(), table.bytes.data(), table.bytes.size()) == 0),
              "batched_copy_with_table_: the table was built for other tensors (addresses, sizes "
              "or dtypes differ); build it again with batched_copy_table");
  TORCH_CHECK(device_table.numel() == host_table.numel() &&
                  (dst.empty() || device_table.device() == dst[0].device()),
              "batched_copy_with_table_: the device table must be the one batched_copy_table "
              "returned with this host table");
  if (dst.empty()) return;
  const c10::cuda::CUDAGuard guard(dst[0].device());
  const at::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
  launch(table.parts[0], device_table.const_data_ptr<uint8_t>(), stream);
  copy_fallback_pairs(dst, src, batch);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastreload, CUDA, m) {
  m.impl("batched_copy_", &batched_copy_cuda);
  m.impl("batched_copy_table", &batched_copy_table);
  m.impl("batched_copy_with_table_", &batched_copy_with_table_);
}

}  // namespace fastreload
