// Tools for hooks: synthetic gradient buckets and `ftcomm hook check`.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/comm.hpp>

namespace ftcomm {

// A c10d::GradBucket over `buffer` holding gradients of `shapes` back to back, for
// hook checks, benchmarks and tests. Owns the sizes GradBucket only refers to.
struct SyntheticBucket {
  SyntheticBucket(at::Tensor buffer, std::vector<std::vector<int64_t>> shapes, size_t index = 0, size_t count = 1);
  SyntheticBucket(const SyntheticBucket&) = delete;
  SyntheticBucket& operator=(const SyntheticBucket&) = delete;
  std::vector<std::vector<int64_t>> shapes;
  std::unique_ptr<c10d::GradBucket> bucket;
};

struct HookCheckOptions {
  int world_size = 2;
  int64_t numel = 1 << 14;  // elements per synthetic bucket
  int steps = 3;            // steps of 3 buckets each
  std::vector<std::pair<std::string, std::string>> params;  // --hook-arg k=v
  std::chrono::milliseconds hook_timeout{std::chrono::seconds(30)};  // per hook call
};

// The largest --numel hook check takes (1 GiB of float32 per synthetic bucket).
constexpr int64_t kMaxHookCheckNumel = int64_t(1) << 28;

struct HookCheckReport {
  std::string name, path, digest;
  std::vector<std::string> replicated, local;
  std::map<std::string, double> params;
  int64_t buckets_checked = 0;
};

// `ftcomm hook check`: loads the hook (signature and state declaration checked),
// then runs it on synthetic buckets over a real Gloo group of `world_size` ranks
// (threads of this process) and checks every output's shape, dtype, device and
// finiteness. Throws c10::Error naming the hook and the first problem found.
HookCheckReport check_hook(const std::string& file_or_name, const HookCheckOptions& options);

}  // namespace ftcomm
