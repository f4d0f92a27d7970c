// Fault-tolerant data parallelism driven from C++: c10d::Reducer with a scripted
// comm hook, snapshots to the rank's checkpoint store every K steps, and recovery
// at start-up (agree on the newest resumable step, resync ranks that lack it with
// broadcast_coalesced, check hook digests and bucket layouts).
#pragma once

#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "ftcomm/checkpoint_store.h"
#include "ftcomm/checkpointer.h"
#include "ftcomm/just_in_time.h"
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
  std::string ckpt_dir;                                         // this rank's store; empty: none
  std::string job_id;
  int commit_every = 10;
  int keep_snapshots = 2;
  // The trainer's settings that change the result (learning rate, batch, model,
  // ...), recorded with every commit together with the hook's parameters
  // ("hook.<name>"). A resume refuses a change, naming the setting and both
  // values, unless its name (or "all") is in allow_changed_settings.
  std::map<std::string, std::string> settings;
  std::set<std::string> allow_changed_settings;
  ScriptCommHookOptions hook_options;
  // Just-in-time commits at a failure (see just_in_time.h); needs ckpt_dir.
  bool just_in_time = true;
  JustInTimeOptions jit_options;
  // Which step a resume picks when a rank's own state is missing at the newest.
  LocalStatePolicy local_state_policy = LocalStatePolicy::kExact;
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
  double jit_seconds() const { return jit_seconds_; }
  CheckpointStore* store() { return checkpointer_->store(); }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  TrainingState state_;  // parameters, optimizer state (the trainer's extra_state), hook
  DdpOptions options_;
  std::unique_ptr<c10d::Reducer> reducer_;
  const ScriptCommHook* comm_ = nullptr;  // owned by reducer_
  std::unique_ptr<Checkpointer> checkpointer_;
  std::unique_ptr<JustInTime> jit_;  // from finish_recovery() on, when enabled and there is a store
  double jit_seconds_ = 0;
};

// The shortest text that reads back as `v` (how settings are recorded).
std::string format_setting(double v);

// SHA-256 of the tensors' bytes, in order (the run's parameter digest).
std::string tensors_digest(const std::vector<at::Tensor>& tensors);

}  // namespace ftcomm
