#include "ftcomm/script_comm_hook.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "control.h"
#include "hook_text.h"
#include "log.h"

namespace ftcomm {

using detail::first_line;
using detail::script_error;

HookAgreement parse_hook_agreement(const std::string& name) {
  if (name == "auto" || name == "on") return HookAgreement::kAuto;
  if (name == "per-collective") return HookAgreement::kPerCollective;
  if (name == "per-step") return HookAgreement::kPerStep;
  if (name == "fail-fast") return HookAgreement::kFailFast;
  if (name == "off") return HookAgreement::kOff;
  TORCH_CHECK(false, "unknown hook agreement '", name, "': use auto, per-collective, per-step, fail-fast or off");
}

const char* hook_agreement_name(HookAgreement agreement) {
  switch (agreement) {
    case HookAgreement::kAuto: return "auto";
    case HookAgreement::kPerCollective: return "per-collective";
    case HookAgreement::kPerStep: return "per-step";
    case HookAgreement::kFailFast: return "fail-fast";
    case HookAgreement::kOff: return "off";
  }
  return "?";
}

namespace {

// The store the group was made with, which every rank of the group shares;
// null when there is none.
c10::intrusive_ptr<c10d::Store> failure_store_of(const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  try {
    return pg->getStore();
  } catch (const std::exception&) {
    return {};
  }
}

// The number of this hook among the hooks this rank made on the group whose
// store this is: ranks make their hooks in the same order (register_hook is a
// collective), so the same hook gets the same number on every rank.
int64_t next_hook_number(const c10::intrusive_ptr<c10d::Store>& store, int rank) {
  return store->add("ftcomm/hooks-made/rank" + std::to_string(rank), 1) - 1;
}

}  // namespace

struct ScriptCommHook::Worker : std::enable_shared_from_this<ScriptCommHook::Worker> {
  struct Task {
    c10::intrusive_ptr<HookBucket> bucket;
    at::Tensor original;  // a copy for kFallback
    // CUDA buckets: recorded on the caller's stream once the gradients are in the
    // bucket; the hook's stream waits on it before the hook runs.
    std::unique_ptr<c10::Event> ready;
    c10::intrusive_ptr<c10::ivalue::Future> future;
  };
  Worker(std::shared_ptr<ScriptHook> h, ScriptCommHookOptions o, c10::intrusive_ptr<c10d::ProcessGroup> p)
      : hook(std::move(h)), options(o), pg(std::move(p)),
        group(c10::make_intrusive<HookGroup>(pg, options.control_group)) {}
  void run();       // the worker thread: runs queued buckets in order
  void watch();     // the watchdog thread: bounds each hook call
  void process(Task& task);
  // The stream the hook's work goes on for buckets on `device`: one of its own,
  // so the caller's stream (backward's) never waits for the hook's collectives.
  c10::Stream hook_stream(const at::Device& device) {
    if (!stream || stream->device() != device) {
      stream = c10::impl::VirtualGuardImpl(device.type()).getStreamFromGlobalPool(device, /*isHighPriority=*/false);
    }
    return *stream;
  }
  void process_per_collective(Task& task, bool agree);
  void process_per_step(Task& task);
  void process_fail_fast(Task& task);
  // Fail fast, once the bucket's result is there (or `error` says why not):
  // completes the task's future, or fails it with the failure every rank reports.
  void conclude_fail_fast(Task& task, const at::Tensor& result, const std::string& error);
  // Fail fast: a bucket whose hook returned a collective still in flight; the
  // worker takes the next bucket meanwhile and settles these in order.
  struct InFlight {
    Task task;
    c10::intrusive_ptr<HookWork> work;
  };
  // Under `mutex`: whether the oldest bucket in flight is done.
  bool front_done() const {
    return !in_flight.empty() && in_flight.front().work->pending()->getFuture()->completed();
  }
  void settle(InFlight& item);
  // Runs the hook on the task's bucket under the watchdog: `error` is empty when
  // it returned a tensor of the bucket's shape, dtype and device. False when the
  // watchdog gave up on the call meanwhile (it has failed the future). `started`
  // (when given): a collective the hook returned still in flight, whose result
  // `result` will hold; without it, the call waits for it.
  bool call(Task& task, at::Tensor& result, std::string& error, c10::intrusive_ptr<HookWork>* started = nullptr);
  // The agreement for buckets on `device` (kAuto resolved); throws if it cannot serve them.
  HookAgreement resolve(const at::Device& device) const;
  // Per step, once the ranks decided a failure: aborts the communicator serving
  // `device`, so no collective this rank enqueued waits for a peer that will not
  // join it; later buckets fail at once.
  void abort_device(const at::Device& device, const std::string& why);
  // Fails the task's future unless something already completed it (the
  // watchdog and the worker may both reach a task the watchdog gave up on).
  void fail(Task& task, const HookFailure& failure) {
    task.future->setErrorIfNeeded(error_of(failure));
  }
  // A failure that is not one rank's (rank and bucket unknown).
  void fail(Task& task, const std::string& message) { fail(task, general(message)); }
  HookFailure general(const std::string& message) const { return HookFailure{message, hook->name()}; }
  std::exception_ptr error_of(const HookFailure& failure) const {
    return options.make_error ? options.make_error(failure) : std::make_exception_ptr(HookError(failure));
  }
  // Under `mutex`: whether the watchdog gave up on this hook object; if so, fails
  // `task` with the reason every other bucket got.
  bool fail_if_abandoned(Task& task) {
    if (!abandoned) return false;
    fail(task, abandon_failure);
    return true;
  }
  std::string seconds(std::chrono::milliseconds d) const {
    char text[32];
    std::snprintf(text, sizeof(text), "%g", std::chrono::duration<double>(d).count());
    return text;
  }
  HookFailure stuck_failure(int64_t stuck_rank, int64_t bucket) const {
    return HookFailure{"hook " + hook->name() + " did not return within " + seconds(options.hook_timeout) +
                           " s on rank " + std::to_string(stuck_rank) + " in bucket " + std::to_string(bucket) +
                           " (stuck: an endless loop, or far too slow for the job's --timeout); every rank stops "
                           "here. Fix the hook, or raise --timeout",
                       hook->name(), stuck_rank, bucket, /*stuck=*/true};
  }
  // The error every rank reports for a decided failure: the hook, the failing
  // rank and the bucket; a rank that failed itself names itself, with its reason
  // (`own_error`, in bucket `own_bucket`).
  HookFailure decided_failure(int64_t decision, const std::string& own_error, int64_t own_bucket,
                              const std::string& peer_reason = "") const {
    const bool mine = !own_error.empty();
    const int64_t who = mine ? group->rank() : group->rank_of(decision);
    const int64_t bucket = mine ? own_bucket : group->bucket_of(decision);
    // Failing fast, the ranks learn it from the failing rank's record.
    const std::string how = mode == HookAgreement::kFailFast
                                ? " (the ranks agreed: recorded by rank " + std::to_string(who) + ")"
                                : " (the ranks agreed)";
    if (!mine && group->failure_of(decision) == HookGroup::Failure::kStuck) {
      HookFailure stuck = stuck_failure(who, bucket);
      stuck.message += how;
      return stuck;
    }
    const std::string reason = mine ? own_error : peer_reason;
    return HookFailure{"hook " + hook->name() + " failed on rank " + std::to_string(who) +
                           (reason.empty() ? "" : " (" + reason + ")") + " in bucket " + std::to_string(bucket) +
                           "; every rank stops here" + how + ". Fix the hook" +
                           (options.on_error == OnHookError::kFail && mode == HookAgreement::kPerCollective
                                ? ", or run with the fallback policy" : ""),
                       hook->name(), who, bucket};
  }

