#include "multiprocess.h"

#include "control.h"
#include "fsutil.h"

#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <mutex>
#include <thread>

#include <ATen/ATen.h>
#include <gtest/gtest.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

namespace ftcomm::testing {

namespace {
constexpr const char* kRankVar = "FTCOMM_MP_RANK";
constexpr const char* kWorldVar = "FTCOMM_MP_WORLD";
constexpr const char* kPortVar = "FTCOMM_MP_PORT";
constexpr const char* kDirVar = "FTCOMM_MP_DIR";

// torch 2.11's FlightRecorder singleton is not safe when several Gloo groups of one
// process enqueue work concurrently (ranks as threads): ProcessGroupGloo::enqueue
// records under its own group's lock only, and the test binary crashed in
// FlightRecorder::recordWithResetEnabled in about half of the runs. With the
// recorder off (buffer size 0) 6 of 6 runs passed. Set before any group exists;
// an explicit setting by the user wins.
const bool kFlightRecorderOff = [] {
  ::setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/0);
  return true;
}();
}  // namespace

std::string store_name(StoreKind kind) {
  return kind == StoreKind::kTcp ? "tcp" : kind == StoreKind::kFile ? "file" : "custom";
}

double max_over_ranks(const c10::intrusive_ptr<c10d::ProcessGroup>& pg, double value) {
  return control::max(pg, value);
}

int free_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  socklen_t len = sizeof(addr);
  if (fd < 0 || ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    throw std::runtime_error(std::string("free_port: ") + std::strerror(errno));
  }
  const int port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

std::optional<RankContext> child_context() {
  const char* rank = std::getenv(kRankVar);
  if (rank == nullptr) {
    return std::nullopt;
  }
  RankContext ctx;
  ctx.rank = std::atoi(rank);
  ctx.world = std::atoi(std::getenv(kWorldVar));
  ctx.port = std::atoi(std::getenv(kPortVar));
  ctx.dir = std::getenv(kDirVar);
  return ctx;
}

namespace {
[[noreturn]] void exec_self(const std::vector<std::string>& args, const RankContext& ctx, pid_t parent) {
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (::getppid() != parent) {
    ::_exit(99);
  }
  ::setenv(kRankVar, std::to_string(ctx.rank).c_str(), 1);
  ::setenv(kWorldVar, std::to_string(ctx.world).c_str(), 1);
  ::setenv(kPortVar, std::to_string(ctx.port).c_str(), 1);
  ::setenv(kDirVar, ctx.dir.c_str(), 1);
  std::vector<char*> argv;
  static char self[] = "/proc/self/exe";
  argv.push_back(self);
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  ::execv("/proc/self/exe", argv.data());
  ::_exit(98);
}

void record_status(int status, RankOutcome* outcome) {
  if (WIFEXITED(status)) outcome->exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) outcome->signal = WTERMSIG(status);
}
}  // namespace

