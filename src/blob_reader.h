// Reading a snapshot blob (internal to the store): BlobReader takes the file's
// small headers through a buffer and its tensors' bytes straight into their
// memory; ChainedChecksum chains checksum64 over the same pieces, in order, on a
// thread of its own, so that hashing one tensor overlaps reading the next.
#pragma once

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace ftcomm {
namespace store {

class BlobReader {
 public:
  // Reads from `fd` (positioned at 0), whose size is `size`.
  BlobReader(int fd, uint64_t size) : fd_(fd), left_(size) {}
  // Bytes of the file not consumed yet.
  uint64_t left() const { return left_; }
  // The next `n` bytes into `dst`; false when the file ends first or a read fails.
  bool read(void* dst, size_t n);
  // Fixed-size fields and strings, appending their raw bytes to `raw`.
  bool u64(uint64_t* v, std::string* raw);
  bool i64(int64_t* v, std::string* raw);
  bool str(std::string* s, size_t n, std::string* raw);

 private:
  bool fill();
  int fd_;
  uint64_t left_;
  std::vector<char> buffer_ = std::vector<char>(size_t(64) << 10);
  size_t at_ = 0, have_ = 0;  // buffer_[at_, have_) is read but not consumed
};

class ChainedChecksum {
 public:
  ChainedChecksum() = default;
  ~ChainedChecksum() { finish(); }
  ChainedChecksum(const ChainedChecksum&) = delete;
  ChainedChecksum& operator=(const ChainedChecksum&) = delete;
  // Opens a header piece the caller appends to; the previous open one is hashed.
  std::string* header();
  // Hashes `n` bytes at `p` (which must stay valid until finish()) after the
  // open header piece.
  void add(const void* p, size_t n);
  // Waits for every piece; the chained checksum.
  uint64_t finish();

 private:
  void submit(const void* p, size_t n);
  void close_header();
  std::deque<std::string> headers_;  // stable addresses while hashed
  bool header_open_ = false;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<std::pair<const void*, size_t>> pieces_;
  bool finishing_ = false;
  uint64_t sum_ = 0;
  std::thread hasher_;
};

}  // namespace store
}  // namespace ftcomm
