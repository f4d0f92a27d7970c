// Commits and recovery for one rank of a data-parallel job: a trainer's
// TrainingState and the c10d::Reducer that reduces its gradients, against the
// rank's CheckpointStore. Job (job.h) runs it for both front-ends.
//
//   Checkpointer ckpt(pg, options);
//   ckpt.prepare_recovery(state);                       // collective
//   auto report = ckpt.finish_recovery(state, fresh, &buckets);  // collective
//   ... build the Reducer on `buckets`, or re-bucket an existing one; restore
//       what only the front-end knows (a Python optimizer's state) ...
//   ckpt.accept_recovery();                             // this rank: drops what the resume left behind
//   for each step: train; ckpt.commit(step, state, reducer, position);  // collective when due
//   ckpt.commit_last(step, state, reducer, position);   // collective: the job's last step, when not yet committed
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "ftcomm/bucket_layout.h"
#include "ftcomm/checkpoint_store.h"
#include "ftcomm/recovery.h"

namespace c10d {
class Reducer;
}

namespace ftcomm {

struct CheckpointerOptions {
  std::string ckpt_dir;  // this rank's store; empty: none (recovery still agrees, commits do nothing)
  // ckpt_dir came from rank_store_dir (as Job does it): a store there written by
  // another rank of this job was given to this rank (the ranks were numbered
  // anew), and its commits keep naming their writer. Otherwise such a store is
  // refused.
  bool adopt_other_rank = false;
  std::string job_id;    // a store of another job is refused
  int commit_every = 10;  // a snapshot every K steps; 0: none
  int keep_snapshots = 2;
  // Host staging (CheckpointStoreOptions): slots of one snapshot's copy each,
  // and what a commit does when all of them are still being written. A skipped
  // commit is this rank's alone: a resume then resyncs this rank from a peer
  // that took it.
  int staging_slots = 2;
  SnapshotWhenBehind when_behind = SnapshotWhenBehind::kWait;
  int64_t write_bytes_per_sec = 0;  // the store's cap on blob writes; 0: none
  // CPU state's blobs bypass the page cache (CheckpointStoreOptions::direct_writes):
  // less CPU a commit, a cold read at a restart on the same host.
  bool direct_writes = true;
  // The trainer's settings that change the result (learning rate, batch, model,
  // ...), recorded with every commit together with the hook's parameters
  // ("hook.<name>"). A resume refuses a change, naming the setting and both
  // values, unless its name (or "all") is in allow_changed_settings.
  std::map<std::string, std::string> settings;
  std::set<std::string> allow_changed_settings;
  // Which step a resume picks when a rank's own state is missing at the newest
  // one (see LocalStatePolicy).
  LocalStatePolicy local_state_policy = LocalStatePolicy::kExact;
  // Ranks on this node; 0: torchrun's LOCAL_WORLD_SIZE (1 without it). Buddy
  // copies go that many ranks on (TrainingState::buddy_stride).
  int local_world_size = 0;
  // How refusals name the fix (the CLI's flags by default).
  ResumeFixes fixes;
};

struct RecoveryReport {
  int64_t resumed_from_step = -1;  // -1: fresh start
  // The newest snapshot any rank's store named; above resumed_from_step when
  // newer snapshots were damaged and recovery fell back to an older one.
  int64_t newest_snapshot_step = -1;
  int64_t data_position = 0;  // what the resumed commit recorded
  // The newest step any rank held intact; newest_step - resumed_from_step steps
  // were given up (to the policy, or to damage). -1: none.
  int64_t newest_step = -1;
  int64_t steps_lost = 0;  // RecoveryPlan::steps_lost()
  bool resumed_just_in_time = false;  // the resumed step is a just-in-time commit
  std::string policy;                 // "exact" or "reset"
  std::vector<int> local_state_reset;  // ranks whose rank-local state started afresh
  // The world size that wrote the resumed step (0: fresh start); another than
  // this job's means the job was resized: replicated state carried over, every
  // rank's rank-local state started afresh.
  int resumed_world_size = 0;
  // This rank's commits that the resume leaves behind (damaged, or newer than the
  // resumed step); accept_recovery() drops them.
  std::vector<int64_t> discarded_steps;
  std::vector<std::string> changed_settings;  // allowed changes: "name: old -> new"

