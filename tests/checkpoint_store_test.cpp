// Checkpoint store: round trips, keying, retention, the clear errors, and crash
// safety under kill -9 during commits.
#include <signal.h>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <deque>
#include <future>
#include <fstream>
#include <map>
#include <sys/stat.h>
#include <random>
#include <thread>

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <gtest/gtest.h>
#include <rocksdb/db.h>

#include "ftcomm/bucket_layout.h"
#include "ftcomm/checkpoint_store.h"
#include "ftcomm/errors.h"
#include "ftcomm/process_group.h"
#include "ftcomm/rank_store.h"
#include "checksum.h"
#include "fsutil.h"
#include "store_format.h"
#include "support/multiprocess.h"
#include "support/reducer_model.h"

namespace ftcomm {
namespace {

using namespace std::chrono_literals;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/ftcomm-store-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    detail::remove_tree(path_);
  }
  std::string sub(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

std::unique_ptr<CheckpointStore> open_store(const CheckpointStoreOptions& o) {
  std::unique_ptr<CheckpointStore> store;
  auto s = CheckpointStore::Open(o, &store);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return store;
}

std::unique_ptr<CheckpointStore> open_store(const std::string& dir, int rank = 0, const std::string& job = "job",
                                            int keep_snapshots = 2) {
  CheckpointStoreOptions o;
  o.dir = dir;
  o.job_id = job;
  o.rank = rank;
  o.keep_snapshots = keep_snapshots;
  std::unique_ptr<CheckpointStore> store;
  auto s = CheckpointStore::Open(o, &store);
  EXPECT_TRUE(s.ok()) << s.ToString();
  return store;
}

BucketLayout sample_layout(int buckets) {
  BucketLayout l;
  for (int b = 0; b < buckets; ++b) {
    BucketLayout::Bucket bucket;
    bucket.parameter_indices = {2 * b, 2 * b + 1};
    bucket.offsets = {0, 100};
    bucket.lengths = {100, 50};
    bucket.sizes = {{10, 10}, {50}};
    bucket.dtype = static_cast<int>(at::kFloat);
    bucket.device = "cpu";
    l.buckets.push_back(bucket);
  }
  return l;
}

CommitRecord record_for(int64_t step, uint64_t layout) {
  CommitRecord r;
  r.step = step;
  r.epoch = 1;
  r.world_size = 4;
  r.data_position = step * 32;
  r.rng_state = "rng-" + std::to_string(step);
  r.hook_digest = "d1g35t";
  r.layout_signature = layout;
  return r;
}

std::vector<NamedTensor> state_for(int64_t step) {
  return {{"weight", at::full({256, 256}, float(step))}, {"bias", at::arange(256, at::kDouble) + step},
          {"step", at::tensor({step})}};
}

TEST(CheckpointStore, RoundTripsLayoutCommitHookStateAndSnapshot) {
  TempDir tmp;
  const std::string dir = tmp.sub("rank0");
  const BucketLayout layout = sample_layout(3);
  {
    auto store = open_store(dir);
    ASSERT_TRUE(store->PutLayout(layout).ok());
    ASSERT_TRUE(store->Commit(record_for(1, layout.signature())).ok());
    auto snap = store->CommitSnapshotAsync(record_for(2, layout.signature()), state_for(2));
    ASSERT_TRUE(snap.get().ok()) << snap.get().ToString();
  }
  auto store = open_store(dir);
  BucketLayout back;
  ASSERT_TRUE(store->GetLayout(layout.signature(), &back).ok());
  EXPECT_EQ(back.signature(), layout.signature());
  EXPECT_EQ(back.buckets[2].sizes, layout.buckets[2].sizes);

  CommitRecord latest;
  ASSERT_TRUE(store->LatestCommitted(&latest).ok());
  EXPECT_EQ(latest.step, 2);
  EXPECT_EQ(latest.rng_state, "rng-2");
  EXPECT_TRUE(latest.has_snapshot);
  std::vector<NamedTensor> state;
  auto s = store->LoadSnapshot(latest, &state);
  ASSERT_TRUE(s.ok()) << s.ToString();
  auto want = state_for(2);
  ASSERT_EQ(state.size(), want.size());
  for (size_t i = 0; i < state.size(); ++i) {
    EXPECT_EQ(state[i].name, want[i].name);
    EXPECT_TRUE(at::equal(state[i].tensor, want[i].tensor)) << state[i].name;
  }
  EXPECT_TRUE(store->GetLayout(sample_layout(4).signature(), &back).IsNotFound());
}

TEST(CheckpointStore, LayoutSignatureSeesEveryField) {
  const BucketLayout base = sample_layout(2);
  auto changed = base;
  changed.buckets[1].lengths[0] += 1;
  EXPECT_NE(changed.signature(), base.signature());
  changed = base;
  changed.buckets[0].device = "cuda:0";
  EXPECT_NE(changed.signature(), base.signature());
  changed = base;
  std::swap(changed.buckets[0].parameter_indices[0], changed.buckets[0].parameter_indices[1]);
  EXPECT_NE(changed.signature(), base.signature());
  EXPECT_EQ(sample_layout(2).signature(), base.signature());
}

// A resumed job rebuilds exactly the stored buckets, after c10d's first-iteration
// rebuild too; a layout that does not fit the model, or that this configuration
// would not produce (another bucket cap), is detected.
TEST(CheckpointStoreLayout, AResumedReducerRebuildsTheStoredBuckets) {
  TempDir tmp;
  testing::run_threads(1, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, 1, store));
    const std::vector<int64_t> widths{32, 64, 64, 16};
    testing::ReducerModel first(pg, widths, 8 << 10);
    first.step(4, 0);
    first.step(4, 1);  // after the rebuild
    const BucketLayout layout = bucket_layout_of(first.reducer(), first.parameters());
    ASSERT_GT(layout.buckets.size(), 1u);
    // What recovery agrees on (layout_of the buckets' indices) is what a commit records.
    EXPECT_EQ(layout_of(bucket_indices(layout), first.parameters()).signature(), layout.signature());
    {
      auto ckpt = open_store(tmp.sub("r"));
      ASSERT_TRUE(ckpt->PutLayout(layout).ok());
    }
    auto ckpt = open_store(tmp.sub("r"));
    BucketLayout stored;
    ASSERT_TRUE(ckpt->GetLayout(layout.signature(), &stored).ok());

    testing::ReducerModel resumed(pg, widths, 8 << 10, bucket_indices(stored));
    EXPECT_EQ(layout_mismatch(stored, resumed.parameters()), "");
    EXPECT_EQ(bucket_layout_of(resumed.reducer(), resumed.parameters()).signature(), stored.signature());
    resumed.step(4, 0);
    resumed.step(4, 1);
    EXPECT_EQ(bucket_layout_of(resumed.reducer(), resumed.parameters()).signature(), stored.signature())
        << "c10d's rebuild changed the stored layout";

    testing::ReducerModel other_model(pg, {32, 48, 16}, 8 << 10);
    const std::string why = layout_mismatch(stored, other_model.parameters());
    EXPECT_FALSE(why.empty());
    EXPECT_TRUE(why.find("shape") != std::string::npos || why.find("names parameter") != std::string::npos) << why;

    testing::ReducerModel other_cap(pg, widths, 64 << 10);
    other_cap.step(4, 0);
    other_cap.step(4, 1);
    EXPECT_NE(bucket_layout_of(other_cap.reducer(), other_cap.parameters()).signature(), stored.signature())
        << "a different bucket cap must show as a different layout signature";
  });
}

