// How a checkpoint store lays out its bytes (internal to the store's files):
// the RocksDB keys, the little-endian codec of commit records and bucket
// layouts, and the snapshot blob's header. Every record and blob this ftcomm
// writes is read back through these, and an older format is still read.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "ftcomm/checkpoint_store.h"

namespace ftcomm {
namespace store {

constexpr int kSchemaVersion = 1;
constexpr uint32_t kBlobMagicV1 = 0x42435446;  // "FTCB"
constexpr uint32_t kBlobMagicV2 = 0x32435446;  // "FTC2": each tensor also records its device type
// "FTC3": each tensor's header ends in zero padding (its length, then the bytes),
// so that its data starts at a multiple of kBlobDataAlign in the file; a staged
// image's tensors are then aligned views of one buffer.
constexpr uint32_t kBlobMagic = 0x33435446;
constexpr size_t kBlobDataAlign = 64;

// The advice every "this store is damaged" error ends with.
extern const char* const kDamagedFix;

// --- keys ------------------------------------------------------------------------

// A step as a key: zero-padded, so keys sort as steps do.
std::string step_key(int64_t step);
inline const std::string kCommitPrefix = "commit/";
// Hook state keyed per step: a key space of stores written before hook state
// moved into snapshot blobs only; retention and discards still clear it.
inline const std::string kHookPrefix = "hook/";
inline const std::string kLayoutPrefix = "layout/";
inline const std::string kGcPrefix = "gc/";
inline const std::string kSchemaKey = "meta/schema";
inline const std::string kIdentityKey = "meta/identity";

// --- little-endian encoding ------------------------------------------------------

class Encoder {
 public:
  void u64(uint64_t v) { out_.append(reinterpret_cast<const char*>(&v), 8); }
  void i64(int64_t v) { u64(static_cast<uint64_t>(v)); }
  void str(const std::string& s) {
    u64(s.size());
    out_.append(s);
  }
  void i64s(const std::vector<int64_t>& v) {
    u64(v.size());
    for (int64_t x : v) i64(x);
  }
  void raw(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string& out() { return out_; }

 private:
  std::string out_;
};

class Decoder {
 public:
  Decoder(const char* p, size_t n) : begin_(p), p_(p), end_(p + n) {}
  explicit Decoder(const std::string& s) : Decoder(s.data(), s.size()) {}
  bool u64(uint64_t* v) {
    if (end_ - p_ < 8) return fail();
    std::memcpy(v, p_, 8);
    p_ += 8;
    return true;
  }
  bool i64(int64_t* v) { return u64(reinterpret_cast<uint64_t*>(v)); }
  bool str(std::string* s) {
    uint64_t n;
    if (!u64(&n) || static_cast<uint64_t>(end_ - p_) < n) return fail();
    s->assign(p_, n);
    p_ += n;
    return true;
  }
  bool i64s(std::vector<int64_t>* v) {
    uint64_t n;
    if (!u64(&n) || n > static_cast<uint64_t>(end_ - p_) / 8) return fail();
    v->resize(n);
    for (auto& x : *v) i64(&x);
    return true;
  }
  const char* take(size_t n) {
    if (static_cast<size_t>(end_ - p_) < n) {
      fail();
      return nullptr;
    }
    const char* at = p_;
    p_ += n;
    return at;
  }
  bool ok() const { return ok_; }
  size_t pos() const { return static_cast<size_t>(p_ - begin_); }
  bool done() const { return ok_ && p_ == end_; }

 private:
  bool fail() {
    ok_ = false;
    return false;
  }
  const char* begin_;
  const char* p_;
  const char* end_;
  bool ok_ = true;
};

// A tensor's header (dtype, sizes, bytes) then its bytes.
void encode_tensor_header(Encoder& e, const at::Tensor& t);
// A blob's tensor header (kBlobMagic): name, home, the tensor header, then the
// padding's length and its zero bytes, for a header that starts `at` bytes into
// the file; its data follows at a multiple of kBlobDataAlign.
void encode_blob_tensor_header(Encoder& e, const std::string& name, c10::DeviceType home, const at::Tensor& t,
                               uint64_t at);
std::string encode_record(const CommitRecord& r);
// False when the bytes are not a record (truncated, or trailing bytes).
bool decode_record(const std::string& s, CommitRecord* r);
std::string encode_layout(const BucketLayout& l);
bool decode_layout(const std::string& s, BucketLayout* l);

// Milliseconds since the Unix epoch (a record's unix_ms).
int64_t now_ms();

}  // namespace store
}  // namespace ftcomm
