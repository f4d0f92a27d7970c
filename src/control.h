// Internal: the small control collectives by which ranks decide things together
// (a step to resume from, a verdict, a layout, a digest, a manifest). A few
// integers or bytes each; one home for them, each call with an explicit device
// and deadline.
//
// Which backend carries a control value is decided by the device it is placed on:
// ftcomm's groups serve CPU tensors with Gloo and CUDA tensors with NCCL (or Gloo).
// Control values ride on the CPU, that is on Gloo, by default: they are tiny, the
// host needs their result at once, and a Gloo wait honours its deadline, while the
// host's wait on an NCCL collective whose peer died can block past it. Put one on a
// CUDA device only where it must stay in stream order with NCCL work on that device
// (broadcast_coalesced's verdicts between its CUDA buckets); every rank must pass
// the same device type.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <c10/core/Device.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace ftcomm::control {

struct Options {
  c10::Device device = c10::kCPU;
  // Deadline of each wait; zero: the group's own timeout.
  std::chrono::milliseconds timeout{0};
};

using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

// The largest value over all ranks.
int64_t max(const Group& pg, int64_t value, const Options& o = {});
double max(const Group& pg, double value, const Options& o = {});
// Every rank's `values` (the same count on every rank), rank by rank.
std::vector<std::vector<int64_t>> allgather(const Group& pg, const std::vector<int64_t>& values, const Options& o = {});
// One value per rank.
std::vector<int64_t> allgather(const Group& pg, int64_t value, const Options& o = {});
// Root's `values` replace everyone's; every rank passes the same count.
std::vector<int64_t> broadcast_fixed(const Group& pg, const std::vector<int64_t>& values, int root, const Options& o = {});
// Root's `values` (any count) to every rank.
std::vector<int64_t> broadcast(const Group& pg, const std::vector<int64_t>& values, int root, const Options& o = {});
// Root's bytes (any length) to every rank.
std::string broadcast_bytes(const Group& pg, const std::string& bytes, int root, const Options& o = {});
// Every rank's bytes (any length each), rank by rank.
std::vector<std::string> allgather_bytes(const Group& pg, const std::string& bytes, const Options& o = {});
// A refusal decided together: every rank passes its own error (empty: none);
// when any rank has one, every rank gets it (the lowest such rank's text, with
// "(decided on rank R)"; a rank that has its own gets its own), so none goes on
// into a collective the others have left. One 8-byte allgather when no rank fails.
std::optional<std::string> first_error(const Group& pg, const std::string& error, const Options& o = {});
// first_error(), thrown as a c10::Error.
void throw_if_any(const Group& pg, const std::string& error, const Options& o = {});

}  // namespace ftcomm::control
