#include "snapshot_staging.h"

#include <utility>

#include <ATen/ATen.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

namespace ftcomm {
namespace store {
namespace {

bool fits(const at::Tensor& buffer, const at::Tensor& src, bool pinned) {
  return buffer.defined() && buffer.sizes() == src.sizes() && buffer.dtype() == src.dtype() &&
         buffer.is_pinned() == pinned;
}

}  // namespace

void StagingSlot::stage(const std::vector<NamedTensor>& state) {
  wait_copied();  // a slot is staged again only after its write; this is a no-op then
  // One side stream per accelerator device, entered after the work already on that
  // device's current stream (the step that produced the state).
  struct Side {
    c10::Device device;
    c10::Stream current;
    c10::Stream side;
  };
  std::vector<Side> sides;
  auto side_for = [&](const c10::Device& device) -> const Side& {
    for (const Side& s : sides) {
      if (s.device == device) return s;
    }
    c10::impl::VirtualGuardImpl impl(device.type());
    const c10::Stream current = impl.getStream(device);
    const c10::Stream side = impl.getStreamFromGlobalPool(device, /*isHighPriority=*/false);
    c10::Event ready(device.type());
    ready.record(current);
    ready.block(side);
    sides.push_back(Side{device, current, side});
    return sides.back();
  };

  std::vector<NamedTensor> next;
  next.reserve(state.size());
  const bool reuse = host_.size() == state.size();
  bytes_ = pinned_bytes_ = 0;
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor src = state[i].tensor.detach();
    const bool accelerator = !src.is_cpu();
    at::Tensor dst = reuse ? host_[i].tensor : at::Tensor();
    if (!fits(dst, src, accelerator)) {
      dst = at::empty(src.sizes(), at::TensorOptions().dtype(src.dtype()).pinned_memory(accelerator));
    }
    if (accelerator) {
      const Side& s = side_for(src.device());
      c10::StreamGuard guard(s.side);
      dst.copy_(src, /*non_blocking=*/true);
      // The caller may drop its tensor (a temporary buddy copy) before the copy
      // runs: its memory is not reused until the side stream is past it.
      c10::impl::VirtualGuardImpl(src.device().type()).recordDataPtrOnStream(src.storage().data_ptr(), s.side);
      pinned_bytes_ += static_cast<int64_t>(dst.nbytes());
    } else {
      dst.copy_(src);
    }
    bytes_ += static_cast<int64_t>(dst.nbytes());
    // Home: as the caller says, else where the tensor is now.
    const c10::DeviceType home = state[i].home != c10::DeviceType::CPU ? state[i].home : src.device().type();
    next.push_back({state[i].name, dst, home});
  }
  host_ = std::move(next);
  copied_.clear();
  for (const Side& s : sides) {
    c10::Event done(s.device.type());
    done.record(s.side);
    done.block(s.current);  // the caller's later work waits for the copy, on the device
    copied_.push_back(std::move(done));
  }
}

void StagingSlot::wait_copied() {
  for (const auto& e : copied_) e.synchronize();
  copied_.clear();
}

}  // namespace store
}  // namespace ftcomm
