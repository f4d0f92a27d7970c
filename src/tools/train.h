// `ftcomm train`: one rank of fault-tolerant data-parallel training over
// ftcomm::DistributedDataParallel (see train.cpp for the command line).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

namespace ftcomm::tools {

// A checkpointing baseline a benchmark runs in place of ftcomm's store
// (tests/bench/torch_save_train.cpp: torch::save every K steps). With one, --ckpt
// is the baseline's directory and no ftcomm store is opened.
struct TrainBaseline {
  // Before the first step, on every rank: loads the baseline's checkpoint into
  // the parameters and momentum; returns its step, or -1 when it has none.
  std::function<int64_t(std::vector<at::Tensor>& params, std::vector<at::Tensor>& momentum)> restore;
  // After step `step`'s update (steps count from 1).
  std::function<void(int64_t step, const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& momentum)>
      after_step;
};

// Runs `ftcomm train ARGV...`; returns the exit code (0: trained to --steps; 2: a
// bad command line). An error after the group is up is reported by
// cli::exit_with_error, after this rank's just-in-time save.
int train_main(const std::vector<std::string>& argv, const TrainBaseline* baseline = nullptr);

}  // namespace ftcomm::tools
