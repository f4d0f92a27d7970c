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
#include "events.h"
#include "ftcomm/ddp.h"
#include "ftcomm/process_group.h"
#include "ftcomm/records_json.h"
#include "ftcomm/settings.h"
#include "ftcomm/digest.h"
#include "hook_text.h"
#include "log.h"
#include <torch/csrc/distributed/c10d/HashStore.hpp>

namespace {

using Clock = std::chrono::steady_clock;

struct TrainArgs {
  std::string model = "mlp";
  std::string data;
  std::string device = "cpu";
  int torch_save_every = 0;  // benchmark baseline: torch::save every K steps, no ftcomm store
  int64_t steps = 100, batch = 32, seed = 0;
  int64_t global_batch = 0;  // 0: batch x world size
  double lr = 0.05, momentum = 0.9;
  std::string hook = "allreduce";
  std::vector<std::pair<std::string, std::string>> hook_args;
  std::vector<std::string> hook_digests;
  ftcomm::HookAgreement hook_agree = ftcomm::HookAgreement::kAuto;
  std::string ckpt;
  int commit_every = 10;
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
  app.add_option("--data", a.data, std::string("text file for --model charlm (default ") + "/usr/share/common-licenses/GPL-3)")
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
  app.add_option("--baseline-torch-save-every", a.torch_save_every,
                 "benchmark baseline: torch::save params, optimizer state and the step every K steps into --ckpt "
                 "(synchronously, to a temporary file renamed into place), instead of ftcomm's store; a restart "
                 "torch::loads it")
      ->check(ftcomm::cli::integer_in(0, 1000000000));
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

// A model: its parameters and the loss of one rank's share of a step's batch.
// The global batch depends only on (seed, step), so a resumed run sees the same
// data at any world size.
class Model {
 public:
  explicit Model(at::Device device) : device_(device) {}
  virtual ~Model() = default;
  std::vector<at::Tensor>& params() { return params_; }
  // The loss of samples [first, first + count) of step `step`'s global batch of
  // `global` samples, as this rank's share of the global mean: the sum of its
  // samples' losses x world / global, so the ranks' average is the mean over the
  // global batch however it is divided.
  virtual at::Tensor loss(int64_t step, int64_t first, int64_t count, int64_t global, int world, int64_t seed) = 0;

 protected:
  at::Tensor param(at::Tensor init) {
    params_.push_back(init.to(device_).requires_grad_());
    return params_.back();
  }
  at::Device device_;
  std::vector<at::Tensor> params_;
};

// An MLP fitting a fixed random teacher network on synthetic inputs.
class Mlp : public Model {
 public:
  Mlp(int64_t seed, at::Device device) : Model(device) {
    auto init = at::make_generator<at::CPUGeneratorImpl>(1000 + seed);
    for (size_t i = 0; i + 1 < widths_.size(); ++i) {
      param(at::randn({widths_[i], widths_[i + 1]}, init) / std::sqrt(double(widths_[i])));
      param(at::zeros({widths_[i + 1]}));
    }
    teacher_ = at::randn({widths_.front(), widths_.back()}, init).to(device);
  }
  at::Tensor loss(int64_t step, int64_t first, int64_t count, int64_t global, int world, int64_t seed) override {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003 + step * 131);
    const at::Tensor x = at::randn({global, widths_.front()}, gen).narrow(0, first, count).to(device_);
    const at::Tensor y = at::tanh(at::mm(x, teacher_) / 8.0);
    at::Tensor h = x;
    for (size_t i = 0; i < params_.size(); i += 2) {
      h = at::addmm(params_[i + 1], h, params_[i]);
      if (i + 2 < params_.size()) h = at::relu(h);
    }
    return (h - y).pow(2).mean(1).sum() * (double(world) / double(global));
  }

