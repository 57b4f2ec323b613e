#pragma once
// The batched copy, split into a host-side planner and a per-chunk routine.
//
// The routine is written once for host and device: a chunk is copied by `lanes`
// cooperating workers (a CUDA block's threads, or one CPU thread with lanes == 1),
// so the CPU backend and the host tests execute exactly the code the GPU runs.
// Planning needs no Tensor and no dispatcher; backends turn Tensors into
// CopyDesc (see copy_pairs.h) and hand the chunks to their executor.

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <c10/util/TypeCast.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__SSE2__) && !defined(__CUDA_ARCH__)
#include <immintrin.h>
#define FASTRELOAD_STREAM_STORES 1
#endif

namespace fastreload {

// Element formats the routine converts between. Same-format pairs are planned as
// kBytes (numel counts bytes), whatever their dtype.
enum class ElemKind : uint8_t { kBytes, kF64, kF32, kF16, kBF16, kF8E4M3, kF8E5M2 };

C10_HOST_DEVICE constexpr int64_t elem_size(ElemKind k) {
  switch (k) {
    case ElemKind::kF64: return 8;
    case ElemKind::kF32: return 4;
    case ElemKind::kF16:
    case ElemKind::kBF16: return 2;
    default: return 1;
  }
}

// One contiguous pair: numel elements of src_kind at src become dst_kind at dst.
struct CopyDesc {
  const char* src;
  char* dst;
  int64_t numel;
  ElemKind src_kind;
  ElemKind dst_kind;
};

// Elements [begin, end) of descs[desc].
struct CopyChunk {
  int64_t desc;
  int64_t begin;
  int64_t end;
};

// The larger of a pair's two element sizes: what a chunk budget is counted in.
C10_HOST_DEVICE constexpr int64_t chunk_elem_bytes(const CopyDesc& d) {
  return elem_size(d.src_kind) > elem_size(d.dst_kind) ? elem_size(d.src_kind)
                                                       : elem_size(d.dst_kind);
}

// Splits every pair into chunks of at most chunk_bytes (at least one element).
// Byte-copy chunks start on multiples of chunk_bytes from the pair's start, so a
// pair whose src and dst share their alignment keeps it in every chunk.
inline std::vector<CopyChunk> plan_chunks(const CopyDesc* descs, int64_t count,
                                          int64_t chunk_bytes) {
  std::vector<CopyChunk> chunks;
  int64_t total = 0;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t per = std::max<int64_t>(1, chunk_bytes / chunk_elem_bytes(descs[i]));
    total += (descs[i].numel + per - 1) / per;
  }
  chunks.reserve(static_cast<size_t>(total));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t per = std::max<int64_t>(1, chunk_bytes / chunk_elem_bytes(descs[i]));
    for (int64_t b = 0; b < descs[i].numel; b += per) {
      chunks.push_back({i, b, std::min(descs[i].numel, b + per)});
    }
  }
  return chunks;
}

