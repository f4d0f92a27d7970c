// Scripted comm hooks: numerics against c10d's built-ins and references, the
// Reducer path, bad hooks, digests, collective failure decisions, the .pt route.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <optional>
#include <thread>
#include <tuple>

#include <ATen/ATen.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <gtest/gtest.h>

#include "fsutil.h"
#include "sha256.h"
#include "ftcomm/broadcast.h"
#include "ftcomm/process_group.h"
#include "ftcomm/hook_check.h"
#include "ftcomm/script_comm_hook.h"
#include "support/multiprocess.h"
#include "support/reducer_model.h"

namespace ftcomm {
namespace {

using namespace std::chrono_literals;
using Store = c10::intrusive_ptr<c10d::Store>;

using TestBucket = SyntheticBucket;

at::Tensor run(c10d::CommHookInterface& hook, c10d::GradBucket& bucket) {
  auto future = hook.runHook(bucket);
  future->wait();
  if (future->hasError()) std::rethrow_exception(future->exception_ptr());
  return hook.parseHookResult(future->value());
}

// One step's buckets through `hook`: every runHook first, as the Reducer calls
// them, then every future waited for. Returns the first error ("" if none).
// Runs one step's buckets; returns the first error's message (empty: none) and,
// with `failure`, that error's HookFailure (a HookError is what a failed bucket holds).
std::string run_step(c10d::CommHookInterface& hook, std::initializer_list<c10d::GradBucket*> buckets,
                     std::optional<HookFailure>* failure = nullptr) {
  std::vector<c10::intrusive_ptr<c10::ivalue::Future>> futures;
  for (auto* bucket : buckets) futures.push_back(hook.runHook(*bucket));
  std::string error;
  for (auto& f : futures) {
    f->wait();
    if (!f->hasError() || !error.empty()) continue;
    error = f->tryRetrieveErrorMessage();
    if (failure == nullptr) continue;
    try {
      std::rethrow_exception(f->exception_ptr());
    } catch (const HookError& e) {
      *failure = e.failure();
    } catch (...) {
      ADD_FAILURE() << "a failed bucket holds something other than a HookError: " << error;
    }
  }
  return error;
}

at::Tensor rank_values(int rank, int64_t numel, double scale = 1000.0) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + rank);
  return at::randn({numel}, gen) * scale;
}

bool bit_equal(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() &&
      std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), a.nbytes()) == 0;
}

c10::intrusive_ptr<c10d::ProcessGroup> group(int rank, int world, const Store& store) {
  return make_process_group(testing::thread_options(rank, world, store));
}

// The scripted allreduce and fp16_compress hooks against c10d's built-ins, through
// the Reducer (the built-in hook classes are not exported from libtorch, so the
// comparison runs whole training steps): gradients equal bit for bit.
void expect_scripted_equal_builtins(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, std::vector<int64_t> widths,
                                    int64_t bucket_bytes, int64_t batch, at::Device device = at::kCPU) {
  for (auto [kind, name] : {std::pair{testing::HookKind::kBuiltinAllreduce, "allreduce"},
                            std::pair{testing::HookKind::kBuiltinFp16, "fp16_compress"}}) {
    testing::ReducerModel builtin(pg, widths, bucket_bytes, {}, device);
    testing::ReducerModel scripted(pg, widths, bucket_bytes, {}, device);
    builtin.set_hook(kind);
    scripted.set_hook(testing::HookKind::kCustom, std::make_unique<ScriptCommHook>(pg, ScriptHook::load(name)));
    for (int step = 0; step < 3; ++step) {
      builtin.step(batch, step);
      scripted.step(batch, step);
      const auto want = builtin.gradients(), got = scripted.gradients();
      for (size_t i = 0; i < want.size(); ++i) EXPECT_TRUE(bit_equal(got[i], want[i])) << name << " grad " << i;
    }
  }
}

TEST(ScriptHookNumerics, ThroughTheReducerGradientsEqualTheBuiltins) {
  testing::run_threads(2, [](int rank, const Store& store) {
    expect_scripted_equal_builtins(group(rank, 2, store), {64, 128, 128, 8}, 1 << 15, 16);
  });
}

// PowerSGD at full rank reconstructs each matrix exactly: the result must be the
// plain mean, an independent check of the whole pipeline (P, Q, orthogonalization,
// the uncompressed path, the division by the world size).
TEST(ScriptHookNumerics, PowerSgdAtFullRankEqualsTheMean) {
  testing::run_threads(2, [](int rank, const Store& store) {
    auto pg = group(rank, 2, store);
    const std::vector<std::vector<int64_t>> shapes{{48, 6}, {6}, {40, 5}};
    auto hook = ScriptHook::load("powersgd");
    hook->set_param("start_iter", "0");
    hook->set_param("rank", "6");
    hook->set_param("min_compression_rate", "0");  // compress even where it does not pay
    ScriptCommHook comm(pg, hook);
    const int64_t numel = 48 * 6 + 6 + 40 * 5;
    const at::Tensor mine = rank_values(rank, numel, 1.0);
    const at::Tensor mean = (rank_values(0, numel, 1.0) + rank_values(1, numel, 1.0)) / 2;
    TestBucket b(mine.clone(), shapes);
    const at::Tensor got = run(comm, *b.bucket);
    EXPECT_LT((got - mean).abs().max().item<double>(), 1e-5 * mean.abs().max().item<double>());
  });
}

// An independent C++ implementation of PyTorch's powerSGD_hook algorithm (with
// ftcomm's deterministic initial Q), against which the TorchScript hook must agree
// to 1e-5 relative over several steps with warm start and error feedback. (The hook
// computes P and Q transposed, which is faster on CPUs: the same products summed in
// another order, ~1e-6 apart after a few steps of QR and error feedback; a wrong
// algorithm is off by far more.)
struct PowerSgdReference {
  int rank = 2;
  int start_iter = 1;
  int64_t iteration = 0;
  std::map<int64_t, at::Tensor> p, q, error;

  static void orthogonalize(at::Tensor m) {
    const int64_t r = m.size(2);
    if (r <= 2) {
      for (int64_t i = 0; i < r; ++i) {
        at::Tensor col = m.narrow(2, i, 1);
        col.div_(at::linalg_vector_norm(col, 2, at::IntArrayRef{1}, true));
        if (i + 1 < r) {
          at::Tensor rest = m.narrow(2, i + 1, r - i - 1);
          rest.sub_(at::sum(col * rest, {1}, true) * col);
        }
      }
    } else {
      m.copy_(std::get<0>(at::linalg_qr(m)));
    }
  }

