// Snapshots: blobs written in the background and read back, retention and garbage
// collection (see rocks_store.h).
#include "rocks_store.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <set>
#include <thread>
#include <utility>

#include <ATen/ATen.h>

#include "blob_reader.h"
#include "checksum.h"
#include "fsutil.h"
#include "host_memory.h"
#include "store_format.h"

namespace ftcomm {
namespace store {
namespace {

// `error` (when given) gets the failed write's errno.
StoreStatus write_all(int fd, const void* data, size_t n, const std::string& path, int* error = nullptr) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (error) *error = errno;
      if (errno == EFBIG) {
        return StoreStatus::IOError("write " + path + ": " + std::strerror(errno) +
                                    ": the process's file-size limit (ulimit -f) is below the snapshot's size; raise "
                                    "it (ulimit -f unlimited) or snapshot less state");
      }
      return StoreStatus::IOError("write " + path + ": " + std::strerror(errno) +
                                  "; free space or pick another --ckpt");
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return StoreStatus::OK();
}

StoreStatus fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return StoreStatus::IOError("open " + dir + ": " + std::strerror(errno));
  ::fsync(fd);
  ::close(fd);
  return StoreStatus::OK();
}

}  // namespace

std::shared_future<StoreStatus> RocksCheckpointStore::CommitSnapshotAsync(const CommitRecord& record,
                                                                          const std::vector<NamedTensor>& state) {
  std::lock_guard<std::mutex> call_lock(snapshot_call_mutex_);  // one caller at a time
  std::unique_lock<std::mutex> lock(queue_mutex_);
  if (slots_.empty()) {
    slots_.resize(static_cast<size_t>(std::max(1, options_.staging_slots)));
    slot_busy_.assign(slots_.size(), false);
    staged_bytes_.assign(slots_.size(), {0, 0});
  }
  auto free_slot = [&] { return std::find(slot_busy_.begin(), slot_busy_.end(), false); };
  if (free_slot() == slot_busy_.end()) {
    if (options_.when_behind == SnapshotWhenBehind::kSkip) {
      ++stats_.skipped;
      std::string behind;
      for (const Queued& q : queue_) behind += (behind.empty() ? "" : ", ") + std::to_string(q.record.step);
      std::promise<StoreStatus> skipped;
      skipped.set_value(StoreStatus::Skipped(
          "the snapshot of step " + std::to_string(record.step) + " was skipped: the disk is still writing step(s) " +
          behind + " (" + std::to_string(slots_.size()) + " staging slot(s) in " + options_.dir +
          "); commit less often, add a staging slot, or wait for the disk (when_behind=wait)"));
      return skipped.get_future().share();
    }
    const auto start = std::chrono::steady_clock::now();
    queue_cv_.wait(lock, [&] { return free_slot() != slot_busy_.end(); });
    ++stats_.waited;
    stats_.waited_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }
  const size_t slot = static_cast<size_t>(free_slot() - slot_busy_.begin());
  slot_busy_[slot] = true;
  lock.unlock();
  // The copy, outside the lock: the writer goes on with earlier snapshots.
  try {
    slots_[slot].stage(state);
  } catch (...) {
    lock.lock();
    slot_busy_[slot] = false;
    queue_cv_.notify_all();
    throw;
  }
  auto promise = std::make_shared<std::promise<StoreStatus>>();
  std::shared_future<StoreStatus> done = promise->get_future().share();
  lock.lock();
  ++stats_.taken;
  staged_bytes_[slot] = {slots_[slot].bytes(), slots_[slot].pinned_bytes()};
  queue_.push_back({record, slot, promise});
  if (!writer_.joinable()) writer_ = std::thread([this] { WriterLoop(); });
  queue_cv_.notify_all();
  return done;
}

