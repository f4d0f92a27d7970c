#include "ftcomm/script_comm_hook.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <mutex>
#include <sstream>
#include <thread>

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "control.h"
#include "hook_text.h"
#include "log.h"

namespace ftcomm {

using detail::first_line;
using detail::script_error;

struct ScriptCommHook::Worker {
  struct Task {
    c10::intrusive_ptr<HookBucket> bucket;
    at::Tensor original;  // a copy for kFallback
    // CUDA buckets: recorded on the caller's stream once the gradients are in the
    // bucket; the worker's stream waits on it before the hook runs.
    std::unique_ptr<c10::Event> ready;
    c10::intrusive_ptr<c10::ivalue::Future> future;
  };
  Worker(std::shared_ptr<ScriptHook> h, ScriptCommHookOptions o, c10::intrusive_ptr<c10d::ProcessGroup> p)
      : hook(std::move(h)), options(o), pg(std::move(p)), group(c10::make_intrusive<HookGroup>(pg)) {}
  void run();       // the worker thread: runs queued buckets in order
  void watch();     // the watchdog thread: bounds each hook call
  void process(Task& task);
  void fail(Task& task, const std::string& message) {
    task.future->setError(std::make_exception_ptr(std::runtime_error(message)));
  }
  std::string stuck_message(int64_t stuck_rank, int64_t bucket) const {
    char seconds[32];
    std::snprintf(seconds, sizeof(seconds), "%g", std::chrono::duration<double>(options.hook_timeout).count());
    return "hook " + hook->name() + " did not return within " + seconds + " s on rank " +
           std::to_string(stuck_rank) + " in bucket " + std::to_string(bucket) +
           " (stuck: an endless loop, or far too slow for the job's --timeout); every rank stops here. Fix the "
           "hook, or raise --timeout";
  }

  const std::shared_ptr<ScriptHook> hook;
  const ScriptCommHookOptions options;
  const c10::intrusive_ptr<c10d::ProcessGroup> pg;
  const c10::intrusive_ptr<HookGroup> group;

  std::mutex mutex;  // the queue, stop, abandoned, and the call in progress
  std::condition_variable ready, call_changed;
  std::deque<Task> queue;
  bool stop = false;
  bool abandoned = false;  // the watchdog gave up on a stuck call; the worker thread is lost
  bool in_call = false;    // the hook is running
  std::chrono::steady_clock::time_point call_start;
  int64_t call_bucket = 0;
  c10::intrusive_ptr<c10::ivalue::Future> call_future;
  int64_t fallbacks = 0;
  std::atomic<int64_t> busy_ns{0};
  std::thread thread, watchdog;
};

void ScriptCommHook::Worker::run() {
  while (true) {
    Task task;
    {
      std::unique_lock<std::mutex> lock(mutex);
      ready.wait(lock, [&] { return stop || abandoned || !queue.empty(); });
      if (abandoned || queue.empty()) return;
      task = std::move(queue.front());
      queue.pop_front();
    }
    const auto started = std::chrono::steady_clock::now();
    process(task);
    busy_ns += std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - started).count();
    std::lock_guard<std::mutex> lock(mutex);
    if (abandoned) return;  // a call the watchdog gave up on came back after all
  }
}

