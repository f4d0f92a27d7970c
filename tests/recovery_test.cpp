// Recovery's steps (include/ftcomm/recovery.h) called directly, as any trainer
// calls them: ranks as threads over Gloo (tier 1) and as forked processes over a
// TCP store (tier 2), each rank with its own checkpoint store.
#include <unistd.h>

#include <atomic>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "fsutil.h"
#include "ftcomm/checkpointer.h"
#include "ftcomm/errors.h"
#include "ftcomm/job.h"
#include "ftcomm/process_group.h"
#include "ftcomm/recovery.h"
#include "support/multiprocess.h"

namespace ftcomm {
namespace {

constexpr int64_t kBig = (int64_t(1) << 60) + 2;  // above 2^53: lost through float64

std::string test_hook(const std::string& name) {
  return std::string(FTCOMM_TEST_SOURCE_DIR) + "/hooks/" + name + ".py";
}

class Scratch {
 public:
  Scratch() {
    char tmpl[] = "/tmp/ftcomm-recovery-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~Scratch() { detail::remove_tree(path_); }
  std::string rank_dir(int rank) const { return path_ + "/rank" + std::to_string(rank); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

std::unique_ptr<CheckpointStore> open_rank_store(const std::string& dir, int rank) {
  CheckpointStoreOptions o;
  o.dir = dir;
  o.job_id = "recovery-test";
  o.rank = rank;
  o.keep_snapshots = 4;
  std::unique_ptr<CheckpointStore> store;
  check(CheckpointStore::Open(o, &store));
  return store;
}

// A small model's state: parameters and momentum filled with `value`, and the
// int64 hook's rank-local counter at kBig + rank (one bucket).
TrainingState make_state(float value, bool with_counter, int rank) {
  TrainingState s;
  s.parameters = {at::full({8, 4}, value), at::full({4}, value + 1)};
  s.optimizer = {at::full({8, 4}, value / 2), at::full({4}, value / 2)};
  s.hook = ScriptHook::load(test_hook("int64_counter"));
  if (with_counter) s.hook->state().at("count").insert(0, at::full({1}, kBig + rank, at::kLong));
  return s;
}

void commit(CheckpointStore& store, const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const TrainingState& state,
            int64_t step, std::map<std::string, std::string> settings = {}) {
  CommitRecord r;
  r.step = step;
  r.world_size = pg->getSize();
  r.hook_digest = state.hook->digest();
  r.settings = std::move(settings);
  check(store.CommitSnapshotAsync(r, snapshot_tensors(pg, state)).get());
}

int64_t counter_of(const TrainingState& state) {
  const auto counts = state.hook->state().at("count");
  return counts.contains(0) ? counts.at(0).item<int64_t>() : -1;
}

// --- the plan, as every rank computes it from every rank's candidates -----------

SnapshotCandidate periodic(int64_t step) {
  return {step, false, CommitRecord::kBuddyTrainer | CommitRecord::kBuddyHook};
}
SnapshotCandidate jit(int64_t step, uint64_t buddy_parts = 0) {
  return {step, true, buddy_parts};
}

TEST(RecoveryPlan, WithoutRankLocalStateTheNewestStepWinsAndLaggardsAreResynced) {
  // Rank 1 died in step 17; rank 0 saved step 16 just in time.
  const RecoveryPlan plan = plan_recovery({{jit(16), periodic(10)}, {periodic(10)}}, {false, false, LocalStatePolicy::kExact});
  EXPECT_EQ(plan.step, 16);
  EXPECT_EQ(plan.source, 0);
  EXPECT_TRUE(plan.just_in_time);
  EXPECT_EQ(plan.resync, (std::vector<int>{1}));
  EXPECT_TRUE(plan.local_reset.empty());
  EXPECT_EQ(plan.steps_lost(), 0);
}

TEST(RecoveryPlan, ResetKeepsTheTrainerPartThatTheBuddyHolds) {
  // Rank 1 died in step 17; rank 0's just-in-time step 16 holds rank 1's
  // trainer-local copy (every step) but not its hook state (periodic only).
  const RecoveryNeeds reset{true, true, LocalStatePolicy::kReset};
  const RecoveryPlan plan = plan_recovery({{jit(16, CommitRecord::kBuddyTrainer), periodic(10)}, {periodic(10)}}, reset);
  EXPECT_EQ(plan.step, 16);
  EXPECT_EQ(plan.local_reset, (std::vector<int>{1}));  // its hook state starts afresh...
  ASSERT_EQ(plan.trainer_source.size(), 2u);
  EXPECT_EQ(plan.trainer_source[1].rank, 0);  // ...its RNG and buffers come from rank 0's copy
  EXPECT_TRUE(plan.trainer_source[1].buddy);
  EXPECT_EQ(plan.trainer_source[0].rank, 0);
  EXPECT_FALSE(plan.trainer_source[0].buddy);
  // Without that copy, nothing to keep.
  const RecoveryPlan none = plan_recovery({{jit(16), periodic(10)}, {periodic(10)}}, reset);
  EXPECT_EQ(none.trainer_source[1].rank, -1);
}

TEST(RecoveryPlan, ExactPassesOverAStepWhoseRankLocalHookStateIsMissing) {
  // PowerSGD's error feedback of rank 1 exists only at the periodic step 10.
  const RecoveryNeeds exact{true, false, LocalStatePolicy::kExact};
  RecoveryPlan plan = plan_recovery({{jit(16), periodic(10)}, {periodic(10)}}, exact);
  EXPECT_EQ(plan.step, 10);
  EXPECT_FALSE(plan.just_in_time);
  EXPECT_TRUE(plan.resync.empty());
  EXPECT_EQ(plan.newest_step, 16);
  EXPECT_EQ(plan.steps_lost(), 6);
  // reset takes the newest step and starts rank 1's state afresh.
  plan = plan_recovery({{jit(16), periodic(10)}, {periodic(10)}}, {true, false, LocalStatePolicy::kReset});
  EXPECT_EQ(plan.step, 16);
  EXPECT_EQ(plan.local_reset, (std::vector<int>{1}));
  EXPECT_EQ(plan.resync, (std::vector<int>{1}));
}

TEST(RecoveryPlan, ATrainerStateBuddyCopyInAJustInTimeCommitIsEnoughForExact) {
  // World 3, rank 2 lost: rank 0 (its buddy) saved step 16 with the trainer's
  // rank-local copy of rank 2, so exact resumes there.
  const RecoveryNeeds needs{false, true, LocalStatePolicy::kExact};
  RecoveryPlan plan =
      plan_recovery({{jit(16, CommitRecord::kBuddyTrainer), periodic(10)}, {jit(16), periodic(10)}, {periodic(10)}}, needs);
  EXPECT_EQ(plan.step, 16);
  EXPECT_TRUE(plan.local_reset.empty());
  // Without the copy (the exchange of step 16 never reached rank 0), step 10.
  plan = plan_recovery({{jit(16), periodic(10)}, {jit(16), periodic(10)}, {periodic(10)}}, needs);
  EXPECT_EQ(plan.step, 10);
  // The hook's rank-local state is never in a just-in-time buddy copy.
  plan = plan_recovery({{jit(16, CommitRecord::kBuddyTrainer), periodic(10)}, {jit(16), periodic(10)}, {periodic(10)}},
                       {true, true, LocalStatePolicy::kExact});
  EXPECT_EQ(plan.step, 10);
}

TEST(RecoveryPlan, ExactWithNoCompleteStepTakesTheNewestAndSaysWhoIsReset) {
  // Rank 1's store and its buddy's (rank 2) are both gone: no step has rank 1's
  // state, so even exact resumes from the newest step with it reset.
  const RecoveryPlan plan = plan_recovery({{periodic(20)}, {}, {}}, {true, false, LocalStatePolicy::kExact});
  EXPECT_EQ(plan.step, 20);
  EXPECT_EQ(plan.local_reset, (std::vector<int>{1}));
  EXPECT_EQ(plan.resync, (std::vector<int>{1, 2}));
}

SnapshotCandidate written(int64_t step, int world_size, int owner, bool just_in_time = false, int buddy_stride = 1) {
  return {step,       just_in_time ? true : false, just_in_time ? 0 : CommitRecord::kBuddyTrainer | CommitRecord::kBuddyHook,
          world_size, owner,                       buddy_stride};
}

TEST(RecoveryPlan, BuddyCopiesOneNodeOverSurviveTheLossOfAWholeNode) {
  // Two nodes of two ranks; the node of ranks 0 and 1 is lost with its disk.
  const RecoveryNeeds exact{true, true, LocalStatePolicy::kExact};
  // Copies one node over (stride 2): rank 0's is with rank 2, rank 1's with rank 3.
  RecoveryPlan plan = plan_recovery({{}, {}, {written(20, 4, 2, false, 2)}, {written(20, 4, 3, false, 2)}}, exact);
  EXPECT_EQ(plan.step, 20);
  EXPECT_TRUE(plan.local_reset.empty());
  EXPECT_EQ(plan.local_source[0].rank, 2);
  EXPECT_TRUE(plan.local_source[0].buddy);
  EXPECT_EQ(plan.local_source[1].rank, 3);
  // Copies on the next rank (stride 1): rank 0's was on the lost node too.
  plan = plan_recovery({{}, {}, {written(20, 4, 2)}, {written(20, 4, 3)}}, exact);
  EXPECT_EQ(plan.local_reset, (std::vector<int>{0}));
  EXPECT_EQ(plan.local_source[1].rank, 2);
}

TEST(RecoveryPlan, AResizeCarriesReplicatedStateAndStartsEveryRanksLocalStateAfresh) {
  // World 4 lost a node (rank 3); three ranks resume from step 20 of world 4.
  const RecoveryNeeds exact{true, false, LocalStatePolicy::kExact};
  const RecoveryPlan plan =
      plan_recovery({{written(20, 4, 0)}, {written(20, 4, 1)}, {written(20, 4, 2)}}, exact);
  EXPECT_EQ(plan.step, 20);
  EXPECT_TRUE(plan.resized());
  EXPECT_EQ(plan.step_world_size, 4);
  EXPECT_TRUE(plan.resync.empty());
  EXPECT_EQ(plan.local_reset, (std::vector<int>{0, 1, 2}));
  // Without rank-local state nothing is reset; the resize is still reported.
  const RecoveryPlan stateless =
      plan_recovery({{written(20, 4, 0)}, {written(20, 4, 1)}, {}}, {false, false, LocalStatePolicy::kExact});
  EXPECT_EQ(stateless.step, 20);
  EXPECT_TRUE(stateless.resized());
  EXPECT_TRUE(stateless.local_reset.empty());
  EXPECT_EQ(stateless.resync, (std::vector<int>{2}));
}

TEST(RecoveryPlan, ExactNeverGoesBackPastAResize) {
  // Grown back to 4: ranks 0-2 committed step 30 at world 3; the returning node's
  // old store (rank 3) and the older commits still hold step 20 of world 4, where
  // every rank's state exists. Exact keeps step 30 (all state afresh) instead of
  // giving up ten steps.
  const std::vector<std::vector<SnapshotCandidate>> candidates{
      {written(30, 3, 0), written(20, 4, 0)},
      {written(30, 3, 1), written(20, 4, 1)},
      {written(30, 3, 2), written(20, 4, 2)},
      {written(20, 4, 3)}};
  const RecoveryPlan plan = plan_recovery(candidates, {true, false, LocalStatePolicy::kExact});
  EXPECT_EQ(plan.step, 30);
  EXPECT_EQ(plan.step_world_size, 3);
  EXPECT_EQ(plan.local_reset, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(plan.resync, (std::vector<int>{3}));
}

TEST(RecoveryPlan, ARenumberedRankGetsItsOwnStateFromTheStoreThatHoldsIt) {
  // The rendezvous swapped the two ranks: each now runs with the other's store.
  const RecoveryPlan plan =
      plan_recovery({{written(20, 2, 1)}, {written(20, 2, 0)}}, {true, true, LocalStatePolicy::kExact});
  EXPECT_EQ(plan.step, 20);
  EXPECT_FALSE(plan.resized());
  EXPECT_TRUE(plan.local_reset.empty());
  ASSERT_EQ(plan.local_source.size(), 2u);
  EXPECT_EQ(plan.local_source[0].rank, 1);
  EXPECT_FALSE(plan.local_source[0].buddy);
  EXPECT_EQ(plan.local_source[1].rank, 0);
  // World 3, the store of rank 1 lost, ranks renumbered: rank 1's state comes
  // from the buddy copy in rank 2's snapshot, which rank 0 now holds.
  const RecoveryPlan buddy = plan_recovery({{written(20, 3, 2)}, {}, {written(20, 3, 0)}},
                                           {true, false, LocalStatePolicy::kExact});
  EXPECT_EQ(buddy.step, 20);
  EXPECT_TRUE(buddy.local_reset.empty());
  EXPECT_EQ(buddy.local_source[1].rank, 0);
  EXPECT_TRUE(buddy.local_source[1].buddy);
  EXPECT_EQ(buddy.local_source[2].rank, 0);
  EXPECT_FALSE(buddy.local_source[2].buddy);
  EXPECT_EQ(buddy.local_source[0].rank, 2);
}

TEST(RecoveryPlan, NoSnapshotAnywhereIsAFreshStart) {
  const RecoveryPlan plan = plan_recovery({{}, {}}, {true, true, LocalStatePolicy::kExact});
  EXPECT_TRUE(plan.fresh());
  EXPECT_EQ(plan.rank_steps, (std::vector<int64_t>{-1, -1}));
}

// A replaced rank (empty store) is resynced from a peer, and its rank-local int64
// state comes back bit for bit from its buddy (rank r + 1 keeps r's copy).
// The just-in-time replica copies the hook's state every step: into last step's
// copies where they fit (no allocation), afresh where the state changed shape.
TEST(HookStateEntries, ReuseLastCopiesThatFitAndCopyAfreshWhereTheStateChanged) {
  const TrainingState s = make_state(1.0f, true, 0);
  auto counts = s.hook->state().at("count");
  const std::vector<NamedTensor> first = hook_state_entries(*s.hook);
  ASSERT_EQ(first.size(), 1u);
  const void* storage = first[0].tensor.data_ptr();
  counts.at(0).fill_(7);  // the live state moves on, in place
  const std::vector<NamedTensor> second = hook_state_entries(*s.hook, first);
  ASSERT_EQ(second.size(), 1u);
  EXPECT_EQ(second[0].name, first[0].name);
  EXPECT_EQ(second[0].tensor.data_ptr(), storage) << "a copy that fits is reused";
  EXPECT_NE(second[0].tensor.data_ptr(), counts.at(0).data_ptr()) << "a copy, not the live tensor";
  EXPECT_EQ(second[0].tensor.item<int64_t>(), 7);
  counts.insert_or_assign(0, at::full({3}, 5, at::kLong));  // the state changed shape
  const std::vector<NamedTensor> third = hook_state_entries(*s.hook, second);
  ASSERT_EQ(third.size(), 1u);
  EXPECT_TRUE(at::equal(third[0].tensor, at::full({3}, 5, at::kLong)));
  EXPECT_NE(third[0].tensor.data_ptr(), counts.at(0).data_ptr());
  EXPECT_EQ(second[0].tensor.item<int64_t>(), 7) << "a copy that no longer fits is left alone";
}

TEST(RecoveryThreads, AReplacedRankIsResyncedAndGetsItsBuddyCopyBitForBit) {
  Scratch scratch;
  const int world = 3;
  testing::run_threads(world, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, world, store));
    {
      auto ckpt = open_rank_store(scratch.rank_dir(rank), rank);
      commit(*ckpt, pg, make_state(3.0f, true, rank), 10);
    }
    pg->barrier()->wait();
    if (rank == 1) detail::remove_tree(scratch.rank_dir(1));  // the node and its disk are gone
    pg->barrier()->wait();
    auto ckpt = open_rank_store(scratch.rank_dir(rank), rank);
    TrainingState state = make_state(-1.0f, false, rank);  // a fresh process: other values, no hook state
    const LocalCheckpoint local = load_newest_intact(ckpt.get(), world, rank);
    const RecoveryPlan plan = agree_on_step(pg, local);
    EXPECT_EQ(plan.step, 10);
    EXPECT_EQ(plan.source, 0);
    EXPECT_EQ(plan.resync, std::vector<int>{1});
    if (plan.has_step(rank)) restore_from_checkpoint(plan, local, state, scratch.rank_dir(rank));
    EXPECT_GT(resync(pg, plan, state), 0);
    const RankLocalOutcome outcome = restore_rank_local(pg, plan, local, state);
    EXPECT_NE(outcome.summary.find("rank 1: restored from rank 2's buddy copy"), std::string::npos) << outcome.summary;
    EXPECT_TRUE(at::equal(state.parameters[0], at::full({8, 4}, 3.0f))) << "rank " << rank;
    EXPECT_TRUE(at::equal(state.optimizer[1], at::full({4}, 1.5f))) << "rank " << rank;
    EXPECT_EQ(counter_of(state), kBig + rank) << "rank " << rank << "'s int64 state changed";
  });
}

// A lagging rank (its newest snapshot is older) is resynced to the newest step.
TEST(RecoveryThreads, ALaggingRankIsResyncedToTheNewestStep) {
  Scratch scratch;
  const int world = 2;
  testing::run_threads(world, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, world, store));
    auto ckpt = open_rank_store(scratch.rank_dir(rank), rank);
    commit(*ckpt, pg, make_state(1.0f, true, rank), 10);
    const TrainingState at20 = make_state(2.0f, true, rank);
    const auto tensors = snapshot_tensors(pg, at20);  // collective: every rank takes part
    if (rank == 0) {
      CommitRecord r;
      r.step = 20;
      r.world_size = world;
      r.hook_digest = at20.hook->digest();
      check(ckpt->CommitSnapshotAsync(r, tensors).get());  // rank 1 died before its step-20 commit
    }
    TrainingState state = make_state(0.0f, false, rank);
    const LocalCheckpoint local = load_newest_intact(ckpt.get(), world, rank);
    EXPECT_EQ(local.step, rank == 0 ? 20 : 10);
    const RecoveryPlan plan = agree_on_step(pg, local);
    ASSERT_EQ(plan.step, 20);
    EXPECT_EQ(plan.resync, std::vector<int>{1});
    EXPECT_TRUE(discard_unusable(ckpt.get(), plan, local).empty());
    if (plan.has_step(rank)) restore_from_checkpoint(plan, local, state, scratch.rank_dir(rank));
    resync(pg, plan, state);
    restore_rank_local(pg, plan, local, state);
    EXPECT_TRUE(at::equal(state.parameters[1], at::full({4}, 3.0f))) << "rank " << rank;
    EXPECT_EQ(counter_of(state), kBig + rank);
  });
}