void RocksCheckpointStore::WriterLoop() {
  std::unique_lock<std::mutex> lock(queue_mutex_);
  for (;;) {
    queue_cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, nothing left
    // The front stays queued while it is written: WaitForSnapshot waits for it.
    CommitRecord r = queue_.front().record;
    const size_t slot_index = queue_.front().slot;
    StagingSlot& slot = slots_[slot_index];
    const auto promise = queue_.front().promise;
    lock.unlock();
    const auto start = std::chrono::steady_clock::now();
    StoreStatus s;
    try {
      slot.wait_copied();
      s = WriteBlob(&r, slot);
    } catch (const std::exception& e) {
      s = StoreStatus::IOError(std::string("copying a snapshot to host memory: ") + e.what());
    }
    if (s.ok()) {
      std::lock_guard<std::mutex> commit_lock(commit_mutex_);
      s = CommitLocked(r, /*retention=*/false);
      // A blob whose commit was refused or failed is referenced by nothing.
      if (!s.ok()) ::unlink((blob_dir_ + "/" + r.blob_file).c_str());
    }
    {
      // The slot is free once its snapshot is durable (or failed), before the
      // future says so: a caller that waited for it finds a slot.
      std::lock_guard<std::mutex> l(queue_mutex_);
      if (!s.ok() && unreported_.ok()) unreported_ = s;
      slot_busy_[slot_index] = false;
    }
    queue_cv_.notify_all();
    promise->set_value(s);
    // Retention runs after the commit is reported: retiring the old snapshot
    // (unlinking a blob as large as this one took ~45 ms for 268 MB) is not part
    // of making this one durable. The next write waits for it; a crash before it
    // is finished by the next retention pass.
    if (s.ok()) {
      std::lock_guard<std::mutex> commit_lock(commit_mutex_);
      ApplyRetention();
    }
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    lock.lock();
    ++stats_.written;
    stats_.write_ms += ms;
    queue_.pop_front();
    queue_cv_.notify_all();
  }
}

void RocksCheckpointStore::WaitForWriter() {
  std::unique_lock<std::mutex> lock(queue_mutex_);
  queue_cv_.wait(lock, [&] { return queue_.empty(); });
}

StoreStatus RocksCheckpointStore::WaitForSnapshot() {
  WaitForWriter();
  return TakeSnapshotError();
}

StoreStatus RocksCheckpointStore::TakeSnapshotError() {
  std::lock_guard<std::mutex> lock(queue_mutex_);
  return std::exchange(unreported_, StoreStatus::OK());
}

SnapshotStats RocksCheckpointStore::snapshot_stats() const {
  std::lock_guard<std::mutex> lock(queue_mutex_);
  SnapshotStats out = stats_;
  for (const auto& [bytes, pinned] : staged_bytes_) {
    out.staging_bytes += bytes;
    out.pinned_bytes += pinned;
  }
  return out;
}