 private:
  std::vector<int64_t> widths_{64, 256, 256, 16};
  at::Tensor teacher_;
};

// A small character-level transformer (bytes as tokens; 2 pre-LN blocks, d=64,
// 4 heads, context 32) trained to predict the next byte of a text file.
class CharLm : public Model {
 public:
  CharLm(int64_t seed, const std::string& path, at::Device device) : Model(device) {
    std::ifstream in(path, std::ios::binary);
    TORCH_CHECK(in, "--data '", path, "' cannot be read; give a text file (the default is ", kDefaultData, ")");
    std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    TORCH_CHECK(static_cast<int64_t>(text.size()) > kContext + 1, "--data '", path, "' is too short to train on");
    data_ = at::empty({static_cast<int64_t>(text.size())}, at::kLong);
    for (size_t i = 0; i < text.size(); ++i) data_[i] = static_cast<int64_t>(static_cast<unsigned char>(text[i]));
    auto init = at::make_generator<at::CPUGeneratorImpl>(2000 + seed);
    auto w = [&](std::vector<int64_t> shape, double fan_in) { return param(at::randn(shape, init) / std::sqrt(fan_in)); };
    embed_ = w({kVocab, kDim}, 1.0 / 0.02 / 0.02);
    pos_ = w({kContext, kDim}, 1.0 / 0.02 / 0.02);
    for (int l = 0; l < kLayers; ++l) {
      Block b;
      b.ln1_w = param(at::ones({kDim}));
      b.ln1_b = param(at::zeros({kDim}));
      b.qkv = w({kDim, 3 * kDim}, kDim);
      b.proj = w({kDim, kDim}, kDim);
      b.ln2_w = param(at::ones({kDim}));
      b.ln2_b = param(at::zeros({kDim}));
      b.fc1 = w({kDim, 4 * kDim}, kDim);
      b.fc1_b = param(at::zeros({4 * kDim}));
      b.fc2 = w({4 * kDim, kDim}, 4 * kDim);
      b.fc2_b = param(at::zeros({kDim}));
      blocks_.push_back(b);
    }
    lnf_w_ = param(at::ones({kDim}));
    lnf_b_ = param(at::zeros({kDim}));
    head_ = w({kDim, kVocab}, kDim);
    mask_ = at::full({kContext, kContext}, -std::numeric_limits<float>::infinity()).triu(1).to(device);
  }
  at::Tensor loss(int64_t step, int64_t first, int64_t count, int64_t global, int world, int64_t seed) override {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003 + step * 131);
    const int64_t batch = count;
    const at::Tensor starts =
        at::randint(0, data_.numel() - kContext - 1, {global, 1}, gen, at::kLong).narrow(0, first, count);
    const at::Tensor index = starts + at::arange(kContext + 1, at::kLong);
    const at::Tensor window = data_.index_select(0, index.reshape({-1})).view({batch, kContext + 1}).to(device_);
    const at::Tensor tokens = window.narrow(1, 0, kContext), targets = window.narrow(1, 1, kContext);
    // The embedding as a one-hot matmul: its backward has no atomic adds, so CUDA
    // runs are bit-reproducible (index_select's backward is not).
    at::Tensor x = at::matmul(at::one_hot(tokens, kVocab).to(embed_.scalar_type()), embed_) + pos_;
    const int64_t dh = kDim / kHeads;
    for (const auto& b : blocks_) {
      at::Tensor h = at::layer_norm(x, {kDim}, b.ln1_w, b.ln1_b);
      auto qkv = at::matmul(h, b.qkv).view({batch, kContext, 3, kHeads, dh}).permute({2, 0, 3, 1, 4});
      at::Tensor att = at::matmul(qkv[0], qkv[1].transpose(-2, -1)) / std::sqrt(double(dh)) + mask_;
      at::Tensor y = at::matmul(at::softmax(att, -1), qkv[2]).transpose(1, 2).reshape({batch, kContext, kDim});
      x = x + at::matmul(y, b.proj);
      h = at::layer_norm(x, {kDim}, b.ln2_w, b.ln2_b);
      x = x + at::matmul(at::gelu(at::matmul(h, b.fc1) + b.fc1_b), b.fc2) + b.fc2_b;
    }
    const at::Tensor logits = at::matmul(at::layer_norm(x, {kDim}, lnf_w_, lnf_b_), head_);
    return at::nll_loss(at::log_softmax(logits.view({-1, kVocab}), -1), targets.reshape({-1}), {},
                        at::Reduction::Sum) *
           (double(world) / double(global * kContext));
  }
  static constexpr const char* kDefaultData = "/usr/share/common-licenses/GPL-3";