  at::Tensor run(c10d::ProcessGroup& pg, at::Tensor buffer, int64_t index, bool last,
                 const std::vector<std::vector<int64_t>>& shapes) {
    auto allreduce = [&](at::Tensor t) {
      std::vector<at::Tensor> v{t};
      pg.allreduce(v)->wait();
    };
    const int world = pg.getSize();
    if (iteration < start_iter) {
      buffer.div_(world);
      allreduce(buffer);
      iteration += last;
      return buffer;
    }
    if (error.count(index)) buffer.add_(error[index]);
    const at::Tensor input = buffer.clone();
    std::vector<at::Tensor> compress, plain;
    int64_t at = 0, total_p = 0, total_q = 0;
    for (const auto& s : shapes) {
      const int64_t numel = c10::multiply_integers(s);
      at::Tensor g = buffer.narrow(0, at, numel).view(s);
      at += numel;
      at::Tensor m = g.view({s[0], -1});
      const int64_t r = std::min({m.size(0), m.size(1), int64_t(rank)});
      if ((m.size(0) + m.size(1)) * r * 2 < m.size(0) * m.size(1)) {
        compress.push_back(m);
        total_p += m.size(0) * r;
        total_q += m.size(1) * r;
      } else {
        plain.push_back(g);
      }
    }
    std::vector<at::Tensor> flat;
    for (auto& g : plain) flat.push_back(g.reshape({-1}));
    at::Tensor plain_memory = flat.empty() ? at::empty({0}) : at::cat(flat);
    const bool fresh = !p.count(index);
    if (fresh) {
      p[index] = at::empty({total_p});
      q[index] = at::empty({total_q});
    }
    // Matrices in order of first appearance of their shape.
    std::vector<at::Tensor> ordered;
    std::vector<std::vector<int64_t>> seen;
    for (auto& m : compress) {
      if (std::find(seen.begin(), seen.end(), m.sizes().vec()) == seen.end()) seen.push_back(m.sizes().vec());
    }
    for (auto& s : seen) {
      for (auto& m : compress) {
        if (m.sizes().vec() == s) ordered.push_back(m.unsqueeze(0));
      }
    }
    std::vector<at::Tensor> ps, qs;
    int64_t pa = 0, qa = 0;
    for (auto& m : ordered) {
      const int64_t n = m.size(1), k = m.size(2), r = std::min({n, k, int64_t(rank)});
      ps.push_back(p[index].narrow(0, pa, n * r).view({1, n, r}));
      qs.push_back(q[index].narrow(0, qa, k * r).view({1, k, r}));
      pa += n * r;
      qa += k * r;
    }
    for (size_t k = 0; k < qs.size(); ++k) {
      if (fresh) {
        const double seed = double(iteration * 1000003 + index * 1009 + int64_t(k));
        at::Tensor x = at::arange(qs[k].numel(), at::kDouble);
        qs[k].copy_(at::frac(at::sin(x * 12.9898 + seed * 78.233) * 43758.5453).to(at::kFloat).view(qs[k].sizes()));
      }
      orthogonalize(qs[k]);
    }
    for (size_t k = 0; k < ordered.size(); ++k) ps[k].copy_(at::bmm(ordered[k], qs[k]));
    allreduce(plain_memory);
    plain_memory.div_(world);
    int64_t off = 0;
    for (auto& g : plain) {
      g.copy_(plain_memory.narrow(0, off, g.numel()).view(g.sizes()));
      off += g.numel();
    }
    allreduce(p[index]);
    for (auto& pk : ps) orthogonalize(pk);
    for (size_t k = 0; k < ordered.size(); ++k) qs[k].copy_(at::bmm(ordered[k].transpose(1, 2), ps[k]));
    allreduce(q[index]);
    q[index].div_(world);
    for (size_t k = 0; k < ordered.size(); ++k) ordered[k].copy_(at::bmm(ps[k], qs[k].transpose(1, 2)));
    error[index] = input - buffer;
    iteration += last;
    return buffer;
  }
};

class PowerSgdMatchesReference : public ::testing::TestWithParam<int> {};

TEST_P(PowerSgdMatchesReference, OverStepsWithWarmStartAndErrorFeedback) {
  const int rank_param = GetParam();
  testing::run_threads(2, [rank_param](int rank, const Store& store) {
    auto pg = group(rank, 2, store);
    const std::vector<std::vector<int64_t>> shapes0{{64, 32}, {32}, {16, 16, 3}, {64, 32}};
    const std::vector<std::vector<int64_t>> shapes1{{100, 20}, {20}};
    auto hook = ScriptHook::load("powersgd");
    hook->set_param("start_iter", "1");
    hook->set_param("rank", std::to_string(rank_param));
    ScriptCommHook comm(pg, hook);
    PowerSgdReference ref;
    ref.rank = rank_param;
    for (int step = 0; step < 4; ++step) {
      for (int b = 0; b < 2; ++b) {
        const auto& shapes = b == 0 ? shapes0 : shapes1;
        int64_t numel = 0;
        for (const auto& s : shapes) numel += c10::multiply_integers(s);
        const at::Tensor values = rank_values(rank * 10 + step * 100 + b, numel, 1.0);
        TestBucket mine(values.clone(), shapes, b, 2);
        const at::Tensor got = run(comm, *mine.bucket);
        const at::Tensor want = ref.run(*pg, values.clone(), b, b == 1, shapes);
        const double scale = want.abs().max().item<double>();
        EXPECT_LE((got - want).abs().max().item<double>(), 1e-5 * scale) << "step " << step << " bucket " << b;
        if (step > 0) {
          const at::Tensor err = hook->state().at("error").at(b);
          EXPECT_LE((err - ref.error[b]).abs().max().item<double>(), 1e-5 * scale) << "error feedback differs";
        }
      }
    }
  });
}

INSTANTIATE_TEST_SUITE_P(Ranks, PowerSgdMatchesReference, ::testing::Values(1, 2, 4));

TEST(ScriptHookNumerics, TopkCarriesWhatItDidNotSend) {
  testing::run_threads(2, [](int rank, const Store& store) {
    auto pg = group(rank, 2, store);
    auto hook = ScriptHook::load("topk");
    hook->set_param("ratio", "0.1");
    ScriptCommHook comm(pg, hook);
    const int64_t n = 1000;
    const at::Tensor values = rank_values(rank, n);
    TestBucket b(values.clone(), {{n}});
    run(comm, *b.bucket);
    const at::Tensor error = hook->state().at("error").at(0);
    EXPECT_EQ(at::count_nonzero(values - error).item<int64_t>(), 100) << "exactly k entries were sent";
    // With ratio 1 nothing is held back: the plain mean.
    hook->set_param("ratio", "1");
    EXPECT_EQ(hook->state().at("error").erase(0), 1u);
    TestBucket all(values.clone(), {{n}});
    const at::Tensor mean = (rank_values(0, n) + rank_values(1, n)) / 2;
    EXPECT_LE((run(comm, *all.bucket) - mean).abs().max().item<double>(), 1e-3);
  });
}

// Every library hook on one bucket, over hook x world x dtype: the result against
// the exact mean of the ranks' gradients (computed in float64), within the
// hook's own error bound.
using HookCase = std::tuple<std::string, int, at::ScalarType>;
class HookNumerics : public ::testing::TestWithParam<HookCase> {};

// How far `hook` may land from the mean of `all` (rows: ranks), in float64.
double allowed_error(const std::string& hook, const at::Tensor& all, at::ScalarType dtype) {
  const double largest = all.abs().max().item<double>();
  // The bucket's own dtype rounds the mean once (and the sum, world times).
  const double unit = dtype == at::kFloat ? 1.0 / (1 << 23) : dtype == at::kDouble ? 1e-15 : 1.0 / (1 << 7);
  const double bucket = 4 * all.size(0) * largest * unit;
  if (hook == "fp16_compress") return bucket + 2 * largest / 1024.0;  // fp16 keeps 11 bits
  if (hook == "bf16_compress") return bucket + 2 * largest / 128.0;   // bf16 keeps 8 bits
  if (hook == "int8_quantize") return bucket + largest / 127.0 / 2 * (1 + 1e-5);
  return bucket;  // allreduce, powersgd before start_iter, topk at ratio 1: the mean itself
}

