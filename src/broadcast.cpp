#include "ftcomm/broadcast.h"

#include <cstring>
#include <deque>
#include <algorithm>
#include <map>
#include <mutex>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "checksum.h"
#include "control.h"

namespace ftcomm {
namespace {

// Staged tensors start at multiples of this, so any dtype (complex128 is 16 bytes)
// can be viewed in place and copies stay cache-line aligned.
constexpr size_t kAlign = 64;

size_t align_up(size_t n) {
  return (n + kAlign - 1) / kAlign * kAlign;
}

size_t nbytes_of(const at::Tensor& t) {
  return static_cast<size_t>(t.numel()) * t.element_size();
}

// A uint8 view of a contiguous tensor's bytes; shares its storage.
at::Tensor byte_view(const at::Tensor& t) {
  return at::empty({0}, t.options().dtype(at::kByte))
      .set_(t.storage(), t.storage_offset() * t.element_size(),
            {static_cast<int64_t>(nbytes_of(t))}, {1});
}

// A contiguous tensor shaped and typed like `like`, over `buffer`'s bytes at `offset`.
at::Tensor typed_view(const at::Tensor& buffer, size_t offset, const at::Tensor& like) {
  return at::empty({0}, buffer.options().dtype(like.scalar_type()))
      .set_(buffer.storage(), static_cast<int64_t>(offset) / like.element_size(), {like.numel()}, {1})
      .view(like.sizes());
}

// One tensor's part in a collective. Plan reads each TensorImpl once; pack and
// unpack then touch only this compact record and the data (with 10k tensors the
// scattered TensorImpls cost more than the 1 KiB copies).
struct Piece {
  size_t index;       // into the caller's list
  size_t offset;      // byte offset in the staging buffer (staged only)
  size_t nbytes;
  uint8_t* host_data; // CPU and contiguous: memcpy target/source; else nullptr
};

// One collective: either one tensor in place, or a run of tensors packed at offsets.
struct Unit {
  at::Device device{at::kCPU};
  bool direct = false;
  std::vector<Piece> pieces;
  size_t bytes = 0;
  size_t cap = 0;  // the device's largest staged bucket
};

// Largest staged bucket and smallest in-place tensor on one device. Staged buckets
// are cut small enough that packing, transfer and unpacking of successive buckets
// overlap; on NCCL, large enough that collectives stay few (see the options).
struct Limits {
  size_t cap;
  size_t direct_min;
};

Limits limits_for(bool cuda_over_nccl, const BroadcastCoalescedOptions& o) {
  if (cuda_over_nccl) {
    const size_t cap = std::max(std::min(o.buffer_bytes, o.nccl_pipeline_bytes), kAlign);
    return {cap, std::min(o.nccl_direct_min_bytes, cap)};
  }
  return {std::max(std::min(o.buffer_bytes, o.pipeline_bytes), kAlign), o.direct_min_bytes};
}

bool cuda_goes_to_nccl(const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  try {
    return pg->getBackend(c10::DeviceType::CUDA)->getBackendName() == "nccl";
  } catch (const std::exception&) {
    return false;  // no CUDA backend registered
  }
}

std::vector<Unit> plan(at::TensorList tensors, const BroadcastCoalescedOptions& o,
                       const c10::intrusive_ptr<c10d::ProcessGroup>& pg) {
  // Tensors grouped by device, devices in order of first appearance (typically 1-2).
  std::vector<std::pair<at::Device, std::vector<size_t>>> by_device;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), "broadcast_coalesced: tensor ", i, " is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, "broadcast_coalesced: tensor ", i, " has layout ", t.layout(),
                "; only dense (strided) tensors are supported. Convert sparse tensors with .to_dense() or "
                "broadcast their indices and values separately");
    if (t.numel() == 0) {
      continue;
    }
    TORCH_CHECK(t.is_contiguous() || at::has_internal_overlap(t) != at::MemOverlap::Yes,
                "broadcast_coalesced: tensor ", i,
                " has elements that share memory (e.g. from expand()); pass a .contiguous() copy instead");
    const at::Device device = t.device();
    auto group = std::find_if(by_device.begin(), by_device.end(), [&](const auto& g) { return g.first == device; });
    if (group == by_device.end()) {
      by_device.emplace_back(device, std::vector<size_t>());
      group = by_device.end() - 1;
    }
    group->second.push_back(i);
  }
  std::vector<Unit> units;
  for (const auto& [device, indices] : by_device) {
    const Limits limits = limits_for(device.is_cuda() && cuda_goes_to_nccl(pg), o);
    Unit staged;
    staged.device = device;
    staged.cap = limits.cap;
    for (size_t i : indices) {
      const at::Tensor& t = tensors[i];
      const size_t n = nbytes_of(t);
      const bool contiguous = t.is_contiguous();
      if (contiguous && n >= limits.direct_min) {
        Unit direct;
        direct.device = device;
        direct.direct = true;
        direct.pieces.push_back(Piece{i, 0, n, nullptr});
        direct.bytes = n;
        units.push_back(std::move(direct));
        continue;
      }
      if (!staged.pieces.empty() && align_up(staged.bytes) + n > limits.cap) {
        units.push_back(std::move(staged));
        staged = Unit();
        staged.device = device;
        staged.cap = limits.cap;
      }
      const size_t offset = align_up(staged.bytes);
      uint8_t* host = (contiguous && device.is_cpu()) ? static_cast<uint8_t*>(t.data_ptr()) : nullptr;
      staged.pieces.push_back(Piece{i, offset, n, host});
      staged.bytes = offset + n;
    }
    if (!staged.pieces.empty()) {
      units.push_back(std::move(staged));
    }
  }
  return units;
}