StoreStatus RocksCheckpointStore::LoadSnapshot(const CommitRecord& record, std::vector<NamedTensor>* state) {
  state->clear();
  if (!record.has_snapshot) {
    return StoreStatus::InvalidArgument("commit of step " + std::to_string(record.step) + " carries no snapshot");
  }
  const std::string path = blob_dir_ + "/" + record.blob_file;
  auto damaged = [&](const std::string& why) {
    return StoreStatus::Corruption("snapshot blob " + path + " of step " + std::to_string(record.step) + " " + why +
                                   "; the file is damaged: resync this rank from a peer or resume an older step");
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return StoreStatus::Corruption("snapshot blob " + path + " of step " + std::to_string(record.step) +
                                   " is missing (" + std::strerror(errno) + "); resync this rank from a peer");
  }
  struct stat st {};
  ::fstat(fd, &st);
  if (static_cast<uint64_t>(st.st_size) != record.blob_bytes) {
    ::close(fd);
    return damaged("has " + std::to_string(st.st_size) + " bytes, its commit says " +
                   std::to_string(record.blob_bytes));
  }
  ::posix_fadvise(fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  // Each tensor's bytes are read straight into the tensor (one copy, from the page
  // cache or the disk); the checksum follows on another thread, one piece behind.
  BlobReader in(fd, record.blob_bytes);
  ChainedChecksum checksum;
  std::vector<NamedTensor> out;
  auto result = [&](StoreStatus s) {
    const uint64_t sum = checksum.finish();
    ::close(fd);
    if (s.ok() && in.left() != 0) s = damaged("has " + std::to_string(in.left()) + " bytes past its last tensor");
    if (s.ok() && sum != record.blob_checksum) s = damaged("fails its checksum");
    if (s.ok()) *state = std::move(out);
    return s;
  };
  std::string* head = checksum.header();
  uint64_t magic = 0, count = 0;
  if (!in.u64(&magic, head) || (magic != kBlobMagic && magic != kBlobMagicV2 && magic != kBlobMagicV1) ||
      !in.u64(&count, head)) {
    return result(damaged("has a bad header"));
  }
  for (uint64_t i = 0; i < count; ++i) {
    const std::string truncated = "is truncated at tensor " + std::to_string(i);
    head = checksum.header();
    NamedTensor nt;
    uint64_t name_bytes = 0;
    if (!in.u64(&name_bytes, head) || name_bytes > in.left() || !in.str(&nt.name, name_bytes, head)) {
      return result(damaged(truncated));
    }
    int64_t home = static_cast<int64_t>(c10::DeviceType::CPU);
    if (magic != kBlobMagicV1 && !in.i64(&home, head)) return result(damaged(truncated));
    if (home < 0 || home >= static_cast<int64_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)) {
      return result(damaged("has a bad device type"));
    }
    nt.home = static_cast<c10::DeviceType>(home);
    int64_t dtype = 0;
    uint64_t dims = 0, nbytes = 0;
    if (!in.i64(&dtype, head) || !in.u64(&dims, head) || dims > in.left() / 8) return result(damaged(truncated));
    std::vector<int64_t> sizes(dims);
    for (auto& d : sizes) {
      if (!in.i64(&d, head)) return result(damaged(truncated));
    }
    if (!in.u64(&nbytes, head)) return result(damaged(truncated));
    if (magic == kBlobMagic) {
      uint64_t pad = 0;
      std::string zeros;
      if (!in.u64(&pad, head) || pad >= kBlobDataAlign || !in.str(&zeros, pad, head)) {
        return result(damaged(truncated));
      }
    }
    if (nbytes > in.left()) return result(damaged(truncated));
    if (dtype < 0 || dtype >= static_cast<int64_t>(c10::ScalarType::NumOptions)) {
      return result(damaged("has a bad dtype"));
    }
    // The header's shape is checked against its byte count before anything is
    // allocated: a damaged (or forged) size must fall back to an older snapshot
    // or a peer, not allocate 2^45 elements or throw.
    if (!ShapeFits(static_cast<c10::ScalarType>(dtype), sizes, nbytes)) {
      return result(damaged("has a bad shape for tensor " + std::to_string(i)));
    }
    try {
      nt.tensor = at::empty(sizes, at::TensorOptions().dtype(static_cast<c10::ScalarType>(dtype)));
    } catch (const c10::Error&) {
      return result(damaged("has a tensor of a type this ftcomm cannot hold (tensor " + std::to_string(i) + ")"));
    }
    if (nbytes >= kPrefaultBytes) prefault(nt.tensor.data_ptr(), nbytes);
    if (nbytes > 0 && !in.read(nt.tensor.data_ptr(), nbytes)) return result(damaged(truncated));
    checksum.add(nt.tensor.data_ptr(), nbytes);
    out.push_back(std::move(nt));
  }
  return result(StoreStatus::OK());
}

