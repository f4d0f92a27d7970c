// The ftcomm command-line tool.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "ftcomm/records_json.h"
#include "ftcomm/broadcast.h"
#include "ftcomm/checkpoint_store.h"
#include "ftcomm/hook_check.h"
#include "ftcomm/script_hook.h"
#include "ftcomm/process_group.h"
#include "cli.h"
#include "train.h"
#include "log.h"

namespace {

constexpr const char* kUsage = R"(Usage: ftcomm <command> [options]

Fault-tolerant gradient communication for PyTorch data-parallel training (C++).

Commands:
  train       Run one rank of fault-tolerant data-parallel training (see ftcomm train --help):
                torchrun --no-python --nproc-per-node=4 --max-restarts=3 ftcomm train --ckpt DIR
  doctor      Form a process group and check it: backend choice, an allreduce and
              a verified broadcast_coalesced on CPU (and CUDA when a GPU is present).
              Runs as one rank, or as every rank under torchrun:
                torchrun --no-python --nproc-per-node=2 ftcomm doctor
  inspect DIR [--json]
              Show a rank's checkpoint store: committed steps and their sizes, bucket
              layouts and signatures, hooks and digests, world size, retention. Opens
              read-only, so it works while a job runs. --json prints a stable form.
  hook check FILE_OR_NAME [--world-size N] [--numel N] [--steps N] [--hook-arg k=v ...]
              Compile or load a comm hook (a .py TorchScript file, a .pt archive, or a
              name from hooks_ts/), check its signature and state declaration, run it
              on synthetic buckets over a real Gloo group of N ranks (default 2), check
              every output's shape, dtype, device and finiteness, and print its digest
              and state spec. Exits 1 with the problem on a bad hook.
  hook list   List the hooks in hooks_ts/.
  help        Show this text.

Options of doctor:
  --backend auto|nccl|gloo   What serves CUDA tensors (default auto: NCCL, else Gloo).
  --timeout SECONDS          Deadline of every wait (default 60).
  --master-port PORT         Store port when not under torchrun (default 29500).

Environment (set by torchrun): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT,
TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_USE_AGENT_STORE.
)";

int usage_error(const std::string& message) {
  ftcomm::detail::log_line("ftcomm: " + message + "\nRun 'ftcomm --help' for usage.");
  return 2;
}

