// Durable per-rank state: bucket layouts and per-step commit records in RocksDB,
// and training snapshots (parameters, buffers, optimizer state, hook state) in
// blob files named by their commit record.
//
// Guarantees:
//  * A commit is atomic: its record and (for a snapshot) the reference to its blob
//    become visible together in one synced WriteBatch, after the blob is on disk. After any crash, LatestCommitted() is the last commit that
//    completed; never a partial one.
//  * Durability policy: with Durability::kSync (default) Commit() returns after the
//    WAL is fsync'ed, so a returned commit survives power loss. With kProcessCrash it
//    survives a crash or kill of the process but not of the machine.
//  * One writer: a store directory is locked while open for writing.
//  * Every blob read is checked against the checksum in its record, and RocksDB's
//    own block checksums are verified on every read.
//  * A store that exists but cannot be opened is never written to: Open() first
//    opens an existing directory read-only and checks it (RocksDB's files, the
//    schema, the identity), and only then opens it for writing. A damaged store
//    keeps being refused, with the fix, until someone repairs or moves it.
//  * A write that hits a file-size limit (ulimit -f) fails as an error, not a
//    SIGXFSZ: opening a store for writing ignores that signal when it has its
//    default action. Failed snapshots leave no temporary or unreferenced blob.
// Errors come back as ftcomm::StoreStatus (never rocksdb::Status), with a message
// that names the directory and the fix. Thread-safety: one CheckpointStore may be
// used from several threads; snapshot blobs are written on a background thread.
#pragma once

#include <chrono>
#include <cstdint>
#include <future>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <ATen/core/Tensor.h>

#include "ftcomm/bucket_layout.h"

namespace ftcomm {

class StoreStatus {
 public:
  enum class Code { kOk, kNotFound, kCorruption, kIOError, kInvalidArgument, kBusy, kIncompatible, kSkipped };
  StoreStatus() = default;
  static StoreStatus OK() { return StoreStatus(); }
  static StoreStatus NotFound(std::string m) { return StoreStatus(Code::kNotFound, std::move(m)); }
  static StoreStatus Corruption(std::string m) { return StoreStatus(Code::kCorruption, std::move(m)); }
  static StoreStatus IOError(std::string m) { return StoreStatus(Code::kIOError, std::move(m)); }
  static StoreStatus InvalidArgument(std::string m) { return StoreStatus(Code::kInvalidArgument, std::move(m)); }
  static StoreStatus Busy(std::string m) { return StoreStatus(Code::kBusy, std::move(m)); }
  static StoreStatus Incompatible(std::string m) { return StoreStatus(Code::kIncompatible, std::move(m)); }
  // A snapshot not taken, by the store's policy (SnapshotWhenBehind::kSkip).
  static StoreStatus Skipped(std::string m) { return StoreStatus(Code::kSkipped, std::move(m)); }
  bool ok() const { return code_ == Code::kOk; }
  bool IsNotFound() const { return code_ == Code::kNotFound; }
  bool IsCorruption() const { return code_ == Code::kCorruption; }
  bool IsBusy() const { return code_ == Code::kBusy; }
  bool IsIncompatible() const { return code_ == Code::kIncompatible; }
  bool IsSkipped() const { return code_ == Code::kSkipped; }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "OK", "NotFound", "Corruption", "IOError", "InvalidArgument", "Busy", "Incompatible", "Skipped".
  const char* CodeName() const;
  std::string ToString() const;

