// Built against an installed ftcomm: forms a one-rank group and broadcasts.
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include <ftcomm/broadcast.h>
#include <ftcomm/process_group.h>

int main() {
  ftcomm::ProcessGroupOptions options;
  options.store = ftcomm::StoreKind::kCustom;
  options.custom_store = c10::make_intrusive<c10d::HashStore>();
  auto pg = ftcomm::make_process_group(options);
  std::vector<at::Tensor> tensors{at::ones({3})};
  ftcomm::broadcast_coalesced(pg, tensors, 1 << 20);
  return tensors[0].sum().item<float>() == 3.0f ? 0 : 1;
}