 private:
  static constexpr int64_t kVocab = 256, kDim = 64, kHeads = 4, kContext = 32, kLayers = 2;
  struct Block {
    at::Tensor ln1_w, ln1_b, qkv, proj, ln2_w, ln2_b, fc1, fc1_b, fc2, fc2_b;
  };
  at::Tensor data_, embed_, pos_, lnf_w_, lnf_b_, head_, mask_;
  std::vector<Block> blocks_;
};

}  // namespace

int train_main(const std::vector<std::string>& argv) {
  TrainArgs parsed;
  if (auto rc = parse_train(argv, &parsed)) return *rc;
  const TrainArgs& args = parsed;
  check_summary_path(args.summary);
  ftcomm::ProcessGroupOptions pgo = ftcomm::process_group_options_from_env();
  pgo.backend = ftcomm::parse_backend(args.backend);
  pgo.timeout = std::chrono::milliseconds(static_cast<int64_t>(args.timeout_s * 1000));
  if (!ftcomm::launched_by_torchrun()) {
    pgo.store = ftcomm::StoreKind::kCustom;  // world size 1: an in-memory store
    pgo.custom_store = c10::make_intrusive<c10d::HashStore>();
  }
  at::set_num_threads(1);
  // A resumed run must repeat the uninterrupted one bit for bit; cuBLAS needs a
  // fixed workspace for that, set before CUDA starts (the group may start it).
  if (args.device == "cuda") ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", 0);
  const ftcomm::tools::EventLog events(args.events, pgo.rank, pgo.restart_count);
  const char* node = std::getenv("GROUP_RANK");
  events.emit("launched", {{"world_size", pgo.world_size}, {"node_rank", node ? node : ""}, {"pid", ::getpid()}});
  const auto group_t0 = Clock::now();
  auto pg = ftcomm::make_process_group(pgo);
  const int rank = pg->getRank(), world = pg->getSize();
  events.emit("start", {{"world_size", world}, {"steps", args.steps}, {"model", args.model}, {"hook", args.hook},
                        {"group_ms", std::chrono::duration<double, std::milli>(Clock::now() - group_t0).count()}});
  for (const auto& f : args.failures) {
    TORCH_CHECK(f.rank < world, "--fail-at ", f.rank, ":", f.step, " names rank ", f.rank, ", but this job has ranks 0 to ",
                world - 1);
  }
  auto maybe_fail = [&](int64_t step, const std::string& phase) {
    for (const auto& f : args.failures) {
      if (f.attempt == pgo.restart_count && f.rank == rank && f.phase == phase &&
          (phase == "resync" || phase == "jit" || f.step == step)) {
        ftcomm::detail::log_line("ftcomm train: rank " + std::to_string(rank) + ": injected failure at step " +
                                 std::to_string(step) + " (" + phase + ", attempt " +
                                 std::to_string(pgo.restart_count) + ")");
        events.emit("failure_injected", {{"step", step}, {"phase", phase}});
        ::kill(::getpid(), phase == "hang" ? SIGSTOP : SIGKILL);
      }
    }
  };

  TORCH_CHECK(args.device == "cpu" || args.device == "cuda", "--device must be cpu or cuda, not '", args.device, "'");
  TORCH_CHECK(args.device == "cpu" || at::hasCUDA(), "--device cuda asked for, but rank ", rank,
              " sees no GPU; use --device cpu");
  // Ranks share the GPUs round-robin when there are fewer GPUs than local ranks.
  const at::Device device =
      args.device == "cuda"
          ? at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(
                                      std::max(0, pgo.local_rank) %
                                      std::max<int>(1, c10::impl::getDeviceGuardImpl(at::kCUDA)->deviceCount())))
          : at::Device(at::kCPU);
  if (device.is_cuda()) at::globalContext().setDeterministicAlgorithms(true, /*warn_only=*/true);
  std::unique_ptr<Model> model;
  if (args.model == "mlp") {
    model = std::make_unique<Mlp>(args.seed, device);
  } else {
    model = std::make_unique<CharLm>(args.seed, args.data.empty() ? CharLm::kDefaultData : args.data, device);
  }
  std::vector<at::Tensor>& params = model->params();
  // The step's global batch, divided among this world's ranks: the first G mod W
  // take one sample more.
  const int64_t global_batch = args.global_batch > 0 ? args.global_batch : args.batch * world;
  TORCH_CHECK(global_batch >= world, "the global batch of ", global_batch, " samples leaves ranks without data at world size ",
              world, "; give --global-batch ", world, " or more");
  const int64_t share = global_batch / world + (rank < global_batch % world ? 1 : 0);
  const int64_t share_first = rank * (global_batch / world) + std::min<int64_t>(rank, global_batch % world);
  if (rank == 0 && global_batch % world != 0) {
    std::printf("ftcomm train: the global batch of %lld samples does not divide by %d ranks: ranks 0-%lld take %lld, "
                "the others %lld (each rank's loss is weighted by its share)\n",
                static_cast<long long>(global_batch), world, static_cast<long long>(global_batch % world - 1),
                static_cast<long long>(global_batch / world + 1), static_cast<long long>(global_batch / world));
    std::fflush(stdout);
  }
  std::vector<at::Tensor> momentum;
  for (const auto& p : params) momentum.push_back(at::zeros_like(p));

  ftcomm::DdpOptions options;
  options.bucket_bytes = static_cast<int64_t>(args.bucket_mb * (1 << 20));
  options.hook = args.hook;
  options.hook_args = args.hook_args;
  options.pinned_digests = args.hook_digests;
  options.hook_options.agreement = args.hook_agree;
  // The hook's and the stall deadlines follow --timeout (the group's; see
  // deadlines.h): half of it for a hook call, 0.9 of it for a step.
  ftcomm::JobOptions& job = options.job;
  job.checkpoint.commit_every = args.commit_every;
  job.just_in_time = args.jit;
  job.checkpoint.local_state_policy = ftcomm::parse_local_state_policy(args.jit_policy, "--jit-policy");
  job.jit.before_commit = [&] { maybe_fail(-1, "jit"); };
  job.jit.on_saved = [&](int64_t step, bool saved, const std::string& reason) {
    events.emit("jit_saved", {{"step", step}, {"saved", saved}, {"reason", reason}});
  };
  // What changes the result besides the hook's parameters (the seed is part of
  // the job's identity; the hook's file is checked by its digest).
  job.checkpoint.settings = {{"model", args.model}, {"lr", ftcomm::format_setting(args.lr)},
                             {"global_batch", std::to_string(global_batch)}, {"device", args.device}};
  if (args.model == "charlm") job.checkpoint.settings["data"] = args.data.empty() ? CharLm::kDefaultData : args.data;
  job.checkpoint.allow_changed_settings.insert(args.allow_changes.begin(), args.allow_changes.end());
  job.checkpoint.job_id = "train-" + args.model + "-seed" + std::to_string(args.seed);
  if (args.torch_save_every == 0) job.ckpt_root = args.ckpt;
  ftcomm::DistributedDataParallel ddp(pg, params, momentum, options);
  // Errors from here on are reported before anything is torn down (see
  // exit_with_error): the group's and the Reducer's destructors could delay the
  // message past torchrun's SIGTERM.
  try {
    const auto restart_t0 = Clock::now();
    ddp.prepare_recovery();
    maybe_fail(-1, "resync");  // --fail-at R:S:resync: after the agreement, before any state moves
    const auto report = ddp.finish_recovery();
    // One form of the report everywhere (records_json.h): the event, the summary.
    const nlohmann::json report_json = nlohmann::json::parse(ftcomm::to_json(report));
    if (rank == 0) {
      nlohmann::json recovery = report_json;
      recovery["world_size"] = world;
      events.emit("recovery", recovery);
    }
    if (!report.discarded_steps.empty()) events.emit("discarded", {{"steps", report.discarded_steps}});
    int64_t start = std::max<int64_t>(0, report.resumed_from_step);
    const std::string torch_save_path = args.ckpt + "/torchsave-rank" + std::to_string(rank) + ".pt";
    if (args.torch_save_every > 0 && !args.ckpt.empty() && ::access(torch_save_path.c_str(), R_OK) == 0) {
      // The baseline's restart: every rank loads its own file (no agreement).
      std::vector<at::Tensor> saved;
      torch::load(saved, torch_save_path);
      TORCH_CHECK(saved.size() == 2 * params.size() + 1, torch_save_path, " does not fit this model");
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < params.size(); ++i) {
        params[i].copy_(saved[i]);
        momentum[i].copy_(saved[params.size() + i]);
      }
      start = saved.back().item<int64_t>();
      if (rank == 0) std::printf("ftcomm train: loaded the torch::save baseline of step %lld\n", static_cast<long long>(start));
    }
    // Every rank has the same report, so every rank stops here together.
    TORCH_CHECK(start <= args.steps, "the checkpoint in --ckpt ", args.ckpt, " is at step ", start, ", beyond --steps ",
                args.steps, "; nothing to train. Raise --steps to continue the run, or point --ckpt at a new directory");
    if (rank == 0) {
      if (report.resumed_from_step >= 0) {
        std::printf("ftcomm train: %s\n", ftcomm::resume_line(report, world).c_str());
        if (report.resumed_world_size != world) {
          std::printf("ftcomm train: resized from world size %d to %d at step %lld: the global batch of %lld samples "
                      "is divided anew, rank-local state started afresh\n",
                      report.resumed_world_size, world, static_cast<long long>(report.resumed_from_step),
                      static_cast<long long>(global_batch));
        }
      } else {
        std::printf("ftcomm train: starting at step 0, world %d, hook %s\n", world, ddp.hook()->name().c_str());
      }
      std::fflush(stdout);
    }
    std::optional<double> loss_last;
    double first_step_ms = 0;
    const auto train_t0 = Clock::now();
    auto t_log = Clock::now();
    double comm_at_log = 0;
    int64_t steps_since_log = 0;
    for (int64_t step = start; step < args.steps; ++step) {
      const auto t_step = Clock::now();
      for (auto& p : params) {
        if (p.grad().defined()) p.mutable_grad().zero_();
      }
      maybe_fail(step + 1, "forward");
      ddp.before_forward();
      const at::Tensor loss = model->loss(step, share_first, share, global_batch, world, args.seed);
      maybe_fail(step + 1, "backward");
      ddp.before_backward(loss);
      maybe_fail(step + 1, "hook");  // the hook runs during backward; dying here kills it mid-collective for peers
      maybe_fail(step + 1, "hang");
      loss.backward();
      ddp.before_update();
      maybe_fail(step + 1, "update");
      {
        at::NoGradGuard no_grad;
        for (size_t i = 0; i < params.size(); ++i) {
          momentum[i].mul_(args.momentum).add_(params[i].grad());
          params[i].sub_(momentum[i] * args.lr);
        }
      }
      loss_last = loss.item<double>();
      ddp.after_step(step + 1, (step + 1) * global_batch);
      if (args.torch_save_every > 0 && (step + 1) % args.torch_save_every == 0 && !args.ckpt.empty()) {
        std::vector<at::Tensor> state;
        for (const auto& p : params) state.push_back(p.detach());
        state.insert(state.end(), momentum.begin(), momentum.end());
        state.push_back(at::tensor({step + 1}, at::kLong));
        ::mkdir(args.ckpt.c_str(), 0755);
        torch::save(state, torch_save_path + ".tmp");
        TORCH_CHECK(::rename((torch_save_path + ".tmp").c_str(), torch_save_path.c_str()) == 0, "rename to ",
                    torch_save_path, " failed");
      }
      maybe_fail(step + 1, "commit");
      if (args.pace_ms > 0) {
        const auto until = t_step + std::chrono::microseconds(static_cast<int64_t>(args.pace_ms * 1000));
        std::this_thread::sleep_until(until);
      }
      const double step_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_step).count();
      if (step == start) first_step_ms = step_ms;
      if (rank == 0 && events.enabled()) {
        events.emit("step", {{"step", step + 1}, {"loss", *loss_last}, {"step_ms", step_ms},
                             {"comm_ms_total", ddp.comm_seconds() * 1000}});
      }
      ++steps_since_log;
      if (rank == 0 && args.log_every > 0 && ((step + 1) % args.log_every == 0 || step + 1 == args.steps)) {
        const double s = std::chrono::duration<double>(Clock::now() - t_log).count();
        const double comm = ddp.comm_seconds();
        std::printf("step %lld/%lld loss %.6f samples/s %.0f comm ms/step %.2f\n", static_cast<long long>(step + 1),
                    static_cast<long long>(args.steps), *loss_last,
                    steps_since_log * global_batch / std::max(s, 1e-9), (comm - comm_at_log) * 1000 / steps_since_log);
        std::fflush(stdout);
        t_log = Clock::now();
        comm_at_log = comm;
        steps_since_log = 0;
      }
    }
    ddp.commit_last(args.steps, args.steps * global_batch);
    ddp.flush();
    const std::string digest = ftcomm::tensors_digest(params);
    if (rank == 0 && !args.summary.empty()) {
      // The run's figures, and the resume's report under its own names.
      nlohmann::json summary = report_json;
      summary.update({{"steps", args.steps},
                      {"world_size", world},
                      {"global_batch", global_batch},
                      {"rank_batch", share},
                      {"restarts", pgo.restart_count},
                      {"steps_trained", args.steps - start},
                      {"param_digest", digest},
                      {"loss_last", loss_last ? nlohmann::json(*loss_last) : nlohmann::json(nullptr)},
                      {"first_step_ms", first_step_ms},
                      {"since_start_ms", std::chrono::duration<double, std::milli>(Clock::now() - restart_t0).count()},
                      {"train_ms", std::chrono::duration<double, std::milli>(Clock::now() - train_t0).count()},
                      {"jit_ms", ddp.jit_seconds() * 1000},
                      {"hook", ddp.hook()->name()}});
      std::ofstream out(args.summary);
      out << summary.dump() << "\n";
      TORCH_CHECK(out.good(), "--summary-json '", args.summary, "' could not be written");
    }
    if (rank == 0) std::printf("ftcomm train: done, %lld steps, param digest %s\n", static_cast<long long>(args.steps), digest.c_str());
    if (rank == 0) events.emit("done", {{"steps", args.steps}, {"param_digest", digest}});
  } catch (const std::exception& e) {
    // The last finished step goes to this rank's store just in time (after the
    // snapshot in flight, which is local disk work); nothing else is torn down.
    try {
      ddp.save_just_in_time(std::string("error: ") + ftcomm::detail::first_line(e.what()));
      ddp.flush();
    } catch (const std::exception& save_error) {
      ftcomm::detail::log_line(std::string("ftcomm train: the just-in-time save failed: ") + save_error.what());
    }
    ftcomm::cli::exit_with_error("train", e);
  }
  return 0;
}
