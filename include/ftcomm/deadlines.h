// The deadlines a job derives from its group's collective timeout, in one place:
// a comm hook call may take half of it (so the hook's own deadline fires before
// the collective's, with a message naming the hook) and a step 0.9 of it before
// just in time takes it as stalled (so every backend reacts before the
// collective's own error). Both front-ends (`ftcomm train`, the Python package)
// use these unless told otherwise.
#pragma once

#include <chrono>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace ftcomm {

struct JobDeadlines {
  std::chrono::milliseconds group{0};  // the group's collective timeout; 0: unknown
  std::chrono::milliseconds hook{0};   // one comm hook call; 0: unbounded
  std::chrono::milliseconds stall{0};  // one step, for just in time; 0: never stalled
};

// From a collective timeout (0: unknown, and then no deadlines).
JobDeadlines deadlines_for(std::chrono::milliseconds group_timeout);

// The collective timeout of `pg`'s CPU backend (else its CUDA one); 0 when its
// backends do not say.
std::chrono::milliseconds group_timeout(const c10::intrusive_ptr<c10d::ProcessGroup>& pg);

}  // namespace ftcomm
