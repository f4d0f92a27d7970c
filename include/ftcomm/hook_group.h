// What a scripted hook sees: the TorchScript classes ftcomm.Group (the ranks and
// their collectives) and ftcomm.Bucket (one gradient bucket). Registered with
// TorchScript by libftcomm (TORCH_LIBRARY(ftcomm)); see script_hook.h for the hook
// contract.
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/custom_class.h>

namespace ftcomm {

// What a hook sees of the group, as TorchScript class ftcomm.Group. Collectives
// are synchronous inside the hook (class_ methods cannot return a Future); hooks
// run on ScriptCommHook's worker thread, never on the autograd thread.
//
// Guarded mode (ScriptCommHook's per-bucket agreement): before each collective the
// ranks exchange one control value (a 1-element MAX allreduce), and a rank whose
// hook failed sends its failure there instead. So when a hook fails on some ranks
// only, at any point, every rank learns it at the same control exchange and no
// rank is left waiting in a collective the others never join.
class HookGroup : public torch::CustomClassHolder {
 public:
  explicit HookGroup(c10::intrusive_ptr<c10d::ProcessGroup> pg) : pg_(std::move(pg)) {}
  int64_t rank() const { return pg_->getRank(); }
  int64_t world_size() const { return pg_->getSize(); }
  at::Tensor allreduce(at::Tensor tensor);                   // sum, in place; returns it
  std::vector<at::Tensor> allgather(at::Tensor tensor);      // one tensor per rank
  at::Tensor broadcast(at::Tensor tensor, int64_t root);     // in place; returns it

  // For ScriptCommHook: start a bucket in guarded mode; exchange this rank's
  // verdict (0 = ok, else encode_verdict()) unless the bucket is already decided;
  // and the decision: 0 when every rank was fine, else the largest verdict.
  void begin_guarded();
  int64_t conclude(int64_t verdict);
  // For ScriptCommHook's watchdog, when this rank's hook call passed its
  // deadline: unless the hook is inside one of its collectives (which have their
  // own deadline), stops the hook from starting any further collective and, in
  // guarded mode, concludes the bucket with `verdict` for it. False when the hook
  // is inside a collective (try again later).
  bool try_abandon(int64_t verdict, int64_t* decision);
  // Verdicts: a hook that failed (threw, bad result) or that did not return in time.
  enum class Failure { kError = 0, kStuck = 1 };
  int64_t encode_verdict(Failure why) const { return 1 + rank() + world_size() * static_cast<int64_t>(why); }
  Failure failure_of(int64_t decision) const { return static_cast<Failure>((decision - 1) / world_size()); }
  int64_t rank_of(int64_t decision) const { return (decision - 1) % world_size(); }
  // Whether this bucket was stopped at a control exchange because another rank
  // had failed (this rank's hook then saw an error it did not cause).
  bool stopped_by_peer() const { return stopped_by_peer_; }

 private:
  // Takes op_mutex_ for one collective (with its control exchange).
  std::unique_lock<std::mutex> begin_collective();
  void control_before_collective();
  int64_t exchange(int64_t value);
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  std::mutex op_mutex_;     // held by the worker during each collective
  bool abandoned_ = false;  // the watchdog gave up on this hook call
  bool guarded_ = false;
  int64_t decision_ = -1;  // -1: undecided
  bool stopped_by_peer_ = false;
};

// What a hook sees of a gradient bucket, as TorchScript class ftcomm.Bucket.
class HookBucket : public torch::CustomClassHolder {
 public:
  HookBucket(at::Tensor buffer, int64_t index, bool is_last, std::vector<int64_t> offsets,
             std::vector<int64_t> lengths, std::vector<std::vector<int64_t>> sizes)
      : buffer_(std::move(buffer)), index_(index), is_last_(is_last), offsets_(std::move(offsets)),
        lengths_(std::move(lengths)), sizes_(std::move(sizes)) {}
  static c10::intrusive_ptr<HookBucket> from(c10d::GradBucket& bucket);
  at::Tensor buffer() const { return buffer_; }
  int64_t index() const { return index_; }
  bool is_last() const { return is_last_; }
  std::vector<int64_t> offsets() const { return offsets_; }
  std::vector<int64_t> lengths() const { return lengths_; }
  std::vector<std::vector<int64_t>> sizes() const { return sizes_; }

 private:
  at::Tensor buffer_;
  int64_t index_;
  bool is_last_;
  std::vector<int64_t> offsets_, lengths_;
  std::vector<std::vector<int64_t>> sizes_;
};

}  // namespace ftcomm
