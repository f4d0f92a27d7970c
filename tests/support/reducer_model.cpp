#include "reducer_model.h"

#include <c10/core/impl/VirtualGuardImpl.h>

namespace ftcomm::testing {

ReducerModel::ReducerModel(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, std::vector<int64_t> widths,
                           int64_t bucket_bytes, std::vector<std::vector<size_t>> buckets, at::Device device)
    : pg_(pg), device_(device) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  for (size_t i = 0; i + 1 < widths.size(); ++i) {
    params_.push_back(
        (at::randn({widths[i], widths[i + 1]}, gen) / std::sqrt(double(widths[i]))).to(device).requires_grad_());
    params_.push_back(at::zeros({widths[i + 1]}, device).requires_grad_());
  }
  std::vector<bool> sparse(params_.size(), false);
  if (buckets.empty()) {
    buckets = std::get<0>(c10d::compute_bucket_assignment_by_size(params_, {static_cast<size_t>(bucket_bytes)}, sparse));
  }
  reducer_ = std::make_unique<c10d::Reducer>(params_, buckets, pg_, sparse, bucket_bytes,
                                             /*find_unused_parameters=*/false, /*gradient_as_bucket_view=*/false,
                                             std::unordered_map<size_t, std::string>(), bucket_bytes,
                                             /*skip_all_reduce_unused_params=*/false, /*use_python_reducer=*/false,
                                             std::vector<int64_t>());
}

ReducerModel::~ReducerModel() = default;

void ReducerModel::set_hook(HookKind kind, std::unique_ptr<c10d::CommHookInterface> custom) {
  switch (kind) {
    case HookKind::kNone: break;
    case HookKind::kBuiltinAllreduce: reducer_->register_builtin_comm_hook(c10d::BuiltinCommHookType::ALLREDUCE); break;
    case HookKind::kBuiltinFp16: reducer_->register_builtin_comm_hook(c10d::BuiltinCommHookType::FP16_COMPRESS); break;
    case HookKind::kCustom: reducer_->register_comm_hook(std::move(custom)); break;
  }
}

double ReducerModel::step(int64_t batch, int64_t seed) {
  // A batch is drawn once on the CPU (the same values on every device) and kept
  // on the device, so a timed step holds no host data generation.
  auto& cached = batches_[{batch, seed}];
  if (!cached.first.defined()) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 131 + pg_->getRank());
    cached.first = at::randn({batch, params_[0].size(0)}, gen).to(device_);
    cached.second = at::randn({batch, params_.back().size(0)}, gen).to(device_);
  }
  const at::Tensor& x = cached.first;
  const at::Tensor& target = cached.second;
  for (auto& p : params_) {
    if (p.grad().defined()) p.mutable_grad().zero_();
  }
  reducer_->rebuild_buckets();
  reducer_->prepare_for_forward();
  at::Tensor h = x;
  for (size_t i = 0; i < params_.size(); i += 2) {
    h = at::addmm(params_[i + 1], h, params_[i]);
    if (i + 2 < params_.size()) h = at::relu(h);
  }
  at::Tensor loss = (h - target).pow(2).mean();
  reducer_->prepare_for_backward({loss});
  loss.backward();
  if (device_.is_cuda()) c10::impl::VirtualGuardImpl(device_.type()).synchronizeDevice(device_.index());
  return loss.item<double>();
}

std::vector<at::Tensor> ReducerModel::gradients() const {
  std::vector<at::Tensor> grads;
  for (const auto& p : params_) grads.push_back(p.grad().to(at::kCPU, /*non_blocking=*/false, /*copy=*/true));
  return grads;
}

}  // namespace ftcomm::testing
