#include "ftcomm/bucket_layout.h"

#include <sstream>
#include <unordered_map>

#include <torch/csrc/distributed/c10d/reducer.hpp>

namespace ftcomm {

BucketLayout bucket_layout_of(const c10d::Reducer& reducer, const std::vector<at::Tensor>& params) {
  std::unordered_map<const c10::TensorImpl*, int64_t> index;
  for (size_t i = 0; i < params.size(); ++i) index[params[i].unsafeGetTensorImpl()] = static_cast<int64_t>(i);
  BucketLayout layout;
  // The buckets' own buffers: only their shapes and offsets are read. (Asking
  // for zero tensors instead allocates and zero-fills a copy of every bucket, as
  // large as the model's gradients: 8 ms and 8000 page faults a commit for a
  // 50 MB model on this project's CI machine.)
  for (const auto& bucket : reducer.get_grad_buckets(/*return_zero_tensors=*/false)) {
    BucketLayout::Bucket b;
    const at::Tensor& buffer = bucket.getBuffer();
    b.dtype = static_cast<int>(buffer.scalar_type());
    b.device = c10::DeviceTypeName(buffer.device().type(), /*lower_case=*/true);
    for (const at::Tensor& p : bucket.getParameters()) {
      auto it = index.find(p.unsafeGetTensorImpl());
      TORCH_CHECK(it != index.end(), "bucket_layout_of: the Reducer holds a parameter that is not in `params`");
      b.parameter_indices.push_back(it->second);
    }
    for (const at::Tensor& g : bucket.getGradients()) {
      b.offsets.push_back(g.storage_offset() - buffer.storage_offset());
      b.lengths.push_back(g.numel());
      b.sizes.push_back(g.sizes().vec());
    }
    layout.buckets.push_back(std::move(b));
  }
  return layout;
}

std::string layout_mismatch(const BucketLayout& layout, const std::vector<at::Tensor>& params) {
  std::vector<int> seen(params.size(), 0);
  std::ostringstream why;
  for (size_t b = 0; b < layout.buckets.size(); ++b) {
    const auto& bucket = layout.buckets[b];
    for (size_t k = 0; k < bucket.parameter_indices.size(); ++k) {
      const int64_t i = bucket.parameter_indices[k];
      if (i < 0 || i >= static_cast<int64_t>(params.size())) {
        why << "bucket " << b << " names parameter " << i << ", but the model has " << params.size();
        return why.str();
      }
      ++seen[i];
      const at::Tensor& p = params[i];
      if (k >= bucket.sizes.size() || p.sizes().vec() != bucket.sizes[k]) {
        why << "bucket " << b << " expects parameter " << i << " of shape "
            << (k < bucket.sizes.size() ? c10::IntArrayRef(bucket.sizes[k]) : c10::IntArrayRef()) << ", the model's is "
            << p.sizes();
        return why.str();
      }
      if (static_cast<int>(p.scalar_type()) != bucket.dtype ||
          c10::DeviceTypeName(p.device().type(), /*lower_case=*/true) != bucket.device) {
        why << "bucket " << b << " is " << static_cast<c10::ScalarType>(bucket.dtype) << " on " << bucket.device
            << ", parameter " << i << " is " << p.scalar_type() << " on " << p.device();
        return why.str();
      }
    }
  }
  for (size_t i = 0; i < params.size(); ++i) {
    if (seen[i] != 1) {
      why << "parameter " << i << " is in " << seen[i] << " buckets of the layout, not exactly one";
      return why.str();
    }
  }
  return "";
}

BucketLayout layout_of(const std::vector<std::vector<size_t>>& buckets, const std::vector<at::Tensor>& params) {
  BucketLayout layout;
  for (const auto& indices : buckets) {
    BucketLayout::Bucket b;
    int64_t offset = 0;
    for (size_t i : indices) {
      TORCH_CHECK(i < params.size(), "layout_of: parameter ", i, " of ", params.size());
      const at::Tensor& p = params[i];
      if (b.parameter_indices.empty()) {
        b.dtype = static_cast<int>(p.scalar_type());
        b.device = c10::DeviceTypeName(p.device().type(), /*lower_case=*/true);
      }
      b.parameter_indices.push_back(static_cast<int64_t>(i));
      b.offsets.push_back(offset);
      b.lengths.push_back(p.numel());
      b.sizes.push_back(p.sizes().vec());
      offset += p.numel();
    }
    layout.buckets.push_back(std::move(b));
  }
  return layout;
}

std::vector<std::vector<size_t>> bucket_indices(const BucketLayout& layout) {
  std::vector<std::vector<size_t>> out;
  for (const auto& b : layout.buckets) out.emplace_back(b.parameter_indices.begin(), b.parameter_indices.end());
  return out;
}

}  // namespace ftcomm