// Root: tensors -> buffer. Others: buffer -> tensors. CPU contiguous tensors use
// memcpy (10k small tensors cost ~1 ms instead of ~30 ms of dispatched copy_);
// CUDA uses one fused multi-tensor copy per dtype.
void move_staged(at::TensorList tensors, const Unit& unit, const at::Tensor& buffer, bool pack) {
  if (unit.device.is_cpu()) {
    auto* base = static_cast<uint8_t*>(buffer.data_ptr());
    for (const Piece& p : unit.pieces) {
      if (p.host_data != nullptr) {
        std::memcpy(pack ? base + p.offset : p.host_data, pack ? p.host_data : base + p.offset, p.nbytes);
      } else {
        const at::Tensor& t = tensors[p.index];
        at::Tensor view = typed_view(buffer, p.offset, t);
        pack ? view.copy_(t) : const_cast<at::Tensor&>(t).copy_(view);
      }
    }
    return;
  }
  std::map<at::ScalarType, std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>>> groups;
  for (const Piece& p : unit.pieces) {
    const at::Tensor& t = tensors[p.index];
    auto& [dst, src] = groups[t.scalar_type()];
    at::Tensor view = typed_view(buffer, p.offset, t);
    dst.push_back(pack ? view : t);
    src.push_back(pack ? t : view);
  }
  for (auto& [dtype, pair] : groups) {
    at::_foreach_copy_(pair.first, pair.second, /*non_blocking=*/true);
  }
}

// Host staging buffers outlive a call. Resync moves the same state again and
// again, and a fresh multi-MB buffer costs a page fault per 4 KiB on first touch,
// on the root (packing) and on every receiver (Gloo writing into it). CUDA
// buffers need no cache: the caching allocator already reuses them.
class HostBufferCache {
 public:
  static HostBufferCache& get() {
    static HostBufferCache* cache = new HostBufferCache();  // never destroyed: used at exit
    return *cache;
  }
  at::Tensor take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (static_cast<size_t>(it->numel()) >= bytes && (best == free_.end() || it->numel() < best->numel())) {
          best = it;
        }
      }
      if (best != free_.end()) {
        at::Tensor t = std::move(*best);
        cached_bytes_ -= static_cast<size_t>(t.numel());
        free_.erase(best);
        return t;
      }
    }
    return at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte));
  }
  void give(at::Tensor t) {
    std::lock_guard<std::mutex> lock(mutex_);
    cached_bytes_ += static_cast<size_t>(t.numel());
    free_.push_back(std::move(t));
    while (cached_bytes_ > kMaxCachedBytes && !free_.empty()) {  // drop the oldest
      cached_bytes_ -= static_cast<size_t>(free_.front().numel());
      free_.erase(free_.begin());
    }
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.clear();
    cached_bytes_ = 0;
  }

 private:
  static constexpr size_t kMaxCachedBytes = size_t(1) << 30;
  std::mutex mutex_;
  std::vector<at::Tensor> free_;
  size_t cached_bytes_ = 0;
};

