#include "ftcomm/hook_group.h"

#include <condition_variable>
#include <cstdlib>
#include <memory>
#include <thread>

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
  TORCH_CHECK(!(store_ && stopped_by_peer_), "the hook failed on rank ", rank_of(peer_record_.verdict),
              "; no further collectives on this group");
  return lock;
}

void HookGroup::set_fail_fast(c10::intrusive_ptr<c10d::Store> store, std::string key,
                              std::chrono::milliseconds slice) {
  store_ = std::move(store);
  key_ = std::move(key);
  slice_ = slice;
}

HookGroup::Record HookGroup::record_failure(int64_t verdict, const std::string& reason) {
  const std::string text = std::to_string(verdict) + "|" + reason;
  // compareSet writes only when the key is missing (expected: empty), and
  // returns what the key holds afterwards: the first record wins.
  const std::vector<uint8_t> held =
      store_->compareSet(key_, std::vector<uint8_t>{}, std::vector<uint8_t>(text.begin(), text.end()));
  const std::string got(held.begin(), held.end());
  const auto bar = got.find('|');
  if (bar == std::string::npos || got == text) {
    // This rank's record is the one in force: give the peers a moment to find it
    // and report it as their own error, before this rank's exit (and torchrun's
    // SIGTERM to them) overtakes their error path.
    wait_for_acknowledgements();
    return {verdict, reason};
  }
  acknowledge();
  return {std::strtoll(got.c_str(), nullptr, 10), got.substr(bar + 1)};
}

void HookGroup::acknowledge() {
  if (acknowledged_.exchange(true)) return;
  try {
    store_->add(key_ + "/seen", 1);
  } catch (const std::exception&) {
    // The store is gone (its host rank exited): nobody waits for this any more.
  }
}

