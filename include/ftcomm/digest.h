// A digest of tensors' bytes: equal digests mean bit-identical tensors (what
// `ftcomm train` prints at the end, and what the recovery tests compare).
#pragma once

#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace ftcomm {

// SHA-256 hex of the tensors' bytes, in order (copied to the CPU and made
// contiguous first).
std::string tensors_digest(const std::vector<at::Tensor>& tensors);

}  // namespace ftcomm