int spawn_child(const std::vector<std::string>& args, const RankContext& ctx) {
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    throw std::runtime_error(std::string("spawn_child: fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    exec_self(args, ctx, parent);
  }
  return pid;
}

RankOutcome wait_child(int pid, std::chrono::milliseconds deadline) {
  RankOutcome outcome;
  const auto until = std::chrono::steady_clock::now() + deadline;
  while (true) {
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      record_status(status, &outcome);
      return outcome;
    }
    if (std::chrono::steady_clock::now() > until) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      record_status(status, &outcome);
      outcome.timed_out = true;
      return outcome;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

std::vector<std::string> current_test_args() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return {std::string("--gtest_filter=") + info->test_suite_name() + "." + info->name()};
}

std::vector<RankOutcome> spawn_self(int world, std::chrono::seconds deadline,
                                    const std::vector<std::string>& args) {
  char dir_template[] = "/tmp/ftcomm-mp-XXXXXX";
  if (::mkdtemp(dir_template) == nullptr) {
    throw std::runtime_error(std::string("spawn_self: mkdtemp: ") + std::strerror(errno));
  }
  const std::string dir = dir_template;
  const int port = free_port();
  const pid_t parent = ::getpid();
  std::vector<pid_t> pids(world, -1);
  std::vector<RankOutcome> outcomes(world);
  for (int r = 0; r < world; ++r) {
    outcomes[r].rank = r;
    RankContext ctx{r, world, port, dir};
    const pid_t pid = ::fork();
    if (pid < 0) {
      throw std::runtime_error(std::string("spawn_self: fork: ") + std::strerror(errno));
    }
    if (pid == 0) {
      exec_self(args, ctx, parent);
    }
    pids[r] = pid;
  }
  const auto until = std::chrono::steady_clock::now() + deadline;
  int alive = world;
  while (alive > 0) {
    for (int r = 0; r < world; ++r) {
      if (pids[r] < 0) continue;
      int status = 0;
      const pid_t got = ::waitpid(pids[r], &status, WNOHANG);
      if (got == pids[r]) {
        record_status(status, &outcomes[r]);
        pids[r] = -1;
        --alive;
      }
    }
    if (alive > 0 && std::chrono::steady_clock::now() > until) {
      for (int r = 0; r < world; ++r) {
        if (pids[r] < 0) continue;
        ::kill(pids[r], SIGKILL);
        ::waitpid(pids[r], nullptr, 0);
        outcomes[r].timed_out = true;
        pids[r] = -1;
        --alive;
      }
    }
    if (alive > 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  detail::remove_tree(dir);
  return outcomes;
}

ProcessGroupOptions spawned_options(const RankContext& ctx, StoreKind store, std::chrono::milliseconds timeout) {
  ProcessGroupOptions o;
  o.rank = ctx.rank;
  o.world_size = ctx.world;
  o.store = store;
  o.master_addr = "127.0.0.1";
  o.master_port = ctx.port;
  o.file_path = ctx.dir + "/store";
  o.backend = Backend::kGloo;  // CPU tests; the CUDA ones ask for their backend
  o.timeout = timeout;
  o.announce = false;
  return o;
}

int gpu_count() {
  return at::hasCUDA() ? std::min<int>(8, static_cast<int>(at::getNumGPUs())) : 0;
}

ProcessGroupOptions nccl_options(const RankContext& ctx, std::chrono::milliseconds timeout) {
  ::setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/1);
  ::setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1", 1);
  ::setenv("NVSHMEM_DISABLE_NVLS", "1", 1);
  ProcessGroupOptions o = spawned_options(ctx, StoreKind::kTcp, timeout);
  o.backend = Backend::kNccl;
  o.local_rank = ctx.rank;
  return o;
}

void expect_ranks_ok(const std::vector<RankOutcome>& outcomes, int world) {
  ASSERT_EQ(outcomes.size(), static_cast<size_t>(world));
  for (const auto& o : outcomes) EXPECT_TRUE(o.ok()) << "rank " << o.rank << " exit " << o.exit_code << " signal " << o.signal;
}

std::vector<RankOutcome> run_ranks(int world, std::chrono::seconds deadline,
                                   const std::function<void(const RankContext&)>& body) {
  if (auto ctx = child_context()) {
    int code = 0;
    try {
      body(*ctx);
      code = ::testing::Test::HasFailure() ? 1 : 0;
    } catch (const std::exception& e) {
      std::cerr << "rank " << ctx->rank << ": " << e.what() << std::endl;
      code = 1;
    }
    std::cout.flush();
    std::cerr.flush();
    ::_exit(code);  // skip gtest's report and libtorch's static destructors
  }
  return spawn_self(world, deadline, current_test_args());
}

void run_threads(int world, const std::function<void(int, const c10::intrusive_ptr<c10d::Store>&)>& body) {
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::thread> threads;
  std::exception_ptr first;
  std::mutex mutex;
  for (int r = 0; r < world; ++r) {
    threads.emplace_back([&, r] {
      try {
        body(r, store);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex);
        if (!first) first = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  if (first) std::rethrow_exception(first);
}

ProcessGroupOptions thread_options(int rank, int world, const c10::intrusive_ptr<c10d::Store>& store,
                                   std::chrono::milliseconds timeout) {
  ProcessGroupOptions o;
  o.rank = rank;
  o.world_size = world;
  o.store = StoreKind::kCustom;
  o.custom_store = store;
  o.backend = Backend::kGloo;  // CPU tests; the CUDA ones ask for their backend
  o.timeout = timeout;
  o.announce = false;
  return o;
}

}  // namespace ftcomm::testing