// Counts the bytes the CPU allocator hands out while it is installed.
class CountingCpuAllocator : public at::Allocator {
 public:
  CountingCpuAllocator() : inner_(c10::GetCPUAllocator()) { c10::SetCPUAllocator(this, /*priority=*/255); }
  ~CountingCpuAllocator() override { c10::SetCPUAllocator(inner_, /*priority=*/255); }
  at::DataPtr allocate(size_t n) override {
    bytes_ += static_cast<int64_t>(n);
    return inner_->allocate(n);
  }
  at::DeleterFnPtr raw_deleter() const override { return inner_->raw_deleter(); }
  void copy_data(void* dest, const void* src, size_t count) const override { inner_->copy_data(dest, src, count); }
  int64_t bytes() const { return bytes_; }

 private:
  at::Allocator* inner_;
  std::atomic<int64_t> bytes_{0};
};

// A commit reads the Reducer's layout every time: it must not cost a copy of the
// gradients (c10d's get_grad_buckets with zero tensors allocates and zero-fills
// one as large as every bucket).
TEST(CheckpointStoreLayout, ReadingTheLayoutAllocatesNoBucketSizedMemory) {
  testing::run_threads(1, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, 1, store));
    testing::ReducerModel model(pg, {256, 512, 512, 256}, 256 << 10);
    model.step(4, 0);
    model.step(4, 1);
    int64_t gradient_bytes = 0;
    for (const auto& p : model.parameters()) gradient_bytes += static_cast<int64_t>(p.nbytes());
    BucketLayout layout;
    int64_t allocated = 0;
    {
      CountingCpuAllocator counting;
      layout = bucket_layout_of(model.reducer(), model.parameters());
      allocated = counting.bytes();
    }
    ASSERT_GT(layout.buckets.size(), 1u);
    EXPECT_LT(allocated, gradient_bytes / 16) << "bucket_layout_of allocated " << allocated << " bytes for "
                                              << gradient_bytes << " bytes of gradients";
  });
}

TEST(CheckpointStore, StepsMustIncrease) {
  TempDir tmp;
  auto store = open_store(tmp.sub("r"));
  ASSERT_TRUE(store->Commit(record_for(5, 0)).ok());
  auto s = store->Commit(record_for(5, 0));
  EXPECT_EQ(s.code(), StoreStatus::Code::kInvalidArgument);
  EXPECT_NE(s.message().find("not after the latest committed step 5"), std::string::npos) << s.message();
}

TEST(CheckpointStore, CheckThrowsAStoreErrorWithTheCode) {
  check(StoreStatus::OK());
  try {
    check(StoreStatus::Busy("checkpoint store /x is held by another process"));
    ADD_FAILURE() << "check() of a Busy status returned";
  } catch (const StoreError& e) {
    EXPECT_EQ(e.code(), "Busy");
    EXPECT_EQ(std::string(e.what_without_backtrace()), "Busy: checkpoint store /x is held by another process");
  }
}

TEST(CheckpointStore, RetentionKeepsTheNewestSnapshotsAndCollectsBlobs) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  CheckpointStoreOptions o;
  o.dir = dir;
  o.keep_snapshots = 2;
  std::unique_ptr<CheckpointStore> store;
  ASSERT_TRUE(CheckpointStore::Open(o, &store).ok());
  for (int64_t step = 1; step <= 10; ++step) {
    if (step % 3 == 0) {
      ASSERT_TRUE(store->CommitSnapshotAsync(record_for(step, 0), state_for(step)).get().ok());
    } else {
      ASSERT_TRUE(store->Commit(record_for(step, 0)).ok());
    }
  }
  // Retention runs after a snapshot's commit is reported; wait for it.
  ASSERT_TRUE(store->WaitForSnapshot().ok());
  std::vector<CommitRecord> commits;
  ASSERT_TRUE(store->ListCommits(&commits).ok());
  // Snapshots at 3, 6, 9; keep 6 and 9 and every commit from 6 on.
  ASSERT_EQ(commits.front().step, 6);
  EXPECT_EQ(commits.back().step, 10);
  EXPECT_EQ(commits.size(), 5u);
  size_t blobs = 0;
  for (const auto& name : detail::list_dir(dir + "/blobs")) blobs += name.size() > 5 && name.substr(name.size() - 5) == ".blob";
  EXPECT_EQ(blobs, 2u);
  CommitRecord snap;
  ASSERT_TRUE(store->LatestSnapshot(&snap).ok());
  EXPECT_EQ(snap.step, 9);
}

TEST(CheckpointStoreErrors, MissingDirectoryNamesItAndTheFix) {
  CheckpointStoreOptions o;
  o.dir = "/tmp/ftcomm-no-such-store-dir";
  o.read_only = true;
  std::unique_ptr<CheckpointStore> store;
  auto s = CheckpointStore::Open(o, &store);
  EXPECT_TRUE(s.IsNotFound());
  EXPECT_NE(s.message().find("/tmp/ftcomm-no-such-store-dir"), std::string::npos);
  EXPECT_NE(s.message().find("does not exist"), std::string::npos) << s.message();
}

TEST(CheckpointStoreErrors, UnwritableDirectoryIsRefused) {
  TempDir tmp;
  std::ofstream(tmp.sub("file")) << "x";
  CheckpointStoreOptions o;
  o.dir = tmp.sub("file") + "/rank0";  // a path under a regular file cannot be created
  std::unique_ptr<CheckpointStore> store;
  auto s = CheckpointStore::Open(o, &store);
  EXPECT_EQ(s.code(), StoreStatus::Code::kIOError);
  EXPECT_NE(s.message().find("writable --ckpt"), std::string::npos) << s.message();
}

TEST(CheckpointStoreErrors, AnotherJobOrRankIsRefused) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  open_store(dir, 0, "job-a").reset();
  CheckpointStoreOptions o;
  o.dir = dir;
  o.job_id = "job-b";
  std::unique_ptr<CheckpointStore> store;
  auto s = CheckpointStore::Open(o, &store);
  EXPECT_TRUE(s.IsIncompatible());
  EXPECT_NE(s.message().find("belongs to job 'job-a' rank 0, not job 'job-b'"), std::string::npos) << s.message();
  o.job_id = "job-a";
  o.rank = 3;
  s = CheckpointStore::Open(o, &store);
  EXPECT_TRUE(s.IsIncompatible()) << s.ToString();
}

TEST(CheckpointStore, AnAdoptedStoreKeepsEachCommitsWriter) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  {
    auto store = open_store(dir, 2);
    ASSERT_TRUE(store->Commit(record_for(4, 0)).ok());
  }
  CheckpointStoreOptions o;
  o.dir = dir;
  o.job_id = "job";
  o.rank = 0;
  o.adopt_other_rank = true;
  std::unique_ptr<CheckpointStore> store;
  ASSERT_TRUE(CheckpointStore::Open(o, &store).ok());
  ASSERT_TRUE(store->Commit(record_for(6, 0)).ok());
  std::vector<CommitRecord> back;
  ASSERT_TRUE(store->ListCommits(&back).ok());
  ASSERT_EQ(back.size(), 2u);
  EXPECT_EQ(back[0].rank, 2);  // written by rank 2 before rank 0 took the store over
  EXPECT_EQ(back[1].rank, 0);
  store.reset();
  // The store is rank 0's now: opened as such without adopting, refused as rank 2's.
  auto reopened = open_store(dir, 0);
  ASSERT_TRUE(reopened);
  ASSERT_TRUE(reopened->ListCommits(&back).ok());
  EXPECT_EQ(back[0].rank, 2);
  reopened.reset();
  o.rank = 2;
  o.adopt_other_rank = false;
  EXPECT_TRUE(CheckpointStore::Open(o, &store).IsIncompatible());
}

