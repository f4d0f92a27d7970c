#include "ftcomm/just_in_time.h"

#include <signal.h>

#include <cstdio>
#include <cstdlib>

#include <ATen/ATen.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/csrc/distributed/c10d/reducer.hpp>

#include "log.h"
#include "tensor_bytes.h"

namespace ftcomm {
namespace {

// Process-wide, as signal dispositions are: the handler only sets the flag, the
// watcher thread does the work.
std::atomic<bool> g_sigterm{false};
struct sigaction g_previous_sigterm {};

extern "C" void on_sigterm(int /*signo*/) {
  g_sigterm.store(true);
}

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

std::string rank_text(const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  return "rank " + std::to_string(pg->getRank());
}

// One line for the log: a torch error without its C++ stack trace.
std::string error_text(const std::exception& e) {
  const auto* torch_error = dynamic_cast<const c10::Error*>(&e);
  const std::string text = torch_error ? torch_error->what_without_backtrace() : e.what();
  return text.substr(0, text.find('\n'));
}

bool is_default_or_ignore(const struct sigaction& sa) {
  return !(sa.sa_flags & SA_SIGINFO) && (sa.sa_handler == SIG_DFL || sa.sa_handler == SIG_IGN);
}

}  // namespace

struct JustInTime::Replica {
  int64_t step = -1;
  int64_t data_position = 0;
  TrainingState state;                  // the live tensors, which are step's until the next update
  std::vector<NamedTensor> hook_state;  // copies taken at step_finished
  Exchange local;                       // the trainer's rank-local state and its buddy copy
  BucketLayout layout;
  int layouts_taken = 0;
};

JustInTime::JustInTime(c10::intrusive_ptr<c10d::ProcessGroup> pg, Checkpointer* checkpointer,
                       JustInTimeOptions options)
    : pg_(std::move(pg)), checkpointer_(checkpointer), options_(std::move(options)),
      replica_(std::make_unique<Replica>()) {
  TORCH_CHECK(checkpointer_ != nullptr, "JustInTime needs a Checkpointer");
  if (options_.handle_sigterm) {
    struct sigaction sa {};
    sa.sa_handler = on_sigterm;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    installed_sigterm_ = ::sigaction(SIGTERM, &sa, &g_previous_sigterm) == 0;
  }
  watcher_ = std::thread([this] { watch(); });
}

JustInTime::~JustInTime() {
  {
    std::lock_guard<std::mutex> lk(watch_mu_);
    stop_ = true;
  }
  watch_cv_.notify_all();
  if (watcher_.joinable()) watcher_.join();
  if (installed_sigterm_) ::sigaction(SIGTERM, &g_previous_sigterm, nullptr);
}

int64_t JustInTime::last_finished() const {
  return last_finished_.load();
}

void JustInTime::pause() {
  ++paused_;
}

void JustInTime::resume() {
  last_progress_ms_ = now_ms();
  if (paused_.load() > 0) --paused_;
}

void JustInTime::keep_sigterm_handler() {
  if (!installed_sigterm_) return;
  struct sigaction current {};
  if (::sigaction(SIGTERM, nullptr, &current) != 0) return;
  if (!(current.sa_flags & SA_SIGINFO) && current.sa_handler == on_sigterm) return;
  // The program installed a handler of its own (Python's signal.signal) over
  // ours: ours goes back in front, and that one is passed the signal after the
  // save.
  struct sigaction ours {};
  ours.sa_handler = on_sigterm;
  sigemptyset(&ours.sa_mask);
  ours.sa_flags = SA_RESTART;
  if (::sigaction(SIGTERM, &ours, nullptr) != 0) return;
  g_previous_sigterm = current;
  if (!warned_replaced_) {
    warned_replaced_ = true;
    detail::log_line("ftcomm: " + rank_text(pg_) +
                     ": the program installed a SIGTERM handler after ftcomm's; chaining it: on SIGTERM the last "
                     "finished step is saved just in time first, then the signal goes to that handler");
  }
}

void JustInTime::begin_update(const std::vector<at::Tensor>& rank_local) {
  // Backward is done, so this step's rank-local state (RNG, buffers) is final:
  // its buddy copy goes now, before anything changes. A peer that died takes
  // the exchange down with it; the state is still the last finished step's.
  Exchange capture = exchange(rank_local);
  // A second update before step_finished (two optimizers, or step() called
  // twice): this thread already holds the lock.
  if (!updating_) state_mu_.lock();
  updating_ = true;
  pending_ = std::make_unique<Exchange>(std::move(capture));
}

JustInTime::Exchange JustInTime::exchange(const std::vector<at::Tensor>& rank_local) {
  at::NoGradGuard no_grad;
  Exchange e;
  for (const auto& t : rank_local) e.rank_local.push_back(t.detach().clone());
  const int world = pg_->getSize();
  if (world == 1 || e.rank_local.empty()) return e;
  std::vector<at::Tensor> parts;
  for (const auto& t : e.rank_local) parts.push_back(detail::as_bytes(t));
  at::Tensor flat = at::cat(parts);
  e.gathered.resize(1);
  for (int r = 0; r < world; ++r) e.gathered[0].push_back(at::empty_like(flat));
  std::vector<at::Tensor> in{flat};
  pg_->allgather(e.gathered, in)->wait();
  e.complete = true;
  return e;
}

void JustInTime::step_finished(int64_t step, const TrainingState& state, const c10d::Reducer& reducer,
                               int64_t data_position) {
  at::NoGradGuard no_grad;
  // A trainer that does not call begin_update() exchanges its rank-local state
  // here, before the replica changes.
  std::unique_ptr<Exchange> late;
  if (!updating_) late = std::make_unique<Exchange>(exchange(state.rank_local));
  std::unique_lock<std::timed_mutex> lk(state_mu_, std::defer_lock);
  if (updating_) {
    lk = std::unique_lock<std::timed_mutex>(state_mu_, std::adopt_lock);
  } else {
    lk.lock();
  }
  Replica& r = *replica_;
  r.step = step;
  r.data_position = data_position;
  r.state = state;
  // Buffers (BatchNorm statistics) change in the next forward, long before the
  // next optimizer step: the replica keeps them as they are now. (Parameters
  // and optimizer state change only in the update, which a save never sees.)
  for (auto& b : r.state.buffers) b = b.detach().clone();
  if (state.hook && (!state.hook->replicated_state().empty() || !state.hook->local_state().empty())) {
    // Into last step's copies (no save reads them now: a save holds state_mu_).
    r.hook_state = hook_state_entries(*state.hook, std::move(r.hook_state));
  } else {
    r.hook_state.clear();
  }
  std::unique_ptr<Exchange> taken = late ? std::move(late) : std::move(pending_);
  r.local = taken ? std::move(*taken) : Exchange{};
  // The Reducer settles its buckets after the first iteration; the layout is
  // read until then (reading it later would race the next backward).
  if (r.layouts_taken < 3) {
    r.layout = bucket_layout_of(reducer, state.parameters);
    ++r.layouts_taken;
  }
  pending_.reset();
  updating_ = false;
  last_finished_ = step;
  last_progress_ms_ = now_ms();
}

bool JustInTime::save(const std::string& reason) {
  if (updating_) {
    detail::log_line("ftcomm: " + rank_text(pg_) + ": " + reason + " during the optimizer step after step " +
                     std::to_string(last_finished_.load()) + "; nothing saved just in time (that state is half-updated)");
    return false;
  }
  std::lock_guard<std::timed_mutex> lk(state_mu_);
  return save_locked(reason);
}

bool JustInTime::save_locked(const std::string& reason) {
  const Replica& r = *replica_;
  if (r.step < 1) return false;
  const std::vector<at::Tensor>& mine = r.local.rank_local;
  std::vector<NamedTensor> tensors = own_state_tensors(r.state, r.hook_state, mine);
  uint64_t parts = 0;
  const int world = pg_->getSize();
  if (r.local.complete) {
    const at::Tensor& theirs =
        r.local.gathered[0][static_cast<size_t>(buddy_copy_of(pg_->getRank(), r.state.buddy_stride, world))];
    int64_t at = 0;
    for (size_t i = 0; i < mine.size(); ++i) {
      const auto n = static_cast<int64_t>(mine[i].nbytes());
      tensors.push_back({trainer_buddy_name(i), detail::from_bytes(theirs.narrow(0, at, n), mine[i]),
                         mine[i].device().type()});
      at += n;
    }
    parts |= CommitRecord::kBuddyTrainer;
  }
  if (options_.before_commit) options_.before_commit();
  const bool wrote =
      checkpointer_->commit_just_in_time(r.step, r.data_position, r.layout, r.state, tensors, parts, reason);
  if (options_.on_saved) options_.on_saved(r.step, wrote, reason);
  return wrote;
}

void JustInTime::save_and_exit(const std::string& reason, int code) {
  const bool chain = code == 128 + SIGTERM && installed_sigterm_ && !is_default_or_ignore(g_previous_sigterm);
  detail::log_line("ftcomm: " + rank_text(pg_) + ": " + reason + "; saving step " +
                   std::to_string(last_finished_.load()) + " just in time, then " +
                   (chain ? "passing the signal to the program's SIGTERM handler" : "exiting"));
  // An optimizer step in progress may finish and become the step saved; the
  // trainer's thread then blocks at its next begin_update() until the exit.
  if (!state_mu_.try_lock_for(options_.update_grace)) {
    detail::log_line("ftcomm: " + rank_text(pg_) + ": the optimizer step did not finish within " +
                     std::to_string(options_.update_grace.count()) + " ms; nothing saved just in time");
    std::fflush(nullptr);
    std::_Exit(code);
  }
  try {
    // Device copies go on a stream of their own: the trainer's stream may be
    // waiting on a collective that never completes.
    const at::Device device = replica_->state.accelerator();
    if (device.is_cuda()) {
      const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
      impl->setDevice(device);
      impl->exchangeStream(impl->getStreamFromGlobalPool(device, /*isHighPriority=*/true));
    }
    save_locked(reason);
  } catch (const std::exception& e) {
    detail::log_line("ftcomm: " + rank_text(pg_) + ": the just-in-time save failed: " + error_text(e));
  }
  std::fflush(nullptr);
  if (!chain) std::_Exit(code);
  // The program's handler decides what happens next (Python's runs on the main
  // thread at its next chance); the trainer may go on, so the state is its own
  // again, and this object handles no further SIGTERM.
  state_mu_.unlock();
  g_sigterm = false;
  installed_sigterm_ = false;
  ::sigaction(SIGTERM, &g_previous_sigterm, nullptr);
  ::kill(::getpid(), SIGTERM);
}

void JustInTime::watch() {
  std::unique_lock<std::mutex> lk(watch_mu_);
  while (!stop_) {
    watch_cv_.wait_for(lk, std::chrono::milliseconds(50));
    if (stop_) return;
    if (g_sigterm.load()) {
      lk.unlock();
      save_and_exit("SIGTERM", 128 + SIGTERM);
      lk.lock();
      continue;
    }
    keep_sigterm_handler();
    const int64_t stall = options_.stall_timeout.count();
    if (stall > 0 && paused_.load() == 0 && last_finished_.load() >= 0 &&
        now_ms() - last_progress_ms_.load() > stall) {
      save_and_exit("step " + std::to_string(last_finished_.load() + 1) + " stalled for more than " +
                        std::to_string(stall) + " ms (a hung peer or collective)",
                    1);
    }
  }
}

}  // namespace ftcomm