  const std::shared_ptr<ScriptHook> hook;
  const ScriptCommHookOptions options;
  const c10::intrusive_ptr<c10d::ProcessGroup> pg;
  const c10::intrusive_ptr<HookGroup> group;

  std::mutex mutex;  // the queue, stop, abandoned, broken, mode, and the call in progress
  std::condition_variable ready, call_changed;
  std::deque<Task> queue;
  std::deque<InFlight> in_flight;  // fail fast: buckets whose collective is still running
  bool stop = false;
  bool abandoned = false;  // the watchdog gave up on a stuck call; the worker thread is lost
  HookFailure abandon_failure;  // why, for every bucket after it
  std::string broken;      // per step: why the device communicator was aborted
  HookAgreement mode = HookAgreement::kAuto;  // resolved at the first bucket
  bool in_call = false;    // the hook is running
  std::chrono::steady_clock::time_point call_start;
  int64_t call_bucket = 0;
  at::Device call_device = at::kCPU;
  c10::intrusive_ptr<c10::ivalue::Future> call_future;
  int64_t fallbacks = 0;
  std::atomic<int64_t> busy_ns{0};
  std::optional<c10::Stream> stream;  // see hook_stream(); worker thread only
  // Per step (worker thread only): this step's first failure on this rank.
  int64_t step_verdict = 0;
  std::string step_error;
  // Fail fast (worker thread only): the failure every later bucket reports.
  std::optional<HookFailure> failed;
  // Where kFailFast records failures (set before the threads start).
  c10::intrusive_ptr<c10d::Store> failure_store;
  std::string failure_key;
  std::thread thread, watchdog;
};

void ScriptCommHook::Worker::run() {
  while (true) {
    std::optional<Task> task;
    std::optional<InFlight> done;
    bool look = false;  // the oldest collective in flight is slow: look for a peer's failure
    {
      std::unique_lock<std::mutex> lock(mutex);
      auto woken = [&] { return stop || abandoned || !queue.empty() || front_done(); };
      if (in_flight.empty()) {
        ready.wait(lock, woken);
      } else if (!ready.wait_for(lock, group->slice(), woken)) {
        look = true;
      }
      if (abandoned) return;
      if (!queue.empty()) {
        // A new bucket first: its hook runs while earlier collectives finish.
        task = std::move(queue.front());
        queue.pop_front();
        look = false;
      } else if (front_done()) {
        done = std::move(in_flight.front());
        in_flight.pop_front();
      } else if (stop) {
        for (auto& item : in_flight) fail(item.task, "hook " + hook->name() + ": the hook was destroyed");
        return;
      }
    }
    if (task) {
      const auto started = std::chrono::steady_clock::now();
      process(*task);
      busy_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count();
    } else if (done) {
      settle(*done);
    } else if (look) {
      // Slow: a peer may have failed and will never join. One store request per
      // slice; a record fails the oldest bucket, and with it those behind it.
      try {
        group->check_peers();
      } catch (const std::exception& e) {
        InFlight oldest;
        {
          std::lock_guard<std::mutex> lock(mutex);
          oldest = std::move(in_flight.front());
          in_flight.pop_front();
        }
        conclude_fail_fast(oldest.task, {}, first_line(e.what()));
      }
    }
    std::lock_guard<std::mutex> lock(mutex);
    if (abandoned) return;  // a call the watchdog gave up on came back after all
  }
}

void ScriptCommHook::Worker::settle(InFlight& item) {
  at::Tensor result;
  std::string error;
  try {
    result = item.work->settle();
  } catch (const std::exception& e) {
    error = first_line(e.what());
  }
  conclude_fail_fast(item.task, result, error);
}

HookAgreement ScriptCommHook::Worker::resolve(const at::Device& device) const {
  bool nccl = false;
  if (device.is_cuda()) {
    try {
      nccl = pg->getBackend(device.type())->getBackendName() == "nccl";
    } catch (const std::exception&) {
      nccl = false;  // no backend registered for the device
    }
  }
  if (options.agreement == HookAgreement::kAuto) {
    if (options.on_error != OnHookError::kFail) return HookAgreement::kPerCollective;
    if (nccl) return HookAgreement::kPerStep;
    return !device.is_cuda() && failure_store ? HookAgreement::kFailFast : HookAgreement::kPerCollective;
  }
  TORCH_CHECK(options.agreement != HookAgreement::kFailFast || failure_store, "hook ", hook->name(),
              ": the fail-fast agreement records failures in the group's store, and this group has none that ftcomm "
              "can reach (no Gloo backend); use per-collective");
  TORCH_CHECK(options.agreement != HookAgreement::kFailFast || options.on_error == OnHookError::kFail, "hook ",
              hook->name(), ": the fail-fast agreement cannot fall back (the group is unusable after a failure); use "
              "per-collective with the fallback policy");
  TORCH_CHECK(options.agreement != HookAgreement::kPerStep || nccl || options.control_group,
              "hook ", hook->name(), ": the per-step agreement needs the hook's collectives on NCCL (CUDA buckets), "
              "apart from its exchange on Gloo, or a separate control group; these buckets are on ", device.str(),
              ". Use the per-collective agreement (or auto)");
  return options.agreement;
}

void ScriptCommHook::Worker::process(Task& task) {
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (fail_if_abandoned(task)) return;
  }
  const at::Tensor buffer = task.bucket->buffer();
  // A CUDA hook runs on its own stream, as c10d's collectives run on theirs: a
  // collective's wait() then holds back the hook's later work, not backward's
  // (which would lose the overlap of communication with backward). The futures'
  // events are recorded on it, for the Reducer's stream to wait on.
  c10::OptionalDeviceGuard device_guard;
  c10::OptionalStreamGuard stream_guard;
  if (buffer.is_cuda()) {
    device_guard.reset_device(buffer.device());
    const c10::Stream stream = hook_stream(buffer.device());
    stream_guard.reset_stream(stream);
    task.ready->block(stream);
  }
  if (mode == HookAgreement::kPerStep) {
    process_per_step(task);
  } else if (mode == HookAgreement::kFailFast) {
    process_fail_fast(task);
  } else {
    process_per_collective(task, mode == HookAgreement::kPerCollective);
  }
}

