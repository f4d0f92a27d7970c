#include "ftcomm/ddp.h"

#include <chrono>
#include <cstdio>
#include <cstdlib>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "sha256.h"

namespace ftcomm {

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
  CheckpointerOptions co;
  co.ckpt_dir = options_.ckpt_dir;
  co.job_id = options_.job_id;
  co.commit_every = options_.commit_every;
  co.keep_snapshots = options_.keep_snapshots;
  co.settings = options_.settings;
  co.allow_changed_settings = options_.allow_changed_settings;
  co.local_state_policy = options_.local_state_policy;
  checkpointer_ = std::make_unique<Checkpointer>(pg_, std::move(co));
}

DistributedDataParallel::~DistributedDataParallel() = default;

RecoveryReport DistributedDataParallel::recover() {
  prepare_recovery();
  return finish_recovery();
}

const RecoveryPlan& DistributedDataParallel::prepare_recovery() {
  TORCH_CHECK(!reducer_, "DistributedDataParallel: recovery runs once, before the first step");
  return checkpointer_->prepare_recovery(state_);
}

RecoveryReport DistributedDataParallel::finish_recovery() {
  TORCH_CHECK(!reducer_, "DistributedDataParallel: recovery runs once, before the first step");
  // The Reducer, on one layout for all ranks: the stored one of the rank that
  // serves the step (a replaced rank has none), else a fresh assignment.
  std::vector<bool> sparse(state_.parameters.size(), false);
  auto fresh = std::get<0>(c10d::compute_bucket_assignment_by_size(
      state_.parameters, {static_cast<size_t>(options_.bucket_bytes)}, sparse));
  std::vector<std::vector<size_t>> buckets;
  RecoveryReport report = checkpointer_->finish_recovery(state_, std::move(fresh), &buckets);
  reducer_ = std::make_unique<c10d::Reducer>(state_.parameters, buckets, pg_, sparse, options_.bucket_bytes, false,
                                             false, std::unordered_map<size_t, std::string>(), options_.bucket_bytes,
                                             false, false, std::vector<int64_t>());
  auto comm = std::make_unique<ScriptCommHook>(pg_, state_.hook, options_.hook_options);
  comm_ = comm.get();
  reducer_->register_comm_hook(std::move(comm));
  if (options_.just_in_time && checkpointer_->store() != nullptr) {
    jit_ = std::make_unique<JustInTime>(pg_, checkpointer_.get(), options_.jit_options);
  }
  checkpointer_->accept_recovery();
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

namespace {
double seconds_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}
}  // namespace

void DistributedDataParallel::before_update() {
  if (!jit_) return;
  const auto t = std::chrono::steady_clock::now();
  jit_->begin_update(state_.rank_local);
  jit_seconds_ += seconds_since(t);
}

void DistributedDataParallel::after_step(int64_t step, int64_t data_position) {
  if (jit_) {
    const auto t = std::chrono::steady_clock::now();
    jit_->step_finished(step, state_, *reducer_, data_position);
    jit_seconds_ += seconds_since(t);
  }
  checkpointer_->commit(step, state_, *reducer_, data_position);
}

bool DistributedDataParallel::save_just_in_time(const std::string& reason) {
  return jit_ ? jit_->save(reason) : false;
}

double DistributedDataParallel::comm_seconds() const {
  return comm_ ? comm_->busy_seconds() : 0.0;
}

bool DistributedDataParallel::commit_last(int64_t step, int64_t data_position) {
  TORCH_CHECK(reducer_, "DistributedDataParallel: call recover() before the first step");
  return checkpointer_->commit_last(step, state_, *reducer_, data_position);
}

void DistributedDataParallel::flush() {
  checkpointer_->flush();
}

}  // namespace ftcomm
