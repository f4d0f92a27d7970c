// One rank's part of a fault-tolerant data-parallel job: the core object under
// both front-ends (the C++ trainer's DistributedDataParallel and the Python
// package's FaultTolerant). Besides the model and its Reducer, which the
// front-end keeps, a rank needs: its store directory (found, or taken over from a
// rank the node no longer runs, under the job's root), the Checkpointer,
// just-in-time saving after the resume, the buddy stride the resume agreed on,
// and the deadlines derived from the group's timeout. The Job owns all of them.
//
//   Job job(pg, options);                              // collective when options.ckpt_root is set
//   job.prepare_recovery(state);                       // collective
//   auto report = job.finish_recovery(state, fresh, &buckets);  // collective; starts just in time
//   ... build or re-bucket the Reducer; restore what only the front-end knows ...
//   job.accept_recovery();
//   for each step: ...; job.begin_update(rank_local); optimizer step;
//                  job.step_done(step, state, reducer, position);   // collective when a commit is due
//   job.commit_last(step, state, reducer, position);  // collective
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "ftcomm/checkpointer.h"
#include "ftcomm/deadlines.h"
#include "ftcomm/just_in_time.h"
#include "ftcomm/recovery.h"

namespace c10d {
class Reducer;
}

namespace ftcomm {

struct JobOptions {
  // The stores' root (each node its own disk). This rank's store is found, or a
  // leftover store taken over, under it by rank_store_dir (collective). Empty: no
  // store; recovery still agrees (a fresh start), commits do nothing.
  std::string ckpt_root;
  // Commits and resume checks. Its ckpt_dir and adopt_other_rank are the Job's to
  // set (from ckpt_root).
  CheckpointerOptions checkpoint;
  // Just-in-time commits at a failure, from finish_recovery() on; needs a store.
  bool just_in_time = true;
  JustInTimeOptions jit;
  // A step running longer counts as stalled (jit.stall_timeout is set from it).
  // Unset: the group's deadline (JobDeadlines::stall, 0.9 x its timeout); zero: never.
  std::optional<std::chrono::milliseconds> stall_timeout;
};

class Job {
 public:
  Job(c10::intrusive_ptr<c10d::ProcessGroup> pg, JobOptions options);
  ~Job();
  Job(const Job&) = delete;
  Job& operator=(const Job&) = delete;

  // Collective: agrees on the step to resume, checks it and loads it where it is
  // held (Checkpointer::prepare_recovery). Sets state.buddy_stride, which the Job
  // keeps for every later call.
  const RecoveryPlan& prepare_recovery(TrainingState& state);
  // Collective: resyncs, restores rank-local state, agrees on the buckets
  // (Checkpointer::finish_recovery), then starts just-in-time saving.
  RecoveryReport finish_recovery(TrainingState& state, std::vector<std::vector<size_t>> fresh_buckets,
                                 std::vector<std::vector<size_t>>* buckets);
  // Once the front-end restored everything: drops what the resume left behind.
  void accept_recovery();

  // Before the optimizer step (backward is done): from here until step_done a
  // failure saves nothing. Collective when `rank_local` is not empty and just in
  // time is on (its buddy copy is exchanged).
  void begin_update(const std::vector<at::Tensor>& rank_local);
  // After the optimizer step of `step`: marks it finished (what a just-in-time
  // commit saves) and commits it when due (collective then). Returns whether it
  // committed.
  bool step_done(int64_t step, TrainingState state, const c10d::Reducer& reducer, int64_t data_position);
  // Collective, after the last step (Checkpointer::commit_last).
  bool commit_last(int64_t step, TrainingState state, const c10d::Reducer& reducer, int64_t data_position);
  // After an error on the trainer's thread: saves the last finished step just in
  // time (no collective). Returns whether a commit was written.
  bool save_just_in_time(const std::string& reason);
  // While paused (nestable), no step counts as stalled.
  void pause_stall_watch(bool pause);
  // Ends just-in-time saving (a SIGTERM handler of the program's comes back).
  void stop_just_in_time();
  // Waits for the snapshots in flight; throws the first error among them.
  void flush();
  // What periodic snapshots cost so far (Checkpointer::snapshot_stats), and one line of it.
  SnapshotStats snapshot_stats() const { return checkpointer_->snapshot_stats(); }
  std::string snapshot_summary() const { return checkpointer_->snapshot_summary(); }

  bool due(int64_t step) const { return checkpointer_->due(step); }
  bool just_in_time_active() const { return jit_ != nullptr; }
  // This rank's store directory ("" without a store).
  const std::string& store_dir() const { return store_dir_; }
  CheckpointStore* store() { return checkpointer_->store(); }
  int buddy_stride() const { return buddy_stride_; }
  const JobDeadlines& deadlines() const { return deadlines_; }
  // Seconds spent keeping the just-in-time replica (begin_update and step_done's
  // part; periodic commits not included).
  double jit_seconds() const { return jit_seconds_; }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  JobOptions options_;
  JobDeadlines deadlines_;
  std::string store_dir_;
  std::unique_ptr<Checkpointer> checkpointer_;
  std::unique_ptr<JustInTime> jit_;  // from finish_recovery() on, when enabled and there is a store
  int buddy_stride_ = 1;
  double jit_seconds_ = 0;
};

}  // namespace ftcomm