bool ScriptCommHook::Worker::call(Task& task, at::Tensor& result, std::string& error,
                                  c10::intrusive_ptr<HookWork>* started) {
  const at::Tensor buffer = task.bucket->buffer();
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (fail_if_abandoned(task)) return false;
    in_call = true;
    call_start = std::chrono::steady_clock::now();
    call_bucket = task.bucket->index();
    call_device = buffer.device();
    call_future = task.future;
  }
  // The watchdog polls (see watch()): no wake-up per call.
  try {
    HookOutput out = hook->start(group, task.bucket);
    // Checking for non-finite values needs the data: wait for it here.
    if (out.work && (!started || options.check_finite)) {
      result = out.work->wait();
    } else {
      result = out.tensor;
      if (started) *started = std::move(out.work);
    }
    if (result.sizes() != buffer.sizes() || result.scalar_type() != buffer.scalar_type() ||
        result.device() != buffer.device()) {
      std::ostringstream why;
      why << "returned " << result.scalar_type() << result.sizes() << " on " << result.device() << " for a "
          << buffer.scalar_type() << buffer.sizes() << " bucket on " << buffer.device();
      error = why.str();
    } else if (options.check_finite && !at::isfinite(result).all().item<bool>()) {
      error = "returned non-finite values (NaN or Inf)";
    }
  } catch (const std::exception& e) {
    error = std::string("threw: ") + script_error(e.what());
  }
  std::unique_lock<std::mutex> lock(mutex);
  in_call = false;
  call_future.reset();
  // Once the watchdog has begun to give up on this call, what it returns (often
  // the error of a collective the watchdog stopped) is moot: the watchdog's
  // decision stands, and it is made once its exchange is done.
  if (group->abandoned()) call_changed.wait(lock, [&] { return abandoned; });
  // The watchdog gave up on this call while it ran (and has failed its future,
  // unless the call had just come back and it saw another).
  return !fail_if_abandoned(task);
}

