#include "blob_reader.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "checksum.h"

namespace ftcomm {
namespace store {

bool BlobReader::fill() {
  at_ = have_ = 0;
  const size_t want = static_cast<size_t>(std::min<uint64_t>(buffer_.size(), left_));
  while (have_ < want) {
    const ssize_t r = ::read(fd_, buffer_.data() + have_, want - have_);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    have_ += static_cast<size_t>(r);
  }
  return true;
}

bool BlobReader::read(void* dst, size_t n) {
  if (n > left_) return false;
  char* out = static_cast<char*>(dst);
  const size_t buffered = std::min(n, have_ - at_);
  std::memcpy(out, buffer_.data() + at_, buffered);
  at_ += buffered;
  out += buffered;
  size_t rest = n - buffered;
  left_ -= buffered;
  if (rest == 0) return true;
  if (rest < buffer_.size()) {
    if (!fill() || have_ < rest) return false;
    std::memcpy(out, buffer_.data(), rest);
    at_ = rest;
    left_ -= rest;
    return true;
  }
  // Large: straight from the file into the destination.
  while (rest > 0) {
    const ssize_t r = ::read(fd_, out, std::min<size_t>(rest, size_t(1) << 30));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    out += r;
    rest -= static_cast<size_t>(r);
    left_ -= static_cast<uint64_t>(r);
  }
  return true;
}

bool BlobReader::u64(uint64_t* v, std::string* raw) {
  char b[8];
  if (!read(b, 8)) return false;
  std::memcpy(v, b, 8);
  raw->append(b, 8);
  return true;
}

bool BlobReader::i64(int64_t* v, std::string* raw) {
  uint64_t u = 0;
  if (!u64(&u, raw)) return false;
  std::memcpy(v, &u, 8);
  return true;
}

bool BlobReader::str(std::string* s, size_t n, std::string* raw) {
  s->resize(n);
  if (n > 0 && !read(s->data(), n)) return false;
  raw->append(*s);
  return true;
}

void ChainedChecksum::submit(const void* p, size_t n) {
  std::lock_guard<std::mutex> lock(mutex_);
  pieces_.emplace_back(p, n);
  if (!hasher_.joinable()) {
    hasher_ = std::thread([this] {
      std::unique_lock<std::mutex> l(mutex_);
      for (;;) {
        cv_.wait(l, [&] { return finishing_ || !pieces_.empty(); });
        if (pieces_.empty()) return;
        const auto [data, bytes] = pieces_.front();
        pieces_.pop_front();
        const uint64_t seed = sum_;
        l.unlock();
        const uint64_t next = detail::checksum64(data, bytes, seed);
        l.lock();
        sum_ = next;
      }
    });
  }
  cv_.notify_one();
}

void ChainedChecksum::close_header() {
  if (!header_open_) return;
  header_open_ = false;
  submit(headers_.back().data(), headers_.back().size());
}

std::string* ChainedChecksum::header() {
  close_header();
  headers_.emplace_back();
  header_open_ = true;
  return &headers_.back();
}

void ChainedChecksum::add(const void* p, size_t n) {
  close_header();
  submit(p, n);
}

uint64_t ChainedChecksum::finish() {
  close_header();
  {
    std::lock_guard<std::mutex> lock(mutex_);
    finishing_ = true;
  }
  cv_.notify_one();
  if (hasher_.joinable()) hasher_.join();
  return sum_;
}

}  // namespace store
}  // namespace ftcomm
