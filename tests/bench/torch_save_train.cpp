// The baseline of tests/bench/jit_bench.py: `ftcomm train` with torch::save in
// place of ftcomm's store. Every --every K steps each rank saves its parameters,
// momentum and the step to DIR/torchsave-rank<R>.pt (synchronously, to a
// temporary file renamed into place); a restart torch::loads its own file (no
// agreement between the ranks). The rest of the command line is ftcomm train's.
//
//   torchrun --no-python --nproc-per-node=2 --max-restarts=1 ftcomm_bench_torch_save --every 10 \
//       --ckpt DIR [ftcomm train options]
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/serialize.h>

#include "ftcomm/process_group.h"
#include "train.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  int64_t every = 0;
  std::string dir;
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == "--every") {
      every = std::atoll(args[i + 1].c_str());
      args.erase(args.begin() + static_cast<long>(i), args.begin() + static_cast<long>(i) + 2);
      break;
    }
  }
  for (size_t i = 0; i + 1 < args.size(); ++i) {
    if (args[i] == "--ckpt") dir = args[i + 1];
  }
  if (every < 1 || dir.empty()) {
    std::cerr << "usage: ftcomm_bench_torch_save --every K --ckpt DIR [ftcomm train options]\n"
                 "  (--every: save every K >= 1 steps; --ckpt: where each rank's torchsave-rank<R>.pt goes)\n";
    return 2;
  }
  const int rank = ftcomm::process_group_options_from_env().rank;
  const std::string path = dir + "/torchsave-rank" + std::to_string(std::max(0, rank)) + ".pt";
  ftcomm::tools::TrainBaseline baseline;
  baseline.restore = [&](std::vector<at::Tensor>& params, std::vector<at::Tensor>& momentum) -> int64_t {
    if (::access(path.c_str(), R_OK) != 0) return -1;
    std::vector<at::Tensor> saved;
    torch::load(saved, path);
    TORCH_CHECK(saved.size() == 2 * params.size() + 1, path, " does not fit this model");
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].copy_(saved[i]);
      momentum[i].copy_(saved[params.size() + i]);
    }
    const int64_t step = saved.back().item<int64_t>();
    if (rank <= 0) std::printf("ftcomm train: loaded the torch::save baseline of step %lld\n", static_cast<long long>(step));
    return step;
  };
  baseline.after_step = [&](int64_t step, const std::vector<at::Tensor>& params,
                            const std::vector<at::Tensor>& momentum) {
    if (step % every != 0) return;
    std::vector<at::Tensor> state;
    for (const auto& p : params) state.push_back(p.detach());
    state.insert(state.end(), momentum.begin(), momentum.end());
    state.push_back(at::tensor({step}, at::kLong));
    ::mkdir(dir.c_str(), 0755);
    torch::save(state, path + ".tmp");
    TORCH_CHECK(::rename((path + ".tmp").c_str(), path.c_str()) == 0, "rename to ", path, " failed");
  };
  return ftcomm::tools::train_main(args, &baseline);
}