int doctor(const std::vector<std::string>& args) {
  ftcomm::ProcessGroupOptions options;
  CLI::App app("ftcomm doctor: form a process group and check it (backend choice, an allreduce, a verified "
               "broadcast_coalesced). As one rank, or under torchrun --no-python.",
               "ftcomm doctor");
  std::string backend = "auto";
  double timeout_s = 60;
  app.add_option("--backend", backend, "what serves CUDA tensors")->check(CLI::IsMember({"auto", "nccl", "gloo"}))->capture_default_str();
  app.add_option("--timeout", timeout_s, "seconds: the deadline of every wait")->check(ftcomm::cli::number_in(1, 86400))->capture_default_str();
  app.add_option("--master-port", options.master_port, "store port when not under torchrun")->check(ftcomm::cli::integer_in(1, 65535))->capture_default_str();
  if (int rc = ftcomm::cli::parse(app, args, "ftcomm doctor"); rc >= 0) return rc;
  options.backend = ftcomm::parse_backend(backend);
  options.timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
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
      std::ostringstream line;
      line << "ftcomm doctor: rank " << options.rank << ": allreduce on " << device << " gave "
           << t[0].min().item<float>() << " instead of " << want;
      ftcomm::detail::log_line(line.str());
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

int inspect(const std::vector<std::string>& args) {
  std::string dir;
  bool json = false;
  CLI::App app("ftcomm inspect: show a rank's checkpoint store (opens read-only, so it works while a job runs)",
               "ftcomm inspect");
  app.add_option("DIR", dir, "a rank's store, e.g. CKPT/rank0")->required();
  app.add_flag("--json", json, "print a stable JSON form");
  if (int rc = ftcomm::cli::parse(app, args, "ftcomm inspect"); rc >= 0) return rc;
  ftcomm::CheckpointStoreOptions options;
  options.dir = dir;
  options.read_only = true;
  std::unique_ptr<ftcomm::CheckpointStore> store;
  ftcomm::check(ftcomm::CheckpointStore::Open(options, &store));
  std::vector<ftcomm::CommitRecord> commits;
  ftcomm::check(store->ListCommits(&commits));
  std::vector<uint64_t> layouts;
  ftcomm::check(store->ListLayouts(&layouts));
  int snapshots = 0;
  for (const auto& c : commits) snapshots += c.has_snapshot;
  if (json) {
    nlohmann::json out = {{"dir", dir}, {"commits", nlohmann::json::array()}, {"layouts", nlohmann::json::array()}};
    for (const auto& c : commits) out["commits"].push_back(nlohmann::json::parse(ftcomm::to_json(c)));
    for (uint64_t sig : layouts) {
      ftcomm::BucketLayout layout;
      ftcomm::check(store->GetLayout(sig, &layout));
      out["layouts"].push_back({{"signature", ftcomm::signature_hex(sig)}, {"buckets", layout.buckets.size()}});
    }
    out["retention"] = {{"snapshots_kept", snapshots}, {"commits_kept", commits.size()}};
    std::cout << out.dump(2) << "\n";
    return 0;
  }
  std::cout << "checkpoint store " << dir << "\n";
  if (commits.empty()) {
    std::cout << "  no commits\n";
  } else {
    const auto& last = commits.back();
    std::cout << "  latest step " << last.step << ", world size " << last.world_size << ", epoch " << last.epoch
              << ", hook " << (last.hook_digest.empty() ? "(none)" : last.hook_digest) << "\n";
    if (!last.settings.empty()) {
      std::cout << "  settings:";
      for (const auto& [k, v] : last.settings) std::cout << " " << k << "=" << v;
      std::cout << "\n";
    }
    std::cout << "  retention: " << commits.size() << " commits, " << snapshots << " snapshots kept\n\n";
    std::printf("  %10s %6s %6s %5s %9s %13s %16s %14s  %s\n", "step", "epoch", "world", "rank", "snapshot", "kind",
                "layout", "bytes", "hook");
    for (const auto& c : commits) {
      std::printf("  %10lld %6lld %6d %5d %9s %13s %16s %14llu  %s\n", static_cast<long long>(c.step),
                  static_cast<long long>(c.epoch), c.world_size, c.rank, c.has_snapshot ? "yes" : "-",
                  c.just_in_time ? "just-in-time" : "periodic", ftcomm::signature_hex(c.layout_signature).c_str(),
                  static_cast<unsigned long long>(c.blob_bytes), c.hook_digest.substr(0, 16).c_str());
    }
    for (const auto& c : commits) {
      if (!c.just_in_time) continue;
      std::printf("  step %lld was saved just in time (%s); buddy copy of the previous rank's trainer state: %s, "
                  "of its hook state: no (periodic commits carry it)\n",
                  static_cast<long long>(c.step), c.jit_reason.c_str(),
                  (c.buddy_parts & ftcomm::CommitRecord::kBuddyTrainer) ? "yes" : "no");
    }
  }
  std::cout << "\n  bucket layouts:\n";
  for (uint64_t sig : layouts) {
    ftcomm::BucketLayout layout;
    ftcomm::check(store->GetLayout(sig, &layout));
    size_t params = 0;
    for (const auto& b : layout.buckets) params += b.parameter_indices.size();
    std::cout << "    " << ftcomm::signature_hex(sig) << ": " << layout.buckets.size() << " buckets, " << params
              << " parameters\n";
  }
  if (layouts.empty()) std::cout << "    (none)\n";
  return 0;
}

int hook_command(const std::vector<std::string>& args) {
  if (args.empty()) throw std::invalid_argument("hook needs a subcommand: check or list");
  if (args[0] == "list") {
    std::cout << "hooks in " << ftcomm::hooks_dir() << ":\n";
    for (const auto& name : ftcomm::list_hooks()) std::cout << "  " << name << "\n";
    return 0;
  }
  if (args[0] != "check") throw std::invalid_argument("unknown hook subcommand '" + args[0] + "'; use check or list");
  ftcomm::HookCheckOptions options;
  std::string target;
  std::vector<std::string> hook_args;
  double timeout_s = 30;
  CLI::App app("ftcomm hook check: compile or load a comm hook, check its signature and state declaration, run it "
               "on synthetic buckets over a real Gloo group, check every output. A hook is code, as trusted as a "
               "training script: this runs it (its declarations, then its hook function on every synthetic bucket), "
               "and TorchScript can read and write files (torch.from_file). Check only hooks you would train with",
               "ftcomm hook check");
  app.add_option("HOOK", target, "a .py TorchScript file, a .pt archive, or a name from hooks_ts/")->required();
  app.add_option("--world-size", options.world_size, "ranks (threads of this process)")->check(ftcomm::cli::integer_in(1, 16))->capture_default_str();
  app.add_option("--numel", options.numel, "elements per synthetic bucket")
      ->check(ftcomm::cli::integer_in(64, ftcomm::kMaxHookCheckNumel))->capture_default_str();
  app.add_option("--steps", options.steps, "steps of 3 buckets each")->check(ftcomm::cli::integer_in(1, 100000))->capture_default_str();
  app.add_option("--hook-arg", hook_args, "hook parameter k=v (repeatable)")->type_name("K=V");
  app.add_option("--timeout", timeout_s, "seconds a hook call may take before the check fails, naming the stuck rank")
      ->check(ftcomm::cli::number_in(0.1, 86400))->capture_default_str();
  std::vector<std::string> rest(args.begin() + 1, args.end());
  if (int rc = ftcomm::cli::parse(app, rest, "ftcomm hook check"); rc >= 0) return rc;
  for (const auto& kv : hook_args) options.params.push_back(ftcomm::cli::split_kv("--hook-arg", kv));
  options.hook_timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  const auto report = ftcomm::check_hook(target, options);
  auto join = [](const std::vector<std::string>& v) {
    std::string out;
    for (const auto& s : v) out += (out.empty() ? "" : ", ") + s;
    return out.empty() ? std::string("(none)") : out;
  };
  std::cout << "hook " << report.name << " (" << report.path << ")\n"
            << "  digest     sha256:" << report.digest << "\n"
            << "  replicated " << join(report.replicated) << "\n"
            << "  rank-local " << join(report.local) << "\n"
            << "  params    ";
  if (report.params.empty()) std::cout << " (none)";
  for (const auto& [k, v] : report.params) std::cout << " " << k << "=" << v;
  std::cout << "\n  ok: " << report.buckets_checked << " buckets over " << options.world_size
            << " Gloo ranks, outputs of the right shape, dtype and device, all finite\n";
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
    if (command == "train") return ftcomm::tools::train_main(args);
    if (command == "inspect") return inspect(args);
    if (command == "hook") return hook_command(args);
    return usage_error("unknown command '" + command + "'");
  } catch (const CLI::ParseError& e) {
    return usage_error(command + ": " + e.what());
  } catch (const std::invalid_argument& e) {
    return usage_error(e.what());
  } catch (const std::exception& e) {
    ftcomm::cli::exit_with_error(command, e);
  }
}
