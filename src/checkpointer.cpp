#include "ftcomm/checkpointer.h"

#include <chrono>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "control.h"
#include "ftcomm/bucket_layout.h"
#include "ftcomm/ddp.h"

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
  check(CheckpointStore::Open(so, &store_));
}

Checkpointer::~Checkpointer() {
  if (store_) store_->WaitForSnapshot();
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
  pending_->local = load_newest_intact(store_.get(), world, rank);
  const LocalCheckpoint& local = pending_->local;
  pending_->plan = agree_on_step(pg_, local);
  const RecoveryPlan& plan = pending_->plan;
  report.agreement_ms = ms_since(start);
  report.newest_snapshot_step = plan.newest_snapshot_step;
  report.resynced_ranks = plan.resync;
  report.discarded_steps = discard_unusable(store_.get(), plan, local);
  report.changed_settings =
      check_settings(pg_, plan, local, effective_settings(state), options_.allow_changed_settings);

  start = Clock::now();
  if (plan.has_step(rank)) {
    restore_from_checkpoint(plan, local, state, where);
    report.data_position = local.record.data_position;
    BucketLayout stored;
    if (store_->GetLayout(local.record.layout_signature, &stored).ok()) {
      const std::string why = layout_mismatch(stored, state.parameters);
      TORCH_CHECK(why.empty(), "the stored bucket layout ", signature_hex(local.record.layout_signature), " in ",
                  where, " does not fit this model: ", why);
      pending_->layout = std::make_unique<BucketLayout>(stored);
    }
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
  return report;
}

bool Checkpointer::due(int64_t step) const {
  return store_ && options_.commit_every > 0 && step % options_.commit_every == 0;
}

bool Checkpointer::commit(int64_t step, const TrainingState& state, const c10d::Reducer& reducer,
                          int64_t data_position) {
  if (!due(step)) return false;
  // The layout as the Reducer has it now (after its first-iteration rebuild);
  // stored under its signature, which the commit names.
  const BucketLayout layout = bucket_layout_of(reducer, state.parameters);
  check(store_->PutLayout(layout));
  CommitRecord record;
  record.step = step;
  record.world_size = pg_->getSize();
  record.data_position = data_position;
  record.hook_digest = state.hook ? state.hook->digest() : "";
  record.layout_signature = layout.signature();
  record.settings = effective_settings(state);
  check(store_->WaitForSnapshot());
  store_->CommitSnapshotAsync(record, snapshot_tensors(pg_, state));
  return true;
}

void Checkpointer::flush() {
  if (store_) check(store_->WaitForSnapshot());
}

}  // namespace ftcomm