 private:
  StoreStatus(Code code, std::string message) : code_(code), message_(std::move(message)) {}
  Code code_ = Code::kOk;
  std::string message_;
};

// Throws StoreError (ftcomm/errors.h, a c10::Error) with the status's message
// and code unless it is ok.
void check(const StoreStatus& status);

enum class Durability { kSync, kProcessCrash };

// What a snapshot commit does when every staging slot still holds a snapshot
// that is being written (the disk is slower than the commits come):
enum class SnapshotWhenBehind {
  kWait,  // the commit waits for the oldest write to finish (counted, and logged by the Checkpointer)
  kSkip,  // the commit is not taken: its future says Skipped at once (counted and logged)
};
// "wait" or "skip"; throws c10::Error naming the choices otherwise.
SnapshotWhenBehind parse_snapshot_when_behind(const std::string& text, const std::string& what);
const char* snapshot_when_behind_name(SnapshotWhenBehind policy);

// What the store's snapshots have cost so far (CheckpointStore::snapshot_stats).
struct SnapshotStats {
  int64_t taken = 0;            // snapshots handed to the writer
  int64_t waited = 0;           // of those, how many waited for a free staging slot
  double waited_ms = 0;         // the training thread's time in those waits
  int64_t skipped = 0;          // snapshots not taken (SnapshotWhenBehind::kSkip)
  int64_t written = 0;          // snapshots whose write finished (ok or not)
  double write_ms = 0;          // the writer's time (copy wait, blob, fsync, commit)
  int64_t staging_bytes = 0;    // host memory the staging slots hold now
  int64_t pinned_bytes = 0;     // of which pinned (page-locked) for accelerator copies
};

struct CheckpointStoreOptions {
  std::string dir;                 // one directory per rank
  std::string job_id;              // refuses a store written by another job
  int rank = 0;                    // refuses a store written by another rank (unless adopt_other_rank)
  // Takes over a store of another rank of the same job (a node whose ranks were
  // renumbered at a rendezvous, see rank_store_dir): its identity becomes
  // `rank`, and its commits keep the rank that wrote them (CommitRecord::rank).
  bool adopt_other_rank = false;
  bool create_if_missing = true;   // false: a missing directory is an error
  bool read_only = false;          // no lock, no writes (ftcomm inspect)
  Durability durability = Durability::kSync;
  int keep_snapshots = 2;          // retention: newest K snapshots (and the newest periodic one) and the commits after the oldest of them
  // Host staging: each slot holds one snapshot's copy while it is written, and is
  // reused by later snapshots of the same shapes. Its memory is bounded by
  // staging_slots x the snapshot's blob, rounded up to 4 KiB (pinned when any
  // tensor is on an accelerator).
  // With 2 a commit overlaps the previous one's write; with 1 it waits for it.
  int staging_slots = 2;
  SnapshotWhenBehind when_behind = SnapshotWhenBehind::kWait;
  // Caps the writer's blob writes (bytes per second; 0: none), as RocksDB's rate
  // limiter does, for a disk that training's own reads share.
  int64_t write_bytes_per_sec = 0;
  // Blobs are written with direct I/O (O_DIRECT) where the file system takes it:
  // no copy into the page cache, whose CPU cost (~40 ms for 151 MB on this
  // project's 2-core CI machine) falls on training's cores. Then a blob is not in
  // the page cache after its write: a load right after reads it from the disk.
  bool direct_writes = true;
};

struct CommitRecord {
  int64_t step = -1;
  int64_t epoch = 0;           // membership epoch
  int world_size = 1;
  int64_t data_position = 0;   // samples consumed, or the loader's cursor
  std::string rng_state;       // opaque bytes (e.g. a CPU generator's state)
  std::string hook_digest;     // SHA-256 hex of the hook in use
  uint64_t layout_signature = 0;
  // The settings that change the result (hook parameters, learning rate, batch,
  // ...), name -> value as text; a resume compares them with its own.
  std::map<std::string, std::string> settings;
  // A just-in-time commit: written by a survivor at a failure (a peer's collective
  // error, a stalled step, torchrun's SIGTERM) from the state of its last finished
  // step, without any collective. It holds this rank's whole state but buddy
  // copies only of what reached it before the failure (buddy_parts).
  bool just_in_time = false;
  std::string jit_reason;  // what set it off, e.g. "SIGTERM", "collective error: ..."
  // Which buddy copies of rank (r - 1)'s rank-local state this snapshot holds
  // (kBuddy* bits). A periodic snapshot holds every part there is.
  static constexpr uint64_t kBuddyTrainer = 1;  // the trainer's rank-local state ("local/<i>")
  static constexpr uint64_t kBuddyHook = 2;     // the hook's rank-local state
  uint64_t buddy_parts = kBuddyTrainer | kBuddyHook;
  // The rank whose state the snapshot holds (its rank-local state, and the buddy
  // copy of rank - 1's). Set by the store on commit from its identity; records
  // written before it was recorded read as the store's rank.
  int rank = -1;
  // The buddy copy in this snapshot is of rank (rank - buddy_stride) mod world
  // size; 1 in records written before it was recorded.
  int buddy_stride = 1;
  // Set by the store: whether this commit carries a snapshot, and its blob.
  bool has_snapshot = false;
  std::string blob_file;
  uint64_t blob_bytes = 0;
  uint64_t blob_checksum = 0;
  int64_t unix_ms = 0;
};

struct NamedTensor {
  std::string name;
  at::Tensor tensor;
  // The device type the tensor lives on in use. A snapshot records it from the
  // tensors it is given; LoadSnapshot returns host tensors with it set.
  c10::DeviceType home = c10::DeviceType::CPU;
};

class CheckpointStore {
 public:
  // Opens (and with create_if_missing, creates) the store. Fails with kBusy when
  // another process holds it, kIncompatible for a newer schema or another job or
  // rank, kCorruption for damaged files, kNotFound for a missing directory.
  static StoreStatus Open(const CheckpointStoreOptions& options, std::unique_ptr<CheckpointStore>* store);
  virtual ~CheckpointStore() = default;