TEST(RankStoreDir, LeftoversPairWithMissingRanksInRankOrder) {
  using M = std::map<int, int>;
  // A node that ran ranks 2 and 3 runs 0 and 1 now.
  EXPECT_EQ(pair_leftover_stores({2, 3}, {0, 1}), (M{{0, 2}, {1, 3}}));
  // Every sharing rank has its store: nothing moves, whatever else is there.
  EXPECT_EQ(pair_leftover_stores({0, 1, 5}, {0, 1}), M{});
  // A fresh start: nothing stored.
  EXPECT_EQ(pair_leftover_stores({}, {0, 1, 2, 3}), M{});
  // Stores of other ranks that share the root are theirs, never leftovers (two
  // agents on one disk: ranks 2 and 3 are the other agent's).
  EXPECT_EQ(pair_leftover_stores({2, 3}, {0, 1, 2, 3}), M{});
  // A node running rank 5 alone takes the lowest leftover.
  EXPECT_EQ(pair_leftover_stores({0, 1}, {5}), (M{{5, 0}}));
}

TEST(RankStoreDir, RanksThatShareARootDecideTogether) {
  TempDir tmp;
  const std::string root = tmp.sub("node");
  ASSERT_EQ(::mkdir(root.c_str(), 0755), 0);
  for (const char* r : {"rank2", "rank3", "rank7x"}) ASSERT_EQ(::mkdir((root + "/" + r).c_str(), 0755), 0);
  std::vector<RankStoreDir> got(2);
  testing::run_threads(2, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, 2, store));
    got[static_cast<size_t>(rank)] = rank_store_dir(pg, root);
    // Asked again, each keeps its own.
    EXPECT_EQ(rank_store_dir(pg, root).adopted_from, -1);
  });
  EXPECT_EQ(got[0].dir, root + "/rank0");
  EXPECT_EQ(got[0].adopted_from, 2);
  EXPECT_EQ(got[1].adopted_from, 3);
  EXPECT_TRUE(detail::path_exists(root + "/rank7x"));  // not a store name: left alone
  EXPECT_FALSE(detail::path_exists(root + "/rank2"));
}

TEST(RankStoreDir, AFreshStartOnASharedRootTakesOverNothing) {
  // Four ranks, one root, as two agents on one disk would run them: whichever
  // rank comes first, no rank takes another's store (it did, 2 of 3 times).
  TempDir tmp;
  const std::string root = tmp.sub("shared");
  for (int round = 0; round < 3; ++round) {
    testing::run_threads(4, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
      auto pg = make_process_group(testing::thread_options(rank, 4, store));
      if (rank >= 2) std::this_thread::sleep_for(std::chrono::milliseconds(20 * round));
      const RankStoreDir d = rank_store_dir(pg, root);
      EXPECT_EQ(d.adopted_from, -1) << "rank " << rank;
      EXPECT_EQ(d.dir, root + "/rank" + std::to_string(rank));
      auto s = open_store(d.dir, rank);  // each opens its own, as a job does
    });
  }
  for (int r = 0; r < 4; ++r) EXPECT_TRUE(detail::path_exists(root + "/rank" + std::to_string(r) + "/CURRENT"));
}

TEST(RankStoreDir, ALeftoverStoreInUseIsRefusedOnEveryRank) {
  const auto outcomes = testing::run_ranks(2, 60s, [](const testing::RankContext& ctx) {
    const std::string root = ctx.dir + "/root", ready = ctx.dir + "/ready", done = ctx.dir + "/done";
    if (ctx.rank == 1) {
      // Another process holds a store of a rank that no longer uses this root.
      auto store = open_store(root + "/rank9", 9);
      std::ofstream(ready) << "1";
      for (int i = 0; i < 3000 && !detail::path_exists(done); ++i) std::this_thread::sleep_for(10ms);
      return;
    }
    for (int i = 0; i < 3000 && !detail::path_exists(ready); ++i) std::this_thread::sleep_for(10ms);
    std::string error;
    testing::run_threads(2, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
      auto pg = make_process_group(testing::thread_options(rank, 2, store));
      try {
        rank_store_dir(pg, root);
        ADD_FAILURE() << "rank " << rank << " took over a store in use";
      } catch (const c10::Error& e) {
        EXPECT_NE(std::string(e.what()).find("rank9 is open in process"), std::string::npos) << e.what();
        EXPECT_NE(std::string(e.what()).find("its own checkpoint directory"), std::string::npos) << e.what();
      }
    });
    std::ofstream(done) << "1";
    EXPECT_TRUE(detail::path_exists(root + "/rank9/CURRENT"));
  });
  for (const auto& o : outcomes) EXPECT_TRUE(o.ok()) << "rank " << o.rank << " exit " << o.exit_code;
}

TEST(CheckpointStoreErrors, NewerSchemaIsRefused) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  open_store(dir).reset();
  {
    rocksdb::DB* db = nullptr;
    ASSERT_TRUE(rocksdb::DB::Open(rocksdb::Options(), dir, &db).ok());
    db->Put(rocksdb::WriteOptions(), "meta/schema", "99");
    delete db;
  }
  CheckpointStoreOptions o;
  o.dir = dir;
  o.job_id = "job";
  std::unique_ptr<CheckpointStore> store;
  auto s = CheckpointStore::Open(o, &store);
  EXPECT_TRUE(s.IsIncompatible());
  EXPECT_NE(s.message().find("schema version 99"), std::string::npos) << s.message();
}

TEST(CheckpointStoreErrors, StoreLockedByAnotherProcess) {
  const auto outcomes = testing::run_ranks(2, 60s, [](const testing::RankContext& ctx) {
    const std::string dir = ctx.dir + "/store", ready = ctx.dir + "/ready", done = ctx.dir + "/done";
    if (ctx.rank == 0) {
      auto store = open_store(dir);
      std::ofstream(ready) << "1";
      for (int i = 0; i < 3000 && !detail::path_exists(done); ++i) std::this_thread::sleep_for(10ms);
      return;
    }
    for (int i = 0; i < 3000 && !detail::path_exists(ready); ++i) std::this_thread::sleep_for(10ms);
    CheckpointStoreOptions o;
    o.dir = dir;
    o.job_id = "job";
    std::unique_ptr<CheckpointStore> store;
    auto s = CheckpointStore::Open(o, &store);
    std::ofstream(done) << "1";
    EXPECT_TRUE(s.IsBusy()) << s.ToString();
    EXPECT_NE(s.message().find("in use by another process"), std::string::npos) << s.message();
    // Read-only opens (ftcomm inspect) take no lock and work meanwhile.
    o.read_only = true;
    EXPECT_TRUE(CheckpointStore::Open(o, &store).ok());
  });
  for (const auto& o : outcomes) EXPECT_TRUE(o.ok()) << "rank " << o.rank << " exit " << o.exit_code;
}

void flip_byte(const std::string& path, double where) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(0, std::ios::end);
  const auto size = static_cast<std::streamoff>(f.tellg());
  const std::streamoff at = static_cast<std::streamoff>(size * where);
  f.seekg(at);
  char c = 0;
  f.read(&c, 1);
  c ^= 0x5a;
  f.seekp(at);
  f.write(&c, 1);
}

// A store at `dir` holding one snapshot (step 1), and its commit record.
std::unique_ptr<CheckpointStore> store_with_one_snapshot(const std::string& dir, CommitRecord* r) {
  auto store = open_store(dir);
  EXPECT_TRUE(store->CommitSnapshotAsync(record_for(1, 0), state_for(1)).get().ok());
  EXPECT_TRUE(store->LatestSnapshot(r).ok());
  return store;
}

TEST(CheckpointStoreErrors, CorruptBlobIsReported) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  CommitRecord r;
  auto store = store_with_one_snapshot(dir, &r);
  flip_byte(dir + "/blobs/" + r.blob_file, 0.6);
  std::vector<NamedTensor> state;
  auto s = store->LoadSnapshot(r, &state);
  EXPECT_TRUE(s.IsCorruption());
  EXPECT_NE(s.message().find(r.blob_file), std::string::npos);
  EXPECT_NE(s.message().find("fails its checksum"), std::string::npos) << s.message();
}