void ScriptCommHook::Worker::process(Task& task) {
  const at::Tensor buffer = task.bucket->buffer();
  c10::OptionalDeviceGuard device_guard;
  if (task.ready) {
    device_guard.reset_device(buffer.device());
    task.ready->block(c10::impl::VirtualGuardImpl(buffer.device().type()).getStream(buffer.device()));
  }
  std::string error;
  at::Tensor result;
  if (options.agree_per_bucket) group->begin_guarded();
  {
    std::lock_guard<std::mutex> lock(mutex);
    in_call = true;
    call_start = std::chrono::steady_clock::now();
    call_bucket = task.bucket->index();
    call_future = task.future;
  }
  call_changed.notify_all();
  try {
    result = hook->run(group, task.bucket);
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
  {
    std::lock_guard<std::mutex> lock(mutex);
    in_call = false;
    call_future.reset();
    // The watchdog gave up on this call while it ran, and fails its future.
    if (abandoned) return;
  }
  if (!options.agree_per_bucket) {
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
    bad = group->conclude(error.empty() ? 0 : group->encode_verdict(HookGroup::Failure::kError));
  } catch (const std::exception& e) {
    fail(task, "hook " + hook->name() + ": ranks could not agree on bucket " + std::to_string(task.bucket->index()) +
                   ": " + first_line(e.what()));
    return;
  }
  if (bad == 0) {
    task.future->markCompleted(c10::IValue(result));
    return;
  }
  if (group->failure_of(bad) == HookGroup::Failure::kStuck) {
    fail(task, stuck_message(group->rank_of(bad), task.bucket->index()) + " (the ranks agreed)");
    return;
  }
  // Name this rank's own failure when it has one, else the rank that failed.
  const bool mine = !error.empty() && !group->stopped_by_peer();
  const std::string who = mine ? "rank " + std::to_string(group->rank()) + " (" + error + ")"
                               : "rank " + std::to_string(group->rank_of(bad));
  if (options.on_error == OnHookError::kFallback) {
    std::vector<at::Tensor> plain{task.original};
    pg->allreduce(plain)->wait();
    plain[0].div_(group->world_size());
    if (fallbacks++ == 0 && (mine || group->rank() == 0)) {
      detail::log_line("ftcomm: hook " + hook->name() + " failed on " + who + " in bucket " +
                       std::to_string(task.bucket->index()) +
                       "; every rank falls back to a mean allreduce for such buckets");
    }
    task.future->markCompleted(c10::IValue(plain[0]));
  } else {
    fail(task, "hook " + hook->name() + " failed on " + who + " in bucket " + std::to_string(task.bucket->index()) +
                   "; every rank stops here (the ranks agreed). Fix the hook, or run with the fallback policy");
  }
}

void ScriptCommHook::Worker::watch() {
  using namespace std::chrono_literals;
  std::unique_lock<std::mutex> lock(mutex);
  while (!stop) {
    if (!in_call || options.hook_timeout.count() <= 0) {
      call_changed.wait(lock);
      continue;
    }
    const auto deadline = call_start + options.hook_timeout;
    if (std::chrono::steady_clock::now() < deadline) {
      call_changed.wait_until(lock, deadline);
      continue;
    }
    // Past the deadline. The stuck call cannot be stopped; decide its bucket for
    // it, between its collectives (a collective has its own deadline).
    const int64_t bucket = call_bucket;
    auto future = call_future;
    lock.unlock();
    int64_t decision = 0;
    std::string agreement_error;
    bool acted = false;
    try {
      acted = group->try_abandon(group->encode_verdict(HookGroup::Failure::kStuck), &decision);
    } catch (const std::exception& e) {
      acted = true;
      agreement_error = first_line(e.what());
    }
    lock.lock();
    if (!acted) {
      call_changed.wait_for(lock, 50ms);
      continue;
    }
    // The group takes no further collectives now. If the call came back in the
    // meantime, the worker concludes it itself (with the decision just made).
    abandoned = true;
    const bool still_in_call = in_call && call_future == future;
    std::deque<Task> pending;
    pending.swap(queue);
    lock.unlock();
    std::string message = stuck_message(group->rank(), bucket);
    if (!agreement_error.empty()) message += " (telling the other ranks failed: " + agreement_error + ")";
    else if (decision != 0 && group->rank_of(decision) != group->rank()) message += "; rank " + std::to_string(group->rank_of(decision)) + " was stuck too";
    detail::log_line("ftcomm: rank " + std::to_string(group->rank()) + ": " + message);
    if (still_in_call && future) future->setError(std::make_exception_ptr(std::runtime_error(message)));
    for (auto& t : pending) fail(t, message);
    ready.notify_all();
    return;
  }
}

ScriptCommHook::ScriptCommHook(c10::intrusive_ptr<c10d::ProcessGroup> pg, std::shared_ptr<ScriptHook> hook,
                               ScriptCommHookOptions options)
    : CppCommHookInterface(pg), hook_(hook), worker_(std::make_shared<Worker>(hook, options, pg)) {
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

int64_t ScriptCommHook::fallbacks() const {
  std::lock_guard<std::mutex> lock(worker_->mutex);
  return worker_->fallbacks;
}

c10::intrusive_ptr<c10::ivalue::Future> ScriptCommHook::runHook(c10d::GradBucket& bucket) {
  Worker::Task task;
  task.bucket = HookBucket::from(bucket);
  const at::Tensor& buffer = bucket.getBufferRef();
  if (worker_->options.on_error == OnHookError::kFallback) task.original = buffer.clone();
  if (buffer.is_cuda()) {
    // The future carries CUDA events: the Reducer's wait() makes its stream wait
    // for the hook's work, whichever streams the two threads use.
    task.ready = std::make_unique<c10::Event>(buffer.device().type());
    task.ready->record(c10::impl::VirtualGuardImpl(buffer.device().type()).getStream(buffer.device()));
    task.future = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get(), std::vector<c10::Device>{buffer.device()});
  } else {
    task.future = c10::make_intrusive<c10::ivalue::Future>(c10::TensorType::get());
  }
  auto future = task.future;
  {
    std::lock_guard<std::mutex> lock(worker_->mutex);
    if (worker_->abandoned) {
      worker_->fail(task, "hook " + hook_->name() + " was abandoned after a call that did not return; this process "
                                                     "must exit");
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