// Ranks that would build different buckets are stopped together, naming both
// signatures; on a resume every rank takes the source's buckets.
TEST(RecoveryThreads, BucketLayoutsAreAgreedOrRefusedOnEveryRank) {
  const int world = 2;
  std::atomic<int> refused{0};
  testing::run_threads(world, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, world, store));
    const std::vector<at::Tensor> params = {at::zeros({4, 4}), at::zeros({4}), at::zeros({2, 3})};
    RecoveryPlan fresh;
    fresh.rank_steps = {-1, -1};
    const std::vector<std::vector<size_t>> mine = rank == 0 ? std::vector<std::vector<size_t>>{{0, 1}, {2}}
                                                            : std::vector<std::vector<size_t>>{{0}, {1, 2}};
    try {
      agree_on_buckets(pg, fresh, mine, params);
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("bucket layouts differ"), std::string::npos) << e.what();
      ++refused;
    }
    RecoveryPlan resume;
    resume.step = 10;
    resume.source = 1;
    resume.rank_steps = {10, 10};
    const auto agreed = agree_on_buckets(pg, resume, mine, params);
    EXPECT_EQ(agreed, (std::vector<std::vector<size_t>>{{0}, {1, 2}})) << "rank " << rank;
  });
  EXPECT_EQ(refused.load(), world);
}

