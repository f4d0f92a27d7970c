#include "ftcomm/checkpoint_store.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <mutex>
#include <set>
#include <thread>

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <rocksdb/db.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include "checksum.h"
#include "fsutil.h"

namespace ftcomm {

std::string StoreStatus::ToString() const {
  static const char* names[] = {"OK", "NotFound", "Corruption", "IOError", "InvalidArgument", "Busy", "Incompatible"};
  return ok() ? "OK" : std::string(names[static_cast<int>(code_)]) + ": " + message_;
}

void check(const StoreStatus& status) {
  TORCH_CHECK(status.ok(), status.ToString());
}

std::string signature_hex(uint64_t signature) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, signature);
  return buf;
}

namespace {

constexpr int kSchemaVersion = 1;
const char* const kDamagedFix =
    "nothing was written to it. Restore this rank's directory from a backup, or move it aside (mv DIR DIR.damaged) "
    "and restart: the job then resyncs this rank from a peer that holds the step (its rank-local hook state from a "
    "buddy copy). If every rank's store is damaged, the job can only start afresh";
constexpr uint32_t kBlobMagicV1 = 0x42435446;  // "FTCB"
constexpr uint32_t kBlobMagic = 0x32435446;    // "FTC2": each tensor also records its device type

// --- little-endian encoding of records ------------------------------------------

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
void encode_tensor_header(Encoder& e, const at::Tensor& t) {
  e.i64(static_cast<int64_t>(t.scalar_type()));
  e.i64s(t.sizes().vec());
  e.u64(t.numel() * t.element_size());
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

// --- keys ------------------------------------------------------------------------

std::string step_key(int64_t step) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "%020" PRId64, step);
  return buf;
}
const std::string kCommitPrefix = "commit/";
// Hook state keyed per step: a key space of stores written before hook state
// moved into snapshot blobs only; retention and discards still clear it.
const std::string kHookPrefix = "hook/";
const std::string kLayoutPrefix = "layout/";
const std::string kGcPrefix = "gc/";
const std::string kSchemaKey = "meta/schema";
const std::string kIdentityKey = "meta/identity";

int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// --- files -----------------------------------------------------------------------

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
      return StoreStatus::IOError("write " + path + ": " + std::strerror(errno) + "; free space or pick another --ckpt");
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

class RocksCheckpointStore final : public CheckpointStore {
 public:
  RocksCheckpointStore(CheckpointStoreOptions options, std::unique_ptr<rocksdb::DB> db)
      : options_(std::move(options)), db_(std::move(db)), blob_dir_(options_.dir + "/blobs") {}

  ~RocksCheckpointStore() override {
    WaitForSnapshot();
    if (db_ && !options_.read_only) {
      // Leave SSTs behind so the next open replays no WAL.
      db_->Flush(rocksdb::FlushOptions());
    }
  }

  const CheckpointStoreOptions& options() const override { return options_; }

