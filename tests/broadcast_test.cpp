// broadcast_coalesced: bit-exact results for any dtype/size/layout mix over world
// sizes 1-4, refusals, checksum verification against an injected corruption, and
// the same over forked processes.
#include <chrono>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/comm.hpp>

#include "ftcomm/broadcast.h"
#include "ftcomm/process_group.h"
#include "support/multiprocess.h"

namespace ftcomm {
namespace {

using namespace std::chrono_literals;

// Values that differ per `seed` and cover the dtype's bit patterns reasonably.
at::Tensor make_values(at::ScalarType dtype, at::IntArrayRef shape, int64_t seed, at::Device device = at::kCPU) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::Tensor t;
  if (dtype == at::kBool) {
    t = at::randint(0, 2, shape, gen, at::kLong).to(at::kBool);
  } else if (at::isIntegralType(dtype, /*includeBool=*/false)) {
    t = at::randint(-100, 100, shape, gen, at::kLong).to(dtype);
  } else {
    t = at::randn(shape, gen, at::kDouble).to(dtype);
  }
  return t.to(device);
}

// The tensor list of a test: the parameter dtype at `numel`, a non-contiguous
// (transposed) one, an empty one, a zero-dim scalar, and a large float tensor
// that takes the in-place path. Rank-dependent values; the root's are `seed`'s.
std::vector<at::Tensor> make_list(at::ScalarType dtype, int64_t numel, int64_t seed, at::Device device) {
  std::vector<at::Tensor> list;
  list.push_back(make_values(dtype, {numel}, seed * 10 + 1, device));
  list.push_back(make_values(dtype, {7, 5}, seed * 10 + 2, device).t());
  list.push_back(make_values(dtype, {0, 3}, seed * 10 + 3, device));
  list.push_back(make_values(at::kDouble, {}, seed * 10 + 4, device));
  list.push_back(make_values(at::kFloat, {600, 700}, seed * 10 + 5, device));
  list.push_back(make_values(at::kComplexFloat, {33}, seed * 10 + 6, device));
  return list;
}

void expect_bit_equal(const std::vector<at::Tensor>& got, const std::vector<at::Tensor>& want, int rank) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].sizes(), want[i].sizes());
    EXPECT_EQ(got[i].strides(), want[i].strides()) << "tensor " << i << " changed layout";
    at::Tensor g = got[i].cpu().contiguous(), w = want[i].cpu().contiguous();
    EXPECT_EQ(0, std::memcmp(g.data_ptr(), w.data_ptr(), g.numel() * g.element_size()))
        << "tensor " << i << " differs on rank " << rank;
  }
}

// Tier 3: threads over an in-memory store, world 1-4 x dtype x size.
class BroadcastMatrix
    : public ::testing::TestWithParam<std::tuple<int, at::ScalarType, int64_t>> {};

TEST_P(BroadcastMatrix, BitIdenticalToRoot) {
  const auto [world, dtype, numel] = GetParam();
  testing::run_threads(world, [&, world = world, dtype = dtype, numel = numel](
                                  int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, world, store));
    const int root = world - 1;
    auto tensors = make_list(dtype, numel, rank, at::kCPU);
    BroadcastCoalescedOptions o;
    o.root = root;
    o.buffer_bytes = 4096;  // many buckets, so slots are reused and several are in flight
    o.max_in_flight = 3;
    o.verify = true;
    auto stats = ftcomm::broadcast_coalesced(pg, tensors, o);
    expect_bit_equal(tensors, make_list(dtype, numel, root, at::kCPU), rank);
    // The 600x700 float, and the parameter tensor when it reaches direct_min_bytes.
    const bool big = numel * c10::elementSize(dtype) >= static_cast<int64_t>(o.direct_min_bytes);
    EXPECT_EQ(stats.direct_tensors, big ? 2 : 1);
    EXPECT_GE(stats.broadcasts, 2);
  });
}

