// Test and benchmark support: ranks as threads over an in-memory store, and ranks
// as re-executed child processes over a file or TCP store that can be killed.
// Every spawn has a deadline and kills what it started.
#pragma once

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include "ftcomm/process_group.h"

namespace ftcomm::testing {

// What a spawned child knows about its place in the run.
struct RankContext {
  int rank = 0;
  int world = 1;
  int port = 0;         // free TCP port picked by the parent, for a TCPStore
  std::string dir;      // scratch directory shared by the ranks (file store, files)
};

struct RankOutcome {
  int rank = 0;
  bool timed_out = false;  // killed by the deadline
  int exit_code = -1;      // when it exited
  int signal = 0;          // when a signal ended it
  bool ok() const { return !timed_out && signal == 0 && exit_code == 0; }
};

// The context of this process when it was spawned by spawn_self, else nullopt.
std::optional<RankContext> child_context();

// Re-executes this binary `world` times with `args` (argv[1..]) and the rank
// context in the environment; waits for all of them, killing every child still
// alive at `deadline`. Children die with the parent (PR_SET_PDEATHSIG).
std::vector<RankOutcome> spawn_self(int world, std::chrono::seconds deadline,
                                    const std::vector<std::string>& args);

// Starts one copy of this binary with `args` and the rank context `ctx` in its
// environment, without waiting (for tests that kill it). Dies with the parent.
int spawn_child(const std::vector<std::string>& args, const RankContext& ctx);

// Waits for `pid` up to `deadline`, then SIGKILLs it; the outcome says which.
RankOutcome wait_child(int pid, std::chrono::milliseconds deadline);

// Re-runs the current GoogleTest test alone: the args for spawn_child.
std::vector<std::string> current_test_args();

// Options for a rank of a spawned run: TCP on loopback at the parent's port, or a
// file store in the shared scratch directory. Backend gloo (CPU tests).
ProcessGroupOptions spawned_options(const RankContext& ctx, StoreKind store,
                                    std::chrono::milliseconds timeout = std::chrono::seconds(30));

// GPUs of this host a one-process-per-GPU test can use (at most 8); 0 without CUDA.
int gpu_count();

// Options for rank ctx.rank of a one-process-per-GPU run: NCCL on cuda:<rank>
// (no fallback), a TCP store on loopback. Also turns NVLink multicast off in this
// process (NCCL_NVLS_ENABLE=0 and friends), as the GPU hosts this runs on require.
ProcessGroupOptions nccl_options(const RankContext& ctx, std::chrono::milliseconds timeout = std::chrono::seconds(120));

// GoogleTest tier 2: runs `body` in `world` child processes, each re-running only
// the current test. Inside a child, runs body for that rank and exits (status 1 on
// an exception or a failed expectation). In the parent, returns the outcomes.
std::vector<RankOutcome> run_ranks(int world, std::chrono::seconds deadline,
                                   const std::function<void(const RankContext&)>& body);

// Expects `world` outcomes, each a clean exit (names the rank, exit code and signal).
void expect_ranks_ok(const std::vector<RankOutcome>& outcomes, int world);

// GoogleTest tier 1: runs body(rank, store) on `world` threads that share one
// in-memory store; rethrows the first exception after joining.
void run_threads(int world, const std::function<void(int rank, const c10::intrusive_ptr<c10d::Store>&)>& body);

// Options for a thread rank over `store` (backend gloo, on loopback, quiet).
ProcessGroupOptions thread_options(int rank, int world, const c10::intrusive_ptr<c10d::Store>& store,
                                   std::chrono::milliseconds timeout = std::chrono::seconds(30));

// "tcp" or "file", for test names.
std::string store_name(StoreKind kind);

// The largest `value` over the ranks of `pg` (for benchmarks: slowest rank, any failure).
double max_over_ranks(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, double value);

// A TCP port nothing listens on right now.
int free_port();

}  // namespace ftcomm::testing
