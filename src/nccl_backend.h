// Internal seam to the NCCL backend, compiled only with FTCOMM_WITH_NCCL so that
// the CUDA-heavy ProcessGroupNCCL header stays in one translation unit.
#pragma once

#include <chrono>

#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

namespace ftcomm::detail {

// Builds a ProcessGroupNCCL bound to CUDA device `device_index`, connects its
// communicator eagerly and runs a one-element allreduce as a probe, each within
// `timeout`. Throws c10::Error on any failure.
c10::intrusive_ptr<c10d::Backend> make_nccl_backend(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int world_size,
    std::chrono::milliseconds timeout,
    int device_index);

}  // namespace ftcomm::detail