// A changed setting stops every rank (naming it and both values) unless allowed.
TEST(RecoveryThreads, AChangedSettingIsRefusedOnEveryRankUnlessAllowed) {
  Scratch scratch;
  const int world = 2;
  std::atomic<int> refused{0};
  testing::run_threads(world, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, world, store));
    auto ckpt = open_rank_store(scratch.rank_dir(rank), rank);
    commit(*ckpt, pg, make_state(1.0f, true, rank), 10, {{"lr", "0.05"}, {"batch", "32"}});
    const LocalCheckpoint local = load_newest_intact(ckpt.get(), world, rank);
    const RecoveryPlan plan = agree_on_step(pg, local);
    try {
      check_settings(pg, plan, local, {{"lr", "0.1"}, {"batch", "32"}}, {});
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("'lr' was 0.05 in the checkpoint and is 0.1 now"), std::string::npos)
          << e.what();
      ++refused;
    }
    const auto changes = check_settings(pg, plan, local, {{"lr", "0.1"}, {"batch", "32"}}, {"lr"});
    EXPECT_EQ(changes, std::vector<std::string>{"lr: 0.05 -> 0.1"});
  });
  EXPECT_EQ(refused.load(), world);
}

// Tier 2: the same resync across processes, over a TCP store: the replaced rank's
// process starts with nothing and ends with the source's state and its own
// rank-local state from its buddy.
TEST(RecoveryForked, AReplacedRankInItsOwnProcessResumesBitExactly) {
  const auto outcomes = testing::run_ranks(3, std::chrono::seconds(120), [](const testing::RankContext& ctx) {
    auto pg = make_process_group(testing::spawned_options(ctx, StoreKind::kTcp));
    const std::string dir = ctx.dir + "/rank" + std::to_string(ctx.rank);
    {
      auto ckpt = open_rank_store(dir, ctx.rank);
      commit(*ckpt, pg, make_state(5.0f, true, ctx.rank), 30);
    }
    pg->barrier()->wait();
    if (ctx.rank == 2) detail::remove_tree(dir);
    pg->barrier()->wait();
    auto ckpt = open_rank_store(dir, ctx.rank);
    TrainingState state = make_state(0.0f, false, ctx.rank);
    const LocalCheckpoint local = load_newest_intact(ckpt.get(), 3, ctx.rank);
    const RecoveryPlan plan = agree_on_step(pg, local);
    TORCH_CHECK(plan.step == 30 && plan.resync == std::vector<int>{2}, "unexpected plan");
    if (plan.has_step(ctx.rank)) restore_from_checkpoint(plan, local, state, dir);
    resync(pg, plan, state);
    restore_rank_local(pg, plan, local, state);
    TORCH_CHECK(at::equal(state.parameters[0], at::full({8, 4}, 5.0f)), "parameters differ on rank ", ctx.rank);
    TORCH_CHECK(counter_of(state) == kBig + ctx.rank, "rank-local int64 state differs on rank ", ctx.rank);
  });
  testing::expect_ranks_ok(outcomes, 3);
}

