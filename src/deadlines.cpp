#include "ftcomm/deadlines.h"

#include <c10/util/Exception.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

namespace ftcomm {

JobDeadlines deadlines_for(std::chrono::milliseconds group_timeout) {
  JobDeadlines d;
  if (group_timeout.count() <= 0) return d;
  d.group = group_timeout;
  d.hook = std::chrono::milliseconds(group_timeout.count() / 2);
  d.stall = std::chrono::milliseconds(group_timeout.count() * 9 / 10);
  return d;
}

std::chrono::milliseconds group_timeout(const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  for (const auto type : {c10::DeviceType::CPU, c10::DeviceType::CUDA}) {
    try {
      auto backend = pg->getBackend(type);
      if (backend) return backend->getBackendOptions()->timeout;
    } catch (const c10::Error&) {
      // No backend for this device, or one that does not report its options.
    }
  }
  return std::chrono::milliseconds(0);
}

}  // namespace ftcomm
