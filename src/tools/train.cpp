// `ftcomm train`: one rank of fault-tolerant data-parallel training. Launch under
// torchrun --no-python (restarts, rendezvous); with no torchrun environment it
// runs as world size 1.
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <iostream>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <nlohmann/json.hpp>
#include <torch/serialize.h>

#include "cli.h"
#include "models.h"
#include "train.h"
#include "events.h"
#include "ftcomm/ddp.h"
#include "ftcomm/process_group.h"
#include "ftcomm/records_json.h"
#include "ftcomm/settings.h"
#include "ftcomm/digest.h"
#include "hook_text.h"
#include "log.h"
#include <torch/csrc/distributed/c10d/HashStore.hpp>

namespace ftcomm::tools {
namespace {

using Clock = std::chrono::steady_clock;

struct TrainArgs {
  std::string model = "mlp";
  std::string data;
  std::string device = "cpu";
  int64_t steps = 100, batch = 32, seed = 0;
  int64_t global_batch = 0;  // 0: batch x world size
  double lr = 0.05, momentum = 0.9;
  std::string hook = "allreduce";
  std::vector<std::pair<std::string, std::string>> hook_args;
  std::vector<std::string> hook_digests;
  ftcomm::HookAgreement hook_agree = ftcomm::HookAgreement::kAuto;
  std::string ckpt;
  int commit_every = 10;
  int staging_slots = 2;
  std::string when_behind = "wait";
  double write_mb_per_s = 0;
  bool direct_writes = true;
  bool jit = true;
  std::string jit_policy = "exact";
  std::string backend = "auto";
  double bucket_mb = 1;
  struct Failure {
    int rank;
    int64_t step;
    std::string phase;
    int64_t attempt;
  };
  std::vector<Failure> failures;
  std::string summary;
  int log_every = 10;
  double timeout_s = 60;
  double pace_ms = 0;
  std::vector<std::string> allow_changes;
  std::string events;
};

constexpr const char* kTrainDescription = R"(ftcomm train: one rank of fault-tolerant data-parallel training.
Launch under torchrun --no-python (restarts, rendezvous); without torchrun it runs as world size 1:
  torchrun --no-python --nproc-per-node=4 --max-restarts=3 ftcomm train --ckpt DIR)";

// --fail-at RANK:STEP[:PHASE][@ATTEMPT]; the attempt is torchrun's restart count.
TrainArgs::Failure parse_failure(const std::string& text) {
  auto bad = [&](const std::string& why) {
    return CLI::ValidationError("--fail-at", "'" + text + "' " + why +
                                    "; it takes RANK:STEP[:PHASE][@ATTEMPT], e.g. 1:20:hook@0");
  };
  auto integer = [&](const std::string& field, const char* what) {
    size_t used = 0;
    long long v = 0;
    try {
      v = std::stoll(field, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used == 0 || used != field.size() || v < 0) throw bad(std::string("has ") + what + " '" + field + "', not a whole number >= 0");
    return static_cast<int64_t>(v);
  };
  TrainArgs::Failure f{0, 0, "backward", 0};
  std::string spec = text;
  const auto at = spec.find('@');
  if (at != std::string::npos) {
    f.attempt = integer(spec.substr(at + 1), "attempt");
    spec = spec.substr(0, at);
  }
  const auto c1 = spec.find(':');
  if (c1 == std::string::npos) throw bad("has no STEP");
  const auto c2 = spec.find(':', c1 + 1);
  f.rank = static_cast<int>(integer(spec.substr(0, c1), "rank"));
  f.step = integer(spec.substr(c1 + 1, c2 == std::string::npos ? std::string::npos : c2 - c1 - 1), "step");
  if (c2 != std::string::npos) f.phase = spec.substr(c2 + 1);
  static const std::set<std::string> kPhases{"forward", "backward", "hook", "update", "commit", "resync", "jit", "hang"};
  if (!kPhases.count(f.phase)) {
    throw bad("has phase '" + f.phase + "', not one of forward, backward, hook, update, commit, resync, jit, hang");
  }
  if (f.phase != "resync" && f.phase != "jit" && f.step < 1) throw bad("has step 0; steps count from 1");
  return f;
}

// Returns the exit code when the command line says to stop (--help, or an error).
std::optional<int> parse_train(const std::vector<std::string>& argv, TrainArgs* out) {
  TrainArgs& a = *out;
  CLI::App app(kTrainDescription, "ftcomm train");
  app.set_help_flag("-h,--help", "Show this text");
  app.add_option("--model", a.model, "mlp: an MLP on a synthetic regression task; charlm: a small character-level "
                                     "transformer trained on --data")
      ->check(CLI::IsMember({"mlp", "charlm"}))->capture_default_str();
  app.add_option("--data", a.data, std::string("text file for --model charlm (default ") + kDefaultCharLmData + ")")
      ->check(CLI::ExistingFile);
  app.add_option("--steps", a.steps, "total step target; a restarted job resumes from its newest commit")
      ->check(ftcomm::cli::integer_in(1, 1000000000000LL))->capture_default_str();
  app.add_option("--batch", a.batch,
                 "samples per rank and step: the step's global batch is --batch x the world size. An elastic job "
                 "(torchrun --nnodes MIN:MAX) gives --global-batch instead, which a resize keeps")
      ->check(ftcomm::cli::integer_in(1, 1 << 24))->capture_default_str();
  app.add_option("--global-batch", a.global_batch,
                 "samples per step over all ranks, divided among them (the first G mod W ranks take one more, each "
                 "rank's loss weighted by its share); the data of a step is the same at every world size")
      ->check(ftcomm::cli::integer_in(1, 1LL << 30));
  app.add_option("--lr", a.lr, "learning rate")->check(ftcomm::cli::number_in(0, 1e6, /*lo_open=*/true))->capture_default_str();
  app.add_option("--seed", a.seed, "model and data seed")->check(ftcomm::cli::integer_in(0, 1000000000000LL))->capture_default_str();
  app.add_option("--hook", a.hook, "comm hook: a name from hooks_ts/ or a .py/.pt file")->capture_default_str();
  std::vector<std::string> hook_args;
  app.add_option("--hook-arg", hook_args, "hook parameter k=v (repeatable)")->type_name("K=V");
  app.add_option("--hook-digest", a.hook_digests, "accept only a hook with this SHA-256 (repeatable; see ftcomm hook check)");
  // An on|off switch, "on" by default.
  auto on_off = [&app](const std::string& name, std::string& value, const std::string& help) {
    value = "on";
    app.add_option(name, value, help)->check(CLI::IsMember({"on", "off"}))->capture_default_str();
  };
  std::string agree = "auto";
  app.add_option("--hook-agree", agree,
                 "how the ranks make a hook failing or stuck on some ranks fail (or fall back) on all of them. "
                 "per-collective: a small exchange before each of the hook's collectives and after each bucket; "
                 "per-step: the hook's NCCL collectives go straight to the stream and the ranks exchange once per "
                 "step, aborting the NCCL communicator on a failure (the job then restarts and recovers); "
                 "fail-fast: nothing per collective, a failing rank records its reason in the group's store and "
                 "peers whose collective stalls or breaks find it there (the job then restarts and recovers); auto: "
                 "per-step for CUDA buckets on NCCL, fail-fast for CPU buckets; off: none (a rank-local hook failure "
                 "then surfaces as a collective timeout). A failing hook stops every rank (train has no fallback)")
      ->check(CLI::IsMember({"auto", "on", "per-collective", "per-step", "fail-fast", "off"}))->capture_default_str();
  app.add_option("--timeout", a.timeout_s,
                 "seconds: the deadline of every wait (rendezvous, each collective); a hook call that runs longer "
                 "than half of it fails the step on every rank, naming the stuck rank")
      ->check(ftcomm::cli::number_in(1, 86400))->capture_default_str();
  app.add_option("--ckpt", a.ckpt, "checkpoint stores, one per rank under DIR/rank<R>");
  app.add_option("--commit-every", a.commit_every,
                 "snapshot every K steps; 0: none (with --jit on, a failure still loses at most one step; periodic "
                 "snapshots are for losing every rank at once)")
      ->check(ftcomm::cli::integer_in(0, 1000000000))->capture_default_str();
  app.add_option("--staging-slots", a.staging_slots,
                 "host copies of a snapshot kept for the disk writer, each the size of this rank's state (pinned "
                 "for GPU state): 2 lets a commit overlap the previous one's write")
      ->check(ftcomm::cli::integer_in(1, 8))->capture_default_str();
  app.add_option("--when-behind", a.when_behind,
                 "when every staging slot is still being written (commits outpace the disk): wait for one, or skip "
                 "this rank's commit; both are logged and counted in the summary")
      ->check(CLI::IsMember({"wait", "skip"}))->capture_default_str();
  app.add_option("--write-mb-per-s", a.write_mb_per_s, "caps the snapshot writer's disk writes (MB/s); 0: no cap")
      ->check(ftcomm::cli::number_in(0, 1e6))->capture_default_str();
  std::string direct_writes;
  on_off("--direct-writes", direct_writes,
         "write CPU state's snapshots with direct I/O where the file system takes it: no copy into the page "
         "cache, which costs training's cores CPU at every commit; a restart on the same host then reads the "
         "snapshot from the disk instead of the cache (off: through the page cache)");
  std::string jit;
  on_off("--jit", jit,
         "just-in-time commits: at a failure (a peer's collective error, a step stalled past 0.9 x --timeout, "
         "torchrun's SIGTERM) each survivor saves its last finished step, so a resume loses at most the step "
         "in progress");
  app.add_option("--jit-policy", a.jit_policy,
                 "when the failed rank's rank-local hook state (powersgd's or topk's error feedback) exists only at "
                 "an older commit: exact resumes there (bit-identical), reset resumes from the just-in-time step with "
                 "that state started afresh")
      ->check(CLI::IsMember({"exact", "reset"}))->capture_default_str();
  app.add_option("--allow-change", a.allow_changes,
                 "resume although this setting changed since the checkpoint (repeatable): lr, global_batch, model, data, "
                 "device, hook.<param>, or all");
  app.add_option("--backend", a.backend, "what serves CUDA tensors")->check(CLI::IsMember({"auto", "gloo", "nccl"}))->capture_default_str();
  app.add_option("--device", a.device)->check(CLI::IsMember({"cpu", "cuda"}))->capture_default_str();
  app.add_option("--bucket-mb", a.bucket_mb, "gradient bucket size in MiB")->check(ftcomm::cli::number_in(0, 4096, true))->capture_default_str();
  std::vector<std::string> failures;
  app.add_option("--fail-at", failures,
                 "SIGKILL that rank at that step of torchrun attempt ATTEMPT (default 0, the first); PHASE is forward, "
                 "backward (default), hook, update (during the optimizer step), commit, resync (during recovery at "
                 "start-up; STEP is ignored), jit (during that rank's just-in-time save; STEP is ignored), or hang "
                 "(SIGSTOP instead: the rank hangs in backward). Repeatable")
      ->type_name("RANK:STEP[:PHASE][@ATTEMPT]");
  app.add_option("--summary-json", a.summary, "written by rank 0 at the end (checked at start)");
  app.add_option("--events", a.events,
                 "append structured events as JSON lines to FILE ('-': stderr): each rank's start and injected "
                 "failure, rank 0's recovery (phases with durations, resync bytes), every step (loss, step and comm "
                 "time) and the end");
  app.add_option("--pace-ms", a.pace_ms,
                 "sleep after each step so that it takes at least this long: a larger model's step time for tests "
                 "and demos (the results do not change)")
      ->check(ftcomm::cli::number_in(0, 60000))->capture_default_str();
  app.add_option("--log-every", a.log_every, "progress line every N steps (0: none)")->check(ftcomm::cli::integer_in(0, 1000000000))->capture_default_str();
  if (int rc = ftcomm::cli::parse(app, argv, "ftcomm train"); rc >= 0) return rc;
  for (const auto& kv : hook_args) a.hook_args.push_back(ftcomm::cli::split_kv("--hook-arg", kv));
  for (const auto& f : failures) a.failures.push_back(parse_failure(f));
  a.hook_agree = ftcomm::parse_hook_agreement(agree);
  a.jit = jit == "on";
  a.direct_writes = direct_writes == "on";
  return std::nullopt;
}

// --summary-json is written at the end; a path that cannot be written is refused
// now, not after the run.
void check_summary_path(const std::string& path) {
  if (path.empty()) return;
  struct stat st {};
  TORCH_CHECK(!(::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)), "--summary-json '", path,
              "' is a directory; give a file path");
  const auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  TORCH_CHECK(::stat(dir.c_str(), &st) == 0 && S_ISDIR(st.st_mode), "--summary-json '", path, "': the directory '",
              dir, "' does not exist; create it or choose another path");
  TORCH_CHECK(::access(dir.c_str(), W_OK) == 0, "--summary-json '", path, "': the directory '", dir,
              "' is not writable; choose another path");
}

// One rank's run of `ftcomm train`: the group, the model and its share of the
// batch, DDP over the Job, recovery, the steps, the summary. run() is the order.
class Trainer {
 public:
  Trainer(const TrainArgs& args, const TrainBaseline* baseline) : args_(args), baseline_(baseline) {}