void ScriptCommHook::Worker::process_per_collective(Task& task, bool agree) {
  std::string error;
  at::Tensor result;
  if (agree) group->begin_guarded();
  if (!call(task, result, error)) return;
  if (!agree) {
    if (error.empty()) {
      task.future->markCompleted(c10::IValue(result));
    } else {
      fail(task, "hook " + hook->name() + " in bucket " + std::to_string(task.bucket->index()) + ": " + error);
    }
    return;
  }
  // One rank's failure must not leave the others out of step: all decide
  // together (see HookGroup's guarded mode).
  int64_t bad = 0;
  try {
    bad = group->conclude(error.empty() ? 0 : group->encode_verdict(HookGroup::Failure::kError, task.bucket->index()));
  } catch (const std::exception& e) {
    fail(task, "hook " + hook->name() + ": ranks could not agree on bucket " + std::to_string(task.bucket->index()) +
                   ": " + first_line(e.what()));
    return;
  }
  if (bad == 0) {
    task.future->markCompleted(c10::IValue(result));
    return;
  }
  // Name this rank's own failure when it has one (not one it saw because a peer
  // stopped the bucket), else the rank that failed.
  const std::string own = group->stopped_by_peer() ? std::string() : error;
  if (options.on_error == OnHookError::kFallback && group->failure_of(bad) == HookGroup::Failure::kError) {
    std::vector<at::Tensor> plain{task.original};
    pg->allreduce(plain)->wait();
    plain[0].div_(group->world_size());
    // The failed call may have left this bucket's state half-updated on some
    // ranks (a replicated tensor its peers changed and it did not, an error
    // feedback that counts a gradient the fallback already sent): every rank
    // drops it together, and the hook starts the bucket afresh next time.
    const size_t dropped = hook->reset_bucket(task.bucket->index());
    if (fallbacks++ == 0 && (!own.empty() || group->rank() == 0)) {
      const bool mine = !own.empty() && group->rank_of(bad) == group->rank();
      detail::log_line("ftcomm: hook " + hook->name() + " failed on rank " + std::to_string(group->rank_of(bad)) +
                       (mine ? " (" + own + ")" : "") + " in bucket " + std::to_string(task.bucket->index()) +
                       "; every rank falls back to a mean allreduce for such buckets" +
                       (dropped ? " and starts the hook's state of the bucket afresh" : ""));
    }
    task.future->markCompleted(c10::IValue(plain[0]));
  } else {
    fail(task, decided_failure(bad, own, task.bucket->index()));
  }
}

