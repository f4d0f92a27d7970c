// What a scripted hook sees: the TorchScript classes ftcomm.Group (the ranks and
// their collectives) and ftcomm.Bucket (one gradient bucket). Registered with
// TorchScript by libftcomm (TORCH_LIBRARY(ftcomm)); see script_hook.h for the hook
// contract.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>
#include <torch/custom_class.h>

namespace ftcomm {

// What a hook sees of the group, as TorchScript class ftcomm.Group. Collectives
// are synchronous inside the hook as far as the host can tell (class_ methods
// cannot return a Future): on NCCL they are enqueued on the device's stream and
// the call returns at once; on Gloo it returns once the data is there. Hooks run
// on ScriptCommHook's worker thread, never on the autograd thread.
//
// How a hook failing on some ranks only is kept from leaving the others waiting
// (ScriptCommHook picks the mode, see HookAgreement):
// - per collective: before each collective the ranks exchange one control value
//   (a 1-element MAX allreduce on the control group), and a rank whose hook failed
//   sends its failure there instead, so every rank learns it at the same exchange
//   and none is left in a collective the others never join. After the bucket,
//   one more exchange concludes it.
// - per step: the hook's collectives go straight to the device's stream, and the
//   ranks exchange one value per step, after the step's last bucket. A failure is
//   carried to that exchange (the failing rank runs no further hooks that step),
//   and the caller then aborts the communicator on every rank, which ends any
//   collective that a peer enqueued and this rank never will.
// - fail fast: no exchange. A failing rank records its verdict and reason in the
//   store (record_failure); a collective that is slow, or fails, looks there and
//   ends with the recorded failure (stopped_by_peer).
class HookWork;

class HookGroup : public torch::CustomClassHolder {
 public:
  // `control` carries the agreement's exchanges (its CPU backend); null: `pg`.
  // Per step, the hook's collectives must not share a queue with them (NCCL data,
  // Gloo control: they do not).
  explicit HookGroup(c10::intrusive_ptr<c10d::ProcessGroup> pg, c10::intrusive_ptr<c10d::ProcessGroup> control = {})
      : pg_(std::move(pg)), control_(control ? std::move(control) : pg_) {}
  int64_t rank() const { return pg_->getRank(); }
  int64_t world_size() const { return pg_->getSize(); }
  at::Tensor allreduce(at::Tensor tensor);                   // sum, in place; returns it
  std::vector<at::Tensor> allgather(at::Tensor tensor);      // one tensor per rank
  at::Tensor broadcast(at::Tensor tensor, int64_t root);     // in place; returns it
  // allreduce, started and not waited for: the hook goes on (or returns the
  // Work, and its bucket is done when the sum is), as c10d's built-in hooks
  // return their collective's future. Gloo then carries several buckets at
  // once. Failing fast only; under the other agreements it waits here (their
  // exchanges need the bucket settled), and the Work is done when returned.
  c10::intrusive_ptr<HookWork> start_allreduce(at::Tensor tensor);

  // Per collective, for ScriptCommHook: start a bucket in guarded mode; exchange
  // this rank's verdict (0 = ok, else encode_verdict()) unless the bucket is
  // already decided; and the decision: 0 when every rank was fine, else the
  // largest verdict.
  void begin_guarded();
  int64_t conclude(int64_t verdict);
  // Per step, for ScriptCommHook: a bucket of the step begins (the first one
  // opens the step); and the step's one exchange (this rank's verdict for the whole step).
  // Returns the decision, which the watchdog may already have made for this rank.
  void begin_step();
  int64_t conclude_step(int64_t verdict);
  // For ScriptCommHook's watchdog, when this rank's hook call passed its
  // deadline: stops the hook from starting any further collective and concludes
  // what is open (the bucket, per collective; the step, per step) with `verdict`.
  // Per collective, not while the hook is inside one of its collectives (they
  // have their own deadline): false then (try again later). Per step the exchange
  // travels apart from the hook's collectives, so it never waits for them.
  bool try_abandon(int64_t verdict, int64_t* decision, bool per_step);
  // Verdicts, larger wins: a hook that did not return in time, or one that failed
  // (threw, bad result), so a root cause outranks a rank stuck behind it.
  enum class Failure { kStuck = 0, kError = 1 };
  static constexpr int64_t kMaxBuckets = int64_t(1) << 20;
  int64_t encode_verdict(Failure why, int64_t bucket) const {
    const int64_t b = std::min<int64_t>(std::max<int64_t>(bucket, 0), kMaxBuckets - 1);
    return 1 + rank() + world_size() * (b + kMaxBuckets * static_cast<int64_t>(why));
  }
  Failure failure_of(int64_t decision) const {
    return static_cast<Failure>((decision - 1) / world_size() / kMaxBuckets);
  }
  int64_t bucket_of(int64_t decision) const { return (decision - 1) / world_size() % kMaxBuckets; }
  int64_t rank_of(int64_t decision) const { return (decision - 1) % world_size(); }
  // Whether this bucket was stopped at a control exchange because another rank
  // had failed (this rank's hook then saw an error it did not cause).
  bool stopped_by_peer() const { return stopped_by_peer_; }
  // For a collective started by start_allreduce (HookWork and the hook's worker).
  // Failing fast: one look for a recorded failure; throws as a collective
  // stopped by a peer does when there is one.
  void check_peers();
  // Once it is done: throws the collective's error, explained by a recorded
  // failure if there is one.
  void finish(const c10::intrusive_ptr<c10d::Work>& work);
  // Waits for a started collective as the hook's own collectives wait.
  void wait_started(const c10::intrusive_ptr<c10d::Work>& work);
  std::chrono::milliseconds slice() const { return slice_; }

