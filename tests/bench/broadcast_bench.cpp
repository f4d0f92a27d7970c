// Benchmark of ftcomm::broadcast_coalesced against c10d::broadcast_coalesced, one
// broadcast per tensor, and one broadcast of a pre-allocated flat buffer of the same
// bytes (the limit), all on one process group in one run. Like nccl-tests: every
// timed iteration is checked for correctness, and the baseline prints beside ours.
//
//   ftcomm_bench_broadcast [--world N] [--workloads a,b,c] [--iters N] [--buffer-mb M]
//                          [--scale F] [--device cpu|cuda] [--backend auto|gloo|nccl]
//                          [--json FILE]
// Spawns N local ranks over a loopback TCP store, or runs as one rank under torchrun.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "ftcomm/broadcast.h"
#include "ftcomm/process_group.h"
#include "support/multiprocess.h"

namespace {

struct Args {
  int world = 2;
  std::string workloads = "a,b,c";
  int iters = 5;
  double buffer_mb = 32;
  double scale = 1.0;
  std::string device = "cpu";
  std::string backend = "auto";
  std::string json;
  std::string methods = "ours,c10d,per_tensor,flat_limit";
  int threads = 0;  // intra-op threads per rank; 0: 1 when several ranks share the host, as torchrun sets
  // ftcomm's tuning knobs for "ours"; negative: the library's defaults.
  double direct_min_mb = -1, pipeline_mb = -1;
};

// Exits with CLI11's code on --help or a bad command line.
Args parse(int argc, char** argv) {
  Args a;
  CLI::App app("broadcast_coalesced against c10d's, per-tensor broadcasts and one flat buffer. Workloads: a = "
               "~100M-parameter transformer state (~390 fp32 tensors), b = 10,000 x 1 KiB, c = 8 x 64 MiB; --scale "
               "shrinks every workload (for smoke runs)",
               "ftcomm_bench_broadcast");
  app.add_option("--world", a.world, "CPU ranks to spawn")->check(CLI::Range(1, 64))->capture_default_str();
  app.add_option("--workloads", a.workloads)->capture_default_str();
  app.add_option("--iters", a.iters, "timed iterations")->check(CLI::Range(1, 100000))->capture_default_str();
  app.add_option("--buffer-mb", a.buffer_mb)->check(CLI::Range(0.001, 1e5))->capture_default_str();
  app.add_option("--direct-min-mb", a.direct_min_mb, "ours: BroadcastCoalescedOptions (negative: defaults)");
  app.add_option("--pipeline-mb", a.pipeline_mb, "ours: BroadcastCoalescedOptions (negative: defaults)");
  app.add_option("--scale", a.scale)->check(CLI::Range(1e-9, 1e6))->capture_default_str();
  app.add_option("--device", a.device)->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  app.add_option("--backend", a.backend)->check(CLI::IsMember({"auto", "gloo", "nccl"}))->capture_default_str();
  app.add_option("--json", a.json, "write the results here");
  app.add_option("--threads", a.threads, "intra-op threads per rank (0: 1 when ranks share the host)")
      ->check(CLI::Range(0, 1024));
  app.add_option("--methods", a.methods)->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    std::exit(app.exit(e));
  }
  return a;
}

std::vector<int64_t> workload_numels(char w, double scale) {
  auto s = [&](int64_t n) { return std::max<int64_t>(1, static_cast<int64_t>(n * scale)); };
  std::vector<int64_t> n;
  if (w == 'a') {
    // 24 pre-LN blocks, d=576, ff=2304, q/k/v/o/fc1/fc2 with biases, 2 LayerNorms:
    // 16 tensors a block; token and position embeddings and the final LayerNorm.
    const int64_t d = 576, ff = 2304;
    n = {s(8192 * d), s(1024 * d)};
    for (int layer = 0; layer < 24; ++layer) {
      for (int64_t x : {d, d, d * d, d, d * d, d, d * d, d, d * d, d, d, d, d * ff, ff, ff * d, d}) n.push_back(s(x));
    }
    n.push_back(s(d));
    n.push_back(s(d));
  } else if (w == 'b') {
    n.assign(static_cast<size_t>(std::max<int64_t>(10, static_cast<int64_t>(10000 * scale))), 256);
  } else if (w == 'c') {
    n.assign(8, s(int64_t(16) << 20));
  }
  return n;
}

