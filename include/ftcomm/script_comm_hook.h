// Scripted hooks inside c10d::Reducer: ScriptCommHook, a
// c10d::CppCommHookInterface that runs a ScriptHook on its own worker thread with
// the per-bucket agreement (a hook failing or stuck on some ranks fails or falls
// back on all of them) and a per-call deadline; and agree_on_hook, the digest
// check every rank makes before the first step.
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include "ftcomm/script_hook.h"

namespace ftcomm {

enum class OnHookError { kFail, kFallback };

struct ScriptCommHookOptions {
  // After every bucket all ranks agree (one small allreduce) on whether each
  // rank's hook ran and returned a finite tensor of the bucket's shape, dtype and
  // device, so a bad result never leaves ranks out of step. Then either every rank
  // fails with the same error (kFail) or every rank replaces the bucket's result
  // with a plain mean allreduce of the original gradients (kFallback, which keeps
  // a copy of each bucket) and logs it once.
  bool agree_per_bucket = true;
  // Also treat a result with NaN or Inf as a failure. A full pass over every
  // bucket (it took a 50 MB model's step from 121 to 183 ms on this project's
  // 2-core CI machine), so off in training and on in `ftcomm hook check`; a non-finite
  // result does not desync ranks by itself.
  bool check_finite = false;
  OnHookError on_error = OnHookError::kFail;
  // A hook call that has not returned after this long fails its bucket: with the
  // agreement on, on every rank at once, naming the hook and the stuck rank
  // (whatever on_error says: the stuck thread cannot be stopped, so this hook
  // object takes no further buckets and the process should exit). Keep it below
  // the group's timeout, so that peers waiting at the agreement hear of it before
  // their own wait ends (ftcomm train uses half of --timeout). Zero: unbounded.
  std::chrono::milliseconds hook_timeout{std::chrono::seconds(30)};
};

// A ScriptHook registered with c10d::Reducer::register_comm_hook. runHook copies
// what it needs of the bucket and returns at once; the hook runs on this object's
// one worker thread, in bucket order, so collectives stay matched across ranks.
class ScriptCommHook : public c10d::CppCommHookInterface<c10::intrusive_ptr<c10d::ProcessGroup>> {
 public:
  ScriptCommHook(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::shared_ptr<ScriptHook> hook,
                 ScriptCommHookOptions options = {});
  ~ScriptCommHook() override;
  c10::intrusive_ptr<c10::ivalue::Future> runHook(c10d::GradBucket& bucket) override;
  const std::shared_ptr<ScriptHook>& hook() const { return hook_; }
  int64_t fallbacks() const;
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
