// Bucket layouts of c10d::Reducer: read one off a Reducer, check that a stored one
// fits a model, and turn one back into the bucket indices a Reducer is built with.
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "ftcomm/checkpoint_store.h"

namespace c10d {
class Reducer;
}

namespace ftcomm {

// The Reducer's current buckets (after its first-iteration rebuild, once it ran),
// with parameter indices into `params`, the list the Reducer was built with.
BucketLayout bucket_layout_of(const c10d::Reducer& reducer, const std::vector<at::Tensor>& params);

// Empty when `layout` fits `params` (every parameter in exactly one bucket, with
// its size, dtype and device); else what does not fit, for an error message.
std::string layout_mismatch(const BucketLayout& layout, const std::vector<at::Tensor>& params);

// The bucket_indices argument of c10d::Reducer's constructor.
std::vector<std::vector<size_t>> bucket_indices(const BucketLayout& layout);

}  // namespace ftcomm
