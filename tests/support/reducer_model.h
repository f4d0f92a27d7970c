// A small MLP trained through c10d::Reducer, driven from C++ as DDP does
// (rebuild_buckets, prepare_for_forward, forward, prepare_for_backward, backward),
// for hook tests and the hook benchmark.
#pragma once

#include <map>
#include <memory>
#include <utility>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/csrc/distributed/c10d/default_comm_hooks.hpp>
#include <torch/csrc/distributed/c10d/reducer.hpp>

namespace ftcomm::testing {

enum class HookKind { kNone, kBuiltinAllreduce, kBuiltinFp16, kCustom };

class ReducerModel {
 public:
  // `widths` = layer sizes, e.g. {512, 1024, 1024, 10}; same init on every rank.
  // `buckets`, when given, is the initial bucket assignment (a stored layout).
  // Parameters and batches live on `device` (a CUDA device for NCCL runs).
  ReducerModel(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, std::vector<int64_t> widths,
               int64_t bucket_bytes = 4 << 20, std::vector<std::vector<size_t>> buckets = {},
               at::Device device = at::kCPU);
  ~ReducerModel();
  void set_hook(HookKind kind, std::unique_ptr<c10d::CommHookInterface> custom = nullptr);
  // One forward/backward of a batch whose values depend on `seed` and the rank
  // (drawn at its first use, then kept on the device);
  // returns the loss. Gradients are reduced into the parameters' .grad(). On CUDA it
  // returns once the device has finished the step (so it can be timed).
  double step(int64_t batch, int64_t seed);
  // Copies of the gradients on the CPU.
  std::vector<at::Tensor> gradients() const;
  const std::vector<at::Tensor>& parameters() const { return params_; }
  const c10d::Reducer& reducer() const { return *reducer_; }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  std::vector<at::Tensor> params_;
  std::unique_ptr<c10d::Reducer> reducer_;
  at::Device device_;
  std::map<std::pair<int64_t, int64_t>, std::pair<at::Tensor, at::Tensor>> batches_;  // (batch, seed) -> x, target
};

}  // namespace ftcomm::testing
