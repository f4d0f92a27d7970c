// The ftcomm command-line tool.
#include <chrono>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "ftcomm/broadcast.h"
#include "ftcomm/process_group.h"

namespace {

constexpr const char* kUsage = R"(Usage: ftcomm <command> [options]

Fault-tolerant gradient communication for PyTorch data-parallel training (C++).

Commands:
  doctor      Form a process group and check it: backend choice, an allreduce and
              a verified broadcast_coalesced on CPU (and CUDA when a GPU is present).
              Runs as one rank, or as every rank under torchrun:
                torchrun --no-python --nproc-per-node=2 ftcomm doctor
  help        Show this text.

Options of doctor:
  --backend auto|nccl|gloo   What serves CUDA tensors (default auto: NCCL, else Gloo).
  --timeout SECONDS          Deadline of every wait (default 60).
  --master-port PORT         Store port when not under torchrun (default 29500).

Environment (set by torchrun): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_USE_AGENT_STORE.
)";

int usage_error(const std::string& message) {
  std::cerr << "ftcomm: " << message << "\nRun 'ftcomm --help' for usage.\n";
  return 2;
}

int doctor(const std::vector<std::string>& args) {
  ftcomm::ProcessGroupOptions options;
  for (size_t i = 0; i < args.size(); ++i) {
    auto value = [&]() -> std::string {
      if (i + 1 >= args.size()) throw std::invalid_argument(args[i] + " needs a value");
      return args[++i];
    };
    if (args[i] == "--backend") {
      options.backend = ftcomm::parse_backend(value());
    } else if (args[i] == "--timeout") {
      options.timeout = std::chrono::milliseconds(static_cast<int64_t>(std::stod(value()) * 1000));
    } else if (args[i] == "--master-port") {
      options.master_port = std::stoi(value());
    } else {
      throw std::invalid_argument("unknown option '" + args[i] + "' for doctor");
    }
  }
  options = ftcomm::process_group_options_from_env(options);
  ftcomm::ProcessGroupChoice choice;
  auto pg = ftcomm::make_process_group(options, &choice);
  std::vector<at::Device> devices{at::kCPU};
  if (choice.cuda_available) {
    devices.emplace_back(at::kCUDA, options.local_rank >= 0 ? options.local_rank : 0);
  }
  for (const auto& device : devices) {
    std::vector<at::Tensor> t{at::full({1024}, float(options.rank + 1), at::TensorOptions().device(device))};
    pg->allreduce(t)->wait();
    const float want = options.world_size * (options.world_size + 1) / 2.0f;
    if (t[0].min().item<float>() != want || t[0].max().item<float>() != want) {
      std::cerr << "ftcomm doctor: rank " << options.rank << ": allreduce on " << device << " gave "
                << t[0].min().item<float>() << " instead of " << want << "\n";
      return 1;
    }
    std::vector<at::Tensor> state{at::full({1000}, float(options.rank), at::TensorOptions().device(device)),
                                  at::full({1 << 20}, float(options.rank), at::TensorOptions().device(device))};
    ftcomm::BroadcastCoalescedOptions bc;
    bc.verify = true;
    ftcomm::broadcast_coalesced(pg, state, bc);
    if (options.rank == 0) {
      std::cout << "ftcomm doctor: " << device << ": allreduce ok, broadcast_coalesced ok ("
                << (device.is_cpu() ? "gloo" : ftcomm::backend_name(choice.cuda_backend)) << ", world "
                << options.world_size << ")\n";
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    std::cout << kUsage;
    return args.empty() ? 2 : 0;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  try {
    if (command == "doctor") return doctor(args);
    return usage_error("unknown command '" + command + "'");
  } catch (const c10::Error& e) {
    std::cerr << "ftcomm " << command << ": " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::invalid_argument& e) {
    return usage_error(e.what());
  } catch (const std::exception& e) {
    std::cerr << "ftcomm " << command << ": " << e.what() << "\n";
    return 1;
  }
}
