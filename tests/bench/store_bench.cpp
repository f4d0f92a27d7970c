// Checkpoint-store benchmark:
//  1. commit latency (p50/p99) of a metadata-only commit (a record with a
//     CPU generator's state), under each durability policy;
//  2. snapshot write throughput against a raw sequential write (+fsync) of the
//     same bytes to the same disk, alternating, median of N;
//  3. the slowdown of a compute-bound training step while a snapshot is written
//     in the background;
//  4. loading a snapshot against a plain read of its blob file (into reused
//     memory), from the page cache and from the disk (the file's pages dropped
//     with posix_fadvise), alternating, median of N; and a commit's blocking part
//     (the copy into a staging slot) against a copy into reused memory.
// Correctness is checked on what was timed: the last commit and snapshot are read
// back and compared.
//
//   ftcomm_bench_store [--dir DIR] [--commits N] [--snapshot-mb MB] [--repeats N] [--json FILE]
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "fsutil.h"
#include "ftcomm/checkpoint_store.h"

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t) { return std::chrono::duration<double, std::milli>(Clock::now() - t).count(); }

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5))];
}

ftcomm::CommitRecord record(int64_t step) {
  ftcomm::CommitRecord r;
  r.step = step;
  r.world_size = 4;
  r.hook_digest = "bench";
  r.rng_state = std::string(5056, 'r');  // a CPU generator's state is ~5 KB
  return r;
}

std::unique_ptr<ftcomm::CheckpointStore> open(const std::string& dir, ftcomm::Durability d) {
  ftcomm::detail::remove_tree(dir);
  ftcomm::CheckpointStoreOptions o;
  o.dir = dir;
  o.durability = d;
  o.keep_snapshots = 1;
  std::unique_ptr<ftcomm::CheckpointStore> store;
  ftcomm::check(ftcomm::CheckpointStore::Open(o, &store));
  return store;
}

double raw_write(const std::string& path, const std::vector<ftcomm::NamedTensor>& state) {
  const auto start = Clock::now();
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  for (const auto& nt : state) {
    const char* p = static_cast<const char*>(nt.tensor.data_ptr());
    size_t n = nt.tensor.nbytes();
    while (n > 0) {
      const ssize_t w = ::write(fd, p, n);
      if (w <= 0) throw std::runtime_error("raw write failed");
      p += w;
      n -= static_cast<size_t>(w);
    }
  }
  ::fsync(fd);
  ::close(fd);
  const double ms = ms_since(start);
  ::unlink(path.c_str());
  return ms;
}

