// Opening a checkpoint store: the directory's owner and mode, RocksDB's open
// (read-only first for an existing store), the schema and the identity, adoption
// by another rank; and StoreStatus. The rest of the store is rocks_store.h's.
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
#include "ftcomm/errors.h"
#include "fsutil.h"
#include "rocks_store.h"
#include "store_format.h"

namespace ftcomm {

const char* StoreStatus::CodeName() const {
  static const char* names[] = {"OK", "NotFound", "Corruption", "IOError", "InvalidArgument", "Busy", "Incompatible", "Skipped"};
  return names[static_cast<int>(code_)];
}

std::string StoreStatus::ToString() const {
  return ok() ? "OK" : std::string(CodeName()) + ": " + message_;
}

void check(const StoreStatus& status) {
  if (!status.ok()) throw StoreError(status.ToString(), status.CodeName());
}

SnapshotWhenBehind parse_snapshot_when_behind(const std::string& text, const std::string& what) {
  if (text == "wait") return SnapshotWhenBehind::kWait;
  if (text == "skip") return SnapshotWhenBehind::kSkip;
  TORCH_CHECK(false, what, " must be 'wait' (a commit waits for the disk) or 'skip' (a commit the disk cannot "
              "take yet is skipped), got '", text, "'");
}

const char* snapshot_when_behind_name(SnapshotWhenBehind policy) {
  return policy == SnapshotWhenBehind::kWait ? "wait" : "skip";
}

std::string signature_hex(uint64_t signature) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016" PRIx64, signature);
  return buf;
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
    return StoreStatus::Corruption("checkpoint store " + dir + " cannot be opened (" + text + "); " + store::kDamagedFix);
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
                    std::unique_ptr<store::RocksCheckpointStore>* out) {
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
  *out = std::make_unique<store::RocksCheckpointStore>(o, std::unique_ptr<rocksdb::DB>(raw));
  return StoreStatus::OK();
}

}  // namespace

StoreStatus CheckpointStore::Open(const CheckpointStoreOptions& options, std::unique_ptr<CheckpointStore>* store) {
  if (options.dir.empty()) return StoreStatus::InvalidArgument("checkpoint store: no directory given (--ckpt DIR)");
  if (options.staging_slots < 1 || options.staging_slots > 8) {
    return StoreStatus::InvalidArgument("checkpoint store " + options.dir + ": staging_slots must be 1 to 8, got " +
                                        std::to_string(options.staging_slots) +
                                        " (each slot holds one snapshot's host copy; 2 overlaps a commit with the "
                                        "previous one's write)");
  }
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
  std::unique_ptr<store::RocksCheckpointStore> impl;
  if (existing) {
    // A read-only look first: a store that cannot be opened, or is not this
    // job's, is never written to (a read-write open of a damaged RocksDB
    // directory can write a fresh, empty database over it).
    if (!detail::path_exists(options.dir + "/CURRENT")) {
      return StoreStatus::Corruption("checkpoint store " + options.dir +
                                     " is damaged or is not a checkpoint store: it holds files but no CURRENT (RocksDB's "
                                     "pointer to its newest MANIFEST); " + store::kDamagedFix);
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

namespace store {

StoreStatus RocksCheckpointStore::Prepare(bool check_rank, bool may_write) {
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
    return FromRocks(s, "reading the schema version");
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
        auto st = Adopt(identity);
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
    return FromRocks(s, "reading the store identity");
  } else {
    // No identity: a store whose creation was cut short, which holds nothing.
    // One with commits but no identity is damaged (or not ftcomm's).
    CommitRecord any;
    auto l = Latest(&any, false);
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
    auto st = Write(batch, "writing the store identity");
    if (!st.ok()) return st;
  }
  std::string error;
  if (!detail::make_dirs(blob_dir_, &error)) return StoreStatus::IOError("cannot create " + error);
  return CollectGarbage();
}

StoreStatus RocksCheckpointStore::Adopt(const std::string& identity) {
  std::vector<CommitRecord> records;
  auto s = ListCommits(&records);  // a record without a rank reads as the old identity's
  if (!s.ok()) return s;
  rocksdb::WriteBatch batch;
  for (const auto& r : records) batch.Put(kCommitPrefix + step_key(r.step), encode_record(r));
  batch.Put(kIdentityKey, identity);
  auto st = Write(batch, "adopting the store");
  if (st.ok()) identity_rank_ = options_.rank;
  return st;
}

}  // namespace store
}  // namespace ftcomm
