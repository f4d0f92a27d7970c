// Host staging for snapshots (internal to the store): a slot holds the host copy
// of one snapshot's tensors while the store's writer writes it, and keeps its
// buffers for the next snapshot of the same shapes, so that a commit neither
// allocates nor page-faults after the first (268 MB into fresh pageable memory:
// ~130 ms; into reused memory: ~30 ms).
//
// Tensors on an accelerator are copied into pinned memory on a side stream, after
// the work already queued on the caller's current stream; then the current
// stream waits for the copy by event. The host does not wait: work the caller
// queues afterwards (the next optimizer step) runs after the copy, on the device.
// The writer calls wait_copied() before it reads. Host tensors are copied at once.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include <c10/core/Event.h>

#include "ftcomm/checkpoint_store.h"

namespace ftcomm {
namespace store {

class StagingSlot {
 public:
  // Copies `state` into this slot (names and homes as CommitSnapshotAsync
  // records them), reallocating only buffers whose shape, dtype or pinning no
  // longer fits.
  void stage(const std::vector<NamedTensor>& state);
  // Blocks until every copy stage() started is complete.
  void wait_copied();
  const std::vector<NamedTensor>& host() const { return host_; }
  int64_t bytes() const { return bytes_; }
  int64_t pinned_bytes() const { return pinned_bytes_; }

 private:
  std::vector<NamedTensor> host_;
  std::vector<c10::Event> copied_;  // one per accelerator device the last stage() read from
  int64_t bytes_ = 0;
  int64_t pinned_bytes_ = 0;
};

}  // namespace store
}  // namespace ftcomm
