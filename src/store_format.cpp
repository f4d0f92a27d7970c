#include "store_format.h"

#include <chrono>
#include <cinttypes>
#include <cstdio>

#include "checksum.h"

namespace ftcomm {
namespace store {

const char* const kDamagedFix =
    "nothing was written to it. Restore this rank's directory from a backup, or move it aside (mv DIR DIR.damaged) "
    "and restart: the job then resyncs this rank from a peer that holds the step (its rank-local hook state from a "
    "buddy copy). If every rank's store is damaged, the job can only start afresh";

std::string step_key(int64_t step) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%020" PRId64, step);
  return buf;
}

void encode_tensor_header(Encoder& e, const at::Tensor& t) {
  e.i64(static_cast<int64_t>(t.scalar_type()));
  e.i64s(t.sizes().vec());
  e.u64(t.numel() * t.element_size());
}

void encode_blob_tensor_header(Encoder& e, const std::string& name, c10::DeviceType home, const at::Tensor& t,
                               uint64_t at) {
  e.str(name);
  e.i64(static_cast<int64_t>(home));
  encode_tensor_header(e, t);
  const uint64_t end = at + e.out().size() + 8;  // after the padding's length
  const uint64_t pad = (kBlobDataAlign - end % kBlobDataAlign) % kBlobDataAlign;
  e.u64(pad);
  e.out().append(pad, '\0');
}

std::string encode_record(const CommitRecord& r) {
  Encoder e;
  e.i64(r.step);
  e.i64(r.epoch);
  e.i64(r.world_size);
  e.i64(r.data_position);
  e.str(r.rng_state);
  e.str(r.hook_digest);
  e.u64(r.layout_signature);
  e.u64(r.has_snapshot ? 1 : 0);
  e.str(r.blob_file);
  e.u64(r.blob_bytes);
  e.u64(r.blob_checksum);
  e.i64(r.unix_ms);
  // Added after schema 1's first records: a record without it decodes with no
  // settings.
  e.u64(r.settings.size());
  for (const auto& [k, v] : r.settings) {
    e.str(k);
    e.str(v);
  }
  // Added with just-in-time commits: a record without them is periodic, with
  // every buddy part.
  e.u64(r.just_in_time ? 1 : 0);
  e.str(r.jit_reason);
  e.u64(r.buddy_parts);
  // Added with node failure (ranks renumbered, stores adopted): the writer's rank.
  e.i64(r.rank);
  e.i64(r.buddy_stride);
  return std::move(e.out());
}

bool decode_record(const std::string& s, CommitRecord* r) {
  Decoder d(s);
  int64_t world = 0;
  uint64_t snap = 0;
  d.i64(&r->step), d.i64(&r->epoch), d.i64(&world), d.i64(&r->data_position);
  d.str(&r->rng_state), d.str(&r->hook_digest), d.u64(&r->layout_signature), d.u64(&snap);
  d.str(&r->blob_file), d.u64(&r->blob_bytes), d.u64(&r->blob_checksum), d.i64(&r->unix_ms);
  r->world_size = static_cast<int>(world);
  r->has_snapshot = snap != 0;
  r->settings.clear();
  if (d.ok() && !d.done()) {
    uint64_t n = 0;
    if (!d.u64(&n) || n > s.size()) return false;
    for (uint64_t i = 0; i < n; ++i) {
      std::string k, v;
      if (!d.str(&k) || !d.str(&v)) return false;
      r->settings[k] = v;
    }
  }
  r->just_in_time = false;
  r->jit_reason.clear();
  r->buddy_parts = CommitRecord::kBuddyTrainer | CommitRecord::kBuddyHook;
  if (d.ok() && !d.done()) {
    uint64_t jit = 0;
    if (!d.u64(&jit) || !d.str(&r->jit_reason) || !d.u64(&r->buddy_parts)) return false;
    r->just_in_time = jit != 0;
  }
  r->rank = -1;
  r->buddy_stride = 1;
  if (d.ok() && !d.done()) {
    int64_t rank = -1, stride = 1;
    if (!d.i64(&rank) || !d.i64(&stride)) return false;
    r->rank = static_cast<int>(rank);
    r->buddy_stride = static_cast<int>(stride);
  }
  return d.done();
}

std::string encode_layout(const BucketLayout& l) {
  Encoder e;
  e.u64(l.buckets.size());
  for (const auto& b : l.buckets) {
    e.i64s(b.parameter_indices);
    e.i64s(b.offsets);
    e.i64s(b.lengths);
    e.u64(b.sizes.size());
    for (const auto& s : b.sizes) e.i64s(s);
    e.i64(b.dtype);
    e.str(b.device);
  }
  return std::move(e.out());
}

bool decode_layout(const std::string& s, BucketLayout* l) {
  Decoder d(s);
  uint64_t n = 0;
  if (!d.u64(&n) || n > s.size()) return false;
  l->buckets.resize(n);
  for (auto& b : l->buckets) {
    uint64_t m = 0;
    d.i64s(&b.parameter_indices), d.i64s(&b.offsets), d.i64s(&b.lengths);
    if (!d.u64(&m) || m > s.size()) return false;
    b.sizes.resize(m);
    for (auto& x : b.sizes) d.i64s(&x);
    int64_t dtype = 0;
    d.i64(&dtype), d.str(&b.device);
    b.device = b.device.substr(0, b.device.find(':'));  // "cuda:0" in layouts written before device types
    b.dtype = static_cast<int>(dtype);
  }
  return d.done();
}

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace store
}  // namespace ftcomm

namespace ftcomm {

uint64_t BucketLayout::signature() const {
  const std::string bytes = store::encode_layout(*this);
  return detail::checksum64(bytes.data(), bytes.size(), /*seed=*/0x1a7);
}

}  // namespace ftcomm