bool RocksCheckpointStore::ShapeFits(c10::ScalarType dtype, const std::vector<int64_t>& sizes, uint64_t nbytes) {
  size_t item = 0;
  try {
    item = c10::elementSize(dtype);
  } catch (const c10::Error&) {
    return false;
  }
  if (item == 0) return false;
  if (std::any_of(sizes.begin(), sizes.end(), [](int64_t d) { return d < 0; })) return false;
  if (std::find(sizes.begin(), sizes.end(), 0) != sizes.end()) return nbytes == 0;
  uint64_t total = item;
  for (int64_t d : sizes) {
    if (total > nbytes / static_cast<uint64_t>(d)) return false;  // more than nbytes, checked before it overflows
    total *= static_cast<uint64_t>(d);
  }
  return total == nbytes;
}

StoreStatus RocksCheckpointStore::ApplyRetention() {
  std::vector<CommitRecord> all;
  auto s = ListCommits(&all);
  if (!s.ok()) return s;
  std::vector<const CommitRecord*> snaps;
  for (const auto& r : all)
    if (r.has_snapshot) snaps.push_back(&r);
  const int keep = std::max(1, options_.keep_snapshots);
  if (static_cast<int>(snaps.size()) <= keep) return StoreStatus::OK();
  int64_t oldest_kept = snaps[snaps.size() - keep]->step;
  // Just-in-time snapshots lack the buddy copies a failed peer may need; the
  // newest periodic snapshot, which has them, is always kept.
  for (auto it = snaps.rbegin(); it != snaps.rend(); ++it) {
    if (!(*it)->just_in_time) {
      oldest_kept = std::min(oldest_kept, (*it)->step);
      break;
    }
  }
  rocksdb::WriteBatch batch;
  for (const auto& r : all) {
    if (r.step >= oldest_kept) break;
    batch.Delete(kCommitPrefix + step_key(r.step));
    batch.DeleteRange(kHookPrefix + step_key(r.step) + "/", kHookPrefix + step_key(r.step) + "/~");
    if (r.has_snapshot) batch.Put(kGcPrefix + r.blob_file, "");
  }
  s = Write(batch, "retiring old commits");
  return s.ok() ? CollectGarbage() : s;
}

StoreStatus RocksCheckpointStore::CollectGarbage() {
  std::set<std::string> referenced;
  std::vector<CommitRecord> all;
  auto s = ListCommits(&all);
  if (!s.ok()) return s;
  for (const auto& r : all)
    if (r.has_snapshot) referenced.insert(r.blob_file);
  std::vector<std::string> markers;
  s = Scan(kGcPrefix, [&](const rocksdb::Slice& key, const rocksdb::Slice&) {
    markers.push_back(key.ToString());
    return true;
  });
  if (!s.ok()) return s;
  const std::string in_flight = in_flight_blob_;
  for (const std::string& name : detail::list_dir(blob_dir_)) {
    if (!referenced.count(name) && name != in_flight) ::unlink((blob_dir_ + "/" + name).c_str());
  }
  if (markers.empty()) return StoreStatus::OK();
  fsync_dir(blob_dir_);
  rocksdb::WriteBatch batch;
  for (const auto& m : markers) batch.Delete(m);
  return Write(batch, "dropping collected blob markers");
}