void ScriptCommHook::Worker::process_per_step(Task& task) {
  const at::Tensor buffer = task.bucket->buffer();
  at::Tensor result = buffer;
  group->begin_step();
  // After a failure this step, the rank runs no further hooks and goes straight
  // to the step's exchange (its peers may be waiting there already).
  if (step_verdict == 0) {
    at::Tensor out;
    std::string error;
    if (!call(task, out, error)) return;
    if (error.empty()) {
      result = out;
    } else {
      step_verdict = group->encode_verdict(HookGroup::Failure::kError, task.bucket->index());
      step_error = error;
    }
  }
  if (!task.bucket->is_last()) {
    task.future->markCompleted(c10::IValue(result));
    return;
  }
  const int64_t verdict = step_verdict;
  const std::string own = step_error;
  const int64_t own_bucket = verdict == 0 ? 0 : group->bucket_of(verdict);
  step_verdict = 0;
  step_error.clear();
  int64_t decision = 0;
  try {
    decision = group->conclude_step(verdict);
  } catch (const std::exception& e) {
    const std::string message = "hook " + hook->name() + ": ranks could not agree at the end of the step: " +
                                first_line(e.what());
    abort_device(buffer.device(), message);
    fail(task, message);
    return;
  }
  if (decision == 0) {
    task.future->markCompleted(c10::IValue(result));
    return;
  }
  const HookFailure failure = decided_failure(decision, own, own_bucket);
  abort_device(buffer.device(), failure.message);
  fail(task, failure);
}