  // Checks the schema and the identity; with `may_write`, then writes the identity
  // of a new store, makes blobs/ and finishes an interrupted collection. With
  // `check_rank` false (inspect) a store of any rank is accepted.
  StoreStatus Prepare(bool check_rank, bool may_write) {
    std::string value;
    auto s = db_->Get(rocksdb::ReadOptions(), kSchemaKey, &value);
    if (s.ok()) {
      const int version = std::atoi(value.c_str());
      if (version > kSchemaVersion) {
        return StoreStatus::Incompatible("checkpoint store " + options_.dir + " has schema version " + value +
                                         "; this ftcomm reads up to version " + std::to_string(kSchemaVersion) +
                                         ". Upgrade ftcomm, or point --ckpt at another directory");
      }
    } else if (!s.IsNotFound()) {
      return from(s, "reading the schema version");
    }
    const std::string identity = options_.job_id + "\n" + std::to_string(options_.rank);
    std::string stored;
    s = db_->Get(rocksdb::ReadOptions(), kIdentityKey, &stored);
    if (s.ok()) {
      const auto nl = stored.find('\n');
      const std::string job = stored.substr(0, nl), rank = stored.substr(nl + 1);
      const bool job_differs = !options_.job_id.empty() && job != options_.job_id;
      identity_rank_ = std::atoi(rank.c_str());
      const bool rank_differs = check_rank && rank != std::to_string(options_.rank);
      if (rank_differs && !job_differs && options_.adopt_other_rank) {
        if (may_write) {
          auto st = adopt(identity);
          if (!st.ok()) return st;
        }
      } else if (job_differs || rank_differs) {
        return StoreStatus::Incompatible("checkpoint store " + options_.dir + " belongs to job '" + job + "' rank " +
                                         rank + ", not job '" + options_.job_id + "' rank " +
                                         std::to_string(options_.rank) +
                                         ". Point --ckpt at this job's directory (each rank uses its own "
                                         "subdirectory), or remove it to start afresh");
      }
    } else if (!s.IsNotFound()) {
      return from(s, "reading the store identity");
    } else {
      // No identity: a store whose creation was cut short, which holds nothing.
      // One with commits but no identity is damaged (or not ftcomm's).
      CommitRecord any;
      auto l = latest(&any, false);
      if (l.ok()) {
        return StoreStatus::Corruption("checkpoint store " + options_.dir + " holds commits (the newest is step " +
                                       std::to_string(any.step) + ") but no identity record; " + kDamagedFix);
      }
      if (!l.IsNotFound()) return l;
    }
    if (!may_write) return StoreStatus::OK();
    if (stored.empty() || value.empty()) {
      rocksdb::WriteBatch batch;
      batch.Put(kSchemaKey, std::to_string(kSchemaVersion));
      batch.Put(kIdentityKey, identity);
      auto st = write(batch, "writing the store identity");
      if (!st.ok()) return st;
    }
    std::string error;
    if (!detail::make_dirs(blob_dir_, &error)) return StoreStatus::IOError("cannot create " + error);
    return CollectGarbage();
  }

  // This store becomes options_.rank's: its records without a writer's rank get
  // the old identity's, then the identity changes, in one write.
  StoreStatus adopt(const std::string& identity) {
    std::vector<CommitRecord> records;
    auto s = ListCommits(&records);  // a record without a rank reads as the old identity's
    if (!s.ok()) return s;
    rocksdb::WriteBatch batch;
    for (const auto& r : records) batch.Put(kCommitPrefix + step_key(r.step), encode_record(r));
    batch.Put(kIdentityKey, identity);
    auto st = write(batch, "adopting the store");
    if (st.ok()) identity_rank_ = options_.rank;
    return st;
  }

  // A record as this store keeps it: one written before records named their
  // writer is the identity's.
  bool decode(const std::string& value, CommitRecord* r) const {
    if (!decode_record(value, r)) return false;
    if (r->rank < 0) r->rank = identity_rank_;
    return true;
  }

  StoreStatus PutLayout(const BucketLayout& layout) override {
    rocksdb::WriteBatch batch;
    batch.Put(kLayoutPrefix + signature_hex(layout.signature()), encode_layout(layout));
    return write(batch, "writing a bucket layout");
  }

  StoreStatus GetLayout(uint64_t signature, BucketLayout* layout) override {
    std::string value;
    auto s = db_->Get(rocksdb::ReadOptions(), kLayoutPrefix + signature_hex(signature), &value);
    if (s.IsNotFound()) {
      return StoreStatus::NotFound("no bucket layout with signature " + signature_hex(signature) + " in " +
                                   options_.dir);
    }
    if (!s.ok()) return from(s, "reading a bucket layout");
    // The signature is over the bytes as written (a layout written before device
    // types replaced device names, "cuda:0", still checks against its own).
    if (!decode_layout(value, layout) || detail::checksum64(value.data(), value.size(), 0x1a7) != signature) {
      return StoreStatus::Corruption("bucket layout " + signature_hex(signature) + " in " + options_.dir +
                                     " does not decode to its signature");
    }
    return StoreStatus::OK();
  }

  StoreStatus ListLayouts(std::vector<uint64_t>* signatures) override {
    signatures->clear();
    return scan(kLayoutPrefix, [&](const rocksdb::Slice& key, const rocksdb::Slice&) {
      signatures->push_back(std::stoull(key.ToString().substr(kLayoutPrefix.size()), nullptr, 16));
      return true;
    });
  }

