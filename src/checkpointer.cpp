#include "ftcomm/checkpointer.h"

#include <algorithm>
#include <chrono>
#include <future>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "control.h"
#include "ftcomm/bucket_layout.h"
#include "ftcomm/errors.h"
#include "ftcomm/settings.h"
#include "ftcomm/process_group.h"
#include "log.h"

namespace ftcomm {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

}  // namespace

struct Checkpointer::Pending {
  LocalCheckpoint local;
  RecoveryPlan plan;
  RecoveryReport report;
  std::unique_ptr<BucketLayout> layout;  // the stored one, on ranks that hold the step
};

Checkpointer::Checkpointer(c10::intrusive_ptr<c10d::ProcessGroup> pg, CheckpointerOptions options)
    : pg_(std::move(pg)), options_(std::move(options)) {
  TORCH_CHECK(options_.commit_every >= 0, "commit_every must be 0 (no periodic snapshots) or more, got ",
              options_.commit_every);
  TORCH_CHECK(options_.keep_snapshots >= 1, "keep_snapshots must be at least 1, got ", options_.keep_snapshots);
  if (options_.ckpt_dir.empty()) return;
  CheckpointStoreOptions so;
  so.dir = options_.ckpt_dir;
  so.job_id = options_.job_id;
  so.rank = pg_->getRank();
  so.keep_snapshots = options_.keep_snapshots;
  so.staging_slots = options_.staging_slots;
  so.when_behind = options_.when_behind;
  so.write_bytes_per_sec = options_.write_bytes_per_sec;
  so.direct_writes = options_.direct_writes;
  so.adopt_other_rank = options_.adopt_other_rank;
  check(CheckpointStore::Open(so, &store_));
}

Checkpointer::~Checkpointer() {
  if (!store_) return;
  const std::string me = "ftcomm: rank " + std::to_string(pg_->getRank()) + ": ";
  const StoreStatus last = store_->WaitForSnapshot();
  if (!last.ok()) detail::log_line(me + "a snapshot failed: " + last.ToString());
  const SnapshotStats st = store_->snapshot_stats();
  if (st.waited > 0 || st.skipped > 0) {
    detail::log_line(me + snapshot_summary());
  }
}

SnapshotStats Checkpointer::snapshot_stats() const {
  return store_ ? store_->snapshot_stats() : SnapshotStats{};
}

std::string Checkpointer::snapshot_summary() const {
  const SnapshotStats st = snapshot_stats();
  auto mb = [](int64_t bytes) { return std::to_string((bytes + 500000) / 1000000) + " MB"; };
  std::string out = "snapshots: " + std::to_string(st.taken) + " taken, " + std::to_string(st.waited) +
                    " waited for the disk (" + std::to_string(static_cast<int64_t>(st.waited_ms)) + " ms), " +
                    std::to_string(st.skipped) + " skipped (when_behind=" +
                    snapshot_when_behind_name(options_.when_behind) + "); staging " + mb(st.staging_bytes);
  if (st.pinned_bytes > 0) out += " (" + mb(st.pinned_bytes) + " pinned)";
  return out + " in " + std::to_string(options_.staging_slots) + " slot(s)";
}

std::map<std::string, std::string> Checkpointer::effective_settings(const TrainingState& state) const {
  std::map<std::string, std::string> out = options_.settings;
  if (state.hook) {
    for (const auto& [k, v] : state.hook->params()) out["hook." + k] = format_setting(v);
  }
  return out;
}