// World 1: nothing to send, so nothing is sent and the tensors are untouched.
TEST(Broadcast, WorldOneSendsNothing) {
  testing::run_threads(1, [&](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, 1, store));
    auto tensors = make_list(at::kFloat, 1000, 7, at::kCPU);
    BroadcastCoalescedOptions o;
    o.verify = true;
    const auto stats = ftcomm::broadcast_coalesced(pg, tensors, o);
    EXPECT_EQ(stats.broadcasts, 0);
    EXPECT_EQ(stats.bytes, 0);
    expect_bit_equal(tensors, make_list(at::kFloat, 1000, 7, at::kCPU), rank);
  });
}

INSTANTIATE_TEST_SUITE_P(
    WorldDtypeSize, BroadcastMatrix,
    ::testing::Combine(::testing::Values(2, 3, 4),
                       ::testing::Values(at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kLong,
                                         at::kByte, at::kBool),
                       ::testing::Values(int64_t{1}, int64_t{1000}, int64_t{300000})),
    [](const auto& info) {
      return "w" + std::to_string(std::get<0>(info.param)) + "_" +
          c10::toString(std::get<1>(info.param)) + "_n" + std::to_string(std::get<2>(info.param));
    });

TEST(Broadcast, SeedSignatureMatchesC10d) {
  testing::run_threads(3, [](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, 3, store));
    auto ours = make_list(at::kFloat, 5000, rank, at::kCPU);
    auto theirs = make_list(at::kFloat, 5000, rank, at::kCPU);
    ftcomm::broadcast_coalesced(pg, ours, 1 << 20, 1);
    c10d::broadcast_coalesced(pg, theirs, 1 << 20, 1);
    expect_bit_equal(ours, theirs, rank);
  });
}

TEST(Broadcast, RefusesBadInputWithClearErrors) {
  testing::run_threads(2, [](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, 2, store));
    auto expect_error = [&](std::vector<at::Tensor> list, BroadcastCoalescedOptions o, const char* part) {
      try {
        ftcomm::broadcast_coalesced(pg, list, o);
        ADD_FAILURE() << "expected an error containing " << part;
      } catch (const c10::Error& e) {
        EXPECT_NE(std::string(e.what_without_backtrace()).find(part), std::string::npos) << e.what_without_backtrace();
      }
    };
    BroadcastCoalescedOptions o;
    auto sparse = at::eye(3).to_sparse();
    expect_error({at::ones({2}), sparse}, o, "tensor 1 has layout Sparse");
    expect_error({at::ones({1}).expand({4})}, o, "share memory");
    o.root = 2;
    expect_error({at::ones({2})}, o, "root 2 is not a rank of a group of 2");
  });
}

TEST(Broadcast, RequiresGradLeavesAreUpdatedInPlace) {
  testing::run_threads(2, [](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, 2, store));
    auto small = at::full({10}, float(rank)).requires_grad_();
    auto big = at::full({1 << 19}, float(rank)).requires_grad_();
    const void* before = big.data_ptr();
    ftcomm::broadcast_coalesced(pg, {small, big}, 1 << 16, 0);
    EXPECT_TRUE(at::equal(small.detach(), at::zeros({10})));
    EXPECT_TRUE(at::equal(big.detach(), at::zeros({1 << 19})));
    EXPECT_EQ(before, big.data_ptr()) << "must be in place";
  });
}

// Fault injection by subclass: a group whose broadcast flips one received byte on
// non-root ranks at the `corrupt_at`-th collective.
class CorruptingProcessGroup : public c10d::ProcessGroup {
 public:
  CorruptingProcessGroup(const c10::intrusive_ptr<c10d::ProcessGroup>& inner,
                         const c10::intrusive_ptr<c10d::Store>& store, int corrupt_at)
      : c10d::ProcessGroup(store, inner->getRank(), inner->getSize()), corrupt_at_(corrupt_at) {
    setBackend(c10::kCPU, GLOO, inner->getBackend(c10::kCPU));
    setDefaultBackend(GLOO);
  }
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override {
    auto work = c10d::ProcessGroup::broadcast(tensors, opts);
    if (getRank() != opts.rootRank && count_++ == corrupt_at_) {
      work->wait();
      auto* bytes = static_cast<uint8_t*>(tensors[0].data_ptr());
      bytes[tensors[0].nbytes() / 2] ^= 0x10;
    }
    return work;
  }

 private:
  int corrupt_at_;
  int count_ = 0;
};

