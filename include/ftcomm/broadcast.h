// Broadcast of many tensors at once, the resync path of ftcomm.
//
// Same contract as c10d::broadcast_coalesced, with fewer copies and more overlap:
//  * contiguous tensors of at least `direct_min_bytes` are broadcast in place,
//    with no staging copy at all;
//  * smaller (or non-contiguous) tensors of any dtype are packed, byte-wise, into
//    staging buffers of `buffer_bytes` that are reused from bucket to bucket; the
//    root packs (one copy) and the others unpack (one copy);
//  * up to `max_in_flight` broadcasts are outstanding at once, so packing and
//    unpacking overlap the transfer.
// c10d keeps two in flight, groups by dtype, allocates a flat buffer and an
// unflattened copy per bucket, and copies back on every rank including the root.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/intrusive_ptr.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

namespace ftcomm {

struct BroadcastCoalescedOptions {
  int root = 0;
  // Size of one staging buffer; at most max_in_flight of them exist per device.
  size_t buffer_bytes = size_t(16) << 20;
  // Staged buckets are cut at min(buffer_bytes, pipeline_bytes) so that packing,
  // transfer and unpacking of successive buckets overlap (10k x 1 KiB over Gloo,
  // world 2: 10.4 ms as one 10 MB bucket, 7.5 ms in 4 MiB ones).
  size_t pipeline_bytes = size_t(4) << 20;
  // Broadcasts outstanding at once (direct and staged together). At least 1.
  int max_in_flight = 4;
  // Contiguous tensors at least this large skip staging and go in place.
  size_t direct_min_bytes = size_t(1) << 20;
  // CUDA tensors on a group whose CUDA backend is NCCL, instead of the two above: a
  // collective costs tens of microseconds whatever its size and device copies are
  // cheap, so buckets are larger and fewer tensors go in place (at least
  // min(nccl_direct_min_bytes, the bucket size)). On 2 H100s, workload (a) of the
  // benchmark took 2.7 ms this way instead of 7.7 ms (BENCHMARKS.md).
  size_t nccl_pipeline_bytes = size_t(32) << 20;
  size_t nccl_direct_min_bytes = size_t(64) << 20;
  // After the transfer, compare a checksum of every bucket with the root's and
  // fail on every rank if any differs. Also checks up front that every rank passed
  // the same tensor list (dtypes, shapes, devices). Costs one hash pass over the
  // data (CUDA data is hashed on the host) and two small collectives.
  bool verify = false;
  // Deadline for each wait on a collective; 0 means the group's own timeout.
  std::chrono::milliseconds timeout{0};
};

struct BroadcastCoalescedStats {
  int64_t bytes = 0;          // payload bytes moved per receiving rank
  int64_t broadcasts = 0;     // collectives issued
  int64_t direct_tensors = 0; // tensors sent in place
  int64_t staged_tensors = 0; // tensors packed into staging buffers
};

// Broadcasts `tensors` from `options.root` to every rank of `process_group`.
// In place: on every non-root rank each tensor is overwritten and is bit-identical
// to the root's when the call returns; the root's tensors are read only.
// Every rank must pass the same list (same order, dtypes, shapes, devices).
// Accepts any mix of dtypes and of CPU/CUDA devices, empty tensors, and
// non-contiguous tensors (staged through a copy). Refuses, with an error naming the
// tensor: sparse or other non-strided layouts, tensors whose elements overlap in
// memory, and a root outside the group.
// Blocks until every transfer is complete (CUDA streams are synchronised too).
// On a failed collective it throws; tensors of the non-root ranks are then in an
// unspecified mix of old and new values. Autograd is not recorded.
BroadcastCoalescedStats broadcast_coalesced(
    const c10::intrusive_ptr<c10d::ProcessGroup>& process_group,
    at::TensorList tensors,
    const BroadcastCoalescedOptions& options);

// Host staging buffers are kept between calls (up to 1 GiB in all) so that a
// repeated resync does not page-fault fresh buffers in; this frees them.
// Thread-safe; buffers in use by a running call are returned to the cache after it.
void release_broadcast_buffers();

// The seed's signature: staging buffers of `buffer_size` bytes, root `root`.
void broadcast_coalesced(
    const c10::intrusive_ptr<c10d::ProcessGroup>& process_group,
    at::TensorList tensors,
    size_t buffer_size,
    int root = 0);

}  // namespace ftcomm