TEST(CheckpointStoreErrors, CorruptSstIsReported) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  {
    auto store = open_store(dir);
    for (int64_t step = 1; step <= 200; ++step) {
      CommitRecord r = record_for(step, 0);
      r.rng_state = std::string(2048, char('a' + step % 26));  // records enough for several SST blocks
      ASSERT_TRUE(store->Commit(r).ok());
    }
  }  // closing flushes the memtable into an SST
  int corrupted = 0;
  for (const auto& name : detail::list_dir(dir)) {
    if (name.size() > 4 && name.substr(name.size() - 4) == ".sst") {
      flip_byte(dir + "/" + name, 0.3);
      ++corrupted;
    }
  }
  ASSERT_GT(corrupted, 0);
  CheckpointStoreOptions o;
  o.dir = dir;
  o.job_id = "job";
  std::unique_ptr<CheckpointStore> store;
  StoreStatus s = CheckpointStore::Open(o, &store);
  if (s.ok()) {
    std::vector<CommitRecord> commits;
    s = store->ListCommits(&commits);
  }
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find(dir), std::string::npos) << s.message();
}

// Names and sizes of a directory's files (what a refused open must not change).
std::map<std::string, off_t> listing(const std::string& dir) {
  std::map<std::string, off_t> out;
  for (const auto& name : detail::list_dir(dir)) {
    struct stat st {};
    ::stat((dir + "/" + name).c_str(), &st);
    out[name] = S_ISDIR(st.st_mode) ? -1 : st.st_size;
  }
  return out;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Opens `dir` for writing (job "job"), for tests of refusals.
StoreStatus try_open(const std::string& dir) {
  CheckpointStoreOptions o;
  o.dir = dir;
  o.job_id = "job";
  std::unique_ptr<CheckpointStore> store;
  return CheckpointStore::Open(o, &store);
}

// A store with commits and snapshots, closed.
void fill_store(const std::string& dir, int64_t steps) {
  auto store = open_store(dir);
  for (int64_t step = 1; step <= steps; ++step) {
    ASSERT_TRUE(store->CommitSnapshotAsync(record_for(step, 0), state_for(step)).get().ok());
  }
}

// Before the fix, an open with create_if_missing wrote a fresh, empty database
// over a store whose CURRENT was gone, and every later open saw "no commits".
TEST(CheckpointStoreErrors, MissingCurrentIsRefusedEveryTimeAndNothingIsWritten) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  fill_store(dir, 3);
  const std::string current = read_text(dir + "/CURRENT");
  ASSERT_EQ(::unlink((dir + "/CURRENT").c_str()), 0);
  const auto before = listing(dir);
  for (int attempt = 0; attempt < 3; ++attempt) {
    auto s = try_open(dir);
    EXPECT_TRUE(s.IsCorruption()) << s.ToString();
    EXPECT_NE(s.message().find("no CURRENT"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("nothing was written"), std::string::npos) << s.message();
    EXPECT_NE(s.message().find("mv DIR DIR.damaged"), std::string::npos) << s.message();
    EXPECT_EQ(listing(dir), before) << "a refused open changed the store's files (attempt " << attempt << ")";
  }
  // The read-only path (ftcomm inspect) refuses too.
  CheckpointStoreOptions ro;
  ro.dir = dir;
  ro.read_only = true;
  std::unique_ptr<CheckpointStore> reader;
  EXPECT_TRUE(CheckpointStore::Open(ro, &reader).IsCorruption());
  // Repaired, every commit is still there.
  std::ofstream(dir + "/CURRENT") << current;
  auto store = open_store(dir);
  ASSERT_TRUE(store);
  std::vector<CommitRecord> commits;
  ASSERT_TRUE(store->ListCommits(&commits).ok());
  EXPECT_EQ(commits.size(), 2u);  // retention keeps the newest two snapshots
  EXPECT_EQ(commits.back().step, 3);
}

TEST(CheckpointStoreErrors, MissingManifestIsRefusedWithTheFix) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  fill_store(dir, 2);
  const std::string manifest = read_text(dir + "/CURRENT");
  ASSERT_FALSE(manifest.empty());
  ASSERT_EQ(::unlink((dir + "/" + manifest.substr(0, manifest.find('\n'))).c_str()), 0);
  const auto before = listing(dir);
  auto s = try_open(dir);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("mv DIR DIR.damaged"), std::string::npos) << s.message();
  EXPECT_EQ(listing(dir), before);
}

TEST(CheckpointStoreErrors, ADirectoryOfOtherFilesIsNotTakenOver) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  std::ofstream(dir + "/notes.txt") << "mine";
  auto s = try_open(dir);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("is not a checkpoint store"), std::string::npos) << s.message();
  EXPECT_EQ(detail::list_dir(dir), std::vector<std::string>{"notes.txt"});
}

TEST(CheckpointStore, ACreationCutShortIsCreatedAnew) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  ASSERT_EQ(::mkdir(dir.c_str(), 0755), 0);
  std::ofstream(dir + "/LOCK");
  std::ofstream(dir + "/LOG") << "rocksdb log";
  auto store = open_store(dir);
  ASSERT_TRUE(store);
  EXPECT_TRUE(store->Commit(record_for(1, 0)).ok());
}

TEST(CheckpointStore, DiscardCommitsDropsRecordsAndBlobs) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  auto store = open_store(dir, 0, "job", /*keep_snapshots=*/5);
  ASSERT_TRUE(store);
  for (int64_t step = 1; step <= 3; ++step) {
    ASSERT_TRUE(store->CommitSnapshotAsync(record_for(step, 0), state_for(step)).get().ok());
  }
  ASSERT_TRUE(store->DiscardCommits({3, 7}).ok());  // 7 does not exist: ignored
  CommitRecord latest;
  ASSERT_TRUE(store->LatestSnapshot(&latest).ok());
  EXPECT_EQ(latest.step, 2);
  EXPECT_EQ(detail::list_dir(dir + "/blobs").size(), 2u);
  // The step can be committed again (a resume from step 2 continues from there).
  EXPECT_TRUE(store->CommitSnapshotAsync(record_for(3, 0), state_for(30)).get().ok());
}

TEST(CheckpointStore, SettingsRoundTrip) {
  TempDir tmp;
  auto store = open_store(tmp.sub("r"));
  CommitRecord r = record_for(4, 0);
  r.settings = {{"lr", "0.05"}, {"hook.rank", "2"}};
  ASSERT_TRUE(store->Commit(r).ok());
  CommitRecord back;
  ASSERT_TRUE(store->LatestCommitted(&back).ok());
  EXPECT_EQ(back.settings, r.settings);
}

TEST(CheckpointStore, JustInTimeRecordsRoundTripAndOldRecordsReadAsPeriodic) {
  TempDir tmp;
  auto store = open_store(tmp.sub("r"));
  CommitRecord periodic = record_for(4, 0);
  ASSERT_TRUE(store->Commit(periodic).ok());
  CommitRecord jit = record_for(6, 0);
  jit.just_in_time = true;
  jit.jit_reason = "SIGTERM";
  jit.buddy_parts = CommitRecord::kBuddyTrainer;
  ASSERT_TRUE(store->Commit(jit).ok());
  std::vector<CommitRecord> back;
  ASSERT_TRUE(store->ListCommits(&back).ok());
  ASSERT_EQ(back.size(), 2u);
  EXPECT_FALSE(back[0].just_in_time);
  EXPECT_EQ(back[0].buddy_parts, CommitRecord::kBuddyTrainer | CommitRecord::kBuddyHook);
  EXPECT_TRUE(back[1].just_in_time);
  EXPECT_EQ(back[1].jit_reason, "SIGTERM");
  EXPECT_EQ(back[1].buddy_parts, CommitRecord::kBuddyTrainer);
}