uint64_t checksum_tensor(const at::Tensor& t) {
  at::Tensor host = t.is_cpu() ? t.contiguous() : t.to(at::kCPU).contiguous();
  return detail::checksum64(host.data_ptr(), nbytes_of(host));
}

c10::intrusive_ptr<c10d::Work> broadcast_one(const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                             at::Tensor buffer, int root, std::chrono::milliseconds timeout) {
  std::vector<at::Tensor> list{std::move(buffer)};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  options.rootTensor = 0;
  if (timeout.count() > 0) {
    options.timeout = timeout;
  }
  return pg->broadcast(list, options);
}

std::chrono::milliseconds wait_timeout(const BroadcastCoalescedOptions& o) {
  return o.timeout.count() > 0 ? o.timeout : std::chrono::milliseconds(0);
}

control::Options control_on(at::Device device, const BroadcastCoalescedOptions& o) {
  control::Options c;
  c.device = device;
  c.timeout = wait_timeout(o);
  return c;
}

uint64_t layout_signature(at::TensorList tensors) {
  std::vector<int64_t> words;
  for (const at::Tensor& t : tensors) {
    words.push_back(static_cast<int64_t>(t.scalar_type()));
    words.push_back(static_cast<int64_t>(t.device().type()));
    words.push_back(t.dim());
    for (int64_t s : t.sizes()) words.push_back(s);
  }
  return detail::checksum64(words.data(), words.size() * sizeof(int64_t));
}

void synchronize_devices(const std::vector<Unit>& units) {
  std::vector<at::Device> seen;
  for (const Unit& u : units) {
    if (!u.device.is_cpu() && std::find(seen.begin(), seen.end(), u.device) == seen.end()) {
      seen.push_back(u.device);
      c10::impl::VirtualGuardImpl impl(u.device.type());
      impl.getStream(u.device).synchronize();
    }
  }
}

}  // namespace

