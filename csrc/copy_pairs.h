#pragma once
// Host-side view of a batched copy: which pairs are acceptable, and the
// descriptors the fused pass runs on. Metadata only; no byte is touched here.

#include <ATen/core/Tensor.h>

#include <vector>

#include "copy_plan.h"

namespace fastreload {

// Why batched_copy_ refuses a pair. The values are the codes batched_copy_check
// returns and fastreload/ops.py names; keep the two in step.
enum class PairProblem : int8_t {
  kNone = 0,
  kShape = 1,               // dst and src shapes differ
  kDtype = 2,               // no conversion between the two dtypes
  kDevice = 3,              // src neither on dst's device nor on the host; dsts on several devices
  kDestinationOverlap = 4,  // dst shares bytes with another pair's dst, or with itself
  kSourceOverlap = 5,       // src shares bytes with a dst it is not the exact copy of
};

// The first problem of every pair, in pair order.
std::vector<PairProblem> find_pair_problems(at::TensorList dst, at::TensorList src);

struct DescribedBatch {
  std::vector<CopyDesc> fused;        // pairs sharing one dense memory order
  std::vector<int64_t> fused_pairs;   // the pair index of each of them
  std::vector<int64_t> fallback;      // other pairs (strided views): copied by Tensor::copy_
};

// Checks every pair, raising a TORCH_CHECK error that names the first refused
// one, and sorts them into the fused pass and the fallback. Empty pairs and
// pairs whose src is their dst (same bytes, same layout) are left out.
DescribedBatch checked_batch(at::TensorList dst, at::TensorList src);

}  // namespace fastreload
