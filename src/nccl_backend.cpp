#include "nccl_backend.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

namespace ftcomm::detail {

c10::intrusive_ptr<c10d::Backend> make_nccl_backend(const c10::intrusive_ptr<c10d::Store>& store, int rank,
                                                    int world_size, std::chrono::milliseconds timeout,
                                                    int device_index) {
  const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(device_index));
  c10::cuda::set_device(device.index());
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  options->group_name = "ftcomm";
  auto nccl = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world_size, options);
  nccl->setBoundDeviceId(device);
  // Eager init surfaces a broken NCCL (bad environment, unreachable peers) here,
  // where we can still fall back, rather than at the first gradient bucket.
  nccl->eagerConnectSingleDevice(device);
  std::vector<at::Tensor> probe{at::ones({1}, at::TensorOptions().device(device).dtype(at::kFloat))};
  auto work = nccl->allreduce(probe);
  work->wait(timeout);
  c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
  TORCH_CHECK(
      probe[0].item<float>() == static_cast<float>(world_size),
      "NCCL probe allreduce returned ", probe[0].item<float>(), " instead of ", world_size);
  return nccl;
}

}  // namespace ftcomm::detail
