#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>

#include "ftcomm/process_group.h"
#include "ftcomm/hook_check.h"
#include "ftcomm/script_comm_hook.h"

namespace ftcomm {

SyntheticBucket::SyntheticBucket(at::Tensor buffer, std::vector<std::vector<int64_t>> shapes_in, size_t index,
                                 size_t count)
    : shapes(std::move(shapes_in)) {
  std::vector<size_t> offsets, lengths;
  std::vector<c10::IntArrayRef> sizes;
  size_t at = 0;
  for (const auto& s : shapes) {
    offsets.push_back(at);
    lengths.push_back(static_cast<size_t>(c10::multiply_integers(s)));
    sizes.emplace_back(s);
    at += lengths.back();
  }
  TORCH_CHECK(static_cast<int64_t>(at) <= buffer.numel(), "SyntheticBucket: shapes need ", at,
              " elements, the buffer has ", buffer.numel());
  bucket = std::make_unique<c10d::GradBucket>(index, count, std::move(buffer), offsets, lengths, sizes,
                                              std::vector<at::Tensor>(shapes.size()), std::nullopt);
}

HookCheckReport check_hook(const std::string& file_or_name, const HookCheckOptions& options) {
  TORCH_CHECK(options.world_size >= 1 && options.world_size <= 16, "hook check: --world-size must be in [1, 16]");
  TORCH_CHECK(options.numel >= 64 && options.numel <= kMaxHookCheckNumel, "hook check: --numel must be in [64, ",
              kMaxHookCheckNumel, "], not ", options.numel);
  TORCH_CHECK(options.steps >= 1, "hook check: --steps must be at least 1 (0 would check nothing)");
  auto hook = ScriptHook::load(file_or_name);  // compile, signature and state declaration
  for (const auto& [k, v] : options.params) hook->set_param(k, v);
  HookCheckReport report;
  report.name = hook->name();
  report.path = hook->path();
  report.digest = hook->digest();
  report.replicated = hook->replicated_state();
  report.local = hook->local_state();
  report.params = hook->params();

  // Ranks as threads share this process; torch's FlightRecorder is not safe with
  // several Gloo groups enqueueing at once (see tests/support/multiprocess.cpp).
  ::setenv("TORCH_FR_BUFFER_SIZE", "0", 0);
  auto store = c10::make_intrusive<c10d::HashStore>();
  std::mutex mutex;
  std::string first_error;
  int64_t checked = 0;
  std::vector<std::thread> ranks;
  for (int rank = 0; rank < options.world_size; ++rank) {
    ranks.emplace_back([&, rank] {
      try {
        ProcessGroupOptions o;
        o.rank = rank;
        o.world_size = options.world_size;
        o.store = StoreKind::kCustom;
        o.custom_store = store;
        o.backend = Backend::kGloo;
        // Longer than the hook's own deadline, so that a stuck hook is named
        // before a peer's wait times out.
        o.timeout = std::max<std::chrono::milliseconds>(std::chrono::seconds(10), 3 * options.hook_timeout);
        o.announce = false;
        auto pg = make_process_group(o);
        auto mine = ScriptHook::load(report.path);
        for (const auto& [k, v] : options.params) mine->set_param(k, v);
        ScriptCommHookOptions checks;
        checks.check_finite = true;
        checks.hook_timeout = options.hook_timeout;
        ScriptCommHook comm(pg, mine, checks);
        // Three buckets a step: a matrix, a vector and the rest, like a layer.
        const int64_t rows = 32, cols = std::max<int64_t>(1, options.numel / 64);
        std::vector<std::vector<int64_t>> shapes = {{rows, cols}, {cols}, {options.numel - rows * cols - cols}};
        if (shapes[2][0] <= 0) shapes.pop_back();
        auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + rank);
        for (int step = 0; step < options.steps; ++step) {
          for (int b = 0; b < 3; ++b) {
            SyntheticBucket synthetic(at::randn({options.numel}, gen), shapes, b, 3);
            auto future = comm.runHook(*synthetic.bucket);
            future->wait();
            if (future->hasError()) std::rethrow_exception(future->exception_ptr());
            std::lock_guard<std::mutex> lock(mutex);
            ++checked;
          }
        }
      } catch (const std::exception& e) {
        std::lock_guard<std::mutex> lock(mutex);
        const std::string what = e.what();
        if (first_error.empty()) first_error = what.substr(0, what.find("\nException raised from"));
      }
    });
  }
  for (auto& t : ranks) t.join();
  TORCH_CHECK(first_error.empty(), first_error);
  report.buckets_checked = checked;
  return report;
}

}  // namespace ftcomm