  int run() {
    start_group();
    make_model();
    divide_batch();
    ddp_ = std::make_unique<ftcomm::DistributedDataParallel>(pg_, model_->params(), momentum_, ddp_options());
    // Errors from here on are reported before anything is torn down (see
    // exit_with_error): the group's and the Reducer's destructors could delay the
    // message past torchrun's SIGTERM.
    try {
      const auto restart_t0 = Clock::now();
      const int64_t start = recover();
      const auto train_t0 = Clock::now();
      train_steps(start);
      ddp_->commit_last(args_.steps, args_.steps * global_batch_);
      ddp_->flush();
      finish(start, restart_t0, train_t0);
    } catch (const std::exception& e) {
      // The last finished step goes to this rank's store just in time (after the
      // snapshot in flight, which is local disk work); nothing else is torn down.
      try {
        ddp_->save_just_in_time(std::string("error: ") + ftcomm::detail::first_line(e.what()));
        ddp_->flush();
      } catch (const std::exception& save_error) {
        ftcomm::detail::log_line(std::string("ftcomm train: the just-in-time save failed: ") + save_error.what());
      }
      ftcomm::cli::exit_with_error("train", e);
    }
    return 0;
  }

 private:
  // The group (torchrun's environment, else world size 1 on an in-memory store),
  // the event log, and the --fail-at checks that need the world size.
  void start_group() {
    pgo_ = ftcomm::process_group_options_from_env();
    pgo_.backend = ftcomm::parse_backend(args_.backend);
    pgo_.timeout = std::chrono::milliseconds(static_cast<int64_t>(args_.timeout_s * 1000));
    if (!ftcomm::launched_by_torchrun()) {
      pgo_.store = ftcomm::StoreKind::kCustom;  // world size 1: an in-memory store
      pgo_.custom_store = c10::make_intrusive<c10d::HashStore>();
    }
    at::set_num_threads(1);
    // A resumed run must repeat the uninterrupted one bit for bit; cuBLAS needs a
    // fixed workspace for that, set before CUDA starts (the group may start it).
    if (args_.device == "cuda") ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", 0);
    events_ = std::make_unique<EventLog>(args_.events, pgo_.rank, pgo_.restart_count);
    const char* node = std::getenv("GROUP_RANK");
    events_->emit("launched", {{"world_size", pgo_.world_size}, {"node_rank", node ? node : ""}, {"pid", ::getpid()}});
    const auto group_t0 = Clock::now();
    pg_ = ftcomm::make_process_group(pgo_);
    rank_ = pg_->getRank();
    world_ = pg_->getSize();
    events_->emit("start", {{"world_size", world_}, {"steps", args_.steps}, {"model", args_.model}, {"hook", args_.hook},
                            {"group_ms", std::chrono::duration<double, std::milli>(Clock::now() - group_t0).count()}});
    for (const auto& f : args_.failures) {
      TORCH_CHECK(f.rank < world_, "--fail-at ", f.rank, ":", f.step, " names rank ", f.rank,
                  ", but this job has ranks 0 to ", world_ - 1);
    }
  }

