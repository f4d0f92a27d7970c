// Bucket layouts of c10d::Reducer: what one is (BucketLayout, whose signature the
// store and recovery use), read one off a Reducer, check that a stored one fits a
// model, and turn one back into the bucket indices a Reducer is built with.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>


namespace c10d {
class Reducer;
}

namespace ftcomm {

// How gradients map to buckets, and each bucket's shape; what c10d::Reducer
// computed (after its first-iteration rebuild) and what a resumed job must reuse.
struct BucketLayout {
  struct Bucket {
    std::vector<int64_t> parameter_indices;
    std::vector<int64_t> offsets, lengths;
    std::vector<std::vector<int64_t>> sizes;
    int dtype = 0;       // c10::ScalarType
    std::string device;  // the device type, "cpu" or "cuda": no index, ranks use different GPUs
  };
  std::vector<Bucket> buckets;
  // Stable 64-bit hash of everything above (hex in keys and messages).
  uint64_t signature() const;
};

// Hex form of a layout signature, as in keys, messages and `ftcomm inspect`.
std::string signature_hex(uint64_t signature);

// The Reducer's current buckets (after its first-iteration rebuild, once it ran),
// with parameter indices into `params`, the list the Reducer was built with.
BucketLayout bucket_layout_of(const c10d::Reducer& reducer, const std::vector<at::Tensor>& params);

// Empty when `layout` fits `params` (every parameter in exactly one bucket, with
// its size, dtype and device); else what does not fit, for an error message.
std::string layout_mismatch(const BucketLayout& layout, const std::vector<at::Tensor>& params);

// The layout c10d::Reducer gives `buckets` of `params` (the bucket_indices
// argument of its constructor): gradients back to back in each bucket. Its
// signature is the one a commit records for the Reducer's buckets.
BucketLayout layout_of(const std::vector<std::vector<size_t>>& buckets, const std::vector<at::Tensor>& params);

// The bucket_indices argument of c10d::Reducer's constructor.
std::vector<std::vector<size_t>> bucket_indices(const BucketLayout& layout);

}  // namespace ftcomm