TEST(CheckpointStore, RetentionKeepsTheNewestPeriodicSnapshotPastJustInTimeOnes) {
  TempDir tmp;
  auto store = open_store(tmp.sub("r"), 0, "job", /*keep_snapshots=*/1);
  ASSERT_TRUE(store->CommitSnapshotAsync(record_for(10, 0), state_for(10)).get().ok());
  for (int64_t step : {14, 17}) {
    CommitRecord jit = record_for(step, 0);
    jit.just_in_time = true;
    ASSERT_TRUE(store->CommitSnapshotAsync(jit, state_for(step)).get().ok());
  }
  auto snapshots = [&] {
    EXPECT_TRUE(store->WaitForSnapshot().ok());
    std::vector<CommitRecord> commits;
    EXPECT_TRUE(store->ListCommits(&commits).ok());
    std::vector<int64_t> steps;
    for (const auto& c : commits) {
      if (c.has_snapshot) steps.push_back(c.step);
    }
    return steps;
  };
  // Keep 1 snapshot (17) and the newest periodic one (10), where a failed
  // peer's rank-local state may exist alone, with the commits after it.
  EXPECT_EQ(snapshots(), (std::vector<int64_t>{10, 14, 17}));
  // A newer periodic snapshot retires them all.
  ASSERT_TRUE(store->CommitSnapshotAsync(record_for(20, 0), state_for(20)).get().ok());
  EXPECT_EQ(snapshots(), (std::vector<int64_t>{20}));
}

// kill -9 a writer at random points of its commits, many times over. Each time the
// store must reopen, LatestCommitted() must be a complete commit (its snapshot
// and snapshot present and intact) and no older than the last commit the writer
// saw return (Durability::kSync).
void write_u64_at(const std::string& path, std::streamoff at, uint64_t value) {
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekp(at);
  f.write(reinterpret_cast<const char*>(&value), 8);
}

TEST(CheckpointStoreErrors, ABadTensorHeaderIsDamageNotACrash) {
  // The first tensor ("weight", [256, 256]) has its first size at byte 54:
  // magic, count, name length, "weight", home, dtype, number of sizes.
  for (const uint64_t bad : {uint64_t(-5), uint64_t(1) << 45, uint64_t(0), uint64_t(255)}) {
    TempDir tmp;
    const std::string dir = tmp.sub("r");
    CommitRecord r;
    auto store = store_with_one_snapshot(dir, &r);
    write_u64_at(dir + "/blobs/" + r.blob_file, 54, bad);
    std::vector<NamedTensor> state;
    const auto s = store->LoadSnapshot(r, &state);
    EXPECT_TRUE(s.IsCorruption()) << bad << ": " << s.ToString();
    EXPECT_NE(s.message().find("bad shape"), std::string::npos) << s.message();
  }
}

TEST(CheckpointStoreErrors, ABlobIsNeverWrittenThroughALink) {
  TempDir tmp;
  const std::string dir = tmp.sub("r"), victim = tmp.sub("victim");
  std::ofstream(victim) << "precious";
  auto store = open_store(dir);
  // A link planted where the next snapshot's temporary file goes.
  ASSERT_EQ(::symlink(victim.c_str(), (dir + "/blobs/step-" + std::string(19, '0') + "1.blob.tmp").c_str()), 0)
      << "the temporary name changed: update this test";
  ASSERT_TRUE(store->CommitSnapshotAsync(record_for(1, 0), state_for(1)).get().ok());
  std::string text;
  std::getline(std::ifstream(victim), text);
  EXPECT_EQ(text, "precious");
  std::vector<NamedTensor> state;
  CommitRecord r;
  ASSERT_TRUE(store->LatestSnapshot(&r).ok());
  EXPECT_TRUE(store->LoadSnapshot(r, &state).ok());
}

TEST(CheckpointStoreErrors, AStoreOthersCanWriteOrOwnIsRefused) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  open_store(dir).reset();
  CheckpointStoreOptions o;
  o.dir = dir;
  o.job_id = "job";
  std::unique_ptr<CheckpointStore> store;
  ASSERT_EQ(::chmod(dir.c_str(), 0777), 0);
  auto s = CheckpointStore::Open(o, &store);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("may be written by other users (mode 0777)"), std::string::npos) << s.message();
  EXPECT_NE(s.message().find("chmod go-w"), std::string::npos) << s.message();
  ASSERT_EQ(::chmod(dir.c_str(), 0755), 0);
  ASSERT_EQ(::chmod((dir + "/blobs").c_str(), 0757), 0);
  EXPECT_FALSE(CheckpointStore::Open(o, &store).ok());
  ASSERT_EQ(::chmod((dir + "/blobs").c_str(), 0755), 0);
  EXPECT_TRUE(CheckpointStore::Open(o, &store).ok());
  store.reset();
  if (::geteuid() == 0) {  // only root can give a directory away
    ASSERT_EQ(::chown(dir.c_str(), 65534, 65534), 0);
    s = CheckpointStore::Open(o, &store);
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find("is owned by uid 65534"), std::string::npos) << s.message();
    // Reading it (ftcomm inspect) stays possible.
    o.read_only = true;
    EXPECT_TRUE(CheckpointStore::Open(o, &store).ok());
  }
}

TEST(CheckpointStore, TheWriteAheadLogStaysSmall) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  auto store = open_store(dir);
  ASSERT_TRUE(store->CommitSnapshotAsync(record_for(1, 0), state_for(1)).get().ok());
  // As a crash leaves it: the log still open, never flushed into a table.
  uint64_t allocated = 0;
  for (const auto& name : detail::list_dir(dir)) {
    if (name.size() > 4 && name.compare(name.size() - 4, 4, ".log") == 0) {
      struct stat st {};
      ASSERT_EQ(::stat((dir + "/" + name).c_str(), &st), 0);
      allocated += static_cast<uint64_t>(st.st_blocks) * 512;
    }
  }
  EXPECT_LT(allocated, uint64_t(8) << 20) << "bytes the write-ahead log holds on disk";
}

// Runs the current test's child (the writer) `kills` times, each SIGKILLed after a
// random min_ms-max_ms, and calls check(store, acknowledged, previous, kill) on the
// store it leaves: it returns the newest step it found, or -1 while the writer has
// written nothing yet. Steps never go back and commits stay consecutive; in all, the
// writer must have got to step min_progress.
template <typename Check>
void kill_writer_repeatedly(int kills, unsigned seed, int min_ms, int max_ms, int64_t min_progress, Check&& check) {
  TempDir tmp;
  const std::string dir = tmp.sub("run");
  ASSERT_TRUE(detail::make_dirs(dir, nullptr));
  std::mt19937 rng(seed);
  int64_t previous = 0;
  for (int i = 0; i < kills; ++i) {
    const int pid = testing::spawn_child(testing::current_test_args(), testing::RankContext{0, 1, 0, dir});
    std::this_thread::sleep_for(std::chrono::milliseconds(std::uniform_int_distribution<int>(min_ms, max_ms)(rng)));
    ::kill(pid, SIGKILL);
    const auto outcome = testing::wait_child(pid, 30s);
    ASSERT_EQ(outcome.signal, SIGKILL) << "writer exited early with " << outcome.exit_code;
    int64_t acknowledged = 0;
    std::ifstream(dir + "/progress") >> acknowledged;
    auto store = open_store(dir + "/store");
    ASSERT_TRUE(store);
    const int64_t newest = check(*store, acknowledged, previous, i);
    if (newest < 0) continue;  // killed before its first commit: nothing to lose yet
    EXPECT_GE(newest, previous);
    previous = newest;
    std::vector<CommitRecord> commits;
    ASSERT_TRUE(store->ListCommits(&commits).ok());
    for (size_t k = 1; k < commits.size(); ++k) EXPECT_EQ(commits[k].step, commits[k - 1].step + 1);
  }
  EXPECT_GE(previous, min_progress) << "the writer made too little progress to test anything";
}

