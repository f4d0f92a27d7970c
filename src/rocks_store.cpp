// Records: commits, bucket layouts, discards (see rocks_store.h).
#include "rocks_store.h"

#include <algorithm>

#include "checksum.h"
#include "store_format.h"

namespace ftcomm {
namespace store {

RocksCheckpointStore::RocksCheckpointStore(CheckpointStoreOptions options, std::unique_ptr<rocksdb::DB> db)
    : options_(std::move(options)), db_(std::move(db)), blob_dir_(options_.dir + "/blobs") {}

RocksCheckpointStore::~RocksCheckpointStore() {
  WaitForWriter();
  {
    std::lock_guard<std::mutex> lock(queue_mutex_);
    stop_ = true;
    queue_cv_.notify_all();
  }
  if (writer_.joinable()) writer_.join();
  if (db_ && !options_.read_only) {
    // Leave SSTs behind so the next open replays no WAL.
    db_->Flush(rocksdb::FlushOptions());
  }
}

bool RocksCheckpointStore::Decode(const std::string& value, CommitRecord* r) const {
  if (!decode_record(value, r)) return false;
  if (r->rank < 0) r->rank = identity_rank_;
  return true;
}

StoreStatus RocksCheckpointStore::PutLayout(const BucketLayout& layout) {
  rocksdb::WriteBatch batch;
  batch.Put(kLayoutPrefix + signature_hex(layout.signature()), encode_layout(layout));
  return Write(batch, "writing a bucket layout");
}

StoreStatus RocksCheckpointStore::GetLayout(uint64_t signature, BucketLayout* layout) {
  std::string value;
  auto s = db_->Get(rocksdb::ReadOptions(), kLayoutPrefix + signature_hex(signature), &value);
  if (s.IsNotFound()) {
    return StoreStatus::NotFound("no bucket layout with signature " + signature_hex(signature) + " in " + options_.dir);
  }
  if (!s.ok()) return FromRocks(s, "reading a bucket layout");
  // The signature is over the bytes as written (a layout written before device
  // types replaced device names, "cuda:0", still checks against its own).
  if (!decode_layout(value, layout) || detail::checksum64(value.data(), value.size(), 0x1a7) != signature) {
    return StoreStatus::Corruption("bucket layout " + signature_hex(signature) + " in " + options_.dir +
                                   " does not decode to its signature");
  }
  return StoreStatus::OK();
}

StoreStatus RocksCheckpointStore::ListLayouts(std::vector<uint64_t>* signatures) {
  signatures->clear();
  return Scan(kLayoutPrefix, [&](const rocksdb::Slice& key, const rocksdb::Slice&) {
    signatures->push_back(std::stoull(key.ToString().substr(kLayoutPrefix.size()), nullptr, 16));
    return true;
  });
}

StoreStatus RocksCheckpointStore::Commit(const CommitRecord& record) {
  CommitRecord r = record;
  r.has_snapshot = false;
  r.blob_file.clear();
  r.blob_bytes = r.blob_checksum = 0;
  std::lock_guard<std::mutex> lock(commit_mutex_);
  return CommitLocked(r, /*retention=*/false);
}

StoreStatus RocksCheckpointStore::ListCommits(std::vector<CommitRecord>* records) {
  records->clear();
  StoreStatus bad;
  auto s = Scan(kCommitPrefix, [&](const rocksdb::Slice& key, const rocksdb::Slice& value) {
    CommitRecord r;
    if (!Decode(value.ToString(), &r)) {
      bad = StoreStatus::Corruption("commit record " + key.ToString() + " in " + options_.dir + " does not decode");
      return false;
    }
    records->push_back(std::move(r));
    return true;
  });
  return s.ok() ? bad : s;
}

StoreStatus RocksCheckpointStore::DiscardCommits(const std::vector<int64_t>& steps) {
  if (steps.empty()) return StoreStatus::OK();
  WaitForWriter();
  std::lock_guard<std::mutex> lock(commit_mutex_);
  rocksdb::WriteBatch batch;
  for (int64_t step : steps) {
    std::string value;
    auto s = db_->Get(rocksdb::ReadOptions(), kCommitPrefix + step_key(step), &value);
    if (s.IsNotFound()) continue;
    if (!s.ok()) return FromRocks(s, "reading commit " + std::to_string(step));
    CommitRecord r;
    const bool decoded = Decode(value, &r);
    batch.Delete(kCommitPrefix + step_key(step));
    batch.DeleteRange(kHookPrefix + step_key(step) + "/", kHookPrefix + step_key(step) + "/~");
    if (decoded && r.has_snapshot) batch.Put(kGcPrefix + r.blob_file, "");
  }
  auto s = Write(batch, "discarding commits");
  return s.ok() ? CollectGarbage() : s;
}

StoreStatus RocksCheckpointStore::FromRocks(const rocksdb::Status& s, const std::string& what) const {
  const std::string msg = "checkpoint store " + options_.dir + ": " + what + ": " + s.ToString();
  if (s.IsCorruption()) {
    return StoreStatus::Corruption(msg +
                                   ". The store is damaged: delete this rank's directory and let the job "
                                   "resync it from a peer, or restore it from a backup");
  }
  if (s.IsNotFound()) return StoreStatus::NotFound(msg);
  return StoreStatus::IOError(msg);
}

StoreStatus RocksCheckpointStore::Write(rocksdb::WriteBatch& batch, const std::string& what) {
  if (options_.read_only)
    return StoreStatus::InvalidArgument("checkpoint store " + options_.dir + " is open read-only");
  rocksdb::WriteOptions wo;
  wo.sync = options_.durability == Durability::kSync;
  auto s = db_->Write(wo, &batch);
  return s.ok() ? StoreStatus::OK() : FromRocks(s, what);
}

StoreStatus RocksCheckpointStore::Latest(CommitRecord* record, bool snapshot_only) {
  std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
  for (it->SeekForPrev(kCommitPrefix + "~"); it->Valid() && it->key().starts_with(kCommitPrefix); it->Prev()) {
    CommitRecord r;
    if (!Decode(it->value().ToString(), &r)) {
      return StoreStatus::Corruption("commit record " + it->key().ToString() + " in " + options_.dir +
                                     " does not decode");
    }
    if (!snapshot_only || r.has_snapshot) {
      *record = std::move(r);
      return StoreStatus::OK();
    }
  }
  if (!it->status().ok()) return FromRocks(it->status(), "reading the latest commit");
  return StoreStatus::NotFound(std::string("no ") + (snapshot_only ? "snapshot" : "commit") + " in " + options_.dir);
}

StoreStatus RocksCheckpointStore::CommitLocked(CommitRecord r, bool retention) {
  r.rank = options_.rank;
  CommitRecord last;
  auto s = Latest(&last, false);
  if (s.ok() && r.step <= last.step) {
    return StoreStatus::InvalidArgument(
        "commit of step " + std::to_string(r.step) + " to " + options_.dir +
        " is not after the latest committed step " + std::to_string(last.step) +
        ": the job resumed from an older step without discarding the newer commits "
        "(CheckpointStore::DiscardCommits), or two jobs write this store. Give each job its own --ckpt");
  }
  r.unix_ms = now_ms();
  rocksdb::WriteBatch batch;
  batch.Put(kCommitPrefix + step_key(r.step), encode_record(r));
  s = Write(batch, "committing step " + std::to_string(r.step));
  if (!s.ok() || !retention) return s;
  return ApplyRetention();
}

}  // namespace store
}  // namespace ftcomm