// --- a refused resume discards nothing (issue 28, item 1) ------------------------

std::vector<int64_t> steps_of(CheckpointStore& store) {
  std::vector<CommitRecord> records;
  check(store.ListCommits(&records));
  std::vector<int64_t> out;
  for (const auto& r : records) out.push_back(r.step);
  return out;
}

TEST(CheckpointerResume, ARefusedResumeDiscardsNothingAndAnAcceptedOneDiscardsLate) {
  // Both ranks hold 10 and 20; rank 0 also a newer 24 that rank 1 lacks its
  // rank-local state for, so an exact resume picks 20 and leaves 24 behind.
  Scratch scratch;
  const int world = 2;
  testing::run_threads(world, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, world, store));
    {
      auto ckpt = open_rank_store(scratch.rank_dir(rank), rank);
      commit(*ckpt, pg, make_state(1.0f, true, rank), 10, {{"lr", "0.1"}});
      commit(*ckpt, pg, make_state(2.0f, true, rank), 20, {{"lr", "0.1"}});
      if (rank == 0) {
        const TrainingState at24 = make_state(3.0f, true, rank);
        CommitRecord r;
        r.step = 24;
        r.world_size = world;
        r.just_in_time = true;
        r.buddy_parts = 0;
        r.hook_digest = at24.hook->digest();
        r.settings = {{"lr", "0.1"}};
        check(ckpt->CommitSnapshotAsync(r, own_state_tensors(at24, hook_state_entries(*at24.hook), {})).get());
      }
    }
    pg->barrier()->wait();
    auto options = [&](std::map<std::string, std::string> settings) {
      CheckpointerOptions o;
      o.ckpt_dir = scratch.rank_dir(rank);
      o.job_id = "recovery-test";
      o.keep_snapshots = 4;
      o.settings = std::move(settings);
      o.fixes.allow_change = "pass allow_changed_settings=['NAME']";
      return o;
    };
    auto state_with = [&](const std::string& hook) {
      TrainingState state = make_state(0.0f, false, rank);
      if (hook == "none") state.hook.reset();
      if (hook == "other") state.hook = ScriptHook::load(test_hook("fail_on_rank"));
      return state;
    };
    auto attempt = [&](std::map<std::string, std::string> settings, const std::string& hook) {
      Checkpointer ckpt(pg, options(std::move(settings)));
      TrainingState state = state_with(hook);
      ckpt.prepare_recovery(state);
      std::vector<std::vector<size_t>> buckets;
      const RecoveryReport report = ckpt.finish_recovery(state, {{0, 1}}, &buckets);
      EXPECT_EQ(report.resumed_from_step, 20);
      EXPECT_EQ(report.discarded_steps, rank == 0 ? std::vector<int64_t>{24} : std::vector<int64_t>{});
      // Not yet: the front-end may still refuse (a Python optimizer that does not fit).
      EXPECT_EQ(steps_of(*ckpt.store()), rank == 0 ? (std::vector<int64_t>{10, 20, 24}) : (std::vector<int64_t>{10, 20}));
      ckpt.accept_recovery();
      EXPECT_EQ(steps_of(*ckpt.store()), (std::vector<int64_t>{10, 20}));
    };
    for (const auto& [settings, hook, expect] :
         std::vector<std::tuple<std::map<std::string, std::string>, std::string, std::string>>{
             {{{"lr", "0.2"}}, "same", "'lr' was 0.1 in the checkpoint and is 0.2 now"},
             // Another hook's parameters differ first: refused as changed settings.
             {{{"lr", "0.1"}}, "other", "refusing to resume from step"},
             {{{"lr", "0.1"}}, "none", "this run has none"}}) {
      try {
        Checkpointer ckpt(pg, options(settings));
        TrainingState state = state_with(hook);
        ckpt.prepare_recovery(state);
        ADD_FAILURE() << "rank " << rank << ": resumed with " << hook;
      } catch (const ResumeRefused& e) {
        // Every rank refuses, the one without the step too, and nothing changed;
        // typed: every rank names the settings that differ.
        const std::string what = e.what_without_backtrace();
        if (hook == "same") EXPECT_EQ(e.settings(), std::vector<std::string>{"lr"}) << what;
        if (hook == "other") EXPECT_FALSE(e.settings().empty()) << what;
        if (hook == "none") EXPECT_TRUE(e.settings().empty()) << what;
        EXPECT_GE(e.step(), 20) << what;
        if (hook == "same") EXPECT_NE(what.find("allow_changed_settings"), std::string::npos) << what;
        if (rank == 0 || hook == "same") EXPECT_NE(what.find(expect), std::string::npos) << what;
        EXPECT_NE(what.find("othing was discarded"), std::string::npos) << what;
      }
      pg->barrier()->wait();
      EXPECT_EQ(steps_of(*open_rank_store(scratch.rank_dir(rank), rank)),
                rank == 0 ? (std::vector<int64_t>{10, 20, 24}) : (std::vector<int64_t>{10, 20}));
      pg->barrier()->wait();
    }
    attempt({{"lr", "0.1"}}, "same");
  });
}