struct Result {
  std::string workload, method;
  int64_t bytes = 0, tensors = 0;
  double median_ms = 0, min_ms = 0;
  bool correct = true;
};

int run_rank(const Args& args, ftcomm::ProcessGroupOptions options) {
  options.backend = ftcomm::parse_backend(args.backend);
  options.announce = true;
  options.timeout = std::chrono::seconds(300);
  // torchrun sets OMP_NUM_THREADS=1 for several ranks on a host; without it the
  // ranks' OpenMP pools oversubscribe the cores and every copy_/cat slows down.
  const int threads = args.threads > 0 ? args.threads : (options.world_size > 1 ? 1 : at::get_num_threads());
  at::set_num_threads(threads);
  auto pg = ftcomm::make_process_group(options);
  const int rank = pg->getRank(), world = pg->getSize();
  const at::Device device = args.device == "cuda" ? at::Device(at::kCUDA, std::max(0, options.local_rank)) : at::Device(at::kCPU);
  const size_t buffer = static_cast<size_t>(args.buffer_mb * (1 << 20));
  ftcomm::BroadcastCoalescedOptions ours;
  ours.buffer_bytes = buffer;
  if (args.direct_min_mb >= 0) {
    ours.direct_min_bytes = ours.nccl_direct_min_bytes = static_cast<size_t>(args.direct_min_mb * (1 << 20));
  }
  if (args.pipeline_mb >= 0) ours.pipeline_bytes = ours.nccl_pipeline_bytes = static_cast<size_t>(args.pipeline_mb * (1 << 20));
  std::vector<Result> results;

  for (char w : args.workloads) {
    if (w == ',') continue;
    const auto numels = workload_numels(w, args.scale);
    if (numels.empty()) {
      std::cerr << "unknown workload '" << w << "'\n";
      return 2;
    }
    // Every rank can regenerate the root's values, so it checks what it received.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(1234);
    std::vector<at::Tensor> expected, tensors;
    int64_t bytes = 0;
    for (int64_t n : numels) {
      expected.push_back(at::rand({n}, gen, at::kFloat).to(device));
      tensors.push_back(expected.back().clone());
      bytes += n * 4;
    }
    at::Tensor flat_expected = at::cat(expected);
    at::Tensor flat = flat_expected.clone();

    using Method = std::function<void()>;
    std::vector<std::pair<std::string, Method>> methods = {
        {"ours", [&] { ftcomm::broadcast_coalesced(pg, tensors, ours); }},
        {"c10d", [&] { c10d::broadcast_coalesced(pg, tensors, buffer, 0); }},
        {"per_tensor", [&] {
           for (auto& t : tensors) {
             std::vector<at::Tensor> one{t};
             pg->broadcast(one)->wait();
           }
         }},
        {"flat_limit", [&] {
           std::vector<at::Tensor> one{flat};
           pg->broadcast(one)->wait();
         }},
    };
    for (auto& [name, fn] : methods) {
      if (("," + args.methods + ",").find("," + name + ",") == std::string::npos) continue;
      const bool is_flat = name == "flat_limit";
      std::vector<double> times;
      bool correct = true;
      for (int it = 0; it <= args.iters; ++it) {  // iteration 0 warms up
        if (rank != 0) {
          if (is_flat) flat.zero_();
          else for (auto& t : tensors) t.zero_();
        }
        if (device.is_cuda()) {
          std::vector<at::Tensor> sync{at::zeros({1}, device)};
          pg->allreduce(sync)->wait();
          sync[0].item<float>();
        }
        pg->barrier()->wait();
        const auto start = std::chrono::steady_clock::now();
        fn();
        if (device.is_cuda()) flat.sum().item<float>();  // drains the stream
        const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        const double slowest = ftcomm::testing::max_over_ranks(pg, ms);
        bool ok = is_flat ? at::equal(flat, flat_expected) : true;
        for (size_t i = 0; !is_flat && i < tensors.size() && ok; ++i) ok = at::equal(tensors[i], expected[i]);
        correct = correct && ftcomm::testing::max_over_ranks(pg, ok ? 0.0 : 1.0) == 0.0;
        if (it > 0) times.push_back(slowest);
      }
      std::sort(times.begin(), times.end());
      Result r;
      r.workload = std::string(1, w);
      r.method = name;
      r.bytes = bytes;
      r.tensors = static_cast<int64_t>(numels.size());
      r.median_ms = times[times.size() / 2];
      r.min_ms = times.front();
      r.correct = correct;
      results.push_back(r);
      if (rank == 0) {
        std::fprintf(stderr, "  [%c] %-10s %8.2f ms median%s\n", w, name.c_str(), r.median_ms,
                     correct ? "" : "  WRONG RESULT");
      }
    }
  }

  if (rank != 0) return 0;
  bool all_correct = true;
  std::map<std::string, double> ms;
  for (auto& r : results) ms[r.workload + "/" + r.method] = r.median_ms;
  std::printf("\nbroadcast_coalesced, world %d, %s, buffer %.0f MiB, %d iterations (median), %d intra-op threads/rank\n",
              world, device.str().c_str(), args.buffer_mb, args.iters, threads);
  std::printf("%-3s %-11s %8s %9s %10s %9s %11s %7s\n", "wl", "method", "tensors", "MB", "median ms", "GB/s",
              "ours/this", "check");
  for (auto& r : results) {
    const double gbs = r.bytes / (r.median_ms * 1e6);
    const double speedup = ms[r.workload + "/" + r.method] / ms[r.workload + "/ours"];
    std::printf("%-3s %-11s %8lld %9.1f %10.2f %9.3f %10.2fx %7s\n", r.workload.c_str(), r.method.c_str(),
                static_cast<long long>(r.tensors), r.bytes / 1e6, r.median_ms, gbs, speedup,
                r.correct ? "ok" : "WRONG");
    all_correct = all_correct && r.correct;
  }
  struct Target { std::string wl, vs; double min; };
  std::printf("\ntargets (throughput ratio = their time / our time):\n");
  for (const Target& t : {Target{"a", "c10d", 1.2}, Target{"b", "c10d", 1.2}, Target{"b", "per_tensor", 20},
                          Target{"c", "flat_limit", 0.9}}) {
    if (!ms.count(t.wl + "/ours")) continue;
    const double ratio = ms[t.wl + "/" + t.vs] / ms[t.wl + "/ours"];
    std::printf("  (%s) ours / %-10s %7.2fx  target >= %.1fx  %s\n", t.wl.c_str(), t.vs.c_str(), ratio, t.min,
                ratio >= t.min ? "met" : "MISSED");
  }
  if (!args.json.empty()) {
    nlohmann::json out = {{"world", world},   {"device", device.str()}, {"buffer_mb", args.buffer_mb},
                          {"iters", args.iters}, {"threads", threads},   {"scale", args.scale},
                          {"results", nlohmann::json::array()}};
    for (const auto& r : results) {
      out["results"].push_back({{"workload", r.workload},
                                {"method", r.method},
                                {"tensors", r.tensors},
                                {"bytes", r.bytes},
                                {"median_ms", r.median_ms},
                                {"min_ms", r.min_ms},
                                {"gbps", r.bytes / (r.median_ms * 1e6)},
                                {"correct", r.correct}});
    }
    std::ofstream(args.json) << out.dump(2) << "\n";
  }
  return all_correct ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const Args args = parse(argc, argv);
  try {
    if (ftcomm::launched_by_torchrun()) {
      return run_rank(args, ftcomm::process_group_options_from_env());
    }
    if (auto ctx = ftcomm::testing::child_context()) {
      return run_rank(args, ftcomm::testing::spawned_options(*ctx, ftcomm::StoreKind::kTcp));
    }
    std::vector<std::string> child_args(argv + 1, argv + argc);
    auto outcomes = ftcomm::testing::spawn_self(args.world, std::chrono::minutes(30), child_args);
    int status = 0;
    for (const auto& o : outcomes) {
      if (!o.ok()) {
        std::cerr << "rank " << o.rank << " failed: exit " << o.exit_code << " signal " << o.signal
                  << (o.timed_out ? " (deadline)" : "") << "\n";
        status = 1;
      }
    }
    return status;
  } catch (const std::exception& e) {
    std::cerr << "ftcomm_bench_broadcast: " << e.what() << "\n";
    return 1;
  }
}