TEST_P(HookNumerics, EveryHookLandsWithinItsBoundOfTheMean) {
  const auto [name, world, dtype] = GetParam();
  testing::run_threads(world, [&, name = name, world = world, dtype = dtype](int rank, const Store& store) {
    auto pg = group(rank, world, store);
    auto hook = ScriptHook::load(name);
    if (name == "topk") hook->set_param("ratio", "1");
    ScriptCommHook comm(pg, hook);
    const int64_t n = 3000;
    TestBucket b(rank_values(rank, n).to(dtype), {{60, 50}});
    const at::Tensor got = run(comm, *b.bucket).to(at::kDouble);
    std::vector<at::Tensor> rows;
    for (int r = 0; r < world; ++r) rows.push_back(rank_values(r, n).to(dtype).to(at::kDouble));
    const at::Tensor all = at::stack(rows);
    const double worst = (got - all.mean(0)).abs().max().item<double>();
    EXPECT_LE(worst, allowed_error(name, all, dtype)) << name << " world " << world << " " << dtype;
    EXPECT_EQ(got.sizes(), (std::vector<int64_t>{n})) << name;
  });
}

INSTANTIATE_TEST_SUITE_P(
    HookWorldDtype, HookNumerics,
    ::testing::Combine(::testing::Values("allreduce", "fp16_compress", "bf16_compress", "int8_quantize", "topk",
                                         "powersgd"),
                       ::testing::Values(2, 3), ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16)),
    [](const auto& info) {
      return std::get<0>(info.param) + "_w" + std::to_string(std::get<1>(info.param)) + "_" +
          c10::toString(std::get<2>(info.param));
    });

// --- several GPUs: one process per GPU, NCCL at world size = GPU count ------

// Rank 0's copy of `grads` (sent with our broadcast_coalesced over the group's Gloo
// side) must equal this rank's bit for bit.
void expect_same_on_every_rank(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, const std::vector<at::Tensor>& grads,
                               const std::string& what) {
  std::vector<at::Tensor> root;
  for (const auto& g : grads) root.push_back(g.clone());
  ftcomm::broadcast_coalesced(pg, root, BroadcastCoalescedOptions{});
  for (size_t i = 0; i < grads.size(); ++i) {
    EXPECT_TRUE(bit_equal(grads[i], root[i])) << what << ": grad " << i << " on rank " << pg->getRank()
                                              << " differs from rank 0's";
  }
}

TEST(ScriptHookMultiGpu, ThroughTheReducerGradientsEqualTheBuiltins) {
  const int world = testing::gpu_count();
  if (world < 2) GTEST_SKIP() << "needs 2 or more GPUs, found " << world;
  testing::expect_ranks_ok(testing::run_ranks(world, 300s, [](const testing::RankContext& ctx) {
    expect_scripted_equal_builtins(make_process_group(testing::nccl_options(ctx)), {256, 512, 512, 64}, 1 << 18, 32,
                                   at::Device(at::kCUDA, ctx.rank));
  }), world);
}

// Every hook of the library, on CUDA over NCCL through the Reducer: after each
// step all ranks hold the same finite gradients (noop, which sends nothing, is
// only checked for finiteness). PowerSGD compresses from step 2 on.
TEST(ScriptHookMultiGpu, EveryLibraryHookKeepsRanksInStep) {
  const int world = testing::gpu_count();
  if (world < 2) GTEST_SKIP() << "needs 2 or more GPUs, found " << world;
  testing::expect_ranks_ok(testing::run_ranks(world, 300s, [](const testing::RankContext& ctx) {
    auto pg = make_process_group(testing::nccl_options(ctx));
    const at::Device gpu(at::kCUDA, ctx.rank);
    const auto names = list_hooks();
    EXPECT_GE(names.size(), 7u);
    for (const auto& name : names) {
      auto hook = ScriptHook::load(name);
      if (name == "powersgd") hook->set_param("start_iter", "2");
      testing::ReducerModel model(pg, {256, 512, 512, 64}, 1 << 18, {}, gpu);
      model.set_hook(testing::HookKind::kCustom, std::make_unique<ScriptCommHook>(pg, hook));
      for (int step = 0; step < 4; ++step) {
        model.step(32, step);
        const auto grads = model.gradients();
        for (size_t i = 0; i < grads.size(); ++i) {
          EXPECT_TRUE(at::isfinite(grads[i]).all().item<bool>()) << name << " step " << step << " grad " << i;
        }
        if (name != "noop") expect_same_on_every_rank(pg, grads, name + " step " + std::to_string(step));
      }
    }
  }), world);
}

// --- bad hooks --------------------------------------------------------------

class HookFiles : public ::testing::Test {
 protected:
  HookFiles() {
    char tmpl[] = "/tmp/ftcomm-hooks-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
  }
  ~HookFiles() override { detail::remove_tree(dir_); }
  std::string write(const std::string& name, const std::string& body, bool with_header = true) {
    const std::string header =
        "from typing import Dict, List\nimport torch\nfrom torch import Tensor\n\n"
        "def spec() -> Dict[str, List[str]]:\n    none: List[str] = []\n    return {'replicated': none, 'local': none}\n\n"
        "def params() -> Dict[str, float]:\n    p: Dict[str, float] = {}\n    return p\n\n";
    const std::string path = dir_ + "/" + name;
    std::ofstream(path) << (with_header ? header : "") << body;
    return path;
  }
  static std::string hook_body(const std::string& lines, const std::string& returns = "Tensor") {
    return "def hook(state: Dict[str, Dict[int, Tensor]], params: Dict[str, float], group: Group, bucket: Bucket) "
           "-> " + returns + ":\n" + lines;
  }
  static std::string work_hook_body(const std::string& lines) { return hook_body(lines, "Work"); }
  void expect_check_error(const std::string& path, std::initializer_list<const char*> parts) {
    try {
      check_hook(path, HookCheckOptions{});
      ADD_FAILURE() << "hook check passed " << path;
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      for (const char* part : parts) EXPECT_NE(what.find(part), std::string::npos) << "missing '" << part << "' in:\n" << what;
    }
  }
  std::string dir_;
};

TEST_F(HookFiles, ANewHookFileDeploysByPathWithNoRebuild) {
  const auto path = write("double_mean.py", hook_body("    b = bucket.buffer()\n    b.mul_(2.0 / group.world_size())\n    return group.allreduce(b)\n"));
  const auto report = check_hook(path, HookCheckOptions{});
  EXPECT_EQ(report.name, "double_mean");
  EXPECT_EQ(report.digest.size(), 64u);
  EXPECT_EQ(report.buckets_checked, 18);
}

TEST_F(HookFiles, EachKindOfBadHookGetsAClearError) {
  expect_check_error(write("syntax.py", hook_body("    b = bucket.buffer(\n    return b\n")), {"does not compile", "line"});
  expect_check_error(write("signature.py", "def hook(x: Tensor) -> Tensor:\n    return x\n"), {"wrong signature", "takes 1 arguments"});
  expect_check_error(write("nostate.py",
                           "from typing import Dict, List\nfrom torch import Tensor\n"
                           "def spec() -> Dict[str, List[str]]:\n    l: List[str] = []\n    return {'local': l}\n"
                           "def params() -> Dict[str, float]:\n    p: Dict[str, float] = {}\n    return p\n" +
                               hook_body("    return bucket.buffer()\n"),
                           false),
                     {"missing state declaration", "replicated"});
  expect_check_error(write("shape.py", hook_body("    return bucket.buffer()[:10]\n")), {"returned", "bucket"});
  expect_check_error(write("dtype.py", hook_body("    return bucket.buffer().to(torch.float64)\n")), {"returned Double"});
  expect_check_error(write("nan.py", hook_body("    return bucket.buffer() * float('nan')\n")), {"non-finite"});
  expect_check_error(write("throws.py", hook_body("    raise Exception('boom')\n")), {"threw", "boom"});
  expect_check_error(write("nothook.py", "def hello() -> int:\n    return 1\n", false), {"is not a hook", "no 'hook' function"});
  expect_check_error(write("junk.pt", "not an archive"), {"not a TorchScript archive"});
  expect_check_error("no_such_hook_name", {"unknown hook 'no_such_hook_name'", "powersgd"});
}

