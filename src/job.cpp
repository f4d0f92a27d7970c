#include "ftcomm/job.h"

#include <chrono>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "ftcomm/rank_store.h"

namespace ftcomm {
namespace {

double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

}  // namespace

Job::Job(c10::intrusive_ptr<c10d::ProcessGroup> pg, JobOptions options)
    : pg_(std::move(pg)), options_(std::move(options)), deadlines_(deadlines_for(group_timeout(pg_))) {
  options_.jit.stall_timeout = options_.stall_timeout.value_or(deadlines_.stall);
  TORCH_CHECK(options_.jit.stall_timeout.count() >= 0, "stall_timeout must be 0 (never) or positive, got ",
              options_.jit.stall_timeout.count(), " ms");
  CheckpointerOptions co = options_.checkpoint;
  co.ckpt_dir.clear();
  co.adopt_other_rank = false;
  if (!options_.ckpt_root.empty()) {
    // Collective: after a rendezvous numbered the ranks anew, a rank takes over
    // a leftover store on its disk (its replicated state is the job's).
    store_dir_ = rank_store_dir(pg_, options_.ckpt_root).dir;
    co.ckpt_dir = store_dir_;
    co.adopt_other_rank = true;
  }
  checkpointer_ = std::make_unique<Checkpointer>(pg_, std::move(co));
}

Job::~Job() {
  jit_.reset();  // before the checkpointer it saves through
}

const RecoveryPlan& Job::prepare_recovery(TrainingState& state) {
  const RecoveryPlan& plan = checkpointer_->prepare_recovery(state);
  buddy_stride_ = state.buddy_stride;
  return plan;
}

RecoveryReport Job::finish_recovery(TrainingState& state, std::vector<std::vector<size_t>> fresh_buckets,
                                    std::vector<std::vector<size_t>>* buckets) {
  state.buddy_stride = buddy_stride_;
  RecoveryReport report = checkpointer_->finish_recovery(state, std::move(fresh_buckets), buckets);
  if (options_.just_in_time && checkpointer_->store() != nullptr) {
    jit_ = std::make_unique<JustInTime>(pg_, checkpointer_.get(), options_.jit);
  }
  return report;
}

void Job::accept_recovery() {
  checkpointer_->accept_recovery();
}

void Job::begin_update(const std::vector<at::Tensor>& rank_local) {
  if (!jit_) return;
  const auto t = std::chrono::steady_clock::now();
  jit_->begin_update(rank_local);
  jit_seconds_ += seconds_since(t);
}

bool Job::step_done(int64_t step, TrainingState state, const c10d::Reducer& reducer, int64_t data_position) {
  state.buddy_stride = buddy_stride_;
  if (jit_) {
    const auto t = std::chrono::steady_clock::now();
    jit_->step_finished(step, state, reducer, data_position);
    jit_seconds_ += seconds_since(t);
  }
  return checkpointer_->commit(step, state, reducer, data_position);
}

bool Job::commit_last(int64_t step, TrainingState state, const c10d::Reducer& reducer, int64_t data_position) {
  state.buddy_stride = buddy_stride_;
  return checkpointer_->commit_last(step, state, reducer, data_position);
}

bool Job::save_just_in_time(const std::string& reason) {
  return jit_ ? jit_->save(reason) : false;
}

void Job::pause_stall_watch(bool pause) {
  if (!jit_) return;
  if (pause) {
    jit_->pause();
  } else {
    jit_->resume();
  }
}

void Job::stop_just_in_time() {
  jit_.reset();
}

void Job::flush() {
  checkpointer_->flush();
}

}  // namespace ftcomm
