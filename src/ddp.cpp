#include "ftcomm/ddp.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "ftcomm/bucket_layout.h"
#include "ftcomm/recovery.h"
#include "sha256.h"

namespace ftcomm {
namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t).count();
}

}  // namespace

// The shortest text that reads back as the same double.
std::string format_setting(double v) {
  char buf[32];
  for (int digits = 6; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof(buf), "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

std::string tensors_digest(const std::vector<at::Tensor>& tensors) {
  std::string bytes;
  for (const auto& t : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    bytes.append(static_cast<const char*>(c.data_ptr()), c.nbytes());
  }
  return sha256_hex(bytes);
}

DistributedDataParallel::DistributedDataParallel(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                                 std::vector<at::Tensor> params, std::vector<at::Tensor> extra_state,
                                                 DdpOptions options)
    : pg_(std::move(pg)), options_(std::move(options)) {
  state_.parameters = std::move(params);
  state_.optimizer = std::move(extra_state);
  state_.hook = ScriptHook::load(options_.hook);
  for (const auto& [k, v] : options_.hook_args) state_.hook->set_param(k, v);
  agree_on_hook(pg_, *state_.hook, options_.pinned_digests);
  if (!options_.ckpt_dir.empty()) {
    CheckpointStoreOptions so;
    so.dir = options_.ckpt_dir;
    so.job_id = options_.job_id;
    so.rank = pg_->getRank();
    so.keep_snapshots = options_.keep_snapshots;
    check(CheckpointStore::Open(so, &store_));
  }
}

DistributedDataParallel::~DistributedDataParallel() {
  if (store_) store_->WaitForSnapshot();
}

RecoveryReport DistributedDataParallel::recover() {
  prepare_recovery();
  return finish_recovery();
}

struct DistributedDataParallel::PendingRecovery {
  LocalCheckpoint local;
  RecoveryPlan plan;
  RecoveryReport report;
  std::unique_ptr<BucketLayout> layout;
};

const RecoveryPlan& DistributedDataParallel::prepare_recovery() {
  TORCH_CHECK(!pending_ && !reducer_, "DistributedDataParallel: recovery runs once, before the first step");
  pending_ = std::make_unique<PendingRecovery>();
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
      check_settings(pg_, plan, local, effective_settings(), options_.allow_changed_settings);

  start = Clock::now();
  std::unique_ptr<BucketLayout>& layout = pending_->layout;
  if (plan.has_step(rank)) {
    restore_from_checkpoint(plan, local, state_, where);
    BucketLayout stored;
    if (store_->GetLayout(local.record.layout_signature, &stored).ok()) {
      const std::string why = layout_mismatch(stored, state_.parameters);
      TORCH_CHECK(why.empty(), "the stored bucket layout ", signature_hex(local.record.layout_signature), " in ",
                  where, " does not fit this model: ", why);
      layout = std::make_unique<BucketLayout>(stored);
    }
  }
  report.load_ms = ms_since(start);
  return plan;
}

RecoveryReport DistributedDataParallel::finish_recovery() {
  TORCH_CHECK(pending_, "DistributedDataParallel: call prepare_recovery() before finish_recovery()");
  const auto pending = std::move(pending_);
  const LocalCheckpoint& local = pending->local;
  const RecoveryPlan& plan = pending->plan;
  RecoveryReport& report = pending->report;
  const std::unique_ptr<BucketLayout>& layout = pending->layout;
  at::NoGradGuard no_grad;
  const auto start = Clock::now();
  report.resync_bytes = resync(pg_, plan, state_);
  const RankLocalOutcome local_state = restore_rank_local(pg_, plan, local, state_);
  report.resync_bytes += local_state.bytes;
  report.local_state = local_state.summary;
  report.resync_ms = ms_since(start);
  report.resumed_from_step = plan.step;

  // The Reducer, on one layout for all ranks: the stored one of the rank that
  // serves the step (a replaced rank has none), else a fresh assignment.
  std::vector<bool> sparse(state_.parameters.size(), false);
  const auto buckets = agree_on_buckets(
      pg_, plan,
      layout ? bucket_indices(*layout)
             : std::get<0>(c10d::compute_bucket_assignment_by_size(
                   state_.parameters, {static_cast<size_t>(options_.bucket_bytes)}, sparse)),
      state_.parameters);
  reducer_ = std::make_unique<c10d::Reducer>(state_.parameters, buckets, pg_, sparse, options_.bucket_bytes, false,
                                             false, std::unordered_map<size_t, std::string>(), options_.bucket_bytes,
                                             false, false, std::vector<int64_t>());
  auto comm = std::make_unique<ScriptCommHook>(pg_, state_.hook, options_.hook_options);
  comm_ = comm.get();
  reducer_->register_comm_hook(std::move(comm));
  return report;
}

void DistributedDataParallel::before_forward() {
  TORCH_CHECK(reducer_, "DistributedDataParallel: call recover() before the first step");
  reducer_->rebuild_buckets();
  reducer_->prepare_for_forward();
}

void DistributedDataParallel::before_backward(const at::Tensor& loss) {
  reducer_->prepare_for_backward({loss});
}

void DistributedDataParallel::after_step(int64_t step, int64_t data_position) {
  if (!store_ || options_.commit_every <= 0 || step % options_.commit_every != 0) return;
  // The layout as the Reducer has it now (after its first-iteration rebuild);
  // stored under its signature, which the commit names.
  const BucketLayout layout = bucket_layout_of(*reducer_, state_.parameters);
  check(store_->PutLayout(layout));
  CommitRecord record;
  record.step = step;
  record.world_size = pg_->getSize();
  record.data_position = data_position;
  record.hook_digest = state_.hook->digest();
  record.layout_signature = layout.signature();
  record.settings = effective_settings();
  check(store_->WaitForSnapshot());
  store_->CommitSnapshotAsync(record, snapshot_tensors(pg_, state_));
}

std::map<std::string, std::string> DistributedDataParallel::effective_settings() const {
  std::map<std::string, std::string> out = options_.settings;
  for (const auto& [k, v] : state_.hook->params()) out["hook." + k] = format_setting(v);
  return out;
}

double DistributedDataParallel::comm_seconds() const {
  return comm_ ? comm_->busy_seconds() : 0.0;
}

void DistributedDataParallel::flush() {
  if (store_) check(store_->WaitForSnapshot());
}

}  // namespace ftcomm