TEST(CheckpointStoreCrash, KillNineDuringCommitsNeverLeavesAPartialStep) {
  if (auto ctx = testing::child_context()) {
    // The writer: commit forever; every third step a snapshot.
    auto store = open_store(ctx->dir + "/store");
    CommitRecord last;
    int64_t step = store->LatestCommitted(&last).ok() ? last.step + 1 : 1;
    for (;; ++step) {
      StoreStatus s;
      if (step % 3 == 0) {
        s = store->CommitSnapshotAsync(record_for(step, 0), state_for(step)).get();
      } else {
        s = store->Commit(record_for(step, 0));
      }
      if (!s.ok()) {
        std::cerr << s.ToString() << "\n";
        ::_exit(3);
      }
      std::ofstream(ctx->dir + "/progress", std::ios::trunc) << step;
    }
  }
  kill_writer_repeatedly(25, 42, 400, 1200, 26, [](CheckpointStore& store, int64_t acknowledged, int64_t previous, int i) {
    CommitRecord latest;
    const StoreStatus found = store.LatestCommitted(&latest);
    if (found.IsNotFound() && acknowledged == 0 && previous == 0) return int64_t(-1);
    EXPECT_TRUE(found.ok()) << "kill " << i << ": " << found.ToString();
    EXPECT_GE(latest.step, acknowledged) << "a commit that returned was lost";
    EXPECT_EQ(latest.rng_state, "rng-" + std::to_string(latest.step));
    CommitRecord snap;
    if (store.LatestSnapshot(&snap).ok()) {
      std::vector<NamedTensor> state;
      auto s = store.LoadSnapshot(snap, &state);
      EXPECT_TRUE(s.ok()) << s.ToString();
      if (s.ok()) EXPECT_TRUE(at::equal(state[0].tensor, at::full({256, 256}, float(snap.step))));
    }
    return latest.step;
  });
}


// --- staging and the background writer ---------------------------------------

CheckpointStoreOptions staged_options(const std::string& dir, int slots, SnapshotWhenBehind when_behind,
                                      int64_t write_bytes_per_sec) {
  CheckpointStoreOptions o;
  o.dir = dir;
  o.job_id = "job";
  o.staging_slots = slots;
  o.when_behind = when_behind;
  o.write_bytes_per_sec = write_bytes_per_sec;
  return o;
}

int64_t state_bytes(const std::vector<NamedTensor>& state) {
  int64_t n = 0;
  for (const auto& nt : state) n += static_cast<int64_t>(nt.tensor.nbytes());
  return n;
}

void expect_snapshot_of(CheckpointStore& store, int64_t step) {
  std::vector<CommitRecord> commits;
  ASSERT_TRUE(store.ListCommits(&commits).ok());
  const CommitRecord* found = nullptr;
  for (const auto& c : commits) {
    if (c.step == step) found = &c;
  }
  ASSERT_NE(found, nullptr) << "no commit of step " << step;
  std::vector<NamedTensor> state;
  const auto s = store.LoadSnapshot(*found, &state);
  ASSERT_TRUE(s.ok()) << s.ToString();
  const auto want = state_for(step);
  ASSERT_EQ(state.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) EXPECT_TRUE(at::equal(state[i].tensor, want[i].tensor)) << step;
}

TEST(CheckpointStoreStaging, CommitsOverlapTheWriterAndItsMemoryStaysBounded) {
  TempDir tmp;
  // About 0.26 MB a snapshot at 8 MB/s: each write takes ~33 ms, the commits come
  // far faster (even on a loaded machine), so they overlap the writer and sometimes
  // wait for a slot.
  auto store = open_store(staged_options(tmp.sub("r"), 2, SnapshotWhenBehind::kWait, 8'000'000));
  const int64_t bytes = state_bytes(state_for(1));
  std::vector<std::shared_future<StoreStatus>> done;
  for (int64_t step = 1; step <= 12; ++step) {
    auto state = state_for(step);
    done.push_back(store->CommitSnapshotAsync(record_for(step, 0), state));
    // The caller may change its tensors at once: the copy is the store's.
    for (auto& nt : state) nt.tensor.fill_(-1);
    // A slot holds the blob's image: the tensors' bytes, their headers, and
    // rounding to 4 KiB.
    const SnapshotStats st = store->snapshot_stats();
    EXPECT_LE(st.staging_bytes, 2 * (bytes + 8192)) << "staging grew past its two slots at step " << step;
  }
  ASSERT_TRUE(store->WaitForSnapshot().ok());
  for (auto& d : done) EXPECT_TRUE(d.get().ok()) << d.get().ToString();
  const SnapshotStats st = store->snapshot_stats();
  EXPECT_EQ(st.taken, 12);
  EXPECT_EQ(st.written, 12);
  EXPECT_EQ(st.skipped, 0);
  EXPECT_GT(st.waited, 0) << "12 commits at once against a 33 ms write never waited for a slot";
  CommitRecord newest;
  ASSERT_TRUE(store->LatestSnapshot(&newest).ok());
  EXPECT_EQ(st.staging_bytes, 2 * static_cast<int64_t>((newest.blob_bytes + 4095) / 4096 * 4096));
  EXPECT_EQ(st.pinned_bytes, 0);
  // Retention keeps two snapshots: both are whole and of their own step.
  expect_snapshot_of(*store, 11);
  expect_snapshot_of(*store, 12);
}

TEST(CheckpointStoreStaging, OneSlotAndASlowDiskSkipsACommitAndSaysWhy) {
  TempDir tmp;
  // ~0.5 MB at 2 MB/s: a write takes ~250 ms.
  auto store = open_store(staged_options(tmp.sub("r"), 1, SnapshotWhenBehind::kSkip, 2'000'000));
  auto first = store->CommitSnapshotAsync(record_for(1, 0), state_for(1));
  auto second = store->CommitSnapshotAsync(record_for(2, 0), state_for(2));
  ASSERT_EQ(second.wait_for(0s), std::future_status::ready) << "a skipped commit must not block";
  EXPECT_TRUE(second.get().IsSkipped()) << second.get().ToString();
  EXPECT_NE(second.get().message().find("step 2"), std::string::npos) << second.get().message();
  EXPECT_NE(second.get().message().find("still writing step(s) 1"), std::string::npos) << second.get().message();
  EXPECT_TRUE(first.get().ok());
  auto third = store->CommitSnapshotAsync(record_for(3, 0), state_for(3));
  ASSERT_TRUE(store->WaitForSnapshot().ok());
  EXPECT_TRUE(third.get().ok());
  const SnapshotStats st = store->snapshot_stats();
  EXPECT_EQ(st.taken, 2);
  EXPECT_EQ(st.skipped, 1);
  std::vector<CommitRecord> commits;
  ASSERT_TRUE(store->ListCommits(&commits).ok());
  ASSERT_EQ(commits.size(), 2u);
  EXPECT_EQ(commits[0].step, 1);
  EXPECT_EQ(commits[1].step, 3);
  expect_snapshot_of(*store, 3);
}