TEST_F(HookFiles, UnknownParameterNamesTheKnownOnes) {
  auto hook = ScriptHook::load("powersgd");
  try {
    hook->set_param("rnak", "4");
    ADD_FAILURE();
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what_without_backtrace()).find("no parameter 'rnak'"), std::string::npos);
    EXPECT_NE(std::string(e.what_without_backtrace()).find("rank"), std::string::npos);
  }
}

// A hook that fails on one rank only: the ranks decide together, so either all
// fail with the same error or all fall back to a plain mean allreduce.
TEST_F(HookFiles, AFailureOnOneRankIsDecidedByAllRanks) {
  const auto path = write("rank1_fails.py", hook_body("    if group.rank() == 1:\n        raise Exception('rank one is unhappy')\n"
                                                      "    b = bucket.buffer()\n    b.div_(group.world_size())\n    return group.allreduce(b)\n"));
  for (OnHookError policy : {OnHookError::kFail, OnHookError::kFallback}) {
    testing::run_threads(2, [&, policy](int rank, const Store& store) {
      auto pg = group(rank, 2, store);
      ScriptCommHookOptions options;
      options.on_error = policy;
      ScriptCommHook comm(pg, ScriptHook::load(path), options);
      TestBucket b(rank_values(rank, 100), {{100}});
      if (policy == OnHookError::kFail) {
        try {
          run(comm, *b.bucket);
          ADD_FAILURE() << "rank " << rank << " did not fail";
        } catch (const std::exception& e) {
          EXPECT_NE(std::string(e.what()).find("failed on rank 1"), std::string::npos) << e.what();
        }
      } else {
        const at::Tensor mean = (rank_values(0, 100) + rank_values(1, 100)) / 2;
        EXPECT_LE((run(comm, *b.bucket) - mean).abs().max().item<double>(), 1e-3);
        EXPECT_EQ(comm.fallbacks(), 1);
      }
    });
  }
}

// A fallback after a stateful hook failed midway: its peers updated the bucket's
// replicated state and the failing rank did not. Every rank drops that bucket's
// state, so the ranks start it afresh together instead of going on from states
// that differ.
TEST_F(HookFiles, AFallbackStartsTheFailedBucketsStateAfreshOnEveryRank) {
  const std::string header =
      "from typing import Dict, List\nimport torch\nfrom torch import Tensor\n\n"
      "def spec() -> Dict[str, List[str]]:\n    local: List[str] = []\n"
      "    return {'replicated': ['seen'], 'local': local}\n\n";
  const auto path = write("stateful_fails.py", header + hook_body(
      "    seen = state['seen']\n    i = bucket.index()\n"
      "    if i not in seen:\n        seen[i] = torch.zeros([1])\n"
      "    if group.rank() == 1 and bucket.buffer()[0].item() < -1000.0:\n"
      "        raise Exception('rank one fails before it counts')\n"
      "    seen[i].add_(1.0)\n"
      "    b = bucket.buffer()\n    b.div_(group.world_size())\n    return group.allreduce(b)\n"),
      /*with_header=*/false);
  testing::run_threads(2, [&](int rank, const Store& store) {
    auto pg = group(rank, 2, store);
    ScriptCommHookOptions options;
    options.on_error = OnHookError::kFallback;
    auto hook = ScriptHook::load(path);
    ScriptCommHook comm(pg, hook, options);
    auto seen = [&] {
      auto entries = hook->state().at("seen");
      return entries.contains(0) ? entries.at(0).item<double>() : -1.0;
    };
    TestBucket ok(rank_values(rank, 10, 1.0), {{10}});
    run(comm, *ok.bucket);
    EXPECT_EQ(seen(), 1.0);
    TestBucket bad(at::full({10}, -5000.0), {{10}});  // rank 1 fails on it, rank 0 counts it
    EXPECT_EQ(run(comm, *bad.bucket)[0].item<double>(), -5000.0) << "the fallback's mean";
    EXPECT_EQ(comm.fallbacks(), 1);
    EXPECT_EQ(seen(), -1.0) << "rank " << rank << ": the failed bucket's state was kept";
    TestBucket again(rank_values(rank, 10, 1.0), {{10}});
    run(comm, *again.bucket);
    EXPECT_EQ(seen(), 1.0) << "rank " << rank << ": the bucket starts afresh, equal on every rank";
  });
}

// --- the per-step agreement -------------------------------------------------
//
// Per step, a hook's collectives are not preceded by control exchanges: the ranks
// exchange one value after the step's last bucket. On NCCL the exchange is on
// Gloo, apart from the data; here a second Gloo group plays that part, and the
// hooks' collectives block the host (as an NCCL host blocked behind an unmatched
// collective would), so the watchdog's part is exercised too.

struct PerStepCase {
  std::string name;
  std::string body;    // the hook, failing on rank 1
  int64_t bucket;      // where it fails
  std::string reason;  // what rank 1 reports of its own failure
  bool peers_wait;     // the others wait in a collective rank 1 never joins (the watchdog ends it):
                       // rank 1 runs no hook after its failure in the step
};

// Runs one step of two buckets on every rank of `world` threads; returns each
// rank's first error (empty: none) and the step's wall time on that rank.
std::vector<std::pair<std::string, double>> per_step(int world, const std::string& path,
                                                     std::chrono::milliseconds hook_timeout) {
  std::vector<std::pair<std::string, double>> out(static_cast<size_t>(world));
  testing::run_threads(world, [&](int rank, const Store& store) {
    auto data_options = testing::thread_options(rank, world, store, 4s);  // ends a collective left waiting
    auto control_options = testing::thread_options(rank, world, store, 30s);
    control_options.prefix = "control";
    auto pg = make_process_group(data_options);
    auto control = make_process_group(control_options);
    ScriptCommHookOptions options;
    options.agreement = HookAgreement::kPerStep;
    options.control_group = control;
    options.hook_timeout = hook_timeout;
    ScriptCommHook comm(pg, ScriptHook::load(path), options);
    TestBucket b0(rank_values(rank, 100), {{100}}, 0, 2), b1(rank_values(rank, 50), {{50}}, 1, 2);
    const auto start = std::chrono::steady_clock::now();
    const std::string error = run_step(comm, {b0.bucket.get(), b1.bucket.get()});
    out[static_cast<size_t>(rank)] = {error, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()};
    if (!error.empty()) {
      // The group's device communicator was aborted: later buckets fail at once.
      TestBucket again(rank_values(rank, 10), {{10}}, 0, 2);
      auto f = comm.runHook(*again.bucket);
      EXPECT_TRUE(f->hasError()) << "rank " << rank;
      if (f->hasError()) EXPECT_NE(f->tryRetrieveErrorMessage().find("must restart"), std::string::npos);
    }
  });
  return out;
}