  StoreStatus Commit(const CommitRecord& record) override {
    CommitRecord r = record;
    r.has_snapshot = false;
    r.blob_file.clear();
    r.blob_bytes = r.blob_checksum = 0;
    std::lock_guard<std::mutex> lock(commit_mutex_);
    return CommitLocked(r, /*retention=*/false);
  }

  std::shared_future<StoreStatus> CommitSnapshotAsync(const CommitRecord& record,
                                                      const std::vector<NamedTensor>& state) override {
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

  StoreStatus WaitForSnapshot() override {
    std::lock_guard<std::mutex> lock(snapshot_mutex_);
    if (snapshot_thread_.joinable()) snapshot_thread_.join();
    return snapshot_.valid() ? snapshot_.get() : StoreStatus::OK();
  }

  StoreStatus LatestCommitted(CommitRecord* record) override { return latest(record, /*snapshot_only=*/false); }
  StoreStatus LatestSnapshot(CommitRecord* record) override { return latest(record, /*snapshot_only=*/true); }

  StoreStatus ListCommits(std::vector<CommitRecord>* records) override {
    records->clear();
    StoreStatus bad;
    auto s = scan(kCommitPrefix, [&](const rocksdb::Slice& key, const rocksdb::Slice& value) {
      CommitRecord r;
      if (!decode(value.ToString(), &r)) {
        bad = StoreStatus::Corruption("commit record " + key.ToString() + " in " + options_.dir + " does not decode");
        return false;
      }
      records->push_back(std::move(r));
      return true;
    });
    return s.ok() ? bad : s;
  }

  StoreStatus LoadSnapshot(const CommitRecord& record, std::vector<NamedTensor>* state) override {
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
      if (!d.i64(&dtype) || !d.i64s(&sizes) || !d.u64(&nbytes)) return damaged("is truncated at tensor " + std::to_string(i));
      checksum = detail::checksum64(bytes.data() + header_at, d.pos() - header_at, checksum);
      const char* data = d.take(nbytes);
      if (data == nullptr) return damaged("is truncated at tensor " + std::to_string(i));
      checksum = detail::checksum64(data, nbytes, checksum);
      if (dtype < 0 || dtype >= static_cast<int64_t>(c10::ScalarType::NumOptions)) return damaged("has a bad dtype");
      // The header's shape is checked against the bytes that follow it before
      // anything is allocated: a damaged (or forged) size must fall back to an
      // older snapshot or a peer, not allocate 2^45 elements or throw.
      if (!shape_fits(static_cast<c10::ScalarType>(dtype), sizes, nbytes)) {
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

  // Whether `sizes` of `dtype` make exactly `nbytes` bytes (no negative size, no
  // overflow, an element size the dtype has).
  static bool shape_fits(c10::ScalarType dtype, const std::vector<int64_t>& sizes, uint64_t nbytes) {
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

  StoreStatus DiscardCommits(const std::vector<int64_t>& steps) override {
    if (steps.empty()) return StoreStatus::OK();
    WaitForSnapshot();
    std::lock_guard<std::mutex> lock(commit_mutex_);
    rocksdb::WriteBatch batch;
    for (int64_t step : steps) {
      std::string value;
      auto s = db_->Get(rocksdb::ReadOptions(), kCommitPrefix + step_key(step), &value);
      if (s.IsNotFound()) continue;
      if (!s.ok()) return from(s, "reading commit " + std::to_string(step));
      CommitRecord r;
      const bool decoded = decode(value, &r);
      batch.Delete(kCommitPrefix + step_key(step));
      batch.DeleteRange(kHookPrefix + step_key(step) + "/", kHookPrefix + step_key(step) + "/~");
      if (decoded && r.has_snapshot) batch.Put(kGcPrefix + r.blob_file, "");
    }
    auto s = write(batch, "discarding commits");
    return s.ok() ? CollectGarbage() : s;
  }

  rocksdb::DB* db() { return db_.get(); }

 private:
  StoreStatus from(const rocksdb::Status& s, const std::string& what) const {
    const std::string msg = "checkpoint store " + options_.dir + ": " + what + ": " + s.ToString();
    if (s.IsCorruption()) {
      return StoreStatus::Corruption(msg + ". The store is damaged: delete this rank's directory and let the job "
                                           "resync it from a peer, or restore it from a backup");
    }
    if (s.IsNotFound()) return StoreStatus::NotFound(msg);
    return StoreStatus::IOError(msg);
  }

  StoreStatus write(rocksdb::WriteBatch& batch, const std::string& what) {
    if (options_.read_only) return StoreStatus::InvalidArgument("checkpoint store " + options_.dir + " is open read-only");
    rocksdb::WriteOptions wo;
    wo.sync = options_.durability == Durability::kSync;
    auto s = db_->Write(wo, &batch);
    return s.ok() ? StoreStatus::OK() : from(s, what);
  }

  template <typename Fn>
  StoreStatus scan(const std::string& prefix, Fn&& fn) {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
      if (!fn(it->key(), it->value())) break;
    }
    return it->status().ok() ? StoreStatus::OK() : from(it->status(), "scanning " + prefix);
  }

  StoreStatus latest(CommitRecord* record, bool snapshot_only) {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->SeekForPrev(kCommitPrefix + "~"); it->Valid() && it->key().starts_with(kCommitPrefix); it->Prev()) {
      CommitRecord r;
      if (!decode(it->value().ToString(), &r)) {
        return StoreStatus::Corruption("commit record " + it->key().ToString() + " in " + options_.dir +
                                       " does not decode");
      }
      if (!snapshot_only || r.has_snapshot) {
        *record = std::move(r);
        return StoreStatus::OK();
      }
    }
    if (!it->status().ok()) return from(it->status(), "reading the latest commit");
    return StoreStatus::NotFound(std::string("no ") + (snapshot_only ? "snapshot" : "commit") + " in " + options_.dir);
  }

  StoreStatus CommitLocked(CommitRecord r, bool retention) {
    r.rank = options_.rank;
    CommitRecord last;
    auto s = latest(&last, false);
    if (s.ok() && r.step <= last.step) {
      return StoreStatus::InvalidArgument(
          "commit of step " + std::to_string(r.step) + " to " + options_.dir + " is not after the latest committed step " +
          std::to_string(last.step) + ": the job resumed from an older step without discarding the newer commits "
          "(CheckpointStore::DiscardCommits), or two jobs write this store. Give each job its own --ckpt");
    }
    r.unix_ms = now_ms();
    rocksdb::WriteBatch batch;
    batch.Put(kCommitPrefix + step_key(r.step), encode_record(r));
    s = write(batch, "committing step " + std::to_string(r.step));
    if (!s.ok() || !retention) return s;
    return ApplyRetention();
  }

  // Keeps the newest keep_snapshots snapshots and every commit from the oldest of
  // them on. Crash-safe: the records and a gc/ marker per blob go in one batch;
  // files are unlinked after it is durable; markers go last. Open() finishes any
  // collection a crash interrupted.
  StoreStatus ApplyRetention() {
    std::vector<CommitRecord> all;
    auto s = ListCommits(&all);
    if (!s.ok()) return s;
    std::vector<const CommitRecord*> snaps;
    for (const auto& r : all) if (r.has_snapshot) snaps.push_back(&r);
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
    s = write(batch, "retiring old commits");
    return s.ok() ? CollectGarbage() : s;
  }

  // Unlinks blobs marked for collection and blob files no commit references
  // (a snapshot whose commit never landed), then drops the markers.
  StoreStatus CollectGarbage() {
    std::set<std::string> referenced;
    std::vector<CommitRecord> all;
    auto s = ListCommits(&all);
    if (!s.ok()) return s;
    for (const auto& r : all) if (r.has_snapshot) referenced.insert(r.blob_file);
    std::vector<std::string> markers;
    s = scan(kGcPrefix, [&](const rocksdb::Slice& key, const rocksdb::Slice&) {
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
    return write(batch, "dropping collected blob markers");
  }

  // Streams `state` to blobs/step-N.blob through a temporary name, fsyncs it,
  // renames it into place, fsyncs the directory; fills the record's blob fields.
  StoreStatus WriteBlob(CommitRecord* r, const std::vector<NamedTensor>& state) {
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
      return StoreStatus::IOError("create " + tmp + ": " + std::strerror(errno) + "; is the checkpoint directory writable?");
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

  CheckpointStoreOptions options_;
  int identity_rank_ = options_.rank;  // the rank the store's identity names
  std::unique_ptr<rocksdb::DB> db_;
  std::string blob_dir_;
  std::mutex commit_mutex_;
  std::string in_flight_blob_;
  std::mutex snapshot_call_mutex_;
  std::mutex snapshot_mutex_;
  std::thread snapshot_thread_;
  std::vector<at::Tensor> snapshot_copies_;  // host copies, reused by the next snapshot
  std::shared_future<StoreStatus> snapshot_;
};

}  // namespace

uint64_t BucketLayout::signature() const {
  const std::string bytes = encode_layout(*this);
  return detail::checksum64(bytes.data(), bytes.size(), /*seed=*/0x1a7);
}

namespace {

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// What RocksDB leaves in a directory whose creation was cut short before its
// CURRENT file was written: nothing a commit ever touched (no WAL, no SST, no
// blobs/). Such a directory may be created anew; anything else is a store.
bool only_creation_leftovers(const std::vector<std::string>& names) {
  for (const auto& n : names) {
    const bool leftover = n == "LOCK" || n == "LOG" || n.rfind("LOG.old", 0) == 0 || n == "IDENTITY" ||
                          n == "MANIFEST-000001" || n.rfind("OPTIONS-", 0) == 0 || ends_with(n, ".dbtmp");
    if (!leftover) return false;
  }
  return true;
}

StoreStatus open_failure(const rocksdb::Status& s, const std::string& dir, bool existing) {
  const std::string text = s.ToString();
  if (s.IsIOError() && text.find("lock") != std::string::npos) {
    return StoreStatus::Busy("checkpoint store " + dir +
                             " is in use by another process (its LOCK is held). Stop that process, or give this "
                             "one its own --ckpt directory. (" + text + ")");
  }
  // Whatever keeps an existing store from opening (a missing MANIFEST, a bad SST,
  // a truncated WAL) is damage, and the fix is the same.
  if (existing || s.IsCorruption()) {
    return StoreStatus::Corruption("checkpoint store " + dir + " cannot be opened (" + text + "); " + kDamagedFix);
  }
  if (s.IsInvalidArgument() && text.find("does not exist") != std::string::npos) {
    return StoreStatus::NotFound("no checkpoint store in " + dir + " (" + text +
                                 "). Point at a directory a job wrote with --ckpt");
  }
  return StoreStatus::IOError("cannot open checkpoint store " + dir + ": " + text);
}

// The directory is this process's user's and no one else may write it; it is a
// directory, not a link to one.
StoreStatus check_owner(const std::string& dir) {
  struct stat st {};
  if (::lstat(dir.c_str(), &st) != 0) return StoreStatus::IOError("cannot stat " + dir + ": " + std::strerror(errno));
  if (S_ISLNK(st.st_mode)) {
    struct stat target {};
    if (::stat(dir.c_str(), &target) != 0 || target.st_uid != st.st_uid) {
      return StoreStatus::InvalidArgument("checkpoint store " + dir +
                                          " is a symbolic link to a directory of another owner; refusing it. Point "
                                          "the checkpoint directory at a real directory of this user");
    }
    st = target;
  }
  if (!S_ISDIR(st.st_mode)) return StoreStatus::InvalidArgument("checkpoint store " + dir + " is not a directory");
  if (st.st_uid != ::geteuid()) {
    return StoreStatus::InvalidArgument(
        "checkpoint store " + dir + " is owned by uid " + std::to_string(st.st_uid) + ", not by this process's uid " +
        std::to_string(::geteuid()) +
        "; refusing it (what another user wrote is not read back into training). Give it to this user (chown -R), "
        "or use a checkpoint directory of your own");
  }
  if (st.st_mode & (S_IWGRP | S_IWOTH)) {
    char mode[8];
    std::snprintf(mode, sizeof(mode), "%04o", static_cast<unsigned>(st.st_mode & 07777));
    return StoreStatus::InvalidArgument("checkpoint store " + dir + " may be written by other users (mode " + mode +
                                        "); refusing it (anyone who can write it can change what training reads "
                                        "back). Run chmod go-w " + dir + ", or use a checkpoint directory of your own");
  }
  return StoreStatus::OK();
}

StoreStatus open_db(const CheckpointStoreOptions& options, bool read_only, bool existing,
                    std::unique_ptr<RocksCheckpointStore>* out) {
  rocksdb::Options ro;
  ro.create_if_missing = !existing && options.create_if_missing && !read_only;
  ro.paranoid_checks = true;
  ro.max_open_files = 64;
  ro.keep_log_file_num = 2;
  // Records are small: a 4 MiB memtable keeps RocksDB's preallocated write-ahead
  // log near 4.4 MiB per rank instead of 72 MB (a store left by a crash keeps it).
  ro.write_buffer_size = size_t(4) << 20;
  ro.info_log_level = rocksdb::InfoLogLevel::WARN_LEVEL;
  rocksdb::DB* raw = nullptr;
  rocksdb::Status s = read_only ? rocksdb::DB::OpenForReadOnly(ro, options.dir, &raw)
                                : rocksdb::DB::Open(ro, options.dir, &raw);
  if (!s.ok()) return open_failure(s, options.dir, existing);
  CheckpointStoreOptions o = options;
  o.read_only = read_only;
  *out = std::make_unique<RocksCheckpointStore>(o, std::unique_ptr<rocksdb::DB>(raw));
  return StoreStatus::OK();
}

}  // namespace

StoreStatus CheckpointStore::Open(const CheckpointStoreOptions& options, std::unique_ptr<CheckpointStore>* store) {
  if (options.dir.empty()) return StoreStatus::InvalidArgument("checkpoint store: no directory given (--ckpt DIR)");
  if (!detail::path_exists(options.dir)) {
    if (!options.create_if_missing || options.read_only) {
      return StoreStatus::NotFound("no checkpoint store at " + options.dir +
                                   ": the directory does not exist. Check the path, or run a job with --ckpt " +
                                   options.dir + " to create it");
    }
    std::string error;
    if (!detail::make_dirs(options.dir, &error)) {
      return StoreStatus::IOError("cannot create checkpoint directory " + options.dir + " (" + error +
                                  "). Choose a writable --ckpt");
    }
  }
  if (!options.read_only) {
    // A store is read back into the trainer: one that another user owns, or that
    // others may write, could hold anything. Refused before anything is read.
    auto st = check_owner(options.dir);
    if (st.ok() && detail::path_exists(options.dir + "/blobs")) st = check_owner(options.dir + "/blobs");
    if (!st.ok()) return st;
  }
  if (!options.read_only && ::access(options.dir.c_str(), W_OK) != 0) {
    return StoreStatus::IOError("checkpoint directory " + options.dir + " is not writable (" + std::strerror(errno) +
                                "). Fix its permissions or choose another --ckpt");
  }
  const auto names = detail::list_dir(options.dir);
  const bool existing = !names.empty() && !only_creation_leftovers(names);
  std::unique_ptr<RocksCheckpointStore> impl;
  if (existing) {
    // A read-only look first: a store that cannot be opened, or is not this
    // job's, is never written to (a read-write open of a damaged RocksDB
    // directory can write a fresh, empty database over it).
    if (!detail::path_exists(options.dir + "/CURRENT")) {
      return StoreStatus::Corruption("checkpoint store " + options.dir +
                                     " is damaged or is not a checkpoint store: it holds files but no CURRENT (RocksDB's "
                                     "pointer to its newest MANIFEST); " + kDamagedFix);
    }
    auto st = open_db(options, /*read_only=*/true, existing, &impl);
    if (st.ok()) st = impl->Prepare(/*check_rank=*/!options.read_only, /*may_write=*/false);
    if (!st.ok()) return st;
    if (options.read_only) {
      *store = std::move(impl);
      return StoreStatus::OK();
    }
    impl.reset();
  } else if (options.read_only) {
    return StoreStatus::NotFound("no checkpoint store in " + options.dir +
                                 " (the directory holds no store). Point at a directory a job wrote with --ckpt");
  }
  // Writes that pass the process's file-size limit (ulimit -f) fail with EFBIG
  // and are reported, instead of SIGXFSZ killing the process without a word.
  struct sigaction current {};
  if (::sigaction(SIGXFSZ, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) ::signal(SIGXFSZ, SIG_IGN);
  auto st = open_db(options, /*read_only=*/false, existing, &impl);
  if (st.ok()) st = impl->Prepare(/*check_rank=*/true, /*may_write=*/true);
  if (!st.ok()) return st;
  *store = std::move(impl);
  return StoreStatus::OK();
}

}  // namespace ftcomm
