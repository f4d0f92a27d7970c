// Recovery: the steps that bring every rank of a data-parallel job to one
// resumable step after a restart, as small collectives any trainer can call
// (DistributedDataParallel::recover is one sequence of them):
//
//   LocalCheckpoint local = load_newest_intact(store, world, rank);   // this rank
//   RecoveryPlan plan = agree_on_step(pg, local);                       // collective
//   check_settings(pg, plan, local, settings, allowed);                 // collective
//   restore_from_checkpoint(plan, local, state, where);                 // this rank
//   resync(pg, plan, state);                                            // collective
//   restore_rank_local(pg, plan, local, state);                         // collective
//   buckets = agree_on_buckets(pg, plan, candidate);                    // collective
//   discard_unusable(store, plan, local);      // this rank, once every rank accepted
//
// and at each snapshot, snapshot_tensors(pg, state) is what goes to the store,
// the buddy copy of the previous rank's rank-local hook state included.
//
// Every collective here is entered by every rank in the same order, and any
// refusal is decided together, so no rank waits on a peer that has given up.
#pragma once

#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "ftcomm/checkpoint_store.h"
#include "ftcomm/script_hook.h"

namespace ftcomm {

// What a trainer replicates and snapshots, by role. Every tensor keeps its own
// dtype and device; restored hook state goes back to the device type it came
// from (this rank's own accelerator for CUDA state).
struct TrainingState {
  std::vector<at::Tensor> parameters;
  std::vector<at::Tensor> buffers;    // replicated, not trained (e.g. running statistics)
  std::vector<at::Tensor> optimizer;  // e.g. momentum; replicated
  // Replicated state whose count and shapes only the checkpoint knows: a PyTorch
  // optimizer's state (created at its first step), the trainer's own state as
  // bytes. Restored and resynced whole: these tensors are replaced, not filled.
  std::vector<at::Tensor> objects;
  // This rank's own state (e.g. its RNG states), kept like rank-local hook state:
  // rank r + buddy_stride holds a byte-exact copy. Every rank's must have the same total
  // byte size. Replaced on restore.
  std::vector<at::Tensor> rank_local;
  std::shared_ptr<ScriptHook> hook;   // its replicated and rank-local state; may be null
  // Rank r + buddy_stride (mod world) keeps the byte-exact copy of rank r's
  // rank-local state. The Checkpointer sets it to the ranks per node, so that a
  // copy lives on another node than its owner and survives the node's loss.
  int buddy_stride = 1;
  // This rank's accelerator: the device of its first CUDA parameter, else CPU.
  at::Device accelerator() const;
};

// One snapshot a rank's store holds, as recovery weighs it.
struct SnapshotCandidate {
  int64_t step = -1;
  bool just_in_time = false;
  uint64_t buddy_parts = 0;  // CommitRecord::kBuddy* bits
  int world_size = 0;        // the job's world size when it was written; 0: this job's
  int owner = -1;            // the rank whose state it holds (CommitRecord::rank); -1: the rank holding it
  int buddy_stride = 1;      // its buddy copy is of rank owner - buddy_stride (CommitRecord::buddy_stride)
};

// This rank's newest intact snapshot, found on its own.
struct LocalCheckpoint {
  int rank = 0, world_size = 1;  // who loaded it
  int64_t step = -1;    // -1: none intact (or no store)
  int64_t newest = -1;  // the newest snapshot the store names, intact or not
  CommitRecord record;
  std::vector<NamedTensor> tensors;
  std::vector<int64_t> damaged;  // snapshots that failed to load (size, checksum, missing file)
  std::vector<int64_t> commits;  // every commit the store holds
  // Every snapshot not known to be damaged, newest first: the loaded one, then
  // older ones (checked when loaded, see load_agreed_step).
  std::vector<SnapshotCandidate> candidates;
};

// What to do when a rank's own state (the hook's error feedback, the trainer's
// RNG) exists at no newer step than an older commit: typically the rank that
// failed, whose peers saved a just-in-time commit it has no copy in.
enum class LocalStatePolicy {
  // Resume from the newest step at which every rank's rank-local state exists
  // (its own snapshot, or its buddy's copy), so the run stays bit-identical.
  // When no step has it all (a store and its buddy's both lost), the newest step
  // with that rank's state reset, as kReset.
  kExact,
  // Resume from the newest step any rank holds; a rank whose rank-local state is
  // missing there starts it afresh (the hook's empty, as PyTorch's PowerSGD does
  // when a bucket changes; the trainer's as it is in the new process).
  kReset,
};
const char* policy_name(LocalStatePolicy policy);
// "exact" or "reset" (policy_name's words); anything else throws c10::Error
// naming `what` (the option or argument it came from) and both words.
LocalStatePolicy parse_local_state_policy(const std::string& text, const std::string& what);

// What a resume needs besides replicated state, the same on every rank.
struct RecoveryNeeds {
  bool hook_local = false;     // the hook keeps rank-local state
  bool trainer_local = false;  // the trainer keeps rank-local state (TrainingState::rank_local)
  LocalStatePolicy policy = LocalStatePolicy::kExact;
};

// Newest first, past damaged snapshots (a retained older one is worth more than
// a restart from step 0), each one logged. Snapshots of another world size are
// candidates too: a resume at another world size carries the replicated state
// over and starts all rank-local state afresh.
LocalCheckpoint load_newest_intact(CheckpointStore* store, int world_size, int rank);

struct RecoveryPlan {
  int64_t step = -1;                // the agreed step; -1: a fresh start
  int source = -1;                  // the first rank that has it
  std::vector<int64_t> rank_steps;  // each rank's newest intact step
  std::vector<int> resync;          // ranks that lack it
  int64_t newest_snapshot_step = -1;  // the newest snapshot any store names, intact or not
  // The newest step any rank holds intact (a just-in-time commit, typically);
  // newest_step - step steps were lost to the policy or to damage.
  int64_t newest_step = -1;
  bool just_in_time = false;        // the source's snapshot of `step` is a just-in-time one
  LocalStatePolicy policy = LocalStatePolicy::kExact;
  std::vector<int> local_reset;     // ranks whose rank-local state is missing at `step`, started afresh
  // The world size that wrote `step`; another than this job's is a resize, and
  // then every rank's rank-local state starts afresh (nothing maps one to one).
  int step_world_size = 0;
  // Where each rank's rank-local state at `step` comes from: the rank whose
  // snapshot holds it as its own, or (buddy) the one holding its buddy copy;
  // rank -1: nowhere, started afresh.
  struct LocalSource {
    int rank = -1;
    bool buddy = false;
  };
  std::vector<LocalSource> local_source;
  // Where each rank's trainer-local state alone (TrainingState::rank_local: RNG,
  // buffers) comes from: the same as local_source where that has it all, else a
  // buddy copy that holds at least this part (a just-in-time commit copies it
  // every step, the hook's state only at periodic commits). A rank whose hook
  // state starts afresh (policy reset) keeps its trainer state from here.
  std::vector<LocalSource> trainer_source;
  bool resized() const { return step >= 0 && step_world_size != static_cast<int>(rank_steps.size()); }
  int64_t steps_lost() const { return newest_step < 0 ? 0 : newest_step - std::max<int64_t>(0, step); }
  bool fresh() const { return step < 0; }
  bool has_step(int rank) const { return step >= 0 && rank_steps[static_cast<size_t>(rank)] == step; }
};

// Collective: the newest step some rank holds intact. Rank 0 says so when newer
// snapshots were damaged everywhere.
RecoveryPlan agree_on_step(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const LocalCheckpoint& local);
// Collective: as above, weighing every rank's candidates against `needs`: the
// newest step some rank holds whose rank-local state every rank can get back
// (kExact), or the newest step some rank holds (kReset). Rank 0 logs a choice
// that passes over a newer step.
RecoveryPlan agree_on_step(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const LocalCheckpoint& local,
                           const RecoveryNeeds& needs);
// The plan as every rank computes it from every rank's candidates (newest first),
// without communication: what agree_on_step decides, for tests.
RecoveryPlan plan_recovery(const std::vector<std::vector<SnapshotCandidate>>& candidates, const RecoveryNeeds& needs);

// On a rank that holds the plan's step but loaded another snapshot (the plan
// passed over its newest): loads that one into `local`. Returns false, and drops
// the candidate, when it turns out damaged; the ranks then agree again.
bool load_agreed_step(CheckpointStore* store, const RecoveryPlan& plan, int rank, LocalCheckpoint* local);

// This rank's commits that cannot be continued: damaged, or newer than the agreed
// step. Nothing is changed; see discard_commits.
std::vector<int64_t> unusable_steps(const RecoveryPlan& plan, const LocalCheckpoint& local);
// Removes `steps` (unusable_steps) from this rank's store, so the next commit
// follows its latest, and logs it. Only once every rank has accepted the plan:
// a refused resume (changed settings, another hook, another optimizer) must find
// the newer commits still there when it is relaunched correctly.
void discard_commits(CheckpointStore* store, const std::vector<int64_t>& steps, int64_t resumed_step);
// unusable_steps, then discard_commits. Returns the steps.
std::vector<int64_t> discard_unusable(CheckpointStore* store, const RecoveryPlan& plan, const LocalCheckpoint& local);

// How a refusal tells the user to go on, in the words of the front-end they use
// (a CLI flag, or a Python argument).
struct ResumeFixes {
  std::string allow_change = "allow the change with --allow-change NAME (repeatable; 'all' allows every change)";
  std::string new_store = "point --ckpt at a new directory";
};

// Collective: the settings recorded with the agreed step against `current`. A
// change not in `allowed` (or "all") throws on every rank, naming the setting and
// both values; the allowed ones come back as "name: old -> new".
std::vector<std::string> check_settings(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const RecoveryPlan& plan,
                                        const LocalCheckpoint& local, const std::map<std::string, std::string>& current,
                                        const std::set<std::string>& allowed, const ResumeFixes& fixes = {});

// On a rank that holds the agreed step: parameters, buffers, optimizer state,
// objects, rank-local state and all hook state from its own snapshot. Throws
// naming `where` when the snapshot does not fit the state (another model, another
// hook, a hook where there was none or none where there was one).
void restore_from_checkpoint(const RecoveryPlan& plan, const LocalCheckpoint& local, TrainingState& state,
                             const std::string& where, const ResumeFixes& fixes = {});

// Collective: one manifest and one broadcast_coalesced from the plan's source
// bring parameters, buffers, optimizer, objects and replicated hook state to the
// ranks that lack the step. Returns the bytes sent.
int64_t resync(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const RecoveryPlan& plan, TrainingState& state);

struct RankLocalOutcome {
  std::string summary;  // the same on every rank: what happened to each rank's state
  int64_t bytes = 0;
};
// Collective: rank-local state (the hook's and the trainer's) of each rank that
// lacks the step comes from its buddy (rank r + buddy_stride keeps r's copy, byte for
// byte), else is reset: the hook's to empty, the trainer's kept as it is (logged).
RankLocalOutcome restore_rank_local(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const RecoveryPlan& plan,
                                    const LocalCheckpoint& local, TrainingState& state);

// Collective: the buckets of `parameters` every rank uses, the plan's source's
// `candidate` (its stored layout, or a fresh assignment) on a resume. The ranks
// compare the full layout's signature (layout_of), the one a commit records;
// throws on every rank when they differ, naming both.
std::vector<std::vector<size_t>> agree_on_buckets(const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                                  const RecoveryPlan& plan,
                                                  std::vector<std::vector<size_t>> candidate,
                                                  const std::vector<at::Tensor>& parameters);

// Collective (when there is rank-local hook state): what a snapshot of `state`
// holds, named for restore_from_checkpoint: parameters, buffers, optimizer,
// objects, rank-local state, hook state, and the buddy copy of rank (r - stride)'s
// rank-local state (the hook's and the trainer's).
std::vector<NamedTensor> snapshot_tensors(const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                          const TrainingState& state);

// Without any collective: this rank's own part of snapshot_tensors, with the
// hook's state given as `hook_state` (hook_state_entries) and the trainer's
// rank-local state as `rank_local`: a just-in-time snapshot takes copies made at
// the end of the step it saves, as the live ones may be midway through the next.
std::vector<NamedTensor> own_state_tensors(const TrainingState& state, const std::vector<NamedTensor>& hook_state,
                                           const std::vector<at::Tensor>& rank_local);
// The hook's replicated and rank-local state, named as in a snapshot, as copies.
// Copies in `reuse` (an earlier call's result) whose name, shape, strides, dtype
// and device still fit are overwritten in place, not allocated again: a replica
// refreshed every step (JustInTime) neither allocates nor page-faults its hook
// state (PowerSGD's error is the size of the gradients).
std::vector<NamedTensor> hook_state_entries(const ScriptHook& hook, std::vector<NamedTensor> reuse = {});
// Whose buddy copy rank `rank` keeps: rank - stride, mod world.
inline int buddy_copy_of(int rank, int stride, int world) {
  return ((rank - stride) % world + world) % world;
}
// The names rank (r - stride)'s trainer-local tensors take in rank r's snapshot.
std::string trainer_buddy_name(size_t index);

}  // namespace ftcomm
