// Fault-tolerant data parallelism driven from C++ (the front-end `ftcomm train`
// uses): c10d::Reducer with a scripted comm hook, over a Job (job.h), which keeps
// the rank's store, its commits, recovery at start-up and just in time.
#pragma once

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "ftcomm/checkpoint_store.h"
#include "ftcomm/job.h"
#include "ftcomm/recovery.h"
#include "ftcomm/script_comm_hook.h"

namespace c10d {
class Reducer;
}

namespace ftcomm {

struct DdpOptions {
  int64_t bucket_bytes = int64_t(25) << 20;
  std::string hook = "allreduce";                               // name or file
  std::vector<std::pair<std::string, std::string>> hook_args;  // k=v
  std::vector<std::string> pinned_digests;                      // when set, the hook's must be one
  ScriptCommHookOptions hook_options;
  // A hook call's deadline; unset: the job's (JobDeadlines::hook, half the
  // group's timeout), which hook_options.hook_timeout is then set to.
  std::optional<std::chrono::milliseconds> hook_timeout;
  // The store, commits, resume checks and just in time (job.h). The hook's
  // parameters are recorded with the settings as "hook.<name>".
  JobOptions job;
};

class DistributedDataParallel {
 public:
  // `params` require grad; `extra_state` (e.g. optimizer momentum) is snapshotted
  // and resynced with them. Same shapes and order on every rank.
  DistributedDataParallel(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::vector<at::Tensor> params,
                          std::vector<at::Tensor> extra_state, DdpOptions options);
  ~DistributedDataParallel();

  // Collective. Restores the newest step every rank can resume from (own store,
  // else a peer's copy through broadcast_coalesced); returns what it did. The
  // same as prepare_recovery() then finish_recovery().
  RecoveryReport recover();
  // The two halves of recover(), for callers that act between them: prepare
  // agrees on the step (checking the settings and the hook) and loads it on the
  // ranks that hold it; finish resyncs the others, restores rank-local hook
  // state, builds the Reducer on the agreed buckets and then discards what the
  // resume left behind.
  const RecoveryPlan& prepare_recovery();
  RecoveryReport finish_recovery();

  // Around each step, as DDP does.
  void before_forward();
  void before_backward(const at::Tensor& loss);
  // Before the optimizer step (or any other change of the trainer's state): from
  // here until after_step, a failure saves nothing just in time.
  void before_update();
  // After the optimizer step `step`: marks the step finished (the state a
  // just-in-time commit saves), then snapshots every commit_every steps (in the
  // background; the previous snapshot is waited for first).
  void after_step(int64_t step, int64_t data_position);
  // After an error on the trainer's thread: saves the last finished step just in
  // time (no collective). Returns whether a commit was written.
  bool save_just_in_time(const std::string& reason);
  // Collective, after the last step: with commit_every = 0, commits step `step`
  // so the job can be continued (Checkpointer::commit_last). Returns whether it
  // committed.
  bool commit_last(int64_t step, int64_t data_position);
  // Waits for a snapshot in flight.
  void flush();

  const std::shared_ptr<ScriptHook>& hook() const { return state_.hook; }
  // Seconds spent in the comm hook so far (its compute and collectives).
  double comm_seconds() const;
  // Seconds spent keeping the just-in-time replica so far (before_update and
  // after_step's part; periodic commits not included).
  double jit_seconds() const { return job_.jit_seconds(); }
  CheckpointStore* store() { return job_.store(); }
  const Job& job() const { return job_; }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  TrainingState state_;  // parameters, optimizer state (the trainer's extra_state), hook
  DdpOptions options_;
  Job job_;
  std::unique_ptr<c10d::Reducer> reducer_;
  const ScriptCommHook* comm_ = nullptr;  // owned by reducer_
};

}  // namespace ftcomm