  // --fail-at: kills (or stops) this rank where the command line says.
  void inject(int64_t step, const std::string& phase) const {
    for (const auto& f : args_.failures) {
      if (f.attempt == pgo_.restart_count && f.rank == rank_ && f.phase == phase &&
          (phase == "resync" || phase == "jit" || f.step == step)) {
        ftcomm::detail::log_line("ftcomm train: rank " + std::to_string(rank_) + ": injected failure at step " +
                                 std::to_string(step) + " (" + phase + ", attempt " +
                                 std::to_string(pgo_.restart_count) + ")");
        events_->emit("failure_injected", {{"step", step}, {"phase", phase}});
        ::kill(::getpid(), phase == "hang" ? SIGSTOP : SIGKILL);
      }
    }
  }

  void make_model() {
    TORCH_CHECK(args_.device == "cpu" || args_.device == "cuda", "--device must be cpu or cuda, not '", args_.device,
                "'");
    TORCH_CHECK(args_.device == "cpu" || at::hasCUDA(), "--device cuda asked for, but rank ", rank_,
                " sees no GPU; use --device cpu");
    // Ranks share the GPUs round-robin when there are fewer GPUs than local ranks.
    const at::Device device =
        args_.device == "cuda"
            ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(
                                        std::max(0, pgo_.local_rank) %
                                        std::max<int>(1, c10::impl::getDeviceGuardImpl(at::kCUDA)->deviceCount())))
            : at::Device(at::kCPU);
    if (device.is_cuda()) at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);
    model_ = tools::make_model(args_.model, args_.seed, args_.data, device);
    for (const auto& p : model_->params()) momentum_.push_back(at::zeros_like(p));
  }

  // The step's global batch, divided among this world's ranks: the first G mod W
  // take one sample more.
  void divide_batch() {
    global_batch_ = args_.global_batch > 0 ? args_.global_batch : args_.batch * world_;
    TORCH_CHECK(global_batch_ >= world_, "the global batch of ", global_batch_,
                " samples leaves ranks without data at world size ", world_, "; give --global-batch ", world_,
                " or more");
    share_ = global_batch_ / world_ + (rank_ < global_batch_ % world_ ? 1 : 0);
    share_first_ = rank_ * (global_batch_ / world_) + std::min<int64_t>(rank_, global_batch_ % world_);
    if (rank_ == 0 && global_batch_ % world_ != 0) {
      std::printf("ftcomm train: the global batch of %lld samples does not divide by %d ranks: ranks 0-%lld take "
                  "%lld, the others %lld (each rank's loss is weighted by its share)\n",
                  static_cast<long long>(global_batch_), world_, static_cast<long long>(global_batch_ % world_ - 1),
                  static_cast<long long>(global_batch_ / world_ + 1), static_cast<long long>(global_batch_ / world_));
      std::fflush(stdout);
    }
  }

  ftcomm::DdpOptions ddp_options() const {
    ftcomm::DdpOptions options;
    options.bucket_bytes = static_cast<int64_t>(args_.bucket_mb * (1 << 20));
    options.hook = args_.hook;
    options.hook_args = args_.hook_args;
    options.pinned_digests = args_.hook_digests;
    options.hook_options.agreement = args_.hook_agree;
    // The hook's and the stall deadlines follow --timeout (the group's; see
    // deadlines.h): half of it for a hook call, 0.9 of it for a step.
    ftcomm::JobOptions& job = options.job;
    job.checkpoint.commit_every = args_.commit_every;
    job.checkpoint.staging_slots = args_.staging_slots;
    job.checkpoint.when_behind = ftcomm::parse_snapshot_when_behind(args_.when_behind, "--when-behind");
    job.checkpoint.write_bytes_per_sec = static_cast<int64_t>(args_.write_mb_per_s * 1e6);
    job.checkpoint.direct_writes = args_.direct_writes;
    job.just_in_time = args_.jit;
    job.checkpoint.local_state_policy = ftcomm::parse_local_state_policy(args_.jit_policy, "--jit-policy");
    job.jit.before_commit = [this] { inject(-1, "jit"); };
    job.jit.on_saved = [this](int64_t step, bool saved, const std::string& reason) {
      events_->emit("jit_saved", {{"step", step}, {"saved", saved}, {"reason", reason}});
    };
    // What changes the result besides the hook's parameters (the seed is part of
    // the job's identity; the hook's file is checked by its digest).
    job.checkpoint.settings = {{"model", args_.model}, {"lr", ftcomm::format_setting(args_.lr)},
                               {"global_batch", std::to_string(global_batch_)}, {"device", args_.device}};
    if (args_.model == "charlm") job.checkpoint.settings["data"] = args_.data.empty() ? kDefaultCharLmData : args_.data;
    job.checkpoint.allow_changed_settings.insert(args_.allow_changes.begin(), args_.allow_changes.end());
    job.checkpoint.job_id = "train-" + args_.model + "-seed" + std::to_string(args_.seed);
    if (baseline_ == nullptr) job.ckpt_root = args_.ckpt;  // a baseline keeps its own files there
    return options;
  }

  // The job's recovery (collective): the agreed step restored, its events, and
  // the line rank 0 prints. Returns the step to train from.
  int64_t recover() {
    ddp_->prepare_recovery();
    inject(-1, "resync");  // --fail-at R:S:resync: after the agreement, before any state moves
    const auto report = ddp_->finish_recovery();
    // One form of the report everywhere (records_json.h): the event, the summary.
    report_json_ = nlohmann::json::parse(ftcomm::to_json(report));
    if (rank_ == 0) {
      nlohmann::json recovery = report_json_;
      recovery["world_size"] = world_;
      events_->emit("recovery", recovery);
    }
    if (!report.discarded_steps.empty()) events_->emit("discarded", {{"steps", report.discarded_steps}});
    int64_t start = std::max<int64_t>(0, report.resumed_from_step);
    if (baseline_ != nullptr && baseline_->restore) {
      at::NoGradGuard no_grad;
      const int64_t restored = baseline_->restore(model_->params(), momentum_);
      if (restored >= 0) start = restored;
    }
    // Every rank has the same report, so every rank stops here together.
    TORCH_CHECK(start <= args_.steps, "the checkpoint in --ckpt ", args_.ckpt, " is at step ", start,
                ", beyond --steps ", args_.steps,
                "; nothing to train. Raise --steps to continue the run, or point --ckpt at a new directory");
    if (rank_ == 0) {
      if (report.resumed_from_step >= 0) {
        std::printf("ftcomm train: %s\n", ftcomm::resume_line(report, world_).c_str());
        if (report.resumed_world_size != world_) {
          std::printf("ftcomm train: resized from world size %d to %d at step %lld: the global batch of %lld "
                      "samples is divided anew, rank-local state started afresh\n",
                      report.resumed_world_size, world_, static_cast<long long>(report.resumed_from_step),
                      static_cast<long long>(global_batch_));
        }
      } else {
        std::printf("ftcomm train: starting at step 0, world %d, hook %s\n", world_, ddp_->hook()->name().c_str());
      }
      std::fflush(stdout);
    }
    return start;
  }

  // Steps start+1 .. --steps: forward, backward (the hook runs inside), SGD with
  // momentum, the Job's commit when due; --fail-at points in between.
  void train_steps(int64_t start) {
    std::vector<at::Tensor>& params = model_->params();
    t_log_ = Clock::now();
    for (int64_t step = start; step < args_.steps; ++step) {
      const auto t_step = Clock::now();
      for (auto& p : params) {
        if (p.grad().defined()) p.mutable_grad().zero_();
      }
      inject(step + 1, "forward");
      ddp_->before_forward();
      const at::Tensor loss = model_->loss(step, share_first_, share_, global_batch_, world_, args_.seed);
      inject(step + 1, "backward");
      ddp_->before_backward(loss);
      inject(step + 1, "hook");  // the hook runs during backward; dying here kills it mid-collective for peers
      inject(step + 1, "hang");
      loss.backward();
      ddp_->before_update();
      inject(step + 1, "update");
      {
        at::NoGradGuard no_grad;
        for (size_t i = 0; i < params.size(); ++i) {
          momentum_[i].mul_(args_.momentum).add_(params[i].grad());
          params[i].sub_(momentum_[i] * args_.lr);
        }
      }
      loss_last_ = loss.item<double>();
      ddp_->after_step(step + 1, (step + 1) * global_batch_);
      if (baseline_ != nullptr && baseline_->after_step) baseline_->after_step(step + 1, params, momentum_);
      inject(step + 1, "commit");
      if (args_.pace_ms > 0) {
        std::this_thread::sleep_until(t_step + std::chrono::microseconds(static_cast<int64_t>(args_.pace_ms * 1000)));
      }
      const double step_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_step).count();
      if (step == start) first_step_ms_ = step_ms;
      if (rank_ == 0 && events_->enabled()) {
        events_->emit("step", {{"step", step + 1}, {"loss", *loss_last_}, {"step_ms", step_ms},
                               {"comm_ms_total", ddp_->comm_seconds() * 1000}});
      }
      log_progress(step + 1);
    }
  }

  // Rank 0's progress line every --log-every steps and at the last.
  void log_progress(int64_t done) {
    ++steps_since_log_;
    if (rank_ != 0 || args_.log_every <= 0 || (done % args_.log_every != 0 && done != args_.steps)) return;
    const double s = std::chrono::duration<double>(Clock::now() - t_log_).count();
    const double comm = ddp_->comm_seconds();
    std::printf("step %lld/%lld loss %.6f samples/s %.0f comm ms/step %.2f\n", static_cast<long long>(done),
                static_cast<long long>(args_.steps), *loss_last_,
                steps_since_log_ * global_batch_ / std::max(s, 1e-9), (comm - comm_at_log_) * 1000 / steps_since_log_);
    std::fflush(stdout);
    t_log_ = Clock::now();
    comm_at_log_ = comm;
    steps_since_log_ = 0;
  }

  // The digest line, the summary file and the last event (rank 0).
  void finish(int64_t start, Clock::time_point restart_t0, Clock::time_point train_t0) const {
    const std::string digest = ftcomm::tensors_digest(model_->params());
    if (rank_ != 0) return;
    if (!args_.summary.empty()) {
      // The run's figures, and the resume's report under its own names.
      nlohmann::json summary = report_json_;
      summary.update({{"steps", args_.steps},
                      {"world_size", world_},
                      {"global_batch", global_batch_},
                      {"rank_batch", share_},
                      {"restarts", pgo_.restart_count},
                      {"steps_trained", args_.steps - start},
                      {"param_digest", digest},
                      {"loss_last", loss_last_ ? nlohmann::json(*loss_last_) : nlohmann::json(nullptr)},
                      {"first_step_ms", first_step_ms_},
                      {"since_start_ms", std::chrono::duration<double, std::milli>(Clock::now() - restart_t0).count()},
                      {"train_ms", std::chrono::duration<double, std::milli>(Clock::now() - train_t0).count()},
                      {"jit_ms", ddp_->jit_seconds() * 1000},
                      {"snapshots", nlohmann::json::parse(ftcomm::to_json(ddp_->job().snapshot_stats()))},
                      {"hook", ddp_->hook()->name()}});
      std::ofstream out(args_.summary);
      out << summary.dump() << "\n";
      TORCH_CHECK(out.good(), "--summary-json '", args_.summary, "' could not be written");
    }
    std::printf("ftcomm train: done, %lld steps, param digest %s\n", static_cast<long long>(args_.steps),
                digest.c_str());
    events_->emit("done", {{"steps", args_.steps}, {"param_digest", digest}});
  }

  const TrainArgs& args_;
  const TrainBaseline* baseline_;
  ftcomm::ProcessGroupOptions pgo_;
  std::unique_ptr<EventLog> events_;
  c10::intrusive_ptr<c10d::ProcessGroup> pg_;
  int rank_ = 0, world_ = 1;
  std::unique_ptr<Model> model_;
  std::vector<at::Tensor> momentum_;
  int64_t global_batch_ = 0, share_ = 0, share_first_ = 0;
  std::unique_ptr<ftcomm::DistributedDataParallel> ddp_;
  nlohmann::json report_json_;
  std::optional<double> loss_last_;
  double first_step_ms_ = 0;
  Clock::time_point t_log_;
  double comm_at_log_ = 0;
  int64_t steps_since_log_ = 0;
};

}  // namespace

int train_main(const std::vector<std::string>& argv, const TrainBaseline* baseline) {
  TrainArgs args;
  if (auto rc = parse_train(argv, &args)) return *rc;
  check_summary_path(args.summary);
  return Trainer(args, baseline).run();
}

}  // namespace ftcomm::tools