  // Persists `layout` under its signature (idempotent).
  virtual StoreStatus PutLayout(const BucketLayout& layout) = 0;
  // NotFound when no layout has that signature.
  virtual StoreStatus GetLayout(uint64_t signature, BucketLayout* layout) = 0;
  virtual StoreStatus ListLayouts(std::vector<uint64_t>* signatures) = 0;

  // Metadata commit: the record, atomically, per the durability policy. Steps must increase (a resume from an older step first discards the
  // newer commits with DiscardCommits). Blocks until durable.
  virtual StoreStatus Commit(const CommitRecord& record) = 0;

  // Snapshot commit: copies `state` into a free host staging slot, then writes
  // the blob and the commit on the store's writer thread, in call order. Host
  // tensors are copied before it returns. Tensors on an accelerator are copied
  // on a side stream into pinned memory: the caller's current stream waits for
  // that copy by event, so work queued on it after this call (the next optimizer
  // step) cannot change them first, and the host does not wait. The caller may
  // change its tensors as soon as this returns. With every slot busy, the policy
  // (options().when_behind) waits for one or skips; a skipped commit's future is
  // ready with Skipped. The future yields the commit's status.
  virtual std::shared_future<StoreStatus> CommitSnapshotAsync(const CommitRecord& record,
                                                              const std::vector<NamedTensor>& state) = 0;
  // Waits for every snapshot handed over so far, and for the retention pass that
  // follows each commit. Returns the first failure among them not yet reported
  // (by this or TakeSnapshotError), else OK.
  virtual StoreStatus WaitForSnapshot() = 0;
  // Without waiting: the first failure among finished snapshots not yet reported,
  // else OK.
  virtual StoreStatus TakeSnapshotError() = 0;
  virtual SnapshotStats snapshot_stats() const = 0;

  // The newest complete commit; NotFound in an empty store.
  virtual StoreStatus LatestCommitted(CommitRecord* record) = 0;
  // The newest complete commit that carries a snapshot; NotFound when none.
  virtual StoreStatus LatestSnapshot(CommitRecord* record) = 0;
  // Every complete commit, oldest first.
  virtual StoreStatus ListCommits(std::vector<CommitRecord>* records) = 0;
  // Loads a snapshot's tensors, verifying the blob's size and checksum.
  virtual StoreStatus LoadSnapshot(const CommitRecord& record, std::vector<NamedTensor>* state) = 0;
  // Removes the commits of `steps` (their records and blobs), in one
  // synced batch; blobs are collected after it. For a resume from an older step
  // (newer commits cannot be continued) and for commits whose snapshot is damaged.
  virtual StoreStatus DiscardCommits(const std::vector<int64_t>& steps) = 0;

  virtual const CheckpointStoreOptions& options() const = 0;
};


}  // namespace ftcomm