// The slot is free when the commit's future completes: a caller that waited for
// its snapshot and commits again is not skipped, even while the writer still
// retires an old snapshot (retention unlinks a blob after the future is set).
TEST(CheckpointStoreStaging, ACommitAfterThePreviousOneCompletedIsNeverSkipped) {
  TempDir tmp;
  CheckpointStoreOptions o = staged_options(tmp.sub("r"), 1, SnapshotWhenBehind::kSkip, 0);
  o.keep_snapshots = 1;
  auto store = open_store(o);
  const std::vector<NamedTensor> big{{"big", at::ones({int64_t(16) << 20}, at::kFloat)}};  // 64 MB
  for (int64_t step = 1; step <= 6; ++step) {
    const StoreStatus st = store->CommitSnapshotAsync(record_for(step, 0), big).get();
    ASSERT_TRUE(st.ok()) << "step " << step << ": " << st.ToString();
  }
  ASSERT_TRUE(store->WaitForSnapshot().ok());
  EXPECT_EQ(store->snapshot_stats().skipped, 0);
}

TEST(CheckpointStoreStaging, OneSlotAndASlowDiskWaitsAndCountsIt) {
  TempDir tmp;
  auto store = open_store(staged_options(tmp.sub("r"), 1, SnapshotWhenBehind::kWait, 2'000'000));
  store->CommitSnapshotAsync(record_for(1, 0), state_for(1));
  const auto start = std::chrono::steady_clock::now();
  store->CommitSnapshotAsync(record_for(2, 0), state_for(2));
  const double waited = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  ASSERT_TRUE(store->WaitForSnapshot().ok());
  const SnapshotStats st = store->snapshot_stats();
  EXPECT_EQ(st.waited, 1);
  EXPECT_GT(st.waited_ms, 100) << "the second commit should have waited for most of a ~250 ms write";
  EXPECT_NEAR(st.waited_ms, waited, 50);
  expect_snapshot_of(*store, 2);
}

TEST(CheckpointStoreStaging, AFailedWriteIsReportedOnceAndTheNextCommitStillLands) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  auto store = open_store(staged_options(dir, 2, SnapshotWhenBehind::kWait, 0));
  // The blob's temporary name is taken by a directory the writer cannot remove.
  ASSERT_TRUE(detail::make_dirs(dir + "/blobs/step-00000000000000000001.blob.tmp/x", nullptr));
  auto failed = store->CommitSnapshotAsync(record_for(1, 0), state_for(1));
  EXPECT_FALSE(failed.get().ok());
  EXPECT_FALSE(store->TakeSnapshotError().ok()) << "the failure must be reported";
  EXPECT_TRUE(store->TakeSnapshotError().ok()) << "and reported once";
  EXPECT_TRUE(store->CommitSnapshotAsync(record_for(2, 0), state_for(2)).get().ok());
  EXPECT_TRUE(store->WaitForSnapshot().ok());
  expect_snapshot_of(*store, 2);
}

TEST(CheckpointStoreStaging, DiscardingCommitsWaitsForTheWriterWithoutSwallowingItsFailure) {
  TempDir tmp;
  const std::string dir = tmp.sub("r");
  auto store = open_store(staged_options(dir, 2, SnapshotWhenBehind::kWait, 0));
  ASSERT_TRUE(store->CommitSnapshotAsync(record_for(1, 0), state_for(1)).get().ok());
  ASSERT_TRUE(detail::make_dirs(dir + "/blobs/step-00000000000000000002.blob.tmp/x", nullptr));
  store->CommitSnapshotAsync(record_for(2, 0), state_for(2));
  ASSERT_TRUE(store->DiscardCommits({1}).ok());
  EXPECT_FALSE(store->TakeSnapshotError().ok()) << "the failed write of step 2 must still be reported";
}

TEST(CheckpointStoreStaging, BadSlotCountsAreRefusedWithTheRange) {
  TempDir tmp;
  for (int slots : {0, 9}) {
    std::unique_ptr<CheckpointStore> store;
    const auto s = CheckpointStore::Open(staged_options(tmp.sub("r"), slots, SnapshotWhenBehind::kWait, 0), &store);
    EXPECT_EQ(s.code(), StoreStatus::Code::kInvalidArgument);
    EXPECT_NE(s.message().find("staging_slots must be 1 to 8"), std::string::npos) << s.message();
  }
  EXPECT_THROW(parse_snapshot_when_behind("later", "--when-behind"), c10::Error);
  EXPECT_EQ(parse_snapshot_when_behind("skip", "x"), SnapshotWhenBehind::kSkip);
}

TEST(CheckpointStoreStaging, TrailingBytesAfterTheLastTensorAreDamage) {
  TempDir tmp;
  auto store = open_store(tmp.sub("r"));
  ASSERT_TRUE(store->CommitSnapshotAsync(record_for(1, 0), state_for(1)).get().ok());
  CommitRecord r;
  ASSERT_TRUE(store->LatestSnapshot(&r).ok());
  // A record that claims one byte more than the tensors hold, with that byte on disk.
  std::ofstream(tmp.sub("r") + "/blobs/" + r.blob_file, std::ios::app) << 'x';
  r.blob_bytes += 1;
  std::vector<NamedTensor> state;
  const auto s = store->LoadSnapshot(r, &state);
  EXPECT_TRUE(s.IsCorruption()) << s.ToString();
  EXPECT_NE(s.message().find("past its last tensor"), std::string::npos) << s.message();
  EXPECT_TRUE(state.empty());
}

// Blobs written before data alignment ("FTC2": no padding after each tensor's
// header) still load, tensor for tensor.
TEST(CheckpointStoreStaging, ABlobOfThePreviousFormatStillLoads) {
  TempDir tmp;
  auto store = open_store(tmp.sub("r"));
  const std::vector<NamedTensor> want{{"w", at::arange(6, at::kFloat).view({2, 3})},
                                      {"odd name", at::arange(3).remainder(2).to(at::kBool)},
                                      {"i", at::tensor({int64_t(7)}), c10::DeviceType::CUDA}};
  store::Encoder file;
  file.u64(store::kBlobMagicV2);
  file.u64(want.size());
  std::string bytes = file.out();
  uint64_t sum = detail::checksum64(bytes.data(), bytes.size(), 0);
  for (const auto& nt : want) {
    store::Encoder e;
    e.str(nt.name);
    e.i64(static_cast<int64_t>(nt.home));
    store::encode_tensor_header(e, nt.tensor);
    sum = detail::checksum64(e.out().data(), e.out().size(), sum);
    sum = detail::checksum64(nt.tensor.data_ptr(), nt.tensor.nbytes(), sum);
    bytes += e.out();
    bytes.append(static_cast<const char*>(nt.tensor.data_ptr()), nt.tensor.nbytes());
  }
  std::ofstream(tmp.sub("r") + "/blobs/old.blob", std::ios::binary) << bytes;
  CommitRecord r = record_for(3, 0);
  r.has_snapshot = true;
  r.blob_file = "old.blob";
  r.blob_bytes = bytes.size();
  r.blob_checksum = sum;
  std::vector<NamedTensor> got;
  const StoreStatus st = store->LoadSnapshot(r, &got);
  ASSERT_TRUE(st.ok()) << st.ToString();
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    EXPECT_EQ(got[i].name, want[i].name);
    EXPECT_EQ(got[i].home, want[i].home);
    EXPECT_TRUE(at::equal(got[i].tensor, want[i].tensor)) << want[i].name;
  }
}

// How many of a file's pages are in the page cache.
size_t cached_pages(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  struct stat st {};
  ::fstat(fd, &st);
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  const size_t pages = (static_cast<size_t>(st.st_size) + page - 1) / page;
  void* map = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_SHARED, fd, 0);
  std::vector<unsigned char> in(pages);
  ::mincore(map, static_cast<size_t>(st.st_size), in.data());
  ::munmap(map, static_cast<size_t>(st.st_size));
  ::close(fd);
  size_t n = 0;
  for (unsigned char c : in) n += c & 1;
  return n;
}