void ScriptCommHook::Worker::process_fail_fast(Task& task) {
  // After a failure this rank runs no further hooks: its peers stopped (or will
  // stop) at the collective it left, and the group may hold it still.
  if (failed) {
    fail(task, *failed);
    return;
  }
  at::Tensor result;
  std::string error;
  c10::intrusive_ptr<HookWork> started;
  if (!call(task, result, error, &started)) return;  // the watchdog decided (and recorded) it
  if (started && error.empty()) {
    auto pending = started->pending();
    {
      std::lock_guard<std::mutex> lock(mutex);
      in_flight.push_back({std::move(task), std::move(started)});
    }
    // Wakes this worker when it is done (at once if it is already).
    std::weak_ptr<Worker> self = weak_from_this();
    pending->getFuture()->addCallback([self](c10::ivalue::Future&) {
      if (auto w = self.lock()) {
        { std::lock_guard<std::mutex> lock(w->mutex); }
        w->ready.notify_all();
      }
    });
    return;
  }
  conclude_fail_fast(task, result, error);
}

void ScriptCommHook::Worker::conclude_fail_fast(Task& task, const at::Tensor& result, const std::string& error) {
  if (failed) {
    // An earlier bucket failed; this one's collective is moot.
    fail(task, *failed);
    return;
  }
  if (error.empty()) {
    task.future->markCompleted(c10::IValue(result));
    return;
  }
  const int64_t bucket = task.bucket->index();
  if (group->stopped_by_peer()) {
    const auto& r = group->peer_record();
    failed = decided_failure(r.verdict, "", 0, r.reason);
  } else if (group->collective_broke()) {
    // Not the hook's failure: a peer's process died (or the group timed out).
    failed = general("hook " + hook->name() + " in bucket " + std::to_string(bucket) + " on rank " +
                     std::to_string(group->rank()) + ": a collective failed (" + error +
                     ") with no hook failure on record: a peer's process died, or the group's timeout passed; "
                     "this process must restart");
  } else {
    // This rank's own failure, unless a peer's is on record first (the root
    // cause: this one may be a collective that peer's exit broke).
    HookGroup::Record r;
    try {
      r = group->record_failure(group->encode_verdict(HookGroup::Failure::kError, bucket), error);
    } catch (const std::exception& e) {
      r = {group->encode_verdict(HookGroup::Failure::kError, bucket), error};
      detail::log_line("ftcomm: rank " + std::to_string(group->rank()) + ": could not record the hook's failure (" +
                       first_line(e.what()) + "); peers find out from their collectives");
    }
    failed = group->rank_of(r.verdict) == group->rank() ? decided_failure(r.verdict, error, bucket)
                                                        : decided_failure(r.verdict, "", 0, r.reason);
  }
  fail(task, *failed);
  // Later buckets still in flight may never finish (a peer left): they fail now.
  std::deque<InFlight> rest;
  {
    std::lock_guard<std::mutex> lock(mutex);
    rest.swap(in_flight);
  }
  for (auto& item : rest) fail(item.task, *failed);
}

void ScriptCommHook::Worker::abort_device(const at::Device& device, const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(mutex);
    if (!broken.empty()) return;
    broken = why;
  }
  std::string what = "the " + device.str() + " communicator";
  try {
    auto backend = pg->getBackend(device.type());
    what = "the " + backend->getBackendName() + " communicator of " + device.str();
    backend->abort();  // NCCL's ends every collective in flight on this rank; Gloo's does nothing
  } catch (const std::exception& e) {
    what += " (abort failed: " + first_line(e.what()) + ")";
  }
  detail::log_line("ftcomm: rank " + std::to_string(group->rank()) + ": aborted " + what + " after: " + why);
}

