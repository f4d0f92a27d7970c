#include "snapshot_staging.h"

#include <cstring>
#include <utility>

#include <ATen/ATen.h>
#include <c10/core/StreamGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "host_memory.h"
#include "store_format.h"

namespace ftcomm {
namespace store {
namespace {

// Where a staged tensor lives in use: as the caller says, else where it is now.
c10::DeviceType home_of(const NamedTensor& nt) {
  return nt.home != c10::DeviceType::CPU ? nt.home : nt.tensor.device().type();
}

}  // namespace

void StagingSlot::stage_image(const std::vector<NamedTensor>& state, const std::string& file_header,
                              const std::vector<std::string>& headers, const std::vector<uint64_t>& data_at,
                              size_t total) {
  const size_t need = (total + kImageAlign - 1) / kImageAlign * kImageAlign;
  host_.clear();
  pieces_.clear();
  if (!buffer_.defined() || capacity_ < need) {
    buffer_ = at::Tensor();  // the old buffer goes before the new one comes
    // One extra alignment's worth, so that the image can start on a boundary.
    buffer_ = at::empty({static_cast<int64_t>(need + kImageAlign)}, at::TensorOptions().dtype(at::kByte));
    const auto base = reinterpret_cast<uintptr_t>(buffer_.data_ptr());
    image_ptr_ = reinterpret_cast<uint8_t*>((base + kImageAlign - 1) / kImageAlign * kImageAlign);
    capacity_ = need;
    if (capacity_ >= kPrefaultBytes) prefault(image_ptr_, capacity_);
  }
  blob_bytes_ = total;
  bytes_ = static_cast<int64_t>(capacity_);
  pinned_bytes_ = 0;
  std::memcpy(image_ptr_, file_header.data(), file_header.size());
  std::memset(image_ptr_ + total, 0, capacity_ - total);
  pieces_.emplace_back(image_ptr_, file_header.size());
  const c10::Storage keep = buffer_.storage();
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& src = state[i].tensor;
    uint8_t* header = image_ptr_ + (data_at[i] - headers[i].size());
    std::memcpy(header, headers[i].data(), headers[i].size());
    uint8_t* data = image_ptr_ + data_at[i];
    // A view of the image that keeps its buffer alive.
    at::Tensor view = at::from_blob(
        data, src.sizes(), [keep](void*) {}, at::TensorOptions().dtype(src.dtype()));
    host_.push_back({state[i].name, view, home_of(state[i])});
    pieces_.emplace_back(header, headers[i].size());
    pieces_.emplace_back(data, view.nbytes());
  }
}

void StagingSlot::stage_pinned(const std::vector<NamedTensor>& state, const std::string& file_header,
                               const std::vector<std::string>& headers, size_t total) {
  // Pinned memory comes from c10's host allocator, which rounds each block up
  // to a power of two: one image-sized block would take up to twice the
  // snapshot. So a buffer per tensor, kept while its shape and dtype fit.
  buffer_ = at::Tensor();
  image_ptr_ = nullptr;
  capacity_ = 0;
  blob_bytes_ = total;
  owned_headers_ = headers;
  owned_headers_.insert(owned_headers_.begin(), file_header);
  const bool reuse = host_.size() == state.size();
  std::vector<NamedTensor> next;
  next.reserve(state.size());
  bytes_ = pinned_bytes_ = 0;
  pieces_.clear();
  pieces_.emplace_back(owned_headers_[0].data(), owned_headers_[0].size());
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& src = state[i].tensor;
    const bool pin = !src.is_cpu();
    at::Tensor dst = reuse ? host_[i].tensor : at::Tensor();
    if (!dst.defined() || dst.sizes() != src.sizes() || dst.dtype() != src.dtype() || dst.is_pinned() != pin) {
      dst = at::empty(src.sizes(), at::TensorOptions().dtype(src.dtype()).pinned_memory(pin));
    }
    bytes_ += static_cast<int64_t>(dst.nbytes());
    if (pin) pinned_bytes_ += static_cast<int64_t>(dst.nbytes());
    pieces_.emplace_back(owned_headers_[i + 1].data(), owned_headers_[i + 1].size());
    pieces_.emplace_back(dst.data_ptr(), dst.nbytes());
    next.push_back({state[i].name, dst, home_of(state[i])});
  }
  host_ = std::move(next);
}

void StagingSlot::stage(const std::vector<NamedTensor>& state) {
  wait_copied();  // a slot is staged again only after its write; this is a no-op then

  // The blob's layout, from the tensors' names, homes, dtypes and shapes.
  bool accelerator = false;
  Encoder file_header;
  file_header.u64(kBlobMagic);
  file_header.u64(state.size());
  std::string layout = file_header.out();
  std::vector<std::string> headers;
  std::vector<uint64_t> data_at;
  headers.reserve(state.size());
  data_at.reserve(state.size());
  uint64_t at = layout.size();
  for (const NamedTensor& nt : state) {
    const at::Tensor& src = nt.tensor;
    accelerator = accelerator || !src.is_cpu();
    Encoder e;
    encode_blob_tensor_header(e, nt.name, home_of(nt), src, at);
    at += e.out().size();
    data_at.push_back(at);
    at += static_cast<uint64_t>(src.numel()) * src.element_size();
    layout += e.out();
    headers.push_back(std::move(e.out()));
  }
  const size_t total = static_cast<size_t>(at);

  if (accelerator) {
    stage_pinned(state, file_header.out(), headers, total);
  } else if (!buffer_.defined() || layout != layout_) {
    stage_image(state, file_header.out(), headers, data_at, total);
  }
  layout_ = std::move(layout);

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
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor src = state[i].tensor.detach();
    at::Tensor& dst = host_[i].tensor;
    if (!src.is_cpu()) {
      const Side& s = side_for(src.device());
      c10::StreamGuard guard(s.side);
      dst.copy_(src, /*non_blocking=*/true);
      // The caller may drop its tensor (a temporary buddy copy) before the copy
      // runs: its memory is not reused until the side stream is past it.
      c10::impl::VirtualGuardImpl(src.device().type()).recordDataPtrOnStream(src.storage().data_ptr(), s.side);
    } else {
      dst.copy_(src);
    }
  }
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
