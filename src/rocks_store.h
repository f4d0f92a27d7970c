// The checkpoint store over RocksDB (internal): one class, its work in three
// files, as RocksDB splits DBImpl:
//   checkpoint_store.cpp     opening a directory: ownership, the identity, adoption
//   rocks_store.cpp          records: commits, bucket layouts, discards
//   rocks_store_blobs.cpp    snapshots: blobs written and read back, retention and
//                            garbage collection
// Commits and retention take commit_mutex_. Snapshots are staged into host slots
// (snapshot_staging.h) on the caller's thread and written one at a time, in call
// order, on writer_; queue_mutex_ guards the queue, the slots' use and the stats.
#pragma once

#include <condition_variable>
#include <deque>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <rocksdb/db.h>
#include <rocksdb/write_batch.h>

#include "ftcomm/checkpoint_store.h"
#include "snapshot_staging.h"

namespace ftcomm {
namespace store {

class RocksCheckpointStore final : public CheckpointStore {
 public:
  RocksCheckpointStore(CheckpointStoreOptions options, std::unique_ptr<rocksdb::DB> db);
  ~RocksCheckpointStore() override;
  const CheckpointStoreOptions& options() const override { return options_; }
  // Checks the schema and the identity; with `may_write`, then writes the identity
  // of a new store, makes blobs/ and finishes an interrupted collection. With
  // `check_rank` false (inspect) a store of any rank is accepted.
  StoreStatus Prepare(bool check_rank, bool may_write);
  // This store becomes options_.rank's: its records without a writer's rank get
  // the old identity's, then the identity changes, in one write.
  StoreStatus Adopt(const std::string& identity);
  // A record as this store keeps it: one written before records named their
  // writer is the identity's.
  bool Decode(const std::string& value, CommitRecord* r) const;
  StoreStatus PutLayout(const BucketLayout& layout) override;
  StoreStatus GetLayout(uint64_t signature, BucketLayout* layout) override;
  StoreStatus ListLayouts(std::vector<uint64_t>* signatures) override;
  StoreStatus Commit(const CommitRecord& record) override;
  std::shared_future<StoreStatus> CommitSnapshotAsync(const CommitRecord& record,
                                                      const std::vector<NamedTensor>& state) override;
  StoreStatus WaitForSnapshot() override;
  StoreStatus TakeSnapshotError() override;
  SnapshotStats snapshot_stats() const override;
  StoreStatus LatestCommitted(CommitRecord* record) override { return Latest(record, /*snapshot_only=*/false); }
  StoreStatus LatestSnapshot(CommitRecord* record) override { return Latest(record, /*snapshot_only=*/true); }
  StoreStatus ListCommits(std::vector<CommitRecord>* records) override;
  StoreStatus LoadSnapshot(const CommitRecord& record, std::vector<NamedTensor>* state) override;
  // Whether `sizes` of `dtype` make exactly `nbytes` bytes (no negative size, no
  // overflow, an element size the dtype has).
  static bool ShapeFits(c10::ScalarType dtype, const std::vector<int64_t>& sizes, uint64_t nbytes);
  StoreStatus DiscardCommits(const std::vector<int64_t>& steps) override;
  rocksdb::DB* db() { return db_.get(); }

 private:
  StoreStatus FromRocks(const rocksdb::Status& s, const std::string& what) const;
  StoreStatus Write(rocksdb::WriteBatch& batch, const std::string& what);
  template <typename Fn>
  StoreStatus Scan(const std::string& prefix, Fn&& fn) {
    std::unique_ptr<rocksdb::Iterator> it(db_->NewIterator(rocksdb::ReadOptions()));
    for (it->Seek(prefix); it->Valid() && it->key().starts_with(prefix); it->Next()) {
      if (!fn(it->key(), it->value())) break;
    }
    return it->status().ok() ? StoreStatus::OK() : FromRocks(it->status(), "scanning " + prefix);
  }

  StoreStatus Latest(CommitRecord* record, bool snapshot_only);
  StoreStatus CommitLocked(CommitRecord r, bool retention);
  // Keeps the newest keep_snapshots snapshots and every commit from the oldest of
  // them on. Crash-safe: the records and a gc/ marker per blob go in one batch;
  // files are unlinked after it is durable; markers go last. Open() finishes any
  // collection a crash interrupted.
  StoreStatus ApplyRetention();
  // Unlinks blobs marked for collection and blob files no commit references
  // (a snapshot whose commit never landed), then drops the markers.
  StoreStatus CollectGarbage();
  // Streams `state` to blobs/step-N.blob through a temporary name, fsyncs it,
  // renames it into place, fsyncs the directory; fills the record's blob fields.
  // Writes the slot's image as the blob of `r`'s step, durably, and names it in `r`.
  StoreStatus WriteBlob(CommitRecord* r, const StagingSlot& slot);
  CheckpointStoreOptions options_;
  int identity_rank_ = options_.rank;  // the rank the store's identity names
  std::unique_ptr<rocksdb::DB> db_;
  std::string blob_dir_;
  std::mutex commit_mutex_;
  std::string in_flight_blob_;

  // A snapshot handed to the writer: its record and the slot that holds its copy.
  struct Queued {
    CommitRecord record;
    size_t slot;
    std::shared_ptr<std::promise<StoreStatus>> promise;
  };
  void WriterLoop();
  // Waits until every snapshot handed over is written, leaving failures unreported.
  void WaitForWriter();
  std::mutex snapshot_call_mutex_;  // one CommitSnapshotAsync at a time
  mutable std::mutex queue_mutex_;
  std::condition_variable queue_cv_;
  std::deque<Queued> queue_;              // front: being written
  std::vector<StagingSlot> slots_;        // options_.staging_slots of them
  std::vector<bool> slot_busy_;           // staged or queued, until its write is done
  std::vector<std::pair<int64_t, int64_t>> staged_bytes_;  // each slot's bytes and pinned bytes
  StoreStatus unreported_;                // the first failed snapshot not yet reported
  SnapshotStats stats_;
  bool stop_ = false;
  std::thread writer_;                    // started by the first snapshot
};

}  // namespace store
}  // namespace ftcomm