void ScriptCommHook::Worker::watch() {
  using namespace std::chrono_literals;
  // The watchdog polls rather than being woken at each call, which would cost
  // every bucket a wake-up: a stuck call is seen at most one period late.
  const std::chrono::milliseconds period = std::clamp<std::chrono::milliseconds>(options.hook_timeout / 8, 1ms, 100ms);
  std::unique_lock<std::mutex> lock(mutex);
  while (!stop) {
    if (options.hook_timeout.count() <= 0) {
      call_changed.wait(lock);
      continue;
    }
    if (!in_call || std::chrono::steady_clock::now() < call_start + options.hook_timeout) {
      call_changed.wait_for(lock, period);
      continue;
    }
    // Past the deadline. The stuck call cannot be stopped; decide for it what it
    // has open (its bucket, or its step), between its collectives when they share
    // a queue with the exchange (a collective has its own deadline).
    const int64_t bucket = call_bucket;
    const at::Device device = call_device;
    const bool per_step = mode == HookAgreement::kPerStep;
    auto future = call_future;
    lock.unlock();
    int64_t decision = 0;
    std::string agreement_error;
    bool acted = false;
    try {
      acted = group->try_abandon(group->encode_verdict(HookGroup::Failure::kStuck, bucket), &decision, per_step);
    } catch (const std::exception& e) {
      acted = true;
      agreement_error = first_line(e.what());
    }
    if (!acted) {
      lock.lock();
      call_changed.wait_for(lock, 50ms);
      continue;
    }
    HookFailure failure = stuck_failure(group->rank(), bucket);
    if (!agreement_error.empty()) {
      failure.message += " (telling the other ranks failed: " + agreement_error + ")";
    } else if (decision != 0 && group->failure_of(decision) == HookGroup::Failure::kError) {
      failure = decided_failure(decision, "", 0,
                                mode == HookAgreement::kFailFast ? group->recorded_failure().reason : "");
      failure.message += " (this rank's own call did not return within " + seconds(options.hook_timeout) + " s)";
    } else if (decision != 0 && group->rank_of(decision) != group->rank()) {
      failure.message += "; rank " + std::to_string(group->rank_of(decision)) + " was stuck too";
    }
    lock.lock();
    // The group takes no further collectives now. If the call came back in the
    // meantime, the worker fails whatever bucket it holds with this message.
    abandoned = true;
    abandon_failure = failure;
    const bool still_in_call = in_call && call_future == future;
    std::deque<Task> pending;
    pending.swap(queue);
    for (auto& item : in_flight) pending.push_back(std::move(item.task));
    in_flight.clear();
    lock.unlock();
    call_changed.notify_all();  // a call that came back meanwhile waits for this (see call())
    detail::log_line("ftcomm: rank " + std::to_string(group->rank()) + ": " + failure.message);
    if (per_step) abort_device(device, failure.message);
    if (still_in_call && future) future->setErrorIfNeeded(error_of(failure));
    for (auto& t : pending) fail(t, failure);
    ready.notify_all();
    return;
  }
}

ScriptCommHook::ScriptCommHook(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::shared_ptr<ScriptHook> hook,
                               ScriptCommHookOptions options)
    : CppCommHookInterface(pg), hook_(hook), worker_(std::make_shared<Worker>(hook, options, pg)) {
  TORCH_CHECK(options.agreement != HookAgreement::kPerStep || options.on_error == OnHookError::kFail, "hook ",
              hook->name(), ": the per-step agreement cannot fall back (it aborts the communicator on a failure); "
              "use the per-collective agreement with the fallback policy");
  // Fail fast needs a store every rank shares: the given one, else the one the
  // group was made with. Each hook of a group has its own key (ranks register hooks in
  // the same order).
  worker_->failure_store = options.failure_store ? options.failure_store : failure_store_of(pg);
  if (worker_->failure_store) {
    try {
      worker_->failure_key =
          "ftcomm/hook-failure/" + std::to_string(next_hook_number(worker_->failure_store, pg->getRank()));
    } catch (const std::exception&) {
      worker_->failure_store.reset();  // a store that cannot count: no fail-fast
    }
  }
  // The threads hold the worker: one stuck in a hook outlives this object.
  auto w = worker_;
  w->thread = std::thread([w] { w->run(); });
  w->watchdog = std::thread([w] { w->watch(); });
}