// A blob is written with direct I/O where the file system takes it: it does not
// pass through the page cache (whose copy costs training's cores), except its
// last partial block. With direct_writes off it does. Either way it loads intact.
TEST(CheckpointStoreStaging, DirectWritesLeaveTheBlobOutOfThePageCache) {
  TempDir tmp;
  {
    const std::string probe = tmp.sub("probe");
    const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_DIRECT, 0600);
    if (fd < 0) GTEST_SKIP() << "this file system refuses direct I/O (" << std::strerror(errno) << ")";
    ::close(fd);
  }
  const std::vector<NamedTensor> state{{"big", at::arange(int64_t(1) << 20, at::kFloat)},  // 4 MB
                                       {"tail", at::arange(1001, at::kDouble)}};
  for (const bool direct : {true, false}) {
    CheckpointStoreOptions o = staged_options(tmp.sub(direct ? "direct" : "cached"), 2, SnapshotWhenBehind::kWait, 0);
    o.direct_writes = direct;
    auto store = open_store(o);
    ASSERT_TRUE(store->CommitSnapshotAsync(record_for(1, 0), state).get().ok());
    CommitRecord r;
    ASSERT_TRUE(store->LatestSnapshot(&r).ok());
    ASSERT_NE(r.blob_bytes % 4096, 0u) << "the test wants a partial last block";
    const size_t pages = (r.blob_bytes + 4095) / 4096;
    const size_t cached = cached_pages(o.dir + "/blobs/" + r.blob_file);
    if (direct) {
      EXPECT_LE(cached, 1u) << cached << " of " << pages << " pages in the page cache after a direct write";
    } else {
      EXPECT_EQ(cached, pages) << "a buffered write leaves the blob in the page cache";
    }
    std::vector<NamedTensor> got;
    ASSERT_TRUE(store->LoadSnapshot(r, &got).ok());
    ASSERT_EQ(got.size(), state.size());
    for (size_t i = 0; i < state.size(); ++i) EXPECT_TRUE(at::equal(got[i].tensor, state[i].tensor));
  }
}

// A load faults its large tensors in at once but never advises huge pages for
// them: where the kernel compacts memory for huge pages on the spot
// (transparent_hugepage/defrag "madvise", as on this project's CI machine), that
// made a restarted rank's 101 MB load 3-5x slower (BENCHMARKS.md, "Failure to
// first step at world 4"). The advice shows as "hg" in the mapping's VmFlags.
TEST(CheckpointStoreStaging, ALoadDoesNotAdviseHugePagesForItsTensors) {
  TempDir tmp;
  auto store = open_store(tmp.sub("r"));
  const std::vector<NamedTensor> big{{"big", at::arange(int64_t(8) << 20, at::kFloat)}};  // 32 MB
  ASSERT_TRUE(store->CommitSnapshotAsync(record_for(1, 0), big).get().ok());
  CommitRecord r;
  ASSERT_TRUE(store->LatestSnapshot(&r).ok());
  std::vector<NamedTensor> state;
  ASSERT_TRUE(store->LoadSnapshot(r, &state).ok());
  ASSERT_EQ(state.size(), 1u);
  EXPECT_TRUE(at::equal(state[0].tensor, big[0].tensor));
  // The mapping holding the middle of the tensor (past any 2 MB boundary) and its flags.
  const auto middle = reinterpret_cast<uintptr_t>(state[0].tensor.data_ptr()) + state[0].tensor.nbytes() / 2;
  std::ifstream smaps("/proc/self/smaps");
  std::string line, flags;
  bool inside = false;
  while (std::getline(smaps, line)) {
    unsigned long lo = 0, hi = 0;
    if (std::sscanf(line.c_str(), "%lx-%lx", &lo, &hi) == 2) {
      inside = lo <= middle && middle < hi;
    } else if (inside && line.rfind("VmFlags:", 0) == 0) {
      flags = line + " ";
      break;
    }
  }
  if (flags.empty()) GTEST_SKIP() << "/proc/self/smaps has no VmFlags for the tensor's mapping";
  EXPECT_EQ(flags.find(" hg "), std::string::npos) << "the loaded tensor's memory was advised huge pages: " << flags;
}

TEST(CheckpointStoreStaging, AcceleratorStateIsCopiedBeforeTheNextStepChangesIt) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no CUDA device";
  TempDir tmp;
  auto store = open_store(staged_options(tmp.sub("r"), 2, SnapshotWhenBehind::kWait, 0));
  for (int64_t step = 1; step <= 6; ++step) {
    std::vector<NamedTensor> state = state_for(step);
    for (auto& nt : state) nt.tensor = nt.tensor.to(at::kCUDA);
    // A large tensor, so that the device copy takes a while.
    state.push_back({"big", at::full({64, 1 << 20}, float(step), at::TensorOptions().device(at::kCUDA))});
    store->CommitSnapshotAsync(record_for(step, 0), state);
    // The next "optimizer step", queued on the current stream right away.
    for (auto& nt : state) nt.tensor.add_(1000);
  }
  ASSERT_TRUE(store->WaitForSnapshot().ok());
  CommitRecord r;
  ASSERT_TRUE(store->LatestSnapshot(&r).ok());
  std::vector<NamedTensor> state;
  ASSERT_TRUE(store->LoadSnapshot(r, &state).ok());
  ASSERT_EQ(state.size(), 4u);
  EXPECT_EQ(state[0].home, c10::DeviceType::CUDA);
  EXPECT_TRUE(at::equal(state[0].tensor, state_for(6)[0].tensor));
  EXPECT_TRUE(at::equal(state[3].tensor, at::full({64, 1 << 20}, 6.0f)));
  EXPECT_GT(store->snapshot_stats().pinned_bytes, 0);
}

TEST(CheckpointStoreCrash, KillNineDuringOverlappedSnapshotsNeverLeavesATornOne) {
  if (auto ctx = testing::child_context()) {
    // The writer: a snapshot every step, never waiting for one; its tensors
    // change in place as soon as each commit returns; the writes are slowed to
    // 50 MB/s so that kills land in them. Progress: the newest acknowledged step.
    auto store = open_store(staged_options(ctx->dir + "/store", 2, SnapshotWhenBehind::kWait, 50'000'000));
    CommitRecord last;
    int64_t step = store->LatestCommitted(&last).ok() ? last.step + 1 : 1;
    std::deque<std::pair<int64_t, std::shared_future<StoreStatus>>> pending;
    for (;; ++step) {
      auto state = state_for(step);
      pending.emplace_back(step, store->CommitSnapshotAsync(record_for(step, 0), state));
      for (auto& nt : state) nt.tensor.fill_(-7);
      while (!pending.empty() && pending.front().second.wait_for(0s) == std::future_status::ready) {
        if (!pending.front().second.get().ok()) {
          std::cerr << pending.front().second.get().ToString() << "\n";
          ::_exit(3);
        }
        std::ofstream(ctx->dir + "/progress", std::ios::trunc) << pending.front().first;
        pending.pop_front();
      }
    }
  }
  // Every snapshot is three fsyncs (blob, directory, record): in a container on
  // overlayfs a few a second, so the bar is lower than one a kill.
  kill_writer_repeatedly(12, 7, 500, 1500, 6, [](CheckpointStore& store, int64_t acknowledged, int64_t previous, int i) {
    CommitRecord latest;
    const StoreStatus found = store.LatestSnapshot(&latest);
    if (found.IsNotFound() && acknowledged == 0 && previous == 0) return int64_t(-1);
    EXPECT_TRUE(found.ok()) << "kill " << i << ": " << found.ToString();
    EXPECT_GE(latest.step, acknowledged) << "a snapshot whose commit was acknowledged was lost";
    expect_snapshot_of(store, latest.step);
    return latest.step;
  });
}

}  // namespace
}  // namespace ftcomm
