#include "ftcomm/hook_group.h"

#include <ATen/ATen.h>

#include "control.h"

namespace ftcomm {

int64_t HookGroup::exchange(int64_t value) {
  return control::max(control_, value);  // on the CPU: see control.h
}

void HookGroup::begin_guarded() {
  guarded_ = true;
  decision_ = -1;
  stopped_by_peer_ = false;
}

void HookGroup::begin_step() {
  std::lock_guard<std::mutex> lock(step_mutex_);
  if (!step_open_) {
    step_open_ = true;
    step_decided_ = false;
  }
}

int64_t HookGroup::conclude_step(int64_t verdict) {
  std::lock_guard<std::mutex> lock(step_mutex_);
  const int64_t decision = step_decided_ ? step_decision_ : exchange(verdict);
  step_open_ = false;
  step_decided_ = false;
  return decision;
}

std::unique_lock<std::mutex> HookGroup::begin_collective() {
  std::unique_lock<std::mutex> lock(op_mutex_);
  TORCH_CHECK(!abandoned_, "this hook call passed its deadline and was abandoned; no further collectives");
  return lock;
}

bool HookGroup::try_abandon(int64_t verdict, int64_t* decision, bool per_step) {
  if (per_step) {
    // The step's exchange travels apart from the hook's collectives: it can be
    // made while the hook sits in one (or on a GPU stuck behind one).
    std::lock_guard<std::mutex> lock(step_mutex_);
    if (!step_open_) return false;  // the call came back and concluded the step
    abandoned_ = true;
    if (!step_decided_) {
      step_decided_ = true;
      step_decision_ = exchange(verdict);
    }
    *decision = step_decision_;
    return true;
  }
  std::unique_lock<std::mutex> lock(op_mutex_, std::try_to_lock);
  if (!lock.owns_lock()) return false;
  abandoned_ = true;
  if (guarded_ && decision_ < 0) decision_ = exchange(verdict);
  guarded_ = false;
  *decision = decision_;
  return true;
}

void HookGroup::control_before_collective() {
  if (!guarded_) return;
  TORCH_CHECK(decision_ < 0, "hook bucket already decided; no further collectives");
  const int64_t got = exchange(0);
  if (got != 0) {
    decision_ = got;
    stopped_by_peer_ = true;
    TORCH_CHECK(false, "the hook failed on rank ", rank_of(got), "; stopping this bucket on every rank");
  }
}

int64_t HookGroup::conclude(int64_t verdict) {
  std::lock_guard<std::mutex> lock(op_mutex_);
  if (abandoned_) return decision_;
  if (decision_ < 0) decision_ = exchange(verdict);
  guarded_ = false;
  return decision_;
}

at::Tensor HookGroup::allreduce(at::Tensor tensor) {
  auto lock = begin_collective();
  control_before_collective();
  std::vector<at::Tensor> list{tensor};
  pg_->allreduce(list)->wait();
  return tensor;
}

std::vector<at::Tensor> HookGroup::allgather(at::Tensor tensor) {
  auto lock = begin_collective();
  control_before_collective();
  std::vector<std::vector<at::Tensor>> out(1);
  for (int64_t r = 0; r < world_size(); ++r) out[0].push_back(at::empty_like(tensor));
  std::vector<at::Tensor> in{tensor};
  pg_->allgather(out, in)->wait();
  return out[0];
}

at::Tensor HookGroup::broadcast(at::Tensor tensor, int64_t root) {
  TORCH_CHECK(root >= 0 && root < world_size(), "Group.broadcast: root ", root, " is not a rank of a group of ",
              world_size());
  auto lock = begin_collective();
  control_before_collective();
  std::vector<at::Tensor> list{tensor};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  pg_->broadcast(list, options)->wait();
  return tensor;
}

c10::intrusive_ptr<HookBucket> HookBucket::from(c10d::GradBucket& bucket) {
  // GradBucket keeps offsets, lengths and sizes private; each gradient is a view
  // of the buffer, which gives them back.
  const at::Tensor& buffer = bucket.getBuffer();
  std::vector<int64_t> offsets, lengths;
  std::vector<std::vector<int64_t>> sizes;
  for (const at::Tensor& grad : bucket.getGradients()) {
    offsets.push_back(grad.storage_offset() - buffer.storage_offset());
    lengths.push_back(grad.numel());
    sizes.push_back(grad.sizes().vec());
  }
  return c10::make_intrusive<HookBucket>(bucket.getBufferRef(), static_cast<int64_t>(bucket.getIndex()),
                                         bucket.isLast(), std::move(offsets), std::move(lengths), std::move(sizes));
}

TORCH_LIBRARY(ftcomm, m) {
  m.class_<HookGroup>("Group")
      .def("rank", &HookGroup::rank)
      .def("world_size", &HookGroup::world_size)
      .def("allreduce", &HookGroup::allreduce)
      .def("allgather", &HookGroup::allgather)
      .def("broadcast", &HookGroup::broadcast);
  m.class_<HookBucket>("Bucket")
      .def("buffer", &HookBucket::buffer)
      .def("index", &HookBucket::index)
      .def("is_last", &HookBucket::is_last)
      .def("offsets", &HookBucket::offsets)
      .def("lengths", &HookBucket::lengths)
      .def("sizes", &HookBucket::sizes);
}

}  // namespace ftcomm