  double agreement_ms = 0, load_ms = 0, resync_ms = 0;
  int64_t resync_bytes = 0;
  std::vector<int> resynced_ranks;  // ranks that lacked the step
  // What happened to rank-local state, for every rank (the same text on every
  // rank).
  std::string local_state;
};

class Checkpointer {
 public:
  // Opens this rank's store when options.ckpt_dir is set.
  Checkpointer(c10::intrusive_ptr<c10d::ProcessGroup> pg, CheckpointerOptions options);
  ~Checkpointer();

  // Collective: agrees on the newest step some rank holds intact, checks the
  // settings and loads the step into `state` on the ranks that hold it. A refusal
  // (changed settings, another hook, a snapshot that does not fit) throws on
  // every rank, and nothing in any store has changed.
  const RecoveryPlan& prepare_recovery(TrainingState& state);
  // Collective: resyncs the ranks that lack the step, restores rank-local state
  // and agrees on the buckets: on a resume the source's stored layout, else
  // `fresh_buckets` (which must then be the same on every rank).
  RecoveryReport finish_recovery(TrainingState& state, std::vector<std::vector<size_t>> fresh_buckets,
                                 std::vector<std::vector<size_t>>* buckets);

  // Not collective, once the front-end has restored everything (every rank has
  // passed the collective checks by then): drops this rank's commits that the
  // resume left behind (RecoveryReport::discarded_steps), so the next commit
  // follows the resumed step. The commit calls below do it first if it was not
  // called; a resume refused before it leaves the store as it was.
  void accept_recovery();

  bool due(int64_t step) const;
  // After the optimizer step `step`: when due, persists the Reducer's bucket
  // layout and hands a copy of `state` to the store's writer (a staging slot; when
  // every slot is still being written, options.when_behind waits or skips, and
  // says so in the log). Throws the error of an earlier snapshot that failed.
  // Collective when due. Returns whether it committed (false when skipped).
  bool commit(int64_t step, const TrainingState& state, const c10d::Reducer& reducer, int64_t data_position);
  // Collective, at the end of training, after the last step `step`: with
  // commit_every = 0 (no periodic snapshots), commits it as commit() would, so a
  // finished job can be continued with more steps; nothing when no step ran since
  // the resume. With commit_every = K the last periodic commit serves, as it
  // always has (a continued job redoes at most K - 1 steps). Returns whether it
  // committed.
  bool commit_last(int64_t step, const TrainingState& state, const c10d::Reducer& reducer, int64_t data_position);
  // Waits for the snapshots in flight; throws the first error among them.
  void flush();
  // What the snapshots cost so far (zeros without a store), and one line of it.
  SnapshotStats snapshot_stats() const;
  std::string snapshot_summary() const;

  // Not collective: commits `tensors` (own_state_tensors of the state after step
  // `step`, with the buddy copies `buddy_parts` says) as a just-in-time snapshot,
  // synchronously, after the snapshot in flight. Returns false, writing nothing,
  // when there is no store or the store already holds `step` or a later one.
  bool commit_just_in_time(int64_t step, int64_t data_position, const BucketLayout& layout, const TrainingState& state,
                           const std::vector<NamedTensor>& tensors, uint64_t buddy_parts, const std::string& reason);

  CheckpointStore* store() { return store_.get(); }
  const CheckpointerOptions& options() const { return options_; }
  // options.settings plus the hook's parameters as "hook.<name>".
  std::map<std::string, std::string> effective_settings(const TrainingState& state) const;

 private:
  struct Pending;
  // Stores `layout` under its signature and returns the commit record naming it.
  CommitRecord record_of(int64_t step, int64_t data_position, const BucketLayout& layout, const TrainingState& state);
  bool commit_now(int64_t step, const TrainingState& state, const c10d::Reducer& reducer, int64_t data_position);
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  CheckpointerOptions options_;
  std::unique_ptr<CheckpointStore> store_;
  std::unique_ptr<Pending> pending_;  // between prepare_recovery and finish_recovery
  std::vector<int64_t> to_discard_;   // from finish_recovery to accept_recovery
  int64_t resumed_step_ = -1;         // the step recovery resumed (-1: fresh)
  int64_t last_committed_ = -1;       // the newest step commit() or commit_last() wrote
  int64_t waits_logged_ = 0;
  uint64_t stored_layout_ = 0;        // the signature record_of() last stored          // SnapshotStats::waited when the log last said it
};

}  // namespace ftcomm