ScriptCommHook::~ScriptCommHook() {
  {
    std::lock_guard<std::mutex> lock(worker_->mutex);
    worker_->stop = true;
  }
  worker_->ready.notify_all();
  worker_->call_changed.notify_all();
  worker_->watchdog.join();
  bool stuck;
  {
    std::lock_guard<std::mutex> lock(worker_->mutex);
    stuck = worker_->abandoned && worker_->in_call;
  }
  if (stuck) {
    worker_->thread.detach();  // still inside the hook; it exits if the hook ever returns
  } else {
    worker_->thread.join();
  }
}

double ScriptCommHook::busy_seconds() const {
  return static_cast<double>(worker_->busy_ns.load()) * 1e-9;
}

HookAgreement ScriptCommHook::agreement() const {
  std::lock_guard<std::mutex> lock(worker_->mutex);
  return worker_->mode == HookAgreement::kAuto ? worker_->options.agreement : worker_->mode;
}

int64_t ScriptCommHook::fallbacks() const {
  std::lock_guard<std::mutex> lock(worker_->mutex);
  return worker_->fallbacks;
}

c10::intrusive_ptr<c10::ivalue::Future> ScriptCommHook::runHook(c10d::GradBucket& bucket) {
  Worker::Task task;
  task.bucket = HookBucket::from(bucket);
  const at::Tensor& buffer = bucket.getBufferRef();
  if (worker_->options.on_error == OnHookError::kFallback) task.original = buffer.clone();
  // A CUDA future carries events: the Reducer's wait() makes its stream wait for
  // the hook's work, whichever stream the hook ran on.
  task.future = buffer.is_cuda() ? c10::make_intrusive<c10::ivalue::Future>(
                                       c10::TensorType::get(), std::vector<c10::Device>{buffer.device()})
                                 : c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get());
  auto future = task.future;
  if (buffer.is_cuda()) {
    // The hook's stream waits until the gradients are in the bucket.
    task.ready = std::make_unique<c10::Event>(buffer.device().type());
    task.ready->record(c10::impl::VirtualGuardImpl(buffer.device().type()).getStream(buffer.device()));
  }
  {
    std::lock_guard<std::mutex> lock(worker_->mutex);
    if (worker_->mode == HookAgreement::kAuto) {
      try {
        worker_->mode = worker_->resolve(buffer.device());
      } catch (const std::exception& e) {
        worker_->fail(task, first_line(e.what()));
        return future;
      }
      // Before the worker's first call (it takes this task under the same lock).
      if (worker_->mode == HookAgreement::kFailFast) {
        worker_->group->set_fail_fast(worker_->failure_store, worker_->failure_key);
      }
    }
    if (!worker_->broken.empty()) {
      worker_->fail(task, "hook " + hook_->name() + ": this group's communicator was aborted after a failure (" +
                              worker_->broken + "); this process must restart");
      return future;
    }
    if (worker_->abandoned) {
      worker_->fail(task, "hook " + hook_->name() + " was abandoned after a call that did not return (" +
                              worker_->abandon_failure.message + "); this process must exit");
      return future;
    }
    worker_->queue.push_back(std::move(task));
  }
  worker_->ready.notify_one();
  return future;
}

void agree_on_hook(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const ScriptHook& hook,
                   const std::vector<std::string>& pinned) {
  if (!pinned.empty()) {
    TORCH_CHECK(std::find(pinned.begin(), pinned.end(), hook.digest()) != pinned.end(), "hook ", hook.name(),
                " (", hook.path(), ") has digest ", hook.digest(),
                ", which is not pinned; pin it with --hook-digest ", hook.digest(), " if it is trusted");
  }
  const auto digests = control::allgather_bytes(pg, hook.digest());
  const std::string& first = digests[0];
  for (int r = 1; r < pg->getSize(); ++r) {
    const std::string& theirs = digests[static_cast<size_t>(r)];
    TORCH_CHECK(theirs == first, "hook digests differ: rank 0 has ", first, ", rank ", r, " has ", theirs,
                ". Every rank must load the same hook file (this rank, ", pg->getRank(), ", loaded ", hook.path(), ")");
  }
}

}  // namespace ftcomm