  // Whether the watchdog has begun to abandon the hook call (try_abandon acted):
  // its collectives now throw, and whatever the call returns is moot.
  bool abandoned() const { return abandoned_; }

  // Fail fast: failures are recorded under `key` in `store`, and a collective
  // waits in slices of `slice`, looking for a record between them.
  void set_fail_fast(c10::intrusive_ptr<c10d::Store> store, std::string key,
                     std::chrono::milliseconds slice = std::chrono::milliseconds(50));
  // Records this rank's failure unless one is recorded already (the first
  // wins: the root cause). Returns the record in force. When it is this rank's,
  // waits (at most kAcknowledgeWait) until every peer has found it, so that each
  // reports the recorded reason before this rank's exit gets torchrun to stop
  // them; a peer that found a record acknowledges it.
  struct Record {
    int64_t verdict = 0;  // 0: none
    std::string reason;
  };
  Record record_failure(int64_t verdict, const std::string& reason);
  // The record, if any (verdict 0: none). One store request.
  Record recorded_failure();
  // The record that stopped a collective of this rank (stopped_by_peer()).
  const Record& peer_record() const { return peer_record_; }
  // Fail fast: a collective of this rank failed with no failure on record (a
  // peer's process died, or the group's timeout passed): not this hook's fault,
  // and not recorded as such.
  bool collective_broke() const { return collective_broke_; }

 private:
  static constexpr std::chrono::milliseconds kAcknowledgeWait{2000};
  void acknowledge();
  void wait_for_acknowledgements();
  // Takes op_mutex_ for one collective (with its control exchange).
  std::unique_lock<std::mutex> begin_collective();
  void control_before_collective();
  int64_t exchange(int64_t value);
  // Waits for a collective: at once, or (fail fast) in slices, looking for a
  // recorded failure between them and after a failure of the collective.
  void wait(const c10::intrusive_ptr<c10d::Work>& work);
  void stop_for(const Record& record);  // throws
  c10::intrusive_ptr<c10d::ProcessGroup> pg_, control_;
  std::mutex op_mutex_;     // held by the worker during each collective
  std::atomic<bool> abandoned_{false};  // the watchdog gave up on this hook call
  bool guarded_ = false;
  int64_t decision_ = -1;  // -1: undecided
  bool stopped_by_peer_ = false;
  // Per step: the one exchange of a step, by the worker or by the watchdog.
  std::mutex step_mutex_;
  bool step_open_ = false;     // a bucket of this step has begun; its exchange is owed
  bool step_decided_ = false;  // the watchdog made this rank's exchange
  int64_t step_decision_ = 0;
  // Fail fast.
  c10::intrusive_ptr<c10d::Store> store_;
  std::string key_;
  std::chrono::milliseconds slice_{50};
  Record peer_record_;
  bool collective_broke_ = false;
  std::atomic<bool> acknowledged_{false};
};

// A collective a hook started (Group.start_allreduce), as TorchScript class
// ftcomm.Work. A hook may wait() for it, or return it: the bucket's result is then
// its tensor once the collective is done, and the hook's worker takes the next
// bucket meanwhile. into(out) copies the result into `out` (in out's dtype) when
// done, and makes `out` the result: a compressed bucket written back.
class HookWork : public torch::CustomClassHolder {
 public:
  HookWork(c10::intrusive_ptr<HookGroup> group, c10::intrusive_ptr<c10d::Work> work, at::Tensor tensor)
      : group_(std::move(group)), work_(std::move(work)), tensor_(std::move(tensor)) {}
  // The result, once the collective is done (failing fast, a peer's recorded
  // failure ends the wait). Idempotent.
  at::Tensor wait();
  c10::intrusive_ptr<HookWork> into(at::Tensor out);
  // The tensor wait() returns (the data is there once it has).
  const at::Tensor& result() const { return out_.defined() ? out_ : tensor_; }
  // Null once done (or when it never was in flight).
  const c10::intrusive_ptr<c10d::Work>& pending() const { return work_; }
  // For the hook's worker, once the collective's future has completed: settles
  // the result as wait() would, throwing the collective's error.
  at::Tensor settle();

 private:
  void settled();  // the collective is done: drops it, writes the result into out_
  c10::intrusive_ptr<HookGroup> group_;
  c10::intrusive_ptr<c10d::Work> work_;  // null once settled
  at::Tensor tensor_, out_;
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