TEST_F(HookFiles, PerStepAFailureAtEveryPointIsDecidedByAllRanks) {
  const std::string on_rank1_bucket = "    if group.rank() == 1 and bucket.index() == ";
  const std::string mean = "    b = bucket.buffer()\n    b.div_(group.world_size())\n";
  const std::vector<PerStepCase> cases = {
      {"before_first", hook_body(on_rank1_bucket + "0:\n        raise Exception('unhappy early')\n" + mean +
                                 "    return group.allreduce(b)\n"), 0, "unhappy early", true},
      {"between", hook_body(mean + "    b = group.allreduce(b)\n" + on_rank1_bucket +
                            "0:\n        raise Exception('unhappy between')\n    return group.allreduce(b)\n"),
       0, "unhappy between", true},
      {"before_last", hook_body(on_rank1_bucket + "1:\n        raise Exception('unhappy late')\n" + mean +
                                "    return group.allreduce(b)\n"), 1, "unhappy late", true},
      {"bad_shape_last", hook_body(mean + "    b = group.allreduce(b)\n" + on_rank1_bucket +
                                   "1:\n        return b[:10]\n    return b\n"), 1, "returned Float[10]", false},
      {"bad_dtype_first", hook_body(mean + "    b = group.allreduce(b)\n" + on_rank1_bucket +
                                    "0:\n        return b.double()\n    return b\n"), 0, "returned Double", true},
  };
  const auto hook_timeout = 1500ms;
  for (int world : {2, 3}) {
    for (const auto& c : cases) {
      const auto path = write(c.name + ".py", c.body);
      const auto results = per_step(world, path, hook_timeout);
      for (int rank = 0; rank < world; ++rank) {
        const auto& [error, seconds] = results[static_cast<size_t>(rank)];
        const std::string where = c.name + " world " + std::to_string(world) + " rank " + std::to_string(rank);
        EXPECT_NE(error.find("hook " + c.name + " failed on rank 1"), std::string::npos) << where << ": " << error;
        EXPECT_NE(error.find("in bucket " + std::to_string(c.bucket)), std::string::npos) << where << ": " << error;
        if (rank == 1) EXPECT_NE(error.find(c.reason), std::string::npos) << where << ": " << error;
        // Bounded: at once where nobody waits on a collective; else within the
        // hook deadline, when the waiting ranks' watchdogs make their exchange.
        EXPECT_LT(seconds, c.peers_wait ? 1.5 + 3.0 : 1.0) << where;
      }
    }
  }
}

TEST_F(HookFiles, PerStepWithoutAFailureReducesEveryBucket) {
  const auto path = write("mean.py", hook_body("    b = bucket.buffer()\n    b.div_(group.world_size())\n"
                                               "    return group.allreduce(b)\n"));
  testing::run_threads(2, [&](int rank, const Store& store) {
    auto control_options = testing::thread_options(rank, 2, store);
    control_options.prefix = "control";
    auto pg = group(rank, 2, store);
    ScriptCommHookOptions options;
    options.agreement = HookAgreement::kPerStep;
    options.control_group = make_process_group(control_options);
    ScriptCommHook comm(pg, ScriptHook::load(path), options);
    for (int step = 0; step < 3; ++step) {
      for (int64_t index = 0; index < 3; ++index) {
        const int64_t n = 64 + index;
        TestBucket b(rank_values(rank, n) + step, {{n}}, static_cast<size_t>(index), 3);
        const at::Tensor want = (rank_values(0, n) + rank_values(1, n)) / 2 + step;
        EXPECT_LE((run(comm, *b.bucket) - want).abs().max().item<double>(), 1e-3) << step << " " << index;
      }
    }
    EXPECT_EQ(comm.agreement(), HookAgreement::kPerStep);
  });
}

// --- fail fast: no exchange; the failing rank's record tells its peers ----------
//
// Rank 1 fails at each point a hook can fail; every rank of world 2, 3 and 4 (the
// issue's CPU worlds, as threads over Gloo) must end its step with one error that
// names the hook, rank 1, the bucket and rank 1's reason, within the bound: at
// once for rank 1, within the look-up slice for a peer waiting in a collective,
// and within the hook deadline plus a slice for a stuck rank. Each rank's group
// closes when its thread ends, as a failed process's connections close.
TEST_F(HookFiles, FailFastAFailureAtEveryPointIsReportedByEveryRank) {
  const std::string on_rank1_bucket = "    if group.rank() == 1 and bucket.index() == ";
  const std::string mean = "    b = bucket.buffer()\n    b.div_(group.world_size())\n";
  struct Case {
    std::string name, body, reason;
    int64_t bucket;
  };
  const std::vector<Case> cases = {
      {"ff_before_first", hook_body(on_rank1_bucket + "0:\n        raise Exception('unhappy early')\n" + mean +
                                    "    return group.allreduce(b)\n"), "unhappy early", 0},
      {"ff_between", hook_body(mean + "    b = group.allreduce(b)\n" + on_rank1_bucket +
                               "0:\n        raise Exception('unhappy between')\n    return group.allreduce(b)\n"),
       "unhappy between", 0},
      {"ff_before_last", hook_body(on_rank1_bucket + "1:\n        raise Exception('unhappy late')\n" + mean +
                                   "    return group.allreduce(b)\n"), "unhappy late", 1},
      {"ff_bad_shape_last", hook_body(mean + "    b = group.allreduce(b)\n" + on_rank1_bucket +
                                      "1:\n        return b[:10]\n    return b\n"), "returned Float[10]", 1},
      // Stuck well past the deadline, then back (the late result is discarded),
      // so the abandoned thread does not spin on for the rest of the test.
      {"ff_stuck_first", hook_body(on_rank1_bucket + "0:\n        spins = 0\n        while spins < 80000000:\n"
                                   "            spins += 1\n" + mean + "    return group.allreduce(b)\n"),
       "did not return within 1.5 s", 0},
      // Hooks that return their allreduce still in flight (Group.start_allreduce):
      // the peers' collective never completes, and they learn of the failure
      // while waiting for it, between buckets.
      {"ff_started_first", work_hook_body(on_rank1_bucket + "0:\n        raise Exception('unhappy started')\n" +
                                          mean + "    return group.start_allreduce(b)\n"), "unhappy started", 0},
      {"ff_started_last", work_hook_body(on_rank1_bucket + "1:\n        raise Exception('unhappy last')\n" + mean +
                                         "    return group.start_allreduce(b)\n"), "unhappy last", 1},
      {"ff_started_waited", work_hook_body(mean + "    b = group.start_allreduce(b).wait()\n" + on_rank1_bucket +
                                           "0:\n        raise Exception('unhappy waited')\n"
                                           "    return group.start_allreduce(b)\n"), "unhappy waited", 0},
      {"ff_started_stuck", work_hook_body(on_rank1_bucket + "0:\n        spins = 0\n        while spins < 80000000:\n"
                                          "            spins += 1\n" + mean + "    return group.start_allreduce(b)\n"),
       "did not return within 1.5 s", 0},
  };
  const auto hook_timeout = 1500ms;
  for (int world : {2, 3, 4}) {
    for (const auto& c : cases) {
      const auto path = write(c.name + ".py", c.body);
      std::vector<std::pair<std::string, double>> results(static_cast<size_t>(world));
      testing::run_threads(world, [&](int rank, const Store& store) {
        auto pg = make_process_group(testing::thread_options(rank, world, store, 30s));
        ScriptCommHookOptions options;
        options.hook_timeout = hook_timeout;
        ScriptCommHook comm(pg, ScriptHook::load(path), options);
        // Up to two steps: a failure after rank 1's last collective of a step
        // reaches its peers at their next collective (their step was whole).
        std::string error;
        double seconds = 0;
        std::optional<HookFailure> failure;
        for (int step = 0; step < 2 && error.empty(); ++step) {
          TestBucket b0(rank_values(rank, 100), {{100}}, 0, 2), b1(rank_values(rank, 50), {{50}}, 1, 2);
          const auto start = std::chrono::steady_clock::now();
          error = run_step(comm, {b0.bucket.get(), b1.bucket.get()}, &failure);
          seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        }
        results[static_cast<size_t>(rank)] = {error, seconds};
        // Typed: every rank's HookError names the same hook, rank and bucket.
        const bool stuck = c.name.find("stuck") != std::string::npos;
        EXPECT_TRUE(failure.has_value()) << c.name << " rank " << rank;
        if (failure) {
          EXPECT_EQ(failure->hook, c.name);
          EXPECT_EQ(failure->rank, 1) << c.name << " rank " << rank << ": " << failure->message;
          EXPECT_EQ(failure->bucket, c.bucket) << c.name << " rank " << rank << ": " << failure->message;
          EXPECT_EQ(failure->stuck, stuck) << c.name << " rank " << rank << ": " << failure->message;
          EXPECT_EQ(failure->message, error);
        }
        EXPECT_EQ(comm.agreement(), HookAgreement::kFailFast);
        if (!error.empty()) {
          // Nothing more runs on this rank: later buckets fail at once.
          TestBucket again(rank_values(rank, 10), {{10}}, 0, 2);
          auto f = comm.runHook(*again.bucket);
          f->wait();
          EXPECT_TRUE(f->hasError()) << "rank " << rank;
        }
      });
      for (int rank = 0; rank < world; ++rank) {
        const auto& [error, seconds] = results[static_cast<size_t>(rank)];
        const std::string where = c.name + " world " + std::to_string(world) + " rank " + std::to_string(rank);
        const bool stuck = c.name.find("stuck") != std::string::npos;
        const std::string what = stuck ? "hook " + c.name + " did not return within 1.5 s on rank 1"
                                       : "hook " + c.name + " failed on rank 1 (";
        EXPECT_NE(error.find(what), std::string::npos) << where << ": " << error;
        if (!stuck) EXPECT_NE(error.find(c.reason), std::string::npos) << where << ": " << error;
        EXPECT_NE(error.find("in bucket " + std::to_string(c.bucket)), std::string::npos) << where << ": " << error;
        if (rank != 1) EXPECT_NE(error.find("recorded by rank 1"), std::string::npos) << where << ": " << error;
        EXPECT_LT(seconds, stuck ? 1.5 + 2.0 : 2.0) << where;
      }
    }
  }
}