void compute_step(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor c = a;
  for (int i = 0; i < 8; ++i) c = at::mm(c, b).tanh_();
  (void)c.sum().item<float>();
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir = "/tmp/ftcomm-store-bench", json;
  int commits = 300, repeats = 5;
  double snapshot_mb = 512;
  CLI::App app("Checkpoint-store benchmark: commit latency, snapshot throughput against a raw write, step "
               "slowdown while a snapshot is written",
               "ftcomm_bench_store");
  app.add_option("--dir", dir, "scratch directory (removed at the end)")->capture_default_str();
  app.add_option("--commits", commits, "metadata commits timed per policy")->check(CLI::Range(1, 1000000))->capture_default_str();
  app.add_option("--snapshot-mb", snapshot_mb, "snapshot size")->check(CLI::Range(1.0, 1e6))->capture_default_str();
  app.add_option("--repeats", repeats, "snapshot rounds")->check(CLI::Range(1, 1000))->capture_default_str();
  app.add_option("--json", json, "write the results here");
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(1);
  nlohmann::json js;
  bool correct = true;

  // 1. Commit latency.
  for (auto [durability, name] : {std::pair{ftcomm::Durability::kSync, "sync"},
                                  std::pair{ftcomm::Durability::kProcessCrash, "process_crash"}}) {
    auto store = open(dir + "/commits", durability);
    std::vector<double> lat;
    for (int64_t step = 1; step <= commits; ++step) {
      const auto start = Clock::now();
      ftcomm::check(store->Commit(record(step)));
      lat.push_back(ms_since(start));
    }
    ftcomm::CommitRecord last;
    ftcomm::check(store->LatestCommitted(&last));
    correct = correct && last.step == commits && last.rng_state == record(commits).rng_state;
    std::printf("commit latency (%s, a 5 KB record): p50 %.2f ms  p99 %.2f ms  (%d commits)\n", name,
                percentile(lat, 0.5), percentile(lat, 0.99), commits);
    js[std::string("commit_") + name] = {
        {"p50_ms", percentile(lat, 0.5)}, {"p99_ms", percentile(lat, 0.99)}, {"commits", commits}};
  }

  // 2. Snapshot throughput vs raw sequential write.
  std::vector<ftcomm::NamedTensor> state;
  const int64_t per = 4 << 20;  // 4 MiB tensors
  const int count = std::max(1, static_cast<int>(snapshot_mb * (1 << 20) / per));
  for (int i = 0; i < count; ++i) state.push_back({"t" + std::to_string(i), at::rand({per / 4})});
  const double bytes = static_cast<double>(count) * per;
  auto store = open(dir + "/snap", ftcomm::Durability::kSync);
  std::vector<double> ours, ours_bg, raw;
  for (int r = 0; r < repeats; ++r) {
    // Settle the page cache and the file system's journal (the previous round's
    // unlinks) before each timed write, so neither side pays for the other.
    ftcomm::check(store->WaitForSnapshot());  // the previous round's retention too
    ::sync();
    raw.push_back(raw_write(dir + "/raw.bin", state));
    ::sync();
    const auto start = Clock::now();
    auto future = store->CommitSnapshotAsync(record(r + 1), state);
    const double copied = ms_since(start);
    ftcomm::check(future.get());
    ours.push_back(ms_since(start));
    ours_bg.push_back(ours.back() - copied);
  }
  ftcomm::CommitRecord snap;
  std::vector<ftcomm::NamedTensor> back;
  ftcomm::check(store->LatestSnapshot(&snap));
  ftcomm::check(store->LoadSnapshot(snap, &back));
  for (int i = 0; i < count; ++i) correct = correct && at::equal(back[i].tensor, state[i].tensor);
  std::printf("snapshot rounds (ms), raw / ours:");
  for (size_t i = 0; i < raw.size(); ++i) std::printf(" %.0f/%.0f", raw[i], ours[i]);
  std::printf("\n");
  const double raw_ms = percentile(raw, 0.5), ours_ms = percentile(ours, 0.5), bg_ms = percentile(ours_bg, 0.5);
  std::printf("snapshot %.0f MB: ours %.0f ms (%.2f GB/s; host copy + blob + fsync + commit), raw write+fsync %.0f ms "
              "(%.2f GB/s): ratio %.2fx (target >= 0.7x); background part alone %.0f ms\n",
              bytes / 1e6, ours_ms, bytes / ours_ms / 1e6, raw_ms, bytes / raw_ms / 1e6, raw_ms / ours_ms, bg_ms);
  js["snapshot"] = {{"bytes", bytes},   {"ours_ms", ours_ms},          {"background_ms", bg_ms},
                    {"raw_ms", raw_ms}, {"ratio", raw_ms / ours_ms}};

  // 3. Step slowdown while a snapshot is written in the background.
  const at::Tensor a = at::rand({512, 512}), b = at::rand({512, 512}) / 256;
  std::vector<double> alone, during;
  for (int i = 0; i < 20; ++i) {
    const auto t = Clock::now();
    compute_step(a, b);
    alone.push_back(ms_since(t));
  }
  for (int r = 0; r < repeats; ++r) {
    auto future = store->CommitSnapshotAsync(record(100 + r), state);
    while (future.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
      const auto t = Clock::now();
      compute_step(a, b);
      during.push_back(ms_since(t));
    }
    ftcomm::check(future.get());
  }
  const double step_alone = percentile(alone, 0.5), step_during = percentile(during, 0.5);
  std::printf("training step (1 thread, matmul-bound): %.2f ms alone, %.2f ms while a snapshot is written "
              "(%+.1f%%, %zu steps overlapped)\n",
              step_alone, step_during, 100 * (step_during / step_alone - 1), during.size());
  js["step_slowdown"] = {
      {"alone_ms", step_alone}, {"during_snapshot_ms", step_during}, {"overlapped_steps", during.size()}};
  // 4. Loads against plain reads; the commit's blocking part against a plain copy.
  ftcomm::check(store->WaitForSnapshot());
  ftcomm::check(store->LatestSnapshot(&snap));
  const std::string blob = dir + "/snap/blobs/" + snap.blob_file;
  auto drop = [&] {
    const int fd = ::open(blob.c_str(), O_RDONLY);
    ::fdatasync(fd);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  };
  // A plain read of the blob: into `sink`, reused, or into fresh memory, as a
  // load must land in.
  std::vector<char> sink(snap.blob_bytes);
  auto read_into = [&](char* dst) {
    const auto t = Clock::now();
    const int fd = ::open(blob.c_str(), O_RDONLY);
    size_t got = 0;
    while (got < sink.size()) {
      const ssize_t n = ::read(fd, dst + got, sink.size() - got);
      if (n <= 0) break;
      got += static_cast<size_t>(n);
    }
    ::close(fd);
    return ms_since(t);
  };
  auto plain_read = [&] { return read_into(sink.data()); };
  auto plain_read_fresh = [&] {
    const auto t = Clock::now();
    std::unique_ptr<char[]> fresh(new char[sink.size()]);
    read_into(fresh.get());
    return ms_since(t);
  };
  plain_read();  // the sink's pages, once
  std::vector<double> load_warm, read_warm, load_cold, read_cold, read_fresh, staged, copied_plain;
  for (int r = 0; r < repeats; ++r) {
    for (bool cold : {true, false}) {
      if (cold) drop();
      auto t = Clock::now();
      ftcomm::check(store->LoadSnapshot(snap, &back));
      (cold ? load_cold : load_warm).push_back(ms_since(t));
      if (cold) drop();
      (cold ? read_cold : read_warm).push_back(plain_read());
      if (!cold) read_fresh.push_back(plain_read_fresh());
    }
  }
  for (int i = 0; i < count; ++i) correct = correct && at::equal(back[i].tensor, state[i].tensor);
  std::vector<at::Tensor> reused;
  for (const auto& nt : state) reused.push_back(at::empty_like(nt.tensor));
  for (int r = 0; r < repeats + 1; ++r) {
    auto t = Clock::now();
    for (size_t i = 0; i < state.size(); ++i) reused[i].copy_(state[i].tensor);
    if (r > 0) copied_plain.push_back(ms_since(t));
    t = Clock::now();
    auto future = store->CommitSnapshotAsync(record(1000 + r), state);
    if (r > 1) staged.push_back(ms_since(t));  // the first two fill the slots
    ftcomm::check(future.get());
  }
  const double lw = percentile(load_warm, 0.5), rw = percentile(read_warm, 0.5);
  const double lc = percentile(load_cold, 0.5), rc = percentile(read_cold, 0.5);
  const double rf = percentile(read_fresh, 0.5);
  std::printf("load %.0f MB: page cache: LoadSnapshot %.0f ms, plain read %.0f ms into reused memory (%.2fx), %.0f ms "
              "into fresh memory (%.2fx); disk: LoadSnapshot %.0f ms (%.2f GB/s), plain read %.0f ms (%.2f GB/s) "
              "(%.2fx)\n",
              bytes / 1e6, lw, rw, lw / rw, rf, lw / rf, lc, bytes / lc / 1e6, rc, bytes / rc / 1e6, lc / rc);
  const double st = staged.empty() ? 0 : percentile(staged, 0.5), cp = percentile(copied_plain, 0.5);
  std::printf("commit blocking (copy into a staging slot): %.1f ms; a copy into reused memory %.1f ms (%.2fx)\n", st,
              cp, st / cp);
  js["load"] = {{"warm_ms", lw}, {"warm_read_ms", rw}, {"warm_read_fresh_ms", rf}, {"cold_ms", lc},
                {"cold_read_ms", rc}};
  js["commit_blocking"] = {{"staged_ms", st}, {"copy_ms", cp}};
  js["correct"] = correct;
  std::printf("correctness of what was timed: %s\n", correct ? "ok" : "WRONG");
  if (!json.empty()) std::ofstream(json) << js.dump(2) << "\n";
  store.reset();
  ftcomm::detail::remove_tree(dir);
  return correct ? 0 : 1;
}
