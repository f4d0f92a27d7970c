// Process-group factory: option validation, torchrun's environment, store
// namespacing, Gloo over thread/file/TCP rendezvous, and a rank dying mid-collective.
#include <signal.h>

#include <chrono>
#include <cstdlib>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "control.h"
#include "ftcomm/process_group.h"
#include "support/multiprocess.h"

namespace ftcomm {
namespace {

using namespace std::chrono_literals;
using testing::RankContext;

// Expects `fn` to throw a c10::Error whose message contains every one of `parts`.
template <typename Fn>
void expect_error(Fn&& fn, std::initializer_list<const char*> parts) {
  try {
    fn();
    ADD_FAILURE() << "expected an error";
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    for (const char* part : parts) {
      EXPECT_NE(what.find(part), std::string::npos) << "missing '" << part << "' in: " << what;
    }
  }
}

class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    value ? ::setenv(name, value, 1) : ::unsetenv(name);
  }
  ~ScopedEnv() { old_.empty() ? ::unsetenv(name_) : ::setenv(name_, old_.c_str(), 1); }

 private:
  const char* name_;
  std::string old_;
};

// A group of one rank whose collectives fail, counted: what the control
// exchanges must never need at world 1.
class NoCollectivesGroup : public c10d::ProcessGroup {
 public:
  NoCollectivesGroup() : c10d::ProcessGroup(0, 1) {}
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>&, const c10d::AllreduceOptions&) override {
    return called("allreduce");
  }
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>&, std::vector<at::Tensor>&,
                                           const c10d::AllgatherOptions&) override {
    return called("allgather");
  }
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>&, const c10d::BroadcastOptions&) override {
    return called("broadcast");
  }
  int calls = 0;

 private:
  c10::intrusive_ptr<c10d::Work> called(const char* what) {
    ++calls;
    TORCH_CHECK(false, what, " called on a group of one rank");
  }
};

// At world 1 the ranks' decisions (a hook's per-step or per-collective verdict,
// the resume's agreement) are this rank's own: no collective, no hand-off to
// the backend's threads (30 us a call on Gloo on this project's CI machine).
TEST(ControlExchanges, AGroupOfOneDecidesWithoutACollective) {
  auto group = c10::make_intrusive<NoCollectivesGroup>();
  const c10::intrusive_ptr<c10d::ProcessGroup> pg = group;
  EXPECT_EQ(control::max(pg, int64_t(7)), 7);
  EXPECT_EQ(control::max(pg, 2.5), 2.5);
  EXPECT_EQ(control::allgather(pg, int64_t(3)), std::vector<int64_t>{3});
  EXPECT_EQ(control::broadcast(pg, {4, 5}, 0), (std::vector<int64_t>{4, 5}));
  EXPECT_EQ(control::broadcast_bytes(pg, "abc", 0), "abc");
  EXPECT_EQ(control::allgather_bytes(pg, "xyz"), std::vector<std::string>{"xyz"});
  EXPECT_EQ(control::first_error(pg, ""), std::nullopt);
  EXPECT_EQ(control::first_error(pg, "refused"), std::optional<std::string>("refused"));
  EXPECT_EQ(group->calls, 0);
}

TEST(ProcessGroupOptions, RankOutsideWorldIsRefused) {
  ProcessGroupOptions o;
  o.rank = 4;
  o.world_size = 4;
  expect_error([&] { make_process_group(o); }, {"rank 4 is outside the world of size 4", "RANK"});
  o.rank = -1;
  expect_error([&] { make_process_group(o); }, {"rank -1"});
  o.rank = 0;
  o.world_size = 0;
  expect_error([&] { make_process_group(o); }, {"world_size is 0"});
}

TEST(ProcessGroupOptions, BadPortAndBackendNamesAreRefused) {
  ProcessGroupOptions o;
  o.master_port = 70000;
  expect_error([&] { make_process_group(o); }, {"MASTER_PORT", "65535"});
  expect_error([] { parse_backend("mpi"); }, {"unknown backend 'mpi'", "auto, nccl, gloo"});
  EXPECT_EQ(parse_backend("nccl"), Backend::kNccl);
}