TEST(Broadcast, VerifyCatchesACorruptedTransferOnEveryRank) {
  for (bool verify : {false, true}) {
    testing::run_threads(3, [verify](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
      auto inner = make_process_group(testing::thread_options(rank, 3, store));
      auto pg = c10::make_intrusive<CorruptingProcessGroup>(inner, store, /*corrupt_at=*/verify ? 2 : 0);
      auto tensors = make_list(at::kFloat, 3000, rank, at::kCPU);
      BroadcastCoalescedOptions o;
      o.buffer_bytes = 8192;
      o.verify = verify;
      bool caught = false;
      try {
        ftcomm::broadcast_coalesced(pg, tensors, o);
      } catch (const c10::Error& e) {
        caught = true;
        EXPECT_NE(std::string(e.what_without_backtrace()).find("checksum mismatch"), std::string::npos)
            << e.what_without_backtrace();
      }
      if (verify) {
        EXPECT_TRUE(caught) << "rank " << rank << " did not report the corruption";
      } else if (rank != 0) {
        // Without verification the corruption goes through silently: the check is what catches it.
        EXPECT_FALSE(caught);
        auto root = make_list(at::kFloat, 3000, 0, at::kCPU);
        bool any_diff = false;
        for (size_t i = 0; i < root.size(); ++i) any_diff |= !at::equal(tensors[i], root[i]);
        EXPECT_TRUE(any_diff);
      }
    });
  }
}

TEST(Broadcast, VerifyCatchesMismatchedTensorLists) {
  testing::run_threads(2, [](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto pg = make_process_group(testing::thread_options(rank, 2, store));
    std::vector<at::Tensor> list{at::zeros({rank == 1 ? 5 : 4})};
    BroadcastCoalescedOptions o;
    o.verify = true;
    try {
      ftcomm::broadcast_coalesced(pg, list, o);
      ADD_FAILURE() << "expected a mismatch error";
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what_without_backtrace()).find("rank 1 passed a tensor list that differs"),
                std::string::npos) << e.what_without_backtrace();
    }
  });
}

// CUDA tensors (mixed with CPU ones) through Gloo; runs where a GPU is present.
TEST(Broadcast, MixedCpuAndCudaOverGloo) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no GPU";
  testing::run_threads(2, [](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto options = testing::thread_options(rank, 2, store);
    options.backend = Backend::kGloo;
    auto pg = make_process_group(options);
    auto cpu = make_list(at::kHalf, 2000, rank, at::kCPU);
    auto gpu = make_list(at::kFloat, 300000, rank, at::Device(at::kCUDA, 0));
    std::vector<at::Tensor> all = cpu;
    all.insert(all.end(), gpu.begin(), gpu.end());
    BroadcastCoalescedOptions o;
    o.buffer_bytes = 1 << 14;
    o.verify = true;
    ftcomm::broadcast_coalesced(pg, all, o);
    expect_bit_equal(std::vector<at::Tensor>(all.begin(), all.begin() + cpu.size()),
                     make_list(at::kHalf, 2000, 0, at::kCPU), rank);
    expect_bit_equal(std::vector<at::Tensor>(all.begin() + cpu.size(), all.end()),
                     make_list(at::kFloat, 300000, 0, at::Device(at::kCUDA, 0)), rank);
  });
}

// NCCL at world size 1 (one GPU): the group forms, and broadcast_coalesced of CUDA
// tensors goes through NCCL unchanged.
TEST(Broadcast, NcclWorldOne) {
  if (!at::hasCUDA()) GTEST_SKIP() << "no GPU";
  testing::run_threads(1, [](int rank, const c10::intrusive_ptr<c10d::Store>& store) {
    auto options = testing::thread_options(rank, 1, store);
    options.backend = Backend::kNccl;
    ProcessGroupChoice choice;
    auto pg = make_process_group(options, &choice);
    EXPECT_EQ(choice.cuda_backend, Backend::kNccl);
    auto gpu = make_list(at::kFloat, 300000, 3, at::Device(at::kCUDA, 0));
    BroadcastCoalescedOptions o;
    o.verify = true;
    ftcomm::broadcast_coalesced(pg, gpu, o);
    expect_bit_equal(gpu, make_list(at::kFloat, 300000, 3, at::Device(at::kCUDA, 0)), rank);
    std::vector<at::Tensor> t{at::ones({4}, at::Device(at::kCUDA, 0))};
    pg->allreduce(t)->wait();
    EXPECT_EQ(t[0].sum().item<float>(), 4.0f);
  });
}

