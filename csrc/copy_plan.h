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

// The pairs with every run of pairs that continue one another on both sides (the
// gate and up projections of one expert, which a checkpoint stores back to back
// and a model with fused experts holds back to back) joined into one pair: fewer,
// longer streams to copy.
inline std::vector<CopyDesc> joined_pairs(const CopyDesc* descs, int64_t count) {
  std::vector<CopyDesc> joined;
  joined.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    const CopyDesc& d = descs[i];
    if (!joined.empty()) {
      CopyDesc& last = joined.back();
      if (last.src_kind == d.src_kind && last.dst_kind == d.dst_kind &&
          last.src + last.numel * elem_size(last.src_kind) == d.src &&
          last.dst + last.numel * elem_size(last.dst_kind) == d.dst) {
        last.numel += d.numel;
        continue;
      }
    }
    joined.push_back(d);
  }
  return joined;
}

namespace detail {

template <int W> struct Word;
template <> struct Word<1> { uint8_t v; };
template <> struct Word<2> { uint16_t v; };
template <> struct Word<4> { uint32_t v; };
template <> struct Word<8> { uint64_t v; };
template <> struct alignas(16) Word<16> { uint64_t lo, hi; };

// Copies n bytes using W-byte words for the part where dst is W-aligned, shared
// between lanes; the caller guarantees src and dst agree modulo W.
template <int W>
C10_HOST_DEVICE inline void copy_words(char* dst, const char* src, int64_t n,
                                       int64_t lane, int64_t lanes) {
  int64_t head = static_cast<int64_t>((W - reinterpret_cast<uintptr_t>(dst) % W) % W);
  if (head > n) head = n;
  for (int64_t i = lane; i < head; i += lanes) dst[i] = src[i];
  const int64_t words = (n - head) / W;
  const int64_t tail = head + words * W;
  auto* dw = reinterpret_cast<Word<W>*>(dst + head);
  const auto* sw = reinterpret_cast<const Word<W>*>(src + head);
  for (int64_t i = lane; i < words; i += lanes) dw[i] = sw[i];
  for (int64_t i = tail + lane; i < n; i += lanes) dst[i] = src[i];
}

#if !defined(__CUDA_ARCH__)
// A host thread copying alone. `stream` asks for non-temporal stores: a batch
// larger than the caches then costs no reads of the destination lines it
// overwrites. Checkpoint files place tensors at any 8-byte offset
// (safetensors pads only its header), so half of them sit 8 bytes off the
// destination's 16-byte alignment: reads are unaligned here and only the stores
// are aligned, which costs modern cores nothing and keeps every pair on the wide
// path. Without `stream`, memcpy's own choice of instructions is the fastest.
inline void copy_host(char* dst, const char* src, int64_t n, bool stream) {
#ifdef FASTRELOAD_STREAM_STORES
  constexpr int64_t kLine = 64;
  if (stream && n >= 2 * kLine) {
    const int64_t head = static_cast<int64_t>((kLine - reinterpret_cast<uintptr_t>(dst) % kLine) % kLine);
    std::memcpy(dst, src, static_cast<size_t>(head));
    const int64_t lines = (n - head) / kLine;
    auto* d = reinterpret_cast<__m128i*>(dst + head);
    const auto* s = reinterpret_cast<const __m128i*>(src + head);
    for (int64_t i = 0; i < lines; ++i, d += 4, s += 4) {
      const __m128i a = _mm_loadu_si128(s), b = _mm_loadu_si128(s + 1);
      const __m128i c = _mm_loadu_si128(s + 2), e = _mm_loadu_si128(s + 3);
      _mm_stream_si128(d, a);
      _mm_stream_si128(d + 1, b);
      _mm_stream_si128(d + 2, c);
      _mm_stream_si128(d + 3, e);
    }
    const int64_t done = head + lines * kLine;
    std::memcpy(dst + done, src + done, static_cast<size_t>(n - done));
    return;
  }
#endif
  (void)stream;
  std::memcpy(dst, src, static_cast<size_t>(n));
}
#endif

// The widest word in which src and dst are mutually aligned decides the body of
// cooperating lanes; a host thread alone takes copy_host.
C10_HOST_DEVICE inline void copy_bytes(char* dst, const char* src, int64_t n,
                                       int64_t lane, int64_t lanes, bool stream) {
#if !defined(__CUDA_ARCH__)
  if (lanes == 1) {
    copy_host(dst, src, n, stream);
    return;
  }
#endif
  const uintptr_t rel = reinterpret_cast<uintptr_t>(dst) ^ reinterpret_cast<uintptr_t>(src);
  if ((rel & 15) == 0) {
    copy_words<16>(dst, src, n, lane, lanes);
  } else if ((rel & 7) == 0) {
    copy_words<8>(dst, src, n, lane, lanes);
  } else if ((rel & 3) == 0) {
    copy_words<4>(dst, src, n, lane, lanes);
  } else if ((rel & 1) == 0) {
    copy_words<2>(dst, src, n, lane, lanes);
  } else {
    copy_words<1>(dst, src, n, lane, lanes);
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