BroadcastCoalescedStats broadcast_coalesced(const c10::intrusive_ptr<c10d::ProcessGroup>& pg,
                                            at::TensorList tensors, const BroadcastCoalescedOptions& o) {
  TORCH_CHECK(pg, "broadcast_coalesced: process group is null");
  const int rank = pg->getRank();
  const int world = pg->getSize();
  TORCH_CHECK(o.root >= 0 && o.root < world, "broadcast_coalesced: root ", o.root,
              " is not a rank of a group of ", world, "; pick a root in [0, ", world - 1, "]");
  TORCH_CHECK(o.max_in_flight >= 1, "broadcast_coalesced: max_in_flight must be at least 1, got ", o.max_in_flight);
  at::NoGradGuard no_grad;
  const bool is_root = rank == o.root;

  const std::vector<Unit> units = plan(tensors, o, pg);
  BroadcastCoalescedStats stats;
  if (units.empty() || world == 1) {
    return stats;
  }
  const at::Device control_device = units.front().device;
  if (o.verify) {
    const int64_t mine = static_cast<int64_t>(layout_signature(tensors));
    const int64_t roots = control::broadcast_fixed(pg, {mine}, o.root, control_on(control_device, o))[0];
    const int64_t bad = control::max(pg, int64_t(mine == roots ? 0 : rank + 1), control_on(control_device, o));
    TORCH_CHECK(bad == 0, "broadcast_coalesced: rank ", bad - 1, " passed a tensor list that differs from root ",
                o.root, "'s (count, dtypes, shapes or device types); every rank must pass the same list");
  }

  // Staging slots per device, allocated on first use and reused across buckets.
  struct Slot {
    at::Tensor buffer;
    bool busy = false;
  };
  std::map<std::string, std::vector<Slot>> slots;
  // Slots are as large as the largest bucket they will carry, not buffer_bytes:
  // a 250 MB buffer_size for 10 MB of small tensors allocates 10 MB.
  std::map<std::string, size_t> slot_bytes;
  for (const Unit& unit : units) {
    if (!unit.direct && unit.bytes <= unit.cap) {
      size_t& size = slot_bytes[unit.device.str()];
      size = std::max(size, unit.bytes);
    }
  }
  struct InFlight {
    c10::intrusive_ptr<c10d::Work> work;
    const Unit* unit;
    at::Tensor buffer;
    Slot* slot;
    size_t index;
  };
  std::deque<InFlight> in_flight;

  auto finish = [&](InFlight& f) {
    try {
      f.work->wait(wait_timeout(o));
    } catch (const std::exception& e) {
      TORCH_CHECK(false, "broadcast_coalesced: collective ", f.index, " of ", units.size(), " (", f.unit->bytes,
                  " bytes on ", f.unit->device, ") failed on rank ", rank, " of ", world, ": ", e.what());
    }
    if (!f.unit->direct) {
      if (!is_root) {
        move_staged(tensors, *f.unit, f.buffer, /*pack=*/false);
      }
      if (f.slot != nullptr) {
        f.slot->busy = false;
      }
    }
  };

  for (size_t u = 0; u < units.size(); ++u) {
    const Unit& unit = units[u];
    if (in_flight.size() >= static_cast<size_t>(o.max_in_flight)) {
      finish(in_flight.front());
      in_flight.pop_front();
    }
    InFlight f{nullptr, &unit, at::Tensor(), nullptr, u};
    if (unit.direct) {
      f.buffer = byte_view(tensors[unit.pieces[0].index]);
      ++stats.direct_tensors;
    } else {
      if (unit.bytes > unit.cap) {
        // A single tensor larger than a staging buffer (non-contiguous): own buffer.
        f.buffer = at::empty({static_cast<int64_t>(unit.bytes)}, at::TensorOptions().dtype(at::kByte).device(unit.device));
      } else {
        auto& pool = slots[unit.device.str()];
        for (Slot& s : pool) {
          if (!s.busy) {
            f.slot = &s;
            break;
          }
        }
        if (f.slot == nullptr) {
          pool.reserve(o.max_in_flight);  // pointers into the pool stay valid
          const size_t bytes = slot_bytes[unit.device.str()];
          pool.push_back(Slot{unit.device.is_cpu()
                                  ? HostBufferCache::get().take(bytes)
                                  : at::empty({static_cast<int64_t>(bytes)},
                                              at::TensorOptions().dtype(at::kByte).device(unit.device))});
          f.slot = &pool.back();
        }
        f.slot->busy = true;
        f.buffer = f.slot->buffer;
      }
      if (is_root) {
        move_staged(tensors, unit, f.buffer, /*pack=*/true);
      }
      stats.staged_tensors += static_cast<int64_t>(unit.pieces.size());
      f.buffer = f.buffer.narrow(0, 0, static_cast<int64_t>(unit.bytes));
    }
    f.work = broadcast_one(pg, f.buffer, o.root, o.timeout);
    ++stats.broadcasts;
    for (const Piece& p : unit.pieces) stats.bytes += static_cast<int64_t>(p.nbytes);
    in_flight.push_back(std::move(f));
  }
  while (!in_flight.empty()) {
    finish(in_flight.front());
    in_flight.pop_front();
  }
  synchronize_devices(units);
  for (auto& [device, pool] : slots) {
    for (Slot& slot : pool) {
      if (slot.buffer.is_cpu()) HostBufferCache::get().give(std::move(slot.buffer));
    }
  }

  if (o.verify) {
    std::vector<int64_t> hashes;
    std::vector<size_t> index;
    for (const Unit& unit : units) {
      for (const Piece& p : unit.pieces) {
        hashes.push_back(static_cast<int64_t>(checksum_tensor(tensors[p.index])));
        index.push_back(p.index);
      }
    }
    const std::vector<int64_t> roots = control::broadcast_fixed(pg, hashes, o.root, control_on(control_device, o));
    int64_t first_bad = 0;
    for (size_t k = 0; k < hashes.size() && first_bad == 0; ++k) {
      if (hashes[k] != roots[k]) first_bad = static_cast<int64_t>(index[k]) + 1;
    }
    const int64_t bad = control::max(pg, int64_t(first_bad), control_on(control_device, o));
    TORCH_CHECK(bad == 0, "broadcast_coalesced: checksum mismatch: tensor ", bad - 1,
                " differs from root ", o.root, "'s after the transfer (corrupted transfer); rank ", rank,
                first_bad ? " holds a bad copy" : " is intact, a peer holds a bad copy");
  }
  return stats;
}

void release_broadcast_buffers() {
  HostBufferCache::get().clear();
}

void broadcast_coalesced(const c10::intrusive_ptr<c10d::ProcessGroup>& process_group, at::TensorList tensors,
                         size_t buffer_size, int root) {
  BroadcastCoalescedOptions options;
  options.root = root;
  options.buffer_bytes = buffer_size;
  broadcast_coalesced(process_group, tensors, options);
}

}  // namespace ftcomm