TEST_F(HookFiles, FailFastWithoutAFailureLooksAtTheStoreOnlyWhileACollectiveIsSlow) {
  // Two steps of two buckets at world 3: every bucket reduced, no record made.
  testing::run_threads(3, [&](int rank, const Store& store) {
    auto pg = make_process_group(testing::thread_options(rank, 3, store, 30s));
    ScriptCommHook comm(pg, ScriptHook::load("allreduce"));
    for (int step = 0; step < 2; ++step) {
      TestBucket b0(rank_values(rank, 100), {{100}}, 0, 2), b1(rank_values(rank, 50), {{50}}, 1, 2);
      EXPECT_EQ(run_step(comm, {b0.bucket.get(), b1.bucket.get()}), "") << "rank " << rank;
      const at::Tensor mean = (rank_values(0, 100) + rank_values(1, 100) + rank_values(2, 100)) / 3;
      EXPECT_LE((b0.bucket->getBuffer() - mean).abs().max().item<double>(), 1e-3);
    }
    EXPECT_EQ(comm.agreement(), HookAgreement::kFailFast);
    EXPECT_TRUE(pg->getStore()->check({"ftcomm/hooks-made/rank0"}));
    EXPECT_FALSE(pg->getStore()->check({"ftcomm/hook-failure/0"}));
  });
}

TEST_F(HookFiles, FailFastAPeerThatDiesIsNotRecordedAsThisRanksHookFailure) {
  // Rank 1's process "dies" (its group closes) without any hook failure while
  // rank 0 waits in its allreduce: rank 0 says what broke, records nothing, and
  // does not blame its own hook.
  testing::run_threads(2, [&](int rank, const Store& store) {
    auto pg = make_process_group(testing::thread_options(rank, 2, store, 30s));
    if (rank == 1) return;
    ScriptCommHook comm(pg, ScriptHook::load("allreduce"));
    TestBucket b(rank_values(rank, 100), {{100}});
    const std::string error = run_step(comm, {b.bucket.get()});
    EXPECT_NE(error.find("a collective failed"), std::string::npos) << error;
    EXPECT_NE(error.find("no hook failure on record"), std::string::npos) << error;
    EXPECT_EQ(error.find("failed on rank 0"), std::string::npos) << error;
    EXPECT_FALSE(pg->getStore()->check({"ftcomm/hook-failure/0"}));
  });
}

TEST(HookAgreementChoice, AutoIsFailFastOnTheCpuAndPerStepIsRefusedWhereItCannotBeSafe) {
  EXPECT_EQ(parse_hook_agreement("on"), HookAgreement::kAuto);
  EXPECT_EQ(parse_hook_agreement("per-step"), HookAgreement::kPerStep);
  EXPECT_THROW(parse_hook_agreement("sometimes"), c10::Error);
  testing::run_threads(2, [&](int rank, const Store& store) {
    auto pg = group(rank, 2, store);
    auto hook = ScriptHook::load("allreduce");
    {
      ScriptCommHook comm(pg, hook);
      EXPECT_EQ(comm.agreement(), HookAgreement::kAuto);
      TestBucket b(rank_values(rank, 10), {{10}});
      run(comm, *b.bucket);
      EXPECT_EQ(comm.agreement(), HookAgreement::kFailFast);
    }
    {
      // The fallback needs every rank to decide together: per collective.
      ScriptCommHookOptions options;
      options.on_error = OnHookError::kFallback;
      ScriptCommHook comm(pg, hook, options);
      TestBucket b(rank_values(rank, 10), {{10}});
      run(comm, *b.bucket);
      EXPECT_EQ(comm.agreement(), HookAgreement::kPerCollective);
      options.agreement = HookAgreement::kFailFast;
      ScriptCommHook refused(pg, hook, options);
      TestBucket c(rank_values(rank, 10), {{10}});
      try {
        run(refused, *c.bucket);
        ADD_FAILURE() << "fail-fast with the fallback policy was accepted";
      } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("cannot fall back"), std::string::npos) << e.what();
      }
    }
    {
      // Per step on Gloo alone: the exchange would queue behind the hook's own
      // collectives; refused with the fix.
      ScriptCommHookOptions options;
      options.agreement = HookAgreement::kPerStep;
      ScriptCommHook comm(pg, hook, options);
      TestBucket b(rank_values(rank, 10), {{10}});
      try {
        run(comm, *b.bucket);
        ADD_FAILURE() << "per-step on Gloo alone was accepted";
      } catch (const std::exception& e) {
        EXPECT_NE(std::string(e.what()).find("per-collective"), std::string::npos) << e.what();
      }
    }
    ScriptCommHookOptions fallback;
    fallback.agreement = HookAgreement::kPerStep;
    fallback.on_error = OnHookError::kFallback;
    EXPECT_THROW(ScriptCommHook(pg, hook, fallback), c10::Error);
  });
}