StoreStatus RocksCheckpointStore::WriteBlob(CommitRecord* r, const StagingSlot& slot) {
  const std::string name = "step-" + step_key(r->step) + ".blob";
  const std::string tmp = blob_dir_ + "/" + name + ".tmp";
  const std::string path = blob_dir_ + "/" + name;
  {
    std::lock_guard<std::mutex> lock(commit_mutex_);
    in_flight_blob_ = name + ".tmp";
  }
  // A new file, never a path's target: whatever stands at the temporary name (a
  // leftover, or a planted symbolic link) is removed, and the file is created
  // exclusively without following links. Direct I/O where the file system takes
  // it (not tmpfs, say): the image goes to the disk without a copy into the page
  // cache.
  ::unlink(tmp.c_str());
  const int flags = O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC;
  int fd = -1;
  if (options_.direct_writes && slot.image() != nullptr) {  // an image is aligned for it
    fd = ::open(tmp.c_str(), flags | O_DIRECT, 0600);
    if (fd < 0 && errno == EINVAL) ::unlink(tmp.c_str());
  }
  if (fd < 0) fd = ::open(tmp.c_str(), flags, 0600);
  if (fd < 0) {
    {
      std::lock_guard<std::mutex> lock(commit_mutex_);
      in_flight_blob_.clear();
    }
    return StoreStatus::IOError("create " + tmp + ": " + std::strerror(errno) +
                                "; is the checkpoint directory writable?");
  }
  // The checksum chains over the pieces in file order (file header, then each
  // tensor's header and bytes); LoadSnapshot re-chains over the same pieces. It
  // runs on another core while this thread writes (268 MB: the checksum is
  // ~26 ms, the writes ~85 ms).
  const auto& pieces = slot.pieces();
  auto checksum_task = std::async(std::launch::async, [&pieces] {
    uint64_t c = 0;
    for (const auto& [p, n] : pieces) c = detail::checksum64(p, n, c);
    return c;
  });
  StoreStatus s;
  // Plain writes then one fsync. Starting writeback early with sync_file_range
  // every 8 MB (RocksDB's bytes_per_sync) was measured slower here: the writes
  // then block on the device queue (268 MB: 220-380 ms instead of ~100 ms).
  // An image is written whole; a snapshot in pinned buffers piece by piece.
  // Direct writes cover whole blocks: the image's last partial block goes through
  // the page cache, as does everything where the device refuses a direct write.
  const size_t total = slot.blob_bytes();
  std::vector<std::pair<const void*, size_t>> spans{{slot.image(), total}};
  if (slot.image() == nullptr) spans = pieces;
  const size_t body = total / StagingSlot::kImageAlign * StagingSlot::kImageAlign;
  bool direct = (::fcntl(fd, F_GETFL) & O_DIRECT) != 0;
  auto buffered = [&] {
    if (direct) ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) & ~O_DIRECT);
    direct = false;
  };
  const auto started = std::chrono::steady_clock::now();
  const int64_t rate = options_.write_bytes_per_sec;
  size_t written = 0;  // bytes of the file so far
  for (const auto& [p, n] : spans) {
    const char* data = static_cast<const char*>(p);
    // With a rate cap, 1 MiB at a time, each after its share of the time.
    const size_t chunk = rate > 0 ? size_t(1) << 20 : std::max<size_t>(n, 1);
    size_t done = 0;  // of this span
    while (done < n && s.ok()) {
      if (direct && written + done >= body) buffered();
      const size_t end = direct ? std::min(n, body - written) : n;
      const size_t len = std::min(chunk, end - done);
      int error = 0;
      s = write_all(fd, data + done, len, tmp, &error);
      if (!s.ok() && direct && error == EINVAL) {
        // This device wants larger blocks than the image's alignment: the page
        // cache it is, from where the direct writes stopped.
        buffered();
        done = static_cast<size_t>(::lseek(fd, 0, SEEK_CUR)) - written;
        s = StoreStatus::OK();
        continue;
      }
      done += len;
      if (rate > 0) {
        std::this_thread::sleep_until(started + std::chrono::microseconds((written + done) * 1000000 / rate));
      }
    }
    if (!s.ok()) break;
    written += n;
  }
  const uint64_t checksum = checksum_task.get();
  if (s.ok() && ::fsync(fd) != 0) s = StoreStatus::IOError("fsync " + tmp + ": " + std::strerror(errno));
  ::close(fd);
  if (s.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    s = StoreStatus::IOError("rename " + tmp + ": " + std::strerror(errno));
  }
  if (s.ok()) s = fsync_dir(blob_dir_);
  {
    std::lock_guard<std::mutex> lock(commit_mutex_);
    in_flight_blob_.clear();
  }
  if (!s.ok()) {
    ::unlink(tmp.c_str());
    return s;
  }
  r->has_snapshot = true;
  r->blob_file = name;
  r->blob_bytes = total;
  r->blob_checksum = checksum;
  return StoreStatus::OK();
}

}  // namespace store
}  // namespace ftcomm