const RecoveryPlan& Checkpointer::prepare_recovery(TrainingState& state) {
  TORCH_CHECK(!pending_, "Checkpointer: prepare_recovery() was called twice without finish_recovery()");
  pending_ = std::make_unique<Pending>();
  RecoveryReport& report = pending_->report;
  at::NoGradGuard no_grad;
  const int rank = pg_->getRank(), world = pg_->getSize();
  const std::string where = options_.ckpt_dir.empty() ? "(no store)" : options_.ckpt_dir;

  auto start = Clock::now();
  // Buddy copies one node over: the stride is the most ranks any node runs (the
  // next node's rank for equal nodes), 1 on one node.
  const int per_node = options_.local_world_size > 0 ? options_.local_world_size
                                                     : process_group_options_from_env().local_world_size;
  const auto sizes = control::allgather(pg_, int64_t(std::max(1, per_node)));
  const int64_t most = *std::max_element(sizes.begin(), sizes.end());
  state.buddy_stride = most < world ? static_cast<int>(most) : 1;
  pending_->local = load_newest_intact(store_.get(), world, rank);
  RecoveryNeeds needs;
  needs.hook_local = state.hook && !state.hook->local_state().empty();
  needs.trainer_local = !state.rank_local.empty();
  needs.policy = options_.local_state_policy;
  // A plan that passes over a rank's newest snapshot makes it load an older one,
  // which may turn out damaged: then that rank drops it and the ranks agree
  // again (each round drops one candidate, so this ends).
  for (;;) {
    pending_->plan = agree_on_step(pg_, pending_->local, needs);
    const bool loaded = load_agreed_step(store_.get(), pending_->plan, rank, &pending_->local);
    const auto all = control::allgather(pg_, int64_t(loaded ? 1 : 0));
    if (std::all_of(all.begin(), all.end(), [](int64_t v) { return v == 1; })) break;
  }
  const LocalCheckpoint& local = pending_->local;
  const RecoveryPlan& plan = pending_->plan;
  report.agreement_ms = ms_since(start);
  report.newest_snapshot_step = plan.newest_snapshot_step;
  report.newest_step = plan.newest_step;
  report.steps_lost = plan.steps_lost();
  report.resumed_just_in_time = plan.just_in_time;
  report.policy = policy_name(plan.policy);
  report.local_state_reset = plan.local_reset;
  report.resumed_world_size = plan.step_world_size;
  report.resynced_ranks = plan.resync;
  // Only noted here: accept_recovery() drops them once every check has passed.
  report.discarded_steps = store_ ? unusable_steps(plan, local) : std::vector<int64_t>{};
  report.changed_settings =
      check_settings(pg_, plan, local, effective_settings(state), options_.allow_changed_settings, options_.fixes);

  start = Clock::now();
  std::string refusal;
  if (plan.has_step(rank)) {
    // A snapshot that does not fit (another model, another hook) is refused on
    // every rank together: the ranks that lack the step would otherwise wait in
    // the resync for a peer that has given up.
    try {
      restore_from_checkpoint(plan, local, state, where, options_.fixes);
      report.data_position = local.record.data_position;
      BucketLayout stored;
      if (store_->GetLayout(local.record.layout_signature, &stored).ok()) {
        const std::string why = layout_mismatch(stored, state.parameters);
        TORCH_CHECK(why.empty(), "the stored bucket layout ", signature_hex(local.record.layout_signature), " in ",
                    where, " does not fit this model: ", why);
        pending_->layout = std::make_unique<BucketLayout>(stored);
      }
    } catch (const c10::Error& e) {
      refusal = e.what_without_backtrace();
    }
  }
  if (auto why = control::first_error(pg_, refusal.empty() ? refusal : "refusing to resume from step " +
                                                                        std::to_string(plan.step) + ": " + refusal +
                                                                        " (nothing was discarded)")) {
    throw ResumeRefused(*why, plan.step);
  }
  report.load_ms = ms_since(start);
  return plan;
}

RecoveryReport Checkpointer::finish_recovery(TrainingState& state, std::vector<std::vector<size_t>> fresh_buckets,
                                             std::vector<std::vector<size_t>>* buckets) {
  TORCH_CHECK(pending_, "Checkpointer: call prepare_recovery() before finish_recovery()");
  const auto pending = std::move(pending_);
  const RecoveryPlan& plan = pending->plan;
  RecoveryReport& report = pending->report;
  at::NoGradGuard no_grad;
  const auto start = Clock::now();
  report.resync_bytes = resync(pg_, plan, state);
  const RankLocalOutcome local_state = restore_rank_local(pg_, plan, pending->local, state);
  report.resync_bytes += local_state.bytes;
  report.local_state = local_state.summary;
  // The data position is replicated: the source's goes to every rank.
  if (!plan.fresh()) report.data_position = control::broadcast(pg_, {report.data_position}, plan.source).at(0);
  report.resync_ms = ms_since(start);
  report.resumed_from_step = plan.step;
  *buckets = agree_on_buckets(pg_, plan,
                              pending->layout ? bucket_indices(*pending->layout) : std::move(fresh_buckets),
                              state.parameters);
  to_discard_ = report.discarded_steps;
  resumed_step_ = plan.step;
  last_committed_ = plan.step;
  return report;
}

void Checkpointer::accept_recovery() {
  const std::vector<int64_t> steps = std::move(to_discard_);
  to_discard_.clear();
  discard_commits(store_.get(), steps, resumed_step_);
}