namespace detail {

template <int W> struct Word;
template <> struct Word<1> { uint8_t v; };
template <> struct Word<2> { uint16_t v; };
template <> struct Word<4> { uint32_t v; };
template <> struct Word<8> { uint64_t v; };
template <> struct alignas(16) Word<16> { uint64_t lo, hi; };

// Copies n bytes using W-byte words for the part where dst is W-aligned; the
// caller guarantees src and dst agree modulo W. `stream` asks a host thread for
// non-temporal stores: a batch larger than the caches then costs no reads of the
// destination lines it overwrites.
template <int W>
C10_HOST_DEVICE inline void copy_words(char* dst, const char* src, int64_t n,
                                       int64_t lane, int64_t lanes, bool stream) {
  int64_t head = static_cast<int64_t>((W - reinterpret_cast<uintptr_t>(dst) % W) % W);
  if (head > n) head = n;
  for (int64_t i = lane; i < head; i += lanes) dst[i] = src[i];
  int64_t words = (n - head) / W;
  const int64_t tail = head + words * W;
  auto* dw = reinterpret_cast<Word<W>*>(dst + head);
  const auto* sw = reinterpret_cast<const Word<W>*>(src + head);
#ifdef FASTRELOAD_STREAM_STORES
  if (W == 16 && stream && lanes == 1) {
    auto* dv = reinterpret_cast<__m128i*>(dw);
    const auto* sv = reinterpret_cast<const __m128i*>(sw);
    for (int64_t i = 0; i < words; ++i) _mm_stream_si128(dv + i, _mm_load_si128(sv + i));
    words = 0;
  }
#endif
  for (int64_t i = lane; i < words; i += lanes) dw[i] = sw[i];
  for (int64_t i = tail + lane; i < n; i += lanes) dst[i] = src[i];
}

// The widest word in which src and dst are mutually aligned decides the body.
C10_HOST_DEVICE inline void copy_bytes(char* dst, const char* src, int64_t n,
                                       int64_t lane, int64_t lanes, bool stream) {
  const uintptr_t rel = reinterpret_cast<uintptr_t>(dst) ^ reinterpret_cast<uintptr_t>(src);
  if ((rel & 15) == 0) {
    copy_words<16>(dst, src, n, lane, lanes, stream);
  } else if ((rel & 7) == 0) {
    copy_words<8>(dst, src, n, lane, lanes, stream);
  } else if ((rel & 3) == 0) {
    copy_words<4>(dst, src, n, lane, lanes, stream);
  } else if ((rel & 1) == 0) {
    copy_words<2>(dst, src, n, lane, lanes, stream);
  } else {
    copy_words<1>(dst, src, n, lane, lanes, stream);
  }
}

// c10::convert is what Tensor.copy_ uses, so results match it bit for bit.
template <typename S, typename D>
C10_HOST_DEVICE inline void convert_range(char* dst, const char* src, int64_t begin,
                                          int64_t end, int64_t lane, int64_t lanes) {
  const S* s = reinterpret_cast<const S*>(src);
  D* d = reinterpret_cast<D*>(dst);
  for (int64_t i = begin + lane; i < end; i += lanes) d[i] = c10::convert<D>(s[i]);
}

template <typename S>
C10_HOST_DEVICE inline void convert_from(ElemKind dst_kind, char* dst, const char* src,
                                         int64_t begin, int64_t end, int64_t lane,
                                         int64_t lanes) {
  switch (dst_kind) {
    case ElemKind::kF64: convert_range<S, double>(dst, src, begin, end, lane, lanes); break;
    case ElemKind::kF32: convert_range<S, float>(dst, src, begin, end, lane, lanes); break;
    case ElemKind::kF16: convert_range<S, c10::Half>(dst, src, begin, end, lane, lanes); break;
    case ElemKind::kBF16: convert_range<S, c10::BFloat16>(dst, src, begin, end, lane, lanes); break;
    case ElemKind::kF8E4M3: convert_range<S, c10::Float8_e4m3fn>(dst, src, begin, end, lane, lanes); break;
    case ElemKind::kF8E5M2: convert_range<S, c10::Float8_e5m2>(dst, src, begin, end, lane, lanes); break;
    default: break;  // kBytes never pairs with a float kind (see describe_pair)
  }
}

}  // namespace detail

// Copies one chunk; every lane in [0, lanes) must call it with the same chunk.
// A host thread that passes stream=true calls finish_host_stores() when done.
C10_HOST_DEVICE inline void copy_chunk(const CopyDesc& d, int64_t begin, int64_t end,
                                       int64_t lane, int64_t lanes, bool stream = false) {
  if (d.src_kind == ElemKind::kBytes) {
    detail::copy_bytes(d.dst + begin, d.src + begin, end - begin, lane, lanes, stream);
    return;
  }
  switch (d.src_kind) {
    case ElemKind::kF64: detail::convert_from<double>(d.dst_kind, d.dst, d.src, begin, end, lane, lanes); break;
    case ElemKind::kF32: detail::convert_from<float>(d.dst_kind, d.dst, d.src, begin, end, lane, lanes); break;
    case ElemKind::kF16: detail::convert_from<c10::Half>(d.dst_kind, d.dst, d.src, begin, end, lane, lanes); break;
    case ElemKind::kBF16: detail::convert_from<c10::BFloat16>(d.dst_kind, d.dst, d.src, begin, end, lane, lanes); break;
    case ElemKind::kF8E4M3: detail::convert_from<c10::Float8_e4m3fn>(d.dst_kind, d.dst, d.src, begin, end, lane, lanes); break;
    case ElemKind::kF8E5M2: detail::convert_from<c10::Float8_e5m2>(d.dst_kind, d.dst, d.src, begin, end, lane, lanes); break;
    default: break;
  }
}

// Orders a thread's non-temporal stores before anything it does next.
inline void finish_host_stores() {
#ifdef FASTRELOAD_STREAM_STORES
  _mm_sfence();
#endif
}

}  // namespace fastreload
