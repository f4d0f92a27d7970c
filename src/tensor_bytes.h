// Internal: tensors as raw bytes, so that rank-local state crosses ranks and
// comes back bit for bit in every dtype (an int64 above 2^53 included).
#pragma once

#include <ATen/ATen.h>

namespace ftcomm::detail {

// `t`'s bytes, contiguous, on the CPU.
inline at::Tensor as_bytes(const at::Tensor& t) {
  at::Tensor c = t.detach().to(at::kCPU).contiguous().reshape({-1});
  return c.numel() == 0 ? at::empty({0}, at::kByte) : c.view(at::kByte);
}

// A CPU tensor shaped and typed like `like`, filled from `bytes`.
inline at::Tensor from_bytes(const at::Tensor& bytes, const at::Tensor& like) {
  at::Tensor out = at::empty(like.sizes(), like.options().device(at::kCPU).memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() > 0) out.reshape({-1}).view(at::kByte).copy_(bytes);
  return out;
}

}  // namespace ftcomm::detail