TEST(ProcessGroupOptions, ReadsTorchrunEnvironment) {
  ScopedEnv rank("RANK", "2"), world("WORLD_SIZE", "4"), local("LOCAL_RANK", "1"),
      addr("MASTER_ADDR", "10.1.2.3"), port("MASTER_PORT", "29555"),
      restarts("TORCHELASTIC_RESTART_COUNT", "3"), agent("TORCHELASTIC_USE_AGENT_STORE", "True");
  EXPECT_TRUE(launched_by_torchrun());
  const ProcessGroupOptions o = process_group_options_from_env();
  EXPECT_EQ(o.rank, 2);
  EXPECT_EQ(o.world_size, 4);
  EXPECT_EQ(o.local_rank, 1);
  EXPECT_EQ(o.master_addr, "10.1.2.3");
  EXPECT_EQ(o.master_port, 29555);
  EXPECT_EQ(o.restart_count, 3);
  EXPECT_TRUE(o.store_client_only);
}

TEST(ProcessGroupOptions, MalformedEnvironmentNamesTheVariable) {
  ScopedEnv rank("RANK", "two");
  expect_error([] { process_group_options_from_env(); }, {"RANK='two'", "not an integer"});
}

TEST(ProcessGroupStore, RestartCountNamespacesKeys) {
  auto shared = c10::make_intrusive<c10d::HashStore>();
  ProcessGroupOptions o = testing::thread_options(0, 1, shared);
  auto first = make_store(o);
  first->set("step", std::vector<uint8_t>{7});
  o.restart_count = 1;
  auto second = make_store(o);
  EXPECT_FALSE(second->check({"step"})) << "a restarted group must not see the previous attempt's keys";
  EXPECT_TRUE(first->check({"step"}));
}

TEST(ProcessGroupStore, UnreachableMasterFailsWithinTimeout) {
  ProcessGroupOptions o;
  o.rank = 1;
  o.world_size = 2;
  o.master_port = testing::free_port();
  o.timeout = 2s;
  const auto start = std::chrono::steady_clock::now();
  expect_error([&] { make_process_group(o); }, {"could not reach the store", "MASTER_ADDR=127.0.0.1", "MASTER_PORT"});
  EXPECT_LT(std::chrono::steady_clock::now() - start, 20s);
}

TEST(ProcessGroupBackend, NcclWithoutGpuIsRefused) {
  if (at::hasCUDA()) GTEST_SKIP() << "a GPU is present";
  ProcessGroupOptions o;
  o.backend = Backend::kNccl;
  o.announce = false;
  expect_error([&] { make_process_group(o); }, {"backend 'nccl' was asked for", "--backend gloo"});
}

TEST(ProcessGroupBackend, AutoStatesItsChoiceAndServesCpu) {
  testing::run_threads(2, [](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    ProcessGroupChoice choice;
    auto pg = make_process_group(testing::thread_options(rank, 2, store), &choice);
    if (!at::hasCUDA()) {
      EXPECT_EQ(choice.cuda_backend, Backend::kGloo);
      EXPECT_FALSE(choice.fallback_reason.empty());
    }
    std::vector<at::Tensor> t{at::full({3}, rank + 1.0)};
    pg->allreduce(t)->wait();
    EXPECT_TRUE(at::equal(t[0], at::full({3}, 3.0)));
  });
}

// Two ranks on one GPU: NCCL would refuse them inside its init; auto must see it
// first and fall back to Gloo on both ranks.
TEST(ProcessGroupBackend, AutoFallsBackWhenRanksShareAGpu) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no GPU";
  testing::run_threads(2, [](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto options = testing::thread_options(rank, 2, store);
    options.backend = Backend::kAuto;
    options.local_rank = 0;
    ProcessGroupChoice choice;
    auto pg = make_process_group(options, &choice);
    EXPECT_EQ(choice.cuda_backend, Backend::kGloo);
    EXPECT_NE(choice.fallback_reason.find("share"), std::string::npos) << choice.fallback_reason;
    std::vector<at::Tensor> t{at::ones({8}, at::Device(at::kCUDA, 0))};
    pg->allreduce(t)->wait();
    EXPECT_EQ(t[0].sum().item<float>(), 16.0f);
  });
}

// Tier 2: real processes over each store kind, world 1 to 4.
class ProcessGroupForked : public ::testing::TestWithParam<std::tuple<StoreKind, int>> {};