// The same decision over NCCL with CUDA buckets, one process per GPU: rank 1
// fails before any collective (the others have enqueued their allgather, or are
// stopped before it), between two (before their second allreduce), or returns a
// bad result after its collective. Per collective (either policy; run twice, so
// the fallback's mean and the second round show the communicator stayed in
// step) and per step (the default for NCCL: every rank fails with the same
// error and its NCCL communicator is aborted, so each case gets a group of its
// own, as a restarted job would).
TEST_F(HookFiles, MultiGpuAFailureOnOneRankIsDecidedByAllRanks) {
  const int world = testing::gpu_count();
  if (world < 2) GTEST_SKIP() << "needs 2 or more GPUs, found " << world;
  const std::string fail = "    if group.rank() == 1:\n        raise Exception('rank one is unhappy')\n";
  const std::vector<std::string> hooks = {
      write("fails_first.py", hook_body(fail + "    parts = group.allgather(bucket.buffer())\n"
                                               "    return torch.stack(parts).mean(0)\n")),
      write("fails_between.py", hook_body("    b = bucket.buffer()\n    b.div_(group.world_size())\n"
                                          "    b = group.allreduce(b)\n" + fail + "    return group.allreduce(b)\n")),
      write("fails_after.py", hook_body("    b = bucket.buffer()\n    b.div_(group.world_size())\n"
                                        "    b = group.allreduce(b)\n    if group.rank() == 1:\n"
                                        "        return b[:3]\n    return b\n"))};
  testing::expect_ranks_ok(testing::run_ranks(world, 300s, [&](const testing::RankContext& ctx) {
    int groups = 0;
    auto fresh_group = [&] {
      auto o = testing::nccl_options(ctx, 60s);
      o.prefix = "case" + std::to_string(groups++);
      return make_process_group(o);
    };
    const at::Device gpu(at::kCUDA, ctx.rank);
    at::Tensor mean = at::zeros({1000});
    for (int r = 0; r < ctx.world; ++r) mean += rank_values(r, 1000);
    mean /= ctx.world;
    for (const auto& path : hooks) {
      auto pg = fresh_group();
      for (OnHookError policy : {OnHookError::kFail, OnHookError::kFallback}) {
        ScriptCommHookOptions options;
        options.on_error = policy;
        options.agreement = HookAgreement::kPerCollective;
        ScriptCommHook comm(pg, ScriptHook::load(path), options);
        for (int step = 0; step < 2; ++step) {
          TestBucket b(rank_values(ctx.rank, 1000).to(gpu), {{1000}});
          if (policy == OnHookError::kFail) {
            try {
              run(comm, *b.bucket);
              ADD_FAILURE() << path << ": rank " << ctx.rank << " did not fail";
            } catch (const std::exception& e) {
              EXPECT_NE(std::string(e.what()).find("failed on rank 1"), std::string::npos) << e.what();
            }
          } else {
            const at::Tensor got = run(comm, *b.bucket);
            EXPECT_EQ(got.device(), gpu);
            EXPECT_LE((got.cpu() - mean).abs().max().item<double>(), 1e-3) << path;
          }
        }
        if (policy == OnHookError::kFallback) EXPECT_EQ(comm.fallbacks(), 2) << path;
      }
      // Per step (the default on NCCL): a healthy step with the allreduce hook,
      // then a step of two buckets with the failing one (rank 1 fails in bucket 0).
      auto step_pg = fresh_group();
      {
        ScriptCommHook ok(step_pg, ScriptHook::load("allreduce"));
        TestBucket b0(rank_values(ctx.rank, 1000).to(gpu), {{1000}}, 0, 2);
        TestBucket b1(rank_values(ctx.rank, 1000).to(gpu), {{1000}}, 1, 2);
        auto f0 = ok.runHook(*b0.bucket);
        auto f1 = ok.runHook(*b1.bucket);
        for (auto& f : {f0, f1}) {
          f->wait();
          ASSERT_FALSE(f->hasError()) << f->tryRetrieveErrorMessage();
          EXPECT_LE((f->value().toTensor().cpu() - mean).abs().max().item<double>(), 1e-3);
        }
        EXPECT_EQ(ok.agreement(), HookAgreement::kPerStep);
      }
      ScriptCommHookOptions options;
      options.hook_timeout = 5s;
      ScriptCommHook comm(step_pg, ScriptHook::load(path), options);
      TestBucket b0(rank_values(ctx.rank, 1000).to(gpu), {{1000}}, 0, 2);
      TestBucket b1(rank_values(ctx.rank, 1000).to(gpu), {{1000}}, 1, 2);
      const auto start = std::chrono::steady_clock::now();
      const std::string error = run_step(comm, {b0.bucket.get(), b1.bucket.get()});
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      EXPECT_NE(error.find("failed on rank 1"), std::string::npos) << path << ": " << error;
      EXPECT_NE(error.find("in bucket 0"), std::string::npos) << path << ": " << error;
      EXPECT_LT(seconds, 5.0 + 5.0) << path;  // the hook deadline, then the exchange
      EXPECT_EQ(comm.agreement(), HookAgreement::kPerStep);
    }
  }), world);
}

// The options of a world-1 NCCL group, for the one-GPU tests (on run_threads(1)'s thread).
ProcessGroupOptions nccl_world_one(int rank, const Store& store) {
  auto o = testing::thread_options(rank, 1, store, 60s);
  o.backend = Backend::kNccl;
  return o;
}

// One GPU is enough to see the per-step agreement's failure path on real NCCL:
// the decision, the communicator's abort (without ending the process), the same
// error, later buckets refused, and a new group working afterwards.
TEST_F(HookFiles, GpuPerStepFailureAbortsTheNcclCommunicator) {
  if (testing::gpu_count() < 1) GTEST_SKIP() << "needs a GPU";
  const auto path = write("fails_second.py", hook_body("    b = bucket.buffer()\n    b.div_(group.world_size())\n"
                                                       "    b = group.allreduce(b)\n    if bucket.index() == 0:\n"
                                                       "        raise Exception('bucket zero is unhappy')\n"
                                                       "    return group.allreduce(b)\n"));
  testing::run_threads(1, [&](int rank, const Store& store) {
    const at::Device gpu(at::kCUDA, 0);
    auto o = nccl_world_one(rank, store);
    {
      auto pg = make_process_group(o);
      ScriptCommHook comm(pg, ScriptHook::load(path));
      TestBucket b0(rank_values(0, 1000).to(gpu), {{1000}}, 0, 2), b1(rank_values(0, 1000).to(gpu), {{1000}}, 1, 2);
      const std::string error = run_step(comm, {b0.bucket.get(), b1.bucket.get()});
      EXPECT_NE(error.find("failed on rank 0 (threw"), std::string::npos) << error;
      EXPECT_NE(error.find("bucket zero is unhappy"), std::string::npos) << error;
      EXPECT_EQ(comm.agreement(), HookAgreement::kPerStep);
      TestBucket again(rank_values(0, 10).to(gpu), {{10}}, 0, 2);
      auto f = comm.runHook(*again.bucket);
      ASSERT_TRUE(f->hasError());
      EXPECT_NE(f->tryRetrieveErrorMessage().find("must restart"), std::string::npos);
      std::fprintf(stderr, "per-step NCCL test: decided and aborted; destroying the aborted group\n");
    }
    std::fprintf(stderr, "per-step NCCL test: aborted group destroyed; a new one\n");
    o.prefix = "after";
    auto fresh = make_process_group(o);
    std::vector<at::Tensor> t{at::ones({4}, gpu)};
    fresh->allreduce(t)->wait();
    EXPECT_EQ(t[0].sum().item<double>(), 4.0);
  });
}

