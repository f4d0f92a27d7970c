// Host staging for snapshots (internal to the store): a slot holds one snapshot
// as its blob's bytes, in the pieces of the file's order: the file header, then
// each tensor's header and its data, which stage() copies into place.
//
// A snapshot of host tensors is staged as one page-aligned buffer, the blob's
// image, which the writer writes as it is, in large writes that bypass the page
// cache where the file system allows it (no copy of the snapshot into the
// kernel's cache: on this project's 2-core CI machine that copy cost training's
// cores ~40 ms of CPU a 151 MB commit). A snapshot with tensors on an
// accelerator is staged in pinned buffers, one per tensor (c10's pinned blocks
// are powers of two: an image-sized one could take twice the snapshot), and
// written through the page cache. A slot keeps its buffers for the next snapshot
// of the same layout, so that a commit neither allocates nor page-faults after
// the first (268 MB into fresh pageable memory: ~130 ms; into reused memory:
// ~30 ms).
//
// Tensors on an accelerator are copied into pinned memory on a side stream, after
// the work already queued on the caller's current stream; then the current
// stream waits for the copy by event. The host does not wait: work the caller
// queues afterwards (the next optimizer step) runs after the copy, on the device.
// The writer calls wait_copied() before it reads. Host tensors are copied at once.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <c10/core/Event.h>

#include "ftcomm/checkpoint_store.h"

namespace ftcomm {
namespace store {

class StagingSlot {
 public:
  // The image's start and its capacity are multiples of this (what direct I/O
  // asks of a buffer on the usual 512-byte and 4 KiB block devices).
  static constexpr size_t kImageAlign = 4096;

  // Lays `state` out as a blob (names and homes as CommitSnapshotAsync records
  // them) and copies its data in, reusing the buffer when the layout and the
  // pinning are unchanged.
  void stage(const std::vector<NamedTensor>& state);
  // Blocks until every copy stage() started is complete.
  void wait_copied();

  // The blob's size in bytes.
  size_t blob_bytes() const { return blob_bytes_; }
  // The blob as one page-aligned buffer of blob_bytes() (zeros follow up to the
  // next kImageAlign); null when the snapshot was staged in pinned buffers.
  const uint8_t* image() const { return image_ptr_; }
  // The blob in the pieces its checksum chains over: the file header, then
  // each tensor's header and its data.
  const std::vector<std::pair<const void*, size_t>>& pieces() const { return pieces_; }
  // Host memory the slot holds, and how much of it is pinned.
  int64_t bytes() const { return bytes_; }
  int64_t pinned_bytes() const { return pinned_bytes_; }

 private:
  void stage_image(const std::vector<NamedTensor>& state, const std::string& file_header,
                   const std::vector<std::string>& headers, const std::vector<uint64_t>& data_at, size_t total);
  void stage_pinned(const std::vector<NamedTensor>& state, const std::string& file_header,
                    const std::vector<std::string>& headers, size_t total);

  at::Tensor buffer_;  // owns the image's memory
  uint8_t* image_ptr_ = nullptr;
  size_t blob_bytes_ = 0;
  size_t capacity_ = 0;  // of the image
  int64_t bytes_ = 0;
  int64_t pinned_bytes_ = 0;
  std::vector<std::string> owned_headers_;  // pinned staging: the file header, then each tensor's
  std::string layout_;  // the headers of the staged layout: an image is reused while they are equal
  std::vector<std::pair<const void*, size_t>> pieces_;
  std::vector<NamedTensor> host_;  // the staged tensors: views of the image, or pinned buffers
  std::vector<c10::Event> copied_;  // one per accelerator device the last stage() read from
};

}  // namespace store
}  // namespace ftcomm
