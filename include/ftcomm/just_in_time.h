// Just-in-time commits: at a failure, each surviving rank saves the state of its
// last finished step to its own store, atomically and without any collective,
// then exits; the restarted job resumes there, so a failure costs at most the
// step it interrupted and no periodic snapshot is needed (Gupta et al., "Just-In-
// Time Checkpointing", EuroSys 2024). Data parallelism makes it possible: every
// survivor holds a complete replica of the replicated state.
//
// How a survivor finds out, and what it saves:
//  * a collective fails (Gloo: a dead peer's connection closes; any backend: a
//    timeout): the trainer catches the error and calls save() on its own thread;
//  * a step stalls (a peer hung, an NCCL collective that will never complete):
//    when one step runs past `stall_timeout`, the watcher thread saves and exits;
//  * torchrun's SIGTERM (it sends it to the survivors once a worker died, then
//    SIGKILLs them 30 s later): the watcher thread saves and exits with 143.
//    A SIGTERM handler the program installed, before this object or after it
//    (the watcher sees a replaced handler within 50 ms and puts its own in front
//    again), is chained: the save comes first, then the signal is passed on to
//    that handler instead of exiting.
//
// Which step is "finished": the trainer marks the two moments that matter.
// step_finished(S) after the optimizer step of S (and any other state change of
// S); begin_update() before the optimizer step of S + 1 starts changing state.
// Between them (forward, backward, the hook's collectives) the live parameters,
// optimizer state and objects are S's; copies made at step_finished keep the
// hook's state and the trainer's rank-local state as they were at S, since the
// next backward changes them. Between begin_update() and step_finished() nothing
// is saved: an error there saves nothing, and a SIGTERM waits (up to
// update_grace) for step_finished and saves that step. So:
//   phase of step S + 1        saved on a failure there
//   forward, backward, hook    step S
//   optimizer step             step S + 1 if it finishes within update_grace
//                              (SIGTERM), nothing on an error
//   commit (periodic, S + 1)   step S + 1 (it already finished)
//
// Rank-local state: each rank's is in its own just-in-time commit; the buddy
// copy (rank r + buddy_stride keeps rank r's; one node over) of the trainer's rank-local state (small: RNG
// states, buffers) is exchanged at every begin_update (one small allgather, once
// backward has made that state final), so it is there for a rank that dies
// later in the step too; the hook's rank-local state (error
// feedback, as large as the gradients) is copied to the buddy only at periodic
// commits. Which step a resume picks when that is missing is the Checkpointer's
// LocalStatePolicy.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "ftcomm/bucket_layout.h"
#include "ftcomm/checkpointer.h"
#include "ftcomm/recovery.h"

namespace c10d {
class Reducer;
}

namespace ftcomm {

struct JustInTimeOptions {
  // A step (from one step_finished to the next, after the first) running longer
  // than this is taken as stalled: save, then exit with code 1. Set it below the
  // group's collective timeout and above any real step; zero: never.
  std::chrono::milliseconds stall_timeout{0};
  // How long a SIGTERM waits for an optimizer step in progress to finish.
  std::chrono::milliseconds update_grace{10000};
  // Catch SIGTERM (the previous handler comes back when this object goes).
  bool handle_sigterm = true;
  // Fault injection for tests: called on the saving thread just before the
  // commit is written.
  std::function<void()> before_commit;
  // Called after a save attempt (step, whether a commit was written, reason).
  std::function<void(int64_t, bool, const std::string&)> on_saved;
};

class JustInTime {
 public:
  // `checkpointer` (its store) must outlive this object.
  JustInTime(c10::intrusive_ptr<c10d::ProcessGroup> pg, Checkpointer* checkpointer, JustInTimeOptions options);
  ~JustInTime();
  JustInTime(const JustInTime&) = delete;
  JustInTime& operator=(const JustInTime&) = delete;

  // The trainer's state is about to change (the optimizer step); backward is
  // done. Collective when `rank_local` (the trainer's rank-local state, final
  // for this step by now) is not empty: its buddy copy is exchanged here, so a
  // rank that dies from here on has it at its buddy.
  void begin_update(const std::vector<at::Tensor>& rank_local = {});
  // Step `step` finished: `state` is its state (tensors are kept by reference;
  // the hook's state is copied; the rank-local state is the one begin_update()
  // copied and exchanged, or, when it was not called, copied and exchanged here).
  void step_finished(int64_t step, const TrainingState& state, const c10d::Reducer& reducer, int64_t data_position);
  // On the trainer's thread, after an error: saves the last finished step unless
  // the error came mid-update. Returns whether a commit was written (false also
  // when the store already has that step).
  bool save(const std::string& reason);

  int64_t last_finished() const;

  // While paused (nestable), no step counts as stalled: for healthy work between
  // steps that can outlast stall_timeout (an evaluation, a long data reload). A
  // SIGTERM is still handled. The stall clock starts afresh at the last resume().
  void pause();
  void resume();

 private:
  struct Replica;
  // The trainer's rank-local state, copied, and every rank's (allgathered).
  struct Exchange {
    std::vector<at::Tensor> rank_local;
    std::vector<std::vector<at::Tensor>> gathered;
    bool complete = false;
  };
  Exchange exchange(const std::vector<at::Tensor>& rank_local);
  bool save_locked(const std::string& reason);
  void watch();
  // Saves the last finished step, then exits with `code`; or, for a SIGTERM
  // with a program's handler chained, passes the signal on and returns.
  void save_and_exit(const std::string& reason, int code);
  // The watcher's look at the SIGTERM disposition: a handler installed over ours
  // is chained behind it.
  void keep_sigterm_handler();

  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  Checkpointer* checkpointer_;
  JustInTimeOptions options_;
  std::timed_mutex state_mu_;  // held by the trainer from begin_update() to step_finished(), and by a save
  std::atomic<bool> updating_{false};
  std::unique_ptr<Replica> replica_;  // under state_mu_
  std::unique_ptr<Exchange> pending_;  // from begin_update() to step_finished(), under state_mu_
  std::atomic<int64_t> last_finished_{-1};
  std::atomic<int64_t> last_progress_ms_{0};
  std::atomic<int> paused_{0};
  std::atomic<bool> stop_{false};
  std::mutex watch_mu_;
  std::condition_variable watch_cv_;
  std::thread watcher_;
  bool installed_sigterm_ = false;  // ours is (or was last) the SIGTERM disposition
  bool warned_replaced_ = false;
};

}  // namespace ftcomm
