#include "ftcomm/ddp.h"

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/reducer.hpp>

namespace ftcomm {

DistributedDataParallel::DistributedDataParallel(c10::intrusive_ptr<c10d::ProcessGroup> pg,
                                                 std::vector<at::Tensor> params, std::vector<at::Tensor> extra_state,
                                                 DdpOptions options)
    : pg_(std::move(pg)), options_(std::move(options)), job_(pg_, options_.job) {
  state_.parameters = std::move(params);
  state_.optimizer = std::move(extra_state);
  state_.hook = ScriptHook::load(options_.hook);
  for (const auto& [k, v] : options_.hook_args) state_.hook->set_param(k, v);
  agree_on_hook(pg_, *state_.hook, options_.pinned_digests);
  options_.hook_options.hook_timeout = options_.hook_timeout.value_or(job_.deadlines().hook);
}

DistributedDataParallel::~DistributedDataParallel() = default;

RecoveryReport DistributedDataParallel::recover() {
  prepare_recovery();
  return finish_recovery();
}

const RecoveryPlan& DistributedDataParallel::prepare_recovery() {
  TORCH_CHECK(!reducer_, "DistributedDataParallel: recovery runs once, before the first step");
  return job_.prepare_recovery(state_);
}

RecoveryReport DistributedDataParallel::finish_recovery() {
  TORCH_CHECK(!reducer_, "DistributedDataParallel: recovery runs once, before the first step");
  // The Reducer, on one layout for all ranks: the stored one of the rank that
  // serves the step (a replaced rank has none), else a fresh assignment.
  std::vector<bool> sparse(state_.parameters.size(), false);
  auto fresh = std::get<0>(c10d::compute_bucket_assignment_by_size(
      state_.parameters, {static_cast<size_t>(options_.bucket_bytes)}, sparse));
  std::vector<std::vector<size_t>> buckets;
  RecoveryReport report = job_.finish_recovery(state_, std::move(fresh), &buckets);
  reducer_ = std::make_unique<c10d::Reducer>(state_.parameters, buckets, pg_, sparse, options_.bucket_bytes, false,
                                             false, std::unordered_map<size_t, std::string>(), options_.bucket_bytes,
                                             false, false, std::vector<int64_t>());
  auto comm = std::make_unique<ScriptCommHook>(pg_, state_.hook, options_.hook_options);
  comm_ = comm.get();
  reducer_->register_comm_hook(std::move(comm));
  job_.accept_recovery();
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

void DistributedDataParallel::before_update() {
  job_.begin_update(state_.rank_local);
}

void DistributedDataParallel::after_step(int64_t step, int64_t data_position) {
  job_.step_done(step, state_, *reducer_, data_position);
}

bool DistributedDataParallel::save_just_in_time(const std::string& reason) {
  return job_.save_just_in_time(reason);
}

double DistributedDataParallel::comm_seconds() const {
  return comm_ ? comm_->busy_seconds() : 0.0;
}

bool DistributedDataParallel::commit_last(int64_t step, int64_t data_position) {
  TORCH_CHECK(reducer_, "DistributedDataParallel: call recover() before the first step");
  return job_.commit_last(step, state_, *reducer_, data_position);
}

void DistributedDataParallel::flush() {
  job_.flush();
}

}  // namespace ftcomm
