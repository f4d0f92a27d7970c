// Snapshots: blobs written in the background and read back, retention and garbage
// collection (see rocks_store.h).
#include "rocks_store.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include <ATen/ATen.h>

#include "checksum.h"
#include "fsutil.h"
#include "store_format.h"

namespace ftcomm {
namespace store {
namespace {

StoreStatus write_all(int fd, const void* data, size_t n, const std::string& path) {
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
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
  WaitForSnapshot();
  // Copy now, so training may change its tensors as soon as we return. The host
  // copies are kept for the next snapshot of the same shapes: fresh buffers
  // page-fault in on every snapshot (268 MB: ~130 ms to copy instead of ~30 ms).
  auto host = std::make_shared<std::vector<NamedTensor>>();
  host->reserve(state.size());
  const bool reuse = snapshot_copies_.size() == state.size();
  for (size_t i = 0; i < state.size(); ++i) {
    const at::Tensor& src = state[i].tensor;
    at::Tensor dst;
    if (reuse && snapshot_copies_[i].sizes() == src.sizes() && snapshot_copies_[i].dtype() == src.dtype()) {
      dst = snapshot_copies_[i];
    } else {
      dst = at::empty(src.sizes(), src.options().device(at::kCPU).memory_format(at::MemoryFormat::Contiguous));
    }
    dst.copy_(src.detach());
    // Home: as the caller says, else where the tensor is now.
    const c10::DeviceType home = state[i].home != c10::DeviceType::CPU ? state[i].home : src.device().type();
    host->push_back({state[i].name, dst, home});
  }
  snapshot_copies_.clear();
  for (const auto& nt : *host) snapshot_copies_.push_back(nt.tensor);
  auto promise = std::make_shared<std::promise<StoreStatus>>();
  std::lock_guard<std::mutex> lock(snapshot_mutex_);
  snapshot_ = promise->get_future().share();
  snapshot_thread_ = std::thread([this, record, host, promise] {
    CommitRecord r = record;
    StoreStatus s = WriteBlob(&r, *host);
    if (s.ok()) {
      std::lock_guard<std::mutex> commit_lock(commit_mutex_);
      s = CommitLocked(r, /*retention=*/false);
      // A blob whose commit was refused or failed is referenced by nothing.
      if (!s.ok()) ::unlink((blob_dir_ + "/" + r.blob_file).c_str());
    }
    promise->set_value(s);
    // Retention runs after the commit is reported: retiring the old snapshot
    // (unlinking a blob as large as this one took ~45 ms for 268 MB) is not part
    // of making this one durable. The next snapshot waits for it; a crash before
    // it is finished by the next retention pass.
    if (s.ok()) {
      std::lock_guard<std::mutex> commit_lock(commit_mutex_);
      ApplyRetention();
    }
  });
  return snapshot_;
}

StoreStatus RocksCheckpointStore::WaitForSnapshot() {
  std::lock_guard<std::mutex> lock(snapshot_mutex_);
  if (snapshot_thread_.joinable()) snapshot_thread_.join();
  return snapshot_.valid() ? snapshot_.get() : StoreStatus::OK();
}

StoreStatus RocksCheckpointStore::LoadSnapshot(const CommitRecord& record, std::vector<NamedTensor>* state) {
  if (!record.has_snapshot) {
    return StoreStatus::InvalidArgument("commit of step " + std::to_string(record.step) + " carries no snapshot");
  }
  const std::string path = blob_dir_ + "/" + record.blob_file;
  std::string bytes;
  {
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) {
      return StoreStatus::Corruption("snapshot blob " + path + " of step " + std::to_string(record.step) +
                                     " is missing (" + std::strerror(errno) + "); resync this rank from a peer");
    }
    struct stat st {};
    ::fstat(fd, &st);
    bytes.resize(static_cast<size_t>(st.st_size));
    size_t got = 0;
    while (got < bytes.size()) {
      const ssize_t r = ::read(fd, bytes.data() + got, bytes.size() - got);
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    ::close(fd);
    bytes.resize(got);
  }
  auto damaged = [&](const std::string& why) {
    return StoreStatus::Corruption("snapshot blob " + path + " of step " + std::to_string(record.step) + " " + why +
                                   "; the file is damaged: resync this rank from a peer or resume an older step");
  };
  if (bytes.size() != record.blob_bytes) {
    return damaged("has " + std::to_string(bytes.size()) + " bytes, its commit says " +
                   std::to_string(record.blob_bytes));
  }
  Decoder d(bytes);
  uint64_t magic = 0, count = 0;
  if (!d.u64(&magic) || (magic != kBlobMagic && magic != kBlobMagicV1) || !d.u64(&count)) {
    return damaged("has a bad header");
  }
  uint64_t checksum = detail::checksum64(bytes.data(), d.pos(), 0);
  state->clear();
  for (uint64_t i = 0; i < count; ++i) {
    NamedTensor nt;
    const size_t header_at = d.pos();
    if (!d.str(&nt.name)) return damaged("is truncated at tensor " + std::to_string(i));
    int64_t home = static_cast<int64_t>(c10::DeviceType::CPU);
    if (magic == kBlobMagic && !d.i64(&home)) return damaged("is truncated at tensor " + std::to_string(i));
    if (home < 0 || home >= static_cast<int64_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)) {
      return damaged("has a bad device type");
    }
    nt.home = static_cast<c10::DeviceType>(home);
    int64_t dtype = 0;
    std::vector<int64_t> sizes;
    uint64_t nbytes = 0;
    if (!d.i64(&dtype) || !d.i64s(&sizes) || !d.u64(&nbytes))
      return damaged("is truncated at tensor " + std::to_string(i));
    checksum = detail::checksum64(bytes.data() + header_at, d.pos() - header_at, checksum);
    const char* data = d.take(nbytes);
    if (data == nullptr) return damaged("is truncated at tensor " + std::to_string(i));
    checksum = detail::checksum64(data, nbytes, checksum);
    if (dtype < 0 || dtype >= static_cast<int64_t>(c10::ScalarType::NumOptions)) return damaged("has a bad dtype");
    // The header's shape is checked against the bytes that follow it before
    // anything is allocated: a damaged (or forged) size must fall back to an
    // older snapshot or a peer, not allocate 2^45 elements or throw.
    if (!ShapeFits(static_cast<c10::ScalarType>(dtype), sizes, nbytes)) {
      return damaged("has a bad shape for tensor " + std::to_string(i));
    }
    try {
      nt.tensor = at::empty(sizes, at::TensorOptions().dtype(static_cast<c10::ScalarType>(dtype)));
    } catch (const c10::Error&) {
      return damaged("has a tensor of a type this ftcomm cannot hold (tensor " + std::to_string(i) + ")");
    }
    if (nbytes > 0) std::memcpy(nt.tensor.data_ptr(), data, nbytes);
    state->push_back(std::move(nt));
  }
  if (checksum != record.blob_checksum) {
    state->clear();
    return damaged("fails its checksum");
  }
  return StoreStatus::OK();
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

StoreStatus RocksCheckpointStore::WriteBlob(CommitRecord* r, const std::vector<NamedTensor>& state) {
  const std::string name = "step-" + step_key(r->step) + ".blob";
  const std::string tmp = blob_dir_ + "/" + name + ".tmp";
  const std::string path = blob_dir_ + "/" + name;
  {
    std::lock_guard<std::mutex> lock(commit_mutex_);
    in_flight_blob_ = name + ".tmp";
  }
  // A new file, never a path's target: whatever stands at the temporary name (a
  // leftover, or a planted symbolic link) is removed, and the file is created
  // exclusively without following links.
  ::unlink(tmp.c_str());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
  if (fd < 0) {
    {
      std::lock_guard<std::mutex> lock(commit_mutex_);
      in_flight_blob_.clear();
    }
    return StoreStatus::IOError("create " + tmp + ": " + std::strerror(errno) +
                                "; is the checkpoint directory writable?");
  }
  // The checksum chains over the pieces in file order (file header, then each
  // tensor's header and bytes); LoadSnapshot re-chains over the same pieces.
  Encoder head;
  head.u64(kBlobMagic);
  head.u64(state.size());
  std::vector<std::string> headers;
  headers.reserve(state.size());
  std::vector<std::pair<const void*, size_t>> pieces;
  pieces.emplace_back(head.out().data(), head.out().size());
  for (const auto& nt : state) {
    Encoder e;
    e.str(nt.name);
    e.i64(static_cast<int64_t>(nt.home));
    encode_tensor_header(e, nt.tensor);
    headers.push_back(std::move(e.out()));
    pieces.emplace_back(headers.back().data(), headers.back().size());
    pieces.emplace_back(nt.tensor.data_ptr(), nt.tensor.numel() * nt.tensor.element_size());
  }
  StoreStatus s;
  // The checksum runs on another core while this thread writes (268 MB: the
  // checksum is ~26 ms, the writes ~85 ms).
  auto checksum_task = std::async(std::launch::async, [&pieces] {
    uint64_t c = 0;
    for (const auto& [p, n] : pieces) c = detail::checksum64(p, n, c);
    return c;
  });
  uint64_t total = 0;
  // Plain writes then one fsync. Starting writeback early with sync_file_range
  // every 8 MB (RocksDB's bytes_per_sync) was measured slower here: the writes
  // then block on the device queue (268 MB: 220-380 ms instead of ~100 ms).
  for (const auto& [p, n] : pieces) {
    s = write_all(fd, p, n, tmp);
    if (!s.ok()) break;
    total += n;
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
