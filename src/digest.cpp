#include "ftcomm/digest.h"

#include <ATen/ATen.h>

#include "sha256.h"

namespace ftcomm {

std::string tensors_digest(const std::vector<at::Tensor>& tensors) {
  std::string bytes;
  for (const auto& t : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    bytes.append(static_cast<const char*>(c.data_ptr()), c.nbytes());
  }
  return sha256_hex(bytes);
}

}  // namespace ftcomm