TEST_P(ProcessGroupForked, AllreduceOverStore) {
  const auto [store, world] = GetParam();
  auto outcomes = testing::run_ranks(world, 60s, [store = store](const RankContext& ctx) {
    auto pg = make_process_group(testing::spawned_options(ctx, store));
    std::vector<at::Tensor> t{at::arange(5, at::kFloat) * (ctx.rank + 1)};
    pg->allreduce(t)->wait();
    const double sum = ctx.world * (ctx.world + 1) / 2.0;
    EXPECT_TRUE(at::equal(t[0], at::arange(5, at::kFloat) * sum)) << t[0];
  });
  for (const auto& o : outcomes) EXPECT_TRUE(o.ok()) << "rank " << o.rank << " exit " << o.exit_code << " signal " << o.signal;
}

INSTANTIATE_TEST_SUITE_P(Stores, ProcessGroupForked,
                         ::testing::Combine(::testing::Values(StoreKind::kTcp, StoreKind::kFile),
                                            ::testing::Values(1, 2, 4)),
                         [](const auto& info) {
                           return testing::store_name(std::get<0>(info.param)) + "_w" +
                               std::to_string(std::get<1>(info.param));
                         });

// torchrun with TORCHELASTIC_USE_AGENT_STORE: the agent serves the store and every
// rank, rank 0 included, is a client.
TEST(ProcessGroupForkedAgent, EveryRankIsAClientOfTheAgentStore) {
  std::unique_ptr<c10d::TCPStore> agent;
  if (!testing::child_context()) {
    c10d::TCPStoreOptions server;
    server.port = 0;
    server.isServer = true;
    server.waitWorkers = false;
    agent = std::make_unique<c10d::TCPStore>("127.0.0.1", server);
    ::setenv("FTCOMM_TEST_AGENT_PORT", std::to_string(agent->getPort()).c_str(), 1);
  }
  auto outcomes = testing::run_ranks(3, 60s, [](const RankContext& ctx) {
    ScopedEnv use_agent("TORCHELASTIC_USE_AGENT_STORE", "True");
    ScopedEnv port("MASTER_PORT", std::getenv("FTCOMM_TEST_AGENT_PORT"));
    ProcessGroupOptions base = testing::spawned_options(ctx, StoreKind::kTcp);
    ProcessGroupOptions o = process_group_options_from_env(base);
    ASSERT_TRUE(o.store_client_only);
    auto pg = make_process_group(o);
    std::vector<at::Tensor> t{at::ones({2})};
    pg->allreduce(t)->wait();
    EXPECT_EQ(t[0][0].item<float>(), 3.0f);
  });
  for (const auto& o : outcomes) EXPECT_TRUE(o.ok()) << "rank " << o.rank;
}

// A rank killed in the middle of a collective: the survivors get an error within
// the timeout, not a hang.
TEST(ProcessGroupForkedFault, KilledRankGivesSurvivorsAnErrorNotAHang) {
  constexpr auto kTimeout = 10s;
  auto outcomes = testing::run_ranks(3, 90s, [&](const RankContext& ctx) {
    auto pg = make_process_group(testing::spawned_options(ctx, StoreKind::kTcp, kTimeout));
    std::vector<at::Tensor> t{at::ones({1 << 22})};
    pg->allreduce(t)->wait();  // everyone is connected
    if (ctx.rank == 2) {
      // Start the next collective, then die with it in flight.
      auto work = pg->allreduce(t);
      std::this_thread::sleep_for(5ms);
      ::raise(SIGKILL);
    }
    const auto start = std::chrono::steady_clock::now();
    bool failed = false;
    try {
      for (int i = 0; i < 50; ++i) pg->allreduce(t)->wait();
    } catch (const std::exception& e) {
      failed = true;
    }
    const auto elapsed = std::chrono::steady_clock::now() - start;
    EXPECT_TRUE(failed) << "survivor rank " << ctx.rank << " saw no error";
    EXPECT_LT(elapsed, kTimeout + 10s) << "the error took longer than the timeout";
  });
  EXPECT_EQ(outcomes[2].signal, SIGKILL);
  EXPECT_TRUE(outcomes[0].ok()) << "exit " << outcomes[0].exit_code << " timed out " << outcomes[0].timed_out;
  EXPECT_TRUE(outcomes[1].ok()) << "exit " << outcomes[1].exit_code << " timed out " << outcomes[1].timed_out;
}

}  // namespace
}  // namespace ftcomm