void HookGroup::wait_for_acknowledgements() {
  const int64_t peers = pg_->getSize() - 1;
  const auto until = std::chrono::steady_clock::now() + kAcknowledgeWait;
  try {
    while (store_->add(key_ + "/seen", 0) < peers && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  } catch (const std::exception&) {
    // The store is gone: report without waiting.
  }
}

HookGroup::Record HookGroup::recorded_failure() {
  if (!store_->check({key_})) return {};
  const std::vector<uint8_t> held = store_->get(key_);
  const std::string got(held.begin(), held.end());
  const auto bar = got.find('|');
  if (bar == std::string::npos) return {};
  return {std::strtoll(got.c_str(), nullptr, 10), got.substr(bar + 1)};
}

void HookGroup::stop_for(const Record& r) {
  // The collective may stay pending: nothing more goes on this group
  // (begin_collective refuses once stopped_by_peer_ is set, when failing fast).
  stopped_by_peer_ = true;
  peer_record_ = r;
  acknowledge();
  TORCH_CHECK(false, "the hook failed on rank ", rank_of(r.verdict), "; stopping on every rank");
}

void HookGroup::check_peers() {
  if (!store_) return;
  const Record r = recorded_failure();
  if (r.verdict != 0) stop_for(r);
}

void HookGroup::finish(const c10::intrusive_ptr<c10d::Work>& work) {
  if (store_ && work->getFuture()->hasError()) {
    // A peer's connection closed (it failed and exited) or the collective timed
    // out: a recorded failure explains it. The failing rank records before it
    // fails its bucket, so before its connections close: a short look suffices
    // (a long one would let torchrun's SIGTERM overtake this rank's error path).
    for (int i = 0; i < 2; ++i) {
      check_peers();
      if (i == 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    collective_broke_ = true;
  }
  work->wait();  // rethrows the collective's own error
}

void HookGroup::wait(const c10::intrusive_ptr<c10d::Work>& work) {
  if (!store_) {
    work->wait();
    return;
  }
  struct Done {
    std::mutex mutex;
    std::condition_variable cv;
    bool done = false;
  };
  auto done = std::make_shared<Done>();
  work->getFuture()->addCallback([done](c10::ivalue::Future&) {
    std::lock_guard<std::mutex> lock(done->mutex);
    done->done = true;
    done->cv.notify_all();
  });
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(done->mutex);
      if (done->cv.wait_for(lock, slice_, [&] { return done->done; })) break;
    }
    // Slow: a peer may have failed and will never join. One store request per slice.
    check_peers();
  }
  finish(work);
}

bool HookGroup::try_abandon(int64_t verdict, int64_t* decision, bool per_step) {
  if (store_) {
    // Fail fast: no exchange to make; the record tells the peers. Not while the
    // hook waits in a collective: a peer that never joins it is the one stuck (or
    // failed), its record ends this wait, and recording this rank first would
    // name the wrong rank. (The collective's own deadline bounds the wait.)
    std::unique_lock<std::mutex> lock(op_mutex_, std::try_to_lock);
    if (!lock.owns_lock()) return false;
    abandoned_ = true;
    *decision = record_failure(verdict, "did not return in time").verdict;
    return true;
  }
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
  wait(pg_->allreduce(list));
  return tensor;
}

c10::intrusive_ptr<HookWork> HookGroup::start_allreduce(at::Tensor tensor) {
  auto lock = begin_collective();
  control_before_collective();
  std::vector<at::Tensor> list{tensor};
  auto work = pg_->allreduce(list);
  auto self = c10::intrusive_ptr<HookGroup>::reclaim_copy(this);
  if (store_) return c10::make_intrusive<HookWork>(std::move(self), std::move(work), std::move(tensor));
  wait(work);
  return c10::make_intrusive<HookWork>(std::move(self), nullptr, std::move(tensor));
}

void HookGroup::wait_started(const c10::intrusive_ptr<c10d::Work>& work) {
  // Under the collective lock, as a collective the hook waits in: the watchdog
  // does not take this rank for the stuck one while a peer keeps it waiting.
  auto lock = begin_collective();
  wait(work);
}

at::Tensor HookWork::wait() {
  if (work_) {
    group_->wait_started(work_);
    settled();
  }
  return result();
}

at::Tensor HookWork::settle() {
  if (work_) {
    group_->finish(work_);
    settled();
  }
  return result();
}

void HookWork::settled() {
  work_.reset();
  if (out_.defined()) out_.copy_(tensor_);
}

c10::intrusive_ptr<HookWork> HookWork::into(at::Tensor out) {
  TORCH_CHECK(!out_.defined(), "Work.into: already given a tensor to write the result into");
  TORCH_CHECK(out.sizes() == tensor_.sizes() && out.device() == tensor_.device(), "Work.into: the result is ",
              tensor_.sizes(), " on ", tensor_.device(), ", the tensor to write it into ", out.sizes(), " on ",
              out.device());
  out_ = std::move(out);
  if (!work_) out_.copy_(tensor_);  // done already
  return c10::intrusive_ptr<HookWork>::reclaim_copy(this);
}

std::vector<at::Tensor> HookGroup::allgather(at::Tensor tensor) {
  auto lock = begin_collective();
  control_before_collective();
  std::vector<std::vector<at::Tensor>> out(1);
  for (int64_t r = 0; r < world_size(); ++r) out[0].push_back(at::empty_like(tensor));
  std::vector<at::Tensor> in{tensor};
  wait(pg_->allgather(out, in));
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
  wait(pg_->broadcast(list, options));
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
  // Work first: Group's methods return it.
  m.class_<HookWork>("Work")
      .def("wait", &HookWork::wait)
      .def("into", &HookWork::into);
  m.class_<HookGroup>("Group")
      .def("rank", &HookGroup::rank)
      .def("world_size", &HookGroup::world_size)
      .def("allreduce", &HookGroup::allreduce)
      .def("allgather", &HookGroup::allgather)
      .def("broadcast", &HookGroup::broadcast)
      .def("start_allreduce", &HookGroup::start_allreduce);
  m.class_<HookBucket>("Bucket")
      .def("buffer", &HookBucket::buffer)
      .def("index", &HookBucket::index)
      .def("is_last", &HookBucket::is_last)
      .def("offsets", &HookBucket::offsets)
      .def("lengths", &HookBucket::lengths)
      .def("sizes", &HookBucket::sizes);
}

}  // namespace ftcomm