TEST(JobOverThreads, OwnsTheStoreDirectoryTheDeadlinesAndJustInTime) {
  // The core both front-ends run on: it finds the rank's store under the root
  // (collective), derives the deadlines from the group's timeout, and starts
  // just in time once recovery is done, only where there is a store.
  Scratch scratch;
  const int world = 2;
  testing::run_threads(world, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, world, store, std::chrono::seconds(20)));
    const auto deadlines = deadlines_for(group_timeout(pg));
    EXPECT_EQ(deadlines.group.count(), 20000);
    EXPECT_EQ(deadlines.hook.count(), 10000);
    EXPECT_EQ(deadlines.stall.count(), 18000);
    for (const bool with_store : {true, false}) {
      JobOptions o;
      o.ckpt_root = with_store ? scratch.path() : "";
      o.checkpoint.job_id = "job-test";
      o.jit.handle_sigterm = false;
      Job job(pg, o);
      EXPECT_EQ(job.store_dir(), with_store ? scratch.rank_dir(rank) : "");
      EXPECT_EQ(job.deadlines().stall.count(), 18000);
      TrainingState state = make_state(0.0f, false, rank);
      job.prepare_recovery(state);
      std::vector<std::vector<size_t>> buckets;
      const RecoveryReport report = job.finish_recovery(state, {{0, 1}}, &buckets);
      job.accept_recovery();
      EXPECT_EQ(report.resumed_from_step, -1);
      EXPECT_EQ(buckets, (std::vector<std::vector<size_t>>{{0, 1}}));
      EXPECT_EQ(job.buddy_stride(), 1);
      EXPECT_EQ(job.just_in_time_active(), with_store);
      EXPECT_EQ(job.store() != nullptr, with_store);
      job.stop_just_in_time();
      EXPECT_FALSE(job.just_in_time_active());
      EXPECT_FALSE(job.save_just_in_time("nothing to save"));
      pg->barrier()->wait();
    }
  });
}

}  // namespace
}  // namespace ftcomm