// A hook's work goes on a stream of its own: the caller's stream (backward's,
// in the Reducer) does not wait for the hook's collectives and GPU work, which
// would lose the overlap of communication with backward; yet once the future is
// waited for, it does. Here the hook's GPU work takes about 0.1 s (50 FP32
// matmuls of 4096^2) before its last step, and the caller's stream must be free
// of it at once.
TEST_F(HookFiles, GpuTheHooksWorkStaysOffTheCallersStream) {
  if (testing::gpu_count() < 1) GTEST_SKIP() << "needs a GPU";
  const auto path = write("slow_gpu.py", hook_body(
      "    b = bucket.buffer()\n    b.div_(group.world_size())\n    b = group.allreduce(b)\n"
      "    x = torch.ones([4096, 4096], device=b.device)\n    for i in range(50):\n        x = torch.mm(x, x) / 4096.0\n"
      "    return b.add_(x[0, 0])\n"));
  testing::run_threads(1, [&](int rank, const Store& store) {
    const at::Device gpu(at::kCUDA, 0);
    auto o = nccl_world_one(rank, store);
    auto pg = make_process_group(o);
    c10::impl::VirtualGuardImpl impl(at::kCUDA);
    for (HookAgreement agreement : {HookAgreement::kPerStep, HookAgreement::kPerCollective}) {
      ScriptCommHookOptions options;
      options.agreement = agreement;
      ScriptCommHook comm(pg, ScriptHook::load(path), options);
      const std::string what = hook_agreement_name(agreement);
      for (int step = 0; step < 2; ++step) {  // the first also warms up the hook and cuBLAS
        TestBucket b0(rank_values(0, 1000).to(gpu), {{1000}}, 0, 2), b1(rank_values(0, 10).to(gpu), {{10}}, 1, 2);
        auto f0 = comm.runHook(*b0.bucket);
        while (!f0->completed()) std::this_thread::sleep_for(1ms);  // the hook has enqueued its work
        const auto start = std::chrono::steady_clock::now();
        impl.getStream(gpu).synchronize();
        const double caller_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
        if (step == 1) EXPECT_LT(caller_ms, 20.0) << what << ": the caller's stream waited for the hook's work";
        auto f1 = comm.runHook(*b1.bucket);
        f0->wait();  // as the Reducer does: the caller's stream now waits for the hook's work
        f1->wait();
        ASSERT_FALSE(f1->hasError()) << f1->tryRetrieveErrorMessage();
        EXPECT_TRUE(bit_equal(f0->value().toTensor().cpu(), rank_values(0, 1000) + 1)) << what;
        EXPECT_TRUE(bit_equal(f1->value().toTensor().cpu(), rank_values(0, 10) + 1)) << what;
      }
      EXPECT_EQ(comm.agreement(), agreement);
    }
  });
}

// A hook that passes its deadline but comes back once the watchdog has begun to
// decide (here it keeps calling collectives, which the watchdog stops): the
// step fails with the deadline's error, not with what the stopped collective
// threw.
TEST_F(HookFiles, GpuPerStepAStuckCallThatComesBackFailsItsStep) {
  if (testing::gpu_count() < 1) GTEST_SKIP() << "needs a GPU";
  const auto path = write("keeps_going.py", hook_body("    b = bucket.buffer()\n    while True:\n"
                                                      "        b = group.allreduce(b)\n    return b\n"));
  testing::run_threads(1, [&](int rank, const Store& store) {
    const at::Device gpu(at::kCUDA, 0);
    auto o = nccl_world_one(rank, store);
    auto pg = make_process_group(o);
    ScriptCommHookOptions options;
    options.hook_timeout = 500ms;
    ScriptCommHook comm(pg, ScriptHook::load(path), options);
    TestBucket b0(rank_values(0, 1000).to(gpu), {{1000}}, 0, 2), b1(rank_values(0, 10).to(gpu), {{10}}, 1, 2);
    const auto start = std::chrono::steady_clock::now();
    const std::string error = run_step(comm, {b0.bucket.get(), b1.bucket.get()});
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    EXPECT_NE(error.find("hook keeps_going did not return within 0.5 s on rank 0 in bucket 0"), std::string::npos)
        << error;
    EXPECT_LT(seconds, 0.5 + 0.1 + 5.0);  // the deadline, a polling period, the abort
  });
}

TEST_F(HookFiles, RanksMustAgreeOnTheDigestAndPinsAreEnforced) {
  const auto other = write("other.py", hook_body("    return bucket.buffer()\n"));
  testing::run_threads(2, [&](int rank, const Store& store) {
    auto pg = group(rank, 2, store);
    auto hook = ScriptHook::load(rank == 0 ? std::string("noop") : other);
    try {
      agree_on_hook(pg, *hook);
      ADD_FAILURE() << "digests differ but agree_on_hook passed";
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      EXPECT_NE(what.find("hook digests differ"), std::string::npos) << what;
      EXPECT_NE(what.find(ScriptHook::load("noop")->digest()), std::string::npos) << what;
      EXPECT_NE(what.find(ScriptHook::load(other)->digest()), std::string::npos) << what;
    }
  });
  auto hook = ScriptHook::load("noop");
  testing::run_threads(1, [&](int rank, const Store& store) {
    auto pg = group(rank, 1, store);
    agree_on_hook(pg, *hook, {hook->digest()});
    EXPECT_THROW(agree_on_hook(pg, *hook, {std::string(64, 'a')}), c10::Error);
  });
}

// The .pt route: a module scripted in Python against ftcomm.Group and
// ftcomm.Bucket after torch.ops.load_library, saved with torch.jit.save.
TEST_F(HookFiles, APtArchiveFromPythonLoadsAndRuns) {
  if (std::system("python3 -c 'import torch' >/dev/null 2>&1") != 0) GTEST_SKIP() << "no python3 with torch";
  const std::string script = write("make_hook.py",
                                   "import sys, torch\n"
                                   "from typing import Dict, List\n"
                                   "torch.ops.load_library(sys.argv[1])\n"
                                   "class Mean(torch.nn.Module):\n"
                                   "    @torch.jit.export\n"
                                   "    def spec(self) -> Dict[str, List[str]]:\n"
                                   "        none: List[str] = []\n"
                                   "        return {'replicated': none, 'local': none}\n"
                                   "    @torch.jit.export\n"
                                   "    def params(self) -> Dict[str, float]:\n"
                                   "        return {'scale': 1.0}\n"
                                   "    def forward(self, state: Dict[str, Dict[int, torch.Tensor]], params: Dict[str, float],\n"
                                   "                group: torch.classes.ftcomm.Group, bucket: torch.classes.ftcomm.Bucket) -> torch.Tensor:\n"
                                   "        b = bucket.buffer()\n"
                                   "        b.mul_(params['scale'] / group.world_size())\n"
                                   "        return group.allreduce(b)\n"
                                   "torch.jit.save(torch.jit.script(Mean()), sys.argv[2])\n",
                                   false);
  const std::string pt = dir_ + "/mean.pt";
  const std::string cmd = "python3 -W ignore " + script + " " + FTCOMM_LIBRARY_PATH + " " + pt;
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  const auto report = check_hook(pt, HookCheckOptions{});
  EXPECT_EQ(report.params.at("scale"), 1.0);
  testing::run_threads(2, [&](int rank, const Store& store) {
    auto pg = group(rank, 2, store);
    ScriptCommHook comm(pg, ScriptHook::load(pt));
    TestBucket b(rank_values(rank, 64), {{64}});
    const at::Tensor mean = (rank_values(0, 64) + rank_values(1, 64)) / 2;
    EXPECT_LE((run(comm, *b.bucket) - mean).abs().max().item<double>(), 1e-3);
  });
}

// The digest every rank compares (OpenSSL's SHA-256): the FIPS 180-2 test vectors.
TEST(HookDigest, Sha256MatchesTheStandardVectors) {
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

}  // namespace
}  // namespace ftcomm
