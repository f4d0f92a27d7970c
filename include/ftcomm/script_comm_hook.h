// Scripted hooks inside c10d::Reducer: ScriptCommHook, a
// c10d::CppCommHookInterface that runs a ScriptHook on its own worker thread with
// an agreement (a hook failing or stuck on some ranks fails or falls back on all
// of them; per collective, or per step on NCCL) and a per-call deadline; and
// agree_on_hook, the digest check every rank makes before the first step.
#pragma once

#include <chrono>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include "ftcomm/errors.h"
#include "ftcomm/script_hook.h"

namespace ftcomm {

enum class OnHookError { kFail, kFallback };

// How the ranks keep a hook that fails on some ranks only (throws, returns a
// wrong shape, dtype or device, or does not return in time) from leaving the
// others waiting: either every rank fails with the same error, naming the hook
// and the failing rank, or every rank falls back (kFallback).
enum class HookAgreement {
  // Under OnHookError::kFail: kPerStep for CUDA buckets on NCCL, kFailFast for
  // CPU buckets (where the group has a store); else kPerCollective: the
  // safe choice at the lowest cost for each backend.
  kAuto,
  // A control exchange (a 1-element allreduce on the CPU) before each of the
  // hook's collectives and one after each bucket. A failure stops every rank at
  // the same point, the group stays usable, and kFallback is possible. The host
  // waits for each exchange, so on NCCL it costs a host round trip per collective.
  kPerCollective,
  // The hook's collectives go straight to the device's stream; the ranks
  // exchange one value per step, after its last bucket, and the step's futures
  // complete only after it (so no rank uses a step that failed elsewhere). On a
  // failure every rank aborts the group's device communicator (NCCL's abort ends
  // a collective a peer will never join) and fails with the same error; the
  // group is unusable afterwards and the job restarts (ftcomm train and
  // FaultTolerant recover). kFail only. The exchange must travel apart from the
  // hook's collectives: NCCL buckets (the exchange is on Gloo), or a separate
  // control group.
  kPerStep,
  // No exchange at all (Gloo's choice under kFail): the hook's collectives go
  // straight to the group. A rank whose hook fails (throws, returns a bad result,
  // or passes its deadline) records why in the job's store (the first record
  // wins) and fails that bucket and every later one; a rank waiting in a
  // collective looks at the store whenever the collective has taken longer than
  // a short slice, or has failed (the failing rank's connections closed), and
  // fails with the recorded reason. Every rank reports the same hook, rank,
  // bucket and reason. The group is unusable afterwards (a collective may stay
  // pending on it) and the job restarts; kFail only. Costs nothing per
  // collective: a look at the store only while a collective is slow.
  kFailFast,
  // No agreement: for trusted hooks only; a failure on one rank can leave the
  // others waiting until the group's timeout.
  kOff,
};

// Parses "auto", "per-collective", "per-step", "fail-fast" or "off" (and "on" = "auto");
// throws naming the accepted values otherwise.
HookAgreement parse_hook_agreement(const std::string& name);
const char* hook_agreement_name(HookAgreement agreement);

struct ScriptCommHookOptions {
  HookAgreement agreement = HookAgreement::kAuto;
  // Where the agreement's exchanges travel (its CPU backend); null: the hook's
  // group. A separate group lets kPerStep run where the hook's collectives are on
  // Gloo too (tests).
  c10::intrusive_ptr<c10d::ProcessGroup> control_group;
  // Where kFailFast records a failure; null: the store the group was made with
  // (ProcessGroup::getStore(); every rank of the group shares it).
  c10::intrusive_ptr<c10d::Store> failure_store;
  // Also treat a result with NaN or Inf as a failure. A full pass over every
  // bucket (it took a 50 MB model's step from 121 to 183 ms on this project's
  // 2-core CI machine), so off in training and on in `ftcomm hook check`; a non-finite
  // result does not desync ranks by itself.
  bool check_finite = false;
  OnHookError on_error = OnHookError::kFail;
  // A hook call that has not returned after this long fails its bucket: with an
  // agreement, on every rank at once, naming the hook and the stuck rank
  // (whatever on_error says: the stuck thread cannot be stopped, so this hook
  // object takes no further buckets and the process should exit). Keep it below
  // the group's timeout, so that peers waiting at the agreement hear of it before
  // their own wait ends (ftcomm train uses half of --timeout). Zero: unbounded.
  std::chrono::milliseconds hook_timeout{std::chrono::seconds(30)};
  // What a failed bucket's future holds; empty: a HookError. The Python extension
  // makes it one that Python raises as ftcomm.HookError.
  std::function<std::exception_ptr(const HookFailure&)> make_error;
};

// A ScriptHook registered with c10d::Reducer::register_comm_hook. runHook copies
// what it needs of the bucket and returns at once; the hook runs on this object's
// one worker thread, in bucket order, so collectives stay matched across ranks,
// and a hook that never returns holds that thread, not the autograd thread. The
// thread also keeps the hook's host work (TorchScript, enqueueing collectives) off
// the autograd thread, which launches backward's kernels meanwhile. On CUDA the
// hook's work goes on a stream of its own (as c10d's collectives go on theirs), so
// backward's stream never waits for the hook's collectives; the futures carry
// events for the Reducer's stream.
class ScriptCommHook : public c10d::CppCommHookInterface<c10::intrusive_ptr<c10d::ProcessGroup>> {
 public:
  ScriptCommHook(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::shared_ptr<ScriptHook> hook,
                 ScriptCommHookOptions options = {});
  ~ScriptCommHook() override;
  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override;
  const std::shared_ptr<ScriptHook>& hook() const { return hook_; }
  int64_t fallbacks() const;
  // The agreement in force: options.agreement, with kAuto resolved once the first
  // bucket shows its device (kAuto until then).
  HookAgreement agreement() const;
  // Seconds the worker has spent running the hook (its compute and collectives).
  double busy_seconds() const;

 private:
  struct Worker;
  std::shared_ptr<ScriptHook> hook_;
  std::shared_ptr<Worker> worker_;  // shared with its threads: a stuck one outlives this object
};

// All ranks compare the hook's digest before the first step: throws on every rank,
// naming the ranks and both digests, on a mismatch; and when `pinned` is not
// empty, refuses a digest that is not in it.
void agree_on_hook(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const ScriptHook& hook,
                   const std::vector<std::string>& pinned = {});

}  // namespace ftcomm