// Several GPUs: one process per GPU, NCCL at world size = GPU count (2 to 8).
// Every layout case of make_list on each rank's own GPU plus a CPU part (served by
// the group's Gloo side) in one call, 2,000 small tensors (the staged path) and
// the large in-place one, from every root, with verification on.
TEST(BroadcastMultiGpu, NcclBitIdenticalFromEveryRoot) {
  const int world = testing::gpu_count();
  if (world < 2) GTEST_SKIP() << "needs 2 or more GPUs, found " << world;
  auto outcomes = testing::run_ranks(world, 300s, [world](const testing::RankContext& ctx) {
    ProcessGroupChoice choice;
    auto pg = make_process_group(testing::nccl_options(ctx), &choice);
    ASSERT_EQ(choice.cuda_backend, Backend::kNccl);
    const at::Device gpu(at::kCUDA, ctx.rank);
    auto mixed = [&](int64_t seed) {
      auto list = make_list(at::kBFloat16, 300000, seed, gpu);
      for (auto& t : make_list(at::kHalf, 2000, seed, at::kCPU)) list.push_back(t);
      for (int i = 0; i < 2000; ++i) list.push_back(make_values(i % 2 ? at::kFloat : at::kLong, {256}, seed * 7919 + i, gpu));
      return list;
    };
    for (int root = 0; root < world; ++root) {
      auto list = mixed(ctx.rank + 1);
      BroadcastCoalescedOptions o;
      o.root = root;
      o.buffer_bytes = 1 << 18;
      o.verify = true;
      const auto stats = ftcomm::broadcast_coalesced(pg, list, o);
      EXPECT_GT(stats.direct_tensors, 0);
      EXPECT_GT(stats.staged_tensors, 2000);
      expect_bit_equal(list, mixed(root + 1), ctx.rank);
    }
    // The seed signature over NCCL.
    auto list = make_list(at::kFloat, 50000, ctx.rank + 1, gpu);
    ftcomm::broadcast_coalesced(pg, list, 1 << 16, world - 1);
    expect_bit_equal(list, make_list(at::kFloat, 50000, world, gpu), ctx.rank);
  });
  testing::expect_ranks_ok(outcomes, world);
}

// Tier 2: forked processes over TCP and file stores, with verification on.
class BroadcastForked : public ::testing::TestWithParam<std::tuple<StoreKind, int>> {};

TEST_P(BroadcastForked, ModelStateFromRootZero) {
  const auto [store, world] = GetParam();
  auto outcomes = testing::run_ranks(world, 90s, [store = store](const testing::RankContext& ctx) {
    auto pg = make_process_group(testing::spawned_options(ctx, store));
    std::vector<at::Tensor> list;
    for (int i = 0; i < 40; ++i) {
      list.push_back(make_values(i % 3 ? at::kFloat : at::kHalf, {(i % 5) * 5000 + 3}, ctx.rank * 100 + i));
    }
    BroadcastCoalescedOptions o;
    o.buffer_bytes = 1 << 15;
    o.verify = true;
    ftcomm::broadcast_coalesced(pg, list, o);
    for (int i = 0; i < 40; ++i) {
      EXPECT_TRUE(at::equal(list[i], make_values(i % 3 ? at::kFloat : at::kHalf, {(i % 5) * 5000 + 3}, i)))
          << "tensor " << i;
    }
  });
  for (const auto& o : outcomes) EXPECT_TRUE(o.ok()) << "rank " << o.rank << " exit " << o.exit_code;
}

INSTANTIATE_TEST_SUITE_P(Stores, BroadcastForked,
                         ::testing::Combine(::testing::Values(StoreKind::kTcp, StoreKind::kFile),
                                            ::testing::Values(2, 4)),
                         [](const auto& info) {
                           return testing::store_name(std::get<0>(info.param)) + "_w" +
                               std::to_string(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace ftcomm