CommitRecord Checkpointer::record_of(int64_t step, int64_t data_position, const BucketLayout& layout,
                                     const TrainingState& state) {
  // A layout is stored once: the Reducer keeps it after its first iterations, and
  // a synced write on every commit would cost the training thread an fsync.
  if (layout.signature() != stored_layout_) {
    check(store_->PutLayout(layout));
    stored_layout_ = layout.signature();
  }
  CommitRecord record;
  record.step = step;
  record.world_size = pg_->getSize();
  record.buddy_stride = state.buddy_stride;
  record.data_position = data_position;
  record.hook_digest = state.hook ? state.hook->digest() : "";
  record.layout_signature = layout.signature();
  record.settings = effective_settings(state);
  return record;
}

bool Checkpointer::due(int64_t step) const {
  return store_ && options_.commit_every > 0 && step % options_.commit_every == 0;
}

bool Checkpointer::commit(int64_t step, const TrainingState& state, const c10d::Reducer& reducer,
                          int64_t data_position) {
  if (!due(step)) return false;
  return commit_now(step, state, reducer, data_position);
}

bool Checkpointer::commit_last(int64_t step, const TrainingState& state, const c10d::Reducer& reducer,
                               int64_t data_position) {
  // The same answer on every rank: every rank ran the same steps since the same
  // resumed step, and commit() decides by the step alone.
  if (!store_ || options_.commit_every != 0 || step <= resumed_step_ || step <= last_committed_) return false;
  // The job's last commit is never skipped: a staging slot is freed first.
  check(store_->WaitForSnapshot());
  return commit_now(step, state, reducer, data_position);
}

bool Checkpointer::commit_now(int64_t step, const TrainingState& state, const c10d::Reducer& reducer,
                              int64_t data_position) {
  accept_recovery();
  // The layout as the Reducer has it now (after its first-iteration rebuild);
  // stored under its signature, which the commit names.
  const BucketLayout layout = bucket_layout_of(reducer, state.parameters);
  const CommitRecord record = record_of(step, data_position, layout, state);
  check(store_->TakeSnapshotError());
  const auto done = store_->CommitSnapshotAsync(record, snapshot_tensors(pg_, state));
  const std::string me = "ftcomm: rank " + std::to_string(pg_->getRank()) + ": ";
  if (done.wait_for(std::chrono::seconds(0)) == std::future_status::ready && done.get().IsSkipped()) {
    detail::log_line(me + done.get().message());
    return false;
  }
  // Waits for the disk are said the 1st, 2nd, 4th, 8th, ... time.
  const SnapshotStats st = store_->snapshot_stats();
  if (st.waited > waits_logged_ && (st.waited & (st.waited - 1)) == 0) {
    waits_logged_ = st.waited;
    detail::log_line(me + "the commit of step " + std::to_string(step) +
                     " waited for the disk: every staging slot held a snapshot still being written (" +
                     std::to_string(st.waited) + " such waits, " + std::to_string(static_cast<int64_t>(st.waited_ms)) +
                     " ms in all). Commit less often, add a staging slot, or skip such commits (when_behind=skip)");
  }
  last_committed_ = step;
  return true;
}

void Checkpointer::flush() {
  if (store_) check(store_->WaitForSnapshot());
}

bool Checkpointer::commit_just_in_time(int64_t step, int64_t data_position, const BucketLayout& layout,
                                       const TrainingState& state, const std::vector<NamedTensor>& tensors,
                                       uint64_t buddy_parts, const std::string& reason) {
  if (!store_ || step < 1) return false;
  const auto start = Clock::now();
  accept_recovery();
  // The periodic snapshot in flight is this rank's own disk work: finish it
  // first (it may be of this very step). Its error, if any, is the next
  // recovery's to report; the just-in-time commit goes on regardless.
  const StoreStatus in_flight = store_->WaitForSnapshot();
  if (!in_flight.ok()) detail::log_line("ftcomm: rank " + std::to_string(pg_->getRank()) + ": " + in_flight.ToString());
  CommitRecord latest;
  if (store_->LatestCommitted(&latest).ok() && latest.step >= step) return false;
  CommitRecord record = record_of(step, data_position, layout, state);
  record.just_in_time = true;
  record.jit_reason = reason;
  record.buddy_parts = buddy_parts;
  store_->CommitSnapshotAsync(record, tensors);
  check(store_->WaitForSnapshot());
  detail::log_line("ftcomm: rank " + std::to_string(pg_->getRank()) + ": saved step " + std::to_string(step) +
                   " just in time (" + reason + ") to " + options_.ckpt_dir + " in " +
                   std::to_string(static_cast<int64_t>(ms_since(start))) + " ms");
  return true;
}

}  // namespace ftcomm
