// `ftcomm train`: one rank of fault-tolerant data-parallel training. Launch under
// torchrun --no-python (restarts, rendezvous); with no torchrun environment it
// runs as world size 1.
#include <signal.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <limits>
#include <memory>
#include <iostream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <torch/serialize.h>

#include "ftcomm/ddp.h"
#include "ftcomm/process_group.h"
#include <torch/csrc/distributed/c10d/HashStore.hpp>

namespace {

using Clock = std::chrono::steady_clock;

struct TrainArgs {
  std::string model = "mlp";
  std::string data;
  std::string device = "cpu";
  int torch_save_every = 0;  // benchmark baseline: torch::save every K steps, no ftcomm store
  int64_t steps = 100, batch = 32, seed = 0;
  double lr = 0.05, momentum = 0.9;
  std::string hook = "allreduce";
  std::vector<std::pair<std::string, std::string>> hook_args;
  std::vector<std::string> hook_digests;
  bool hook_agree = true;
  std::string ckpt;
  int commit_every = 10;
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
};

constexpr const char* kTrainUsage = R"(Usage: ftcomm train [options]
  --model mlp|charlm      an MLP on a synthetic regression task, or a small character-level
                          transformer trained on --data FILE (default /usr/share/common-licenses/GPL-3)
  --steps N               total step target; a restarted job resumes from its newest commit (default 100)
  --batch B --lr X --seed S
  --hook NAME|FILE        comm hook (default allreduce); --hook-arg k=v sets its parameters
  --hook-digest SHA256    accept only a hook with this digest (repeatable; see ftcomm hook check)
  --hook-agree on|off     after each bucket (and before each of the hook's collectives) the ranks
                          agree that the hook ran, so a hook failing on some ranks fails or falls
                          back on all of them (default on). off saves those small exchanges
                          (~0.3 ms each on 2 H100s; see BENCHMARKS.md); a rank-local hook failure
                          then surfaces as a collective timeout and a torchrun restart
  --ckpt DIR              checkpoint stores, one per rank under DIR/rank<R>
  --commit-every K        snapshot every K steps (default 10)
  --backend auto|gloo|nccl  --device cpu|cuda  --bucket-mb X
  --baseline-torch-save-every K
                          benchmark baseline: torch::save params and optimizer state every K
                          steps into --ckpt (synchronously), instead of ftcomm's store
  --fail-at RANK:STEP[:PHASE][@ATTEMPT]
                          SIGKILL that rank at that step of torchrun attempt ATTEMPT (default 0,
                          the first); PHASE is forward, backward (default), hook, commit, or
                          resync (during recovery at start-up; STEP is ignored). Repeatable.
  --summary-json FILE     written by rank 0 at the end
)";

TrainArgs parse_train(const std::vector<std::string>& args) {
  TrainArgs a;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& k = args[i];
    auto v = [&]() -> std::string {
      if (i + 1 >= args.size()) throw std::invalid_argument(k + " needs a value");
      return args[++i];
    };
    if (k == "--model") a.model = v();
    else if (k == "--data") a.data = v();
    else if (k == "--device") a.device = v();
    else if (k == "--baseline-torch-save-every") a.torch_save_every = std::stoi(v());
    else if (k == "--steps") a.steps = std::stoll(v());
    else if (k == "--batch") a.batch = std::stoll(v());
    else if (k == "--seed") a.seed = std::stoll(v());
    else if (k == "--lr") a.lr = std::stod(v());
    else if (k == "--hook") a.hook = v();
    else if (k == "--hook-arg") {
      const std::string kv = v();
      const auto eq = kv.find('=');
      if (eq == std::string::npos) throw std::invalid_argument("--hook-arg takes k=v, got '" + kv + "'");
      a.hook_args.emplace_back(kv.substr(0, eq), kv.substr(eq + 1));
    } else if (k == "--hook-digest") a.hook_digests.push_back(v());
    else if (k == "--hook-agree") {
      const std::string on = v();
      if (on != "on" && on != "off") throw std::invalid_argument("--hook-agree takes on or off, got '" + on + "'");
      a.hook_agree = on == "on";
    }
    else if (k == "--ckpt") a.ckpt = v();
    else if (k == "--commit-every") a.commit_every = std::stoi(v());
    else if (k == "--backend") a.backend = v();
    else if (k == "--bucket-mb") a.bucket_mb = std::stod(v());
    else if (k == "--summary-json") a.summary = v();
    else if (k == "--log-every") a.log_every = std::stoi(v());
    else if (k == "--fail-at") {
      // RANK:STEP[:PHASE][@ATTEMPT]; the attempt is torchrun's restart count (default 0).
      std::string spec = v();
      TrainArgs::Failure f{0, 0, "backward", 0};
      const auto at = spec.find('@');
      if (at != std::string::npos) {
        f.attempt = std::stoll(spec.substr(at + 1));
        spec = spec.substr(0, at);
      }
      const auto c1 = spec.find(':');
      if (c1 == std::string::npos) throw std::invalid_argument("--fail-at takes RANK:STEP[:PHASE][@ATTEMPT], got '" + spec + "'");
      const auto c2 = spec.find(':', c1 + 1);
      f.rank = std::stoi(spec.substr(0, c1));
      f.step = std::stoll(spec.substr(c1 + 1, c2 == std::string::npos ? std::string::npos : c2 - c1 - 1));
      if (c2 != std::string::npos) f.phase = spec.substr(c2 + 1);
      if (f.phase != "forward" && f.phase != "backward" && f.phase != "hook" && f.phase != "commit" &&
          f.phase != "resync") {
        throw std::invalid_argument("--fail-at phase '" + f.phase + "' is not one of forward, backward, hook, commit, resync");
      }
      a.failures.push_back(f);
    } else if (k == "--help" || k == "-h") {
      std::cout << kTrainUsage;
      std::exit(0);
    } else {
      throw std::invalid_argument("unknown option '" + k + "' for train");
    }
  }
  if (a.model != "mlp" && a.model != "charlm") {
    throw std::invalid_argument("unknown --model '" + a.model + "'; use mlp or charlm");
  }
  if (a.steps < 1 || a.batch < 1) throw std::invalid_argument("--steps and --batch must be at least 1");
  return a;
}

// A model: its parameters and the loss of one step's batch on one rank. The
// batch depends only on (seed, step, rank), so a resumed run sees the same data.
class Model {
 public:
  explicit Model(at::Device device) : device_(device) {}
  virtual ~Model() = default;
  std::vector<at::Tensor>& params() { return params_; }
  virtual at::Tensor loss(int64_t step, int rank, int64_t batch, int64_t seed) = 0;

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
  at::Tensor loss(int64_t step, int rank, int64_t batch, int64_t seed) override {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003 + step * 131 + rank);
    const at::Tensor x = at::randn({batch, widths_.front()}, gen).to(device_);
    const at::Tensor y = at::tanh(at::mm(x, teacher_) / 8.0);
    at::Tensor h = x;
    for (size_t i = 0; i < params_.size(); i += 2) {
      h = at::addmm(params_[i + 1], h, params_[i]);
      if (i + 2 < params_.size()) h = at::relu(h);
    }
    return (h - y).pow(2).mean();
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
  at::Tensor loss(int64_t step, int rank, int64_t batch, int64_t seed) override {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(seed * 1000003 + step * 131 + rank);
    const at::Tensor starts = at::randint(0, data_.numel() - kContext - 1, {batch, 1}, gen, at::kLong);
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
    return at::nll_loss(at::log_softmax(logits.view({-1, kVocab}), -1), targets.reshape({-1}));
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
  const TrainArgs args = parse_train(argv);
  ftcomm::ProcessGroupOptions pgo = ftcomm::process_group_options_from_env();
  pgo.backend = ftcomm::parse_backend(args.backend);
  if (!ftcomm::launched_by_torchrun()) {
    pgo.store = ftcomm::StoreKind::kCustom;  // world size 1: an in-memory store
    pgo.custom_store = c10::make_intrusive<c10d::HashStore>();
  }
  at::set_num_threads(1);
  // A resumed run must repeat the uninterrupted one bit for bit; cuBLAS needs a
  // fixed workspace for that, set before CUDA starts (the group may start it).
  if (args.device == "cuda") ::setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8", 0);
  auto pg = ftcomm::make_process_group(pgo);
  const int rank = pg->getRank(), world = pg->getSize();
  auto maybe_fail = [&](int64_t step, const std::string& phase) {
    for (const auto& f : args.failures) {
      if (f.attempt == pgo.restart_count && f.rank == rank && f.phase == phase && (phase == "resync" || f.step == step)) {
        std::cerr << "ftcomm train: rank " << rank << ": injected failure at step " << step << " (" << phase
                  << ", attempt " << pgo.restart_count << ")\n";
        ::kill(::getpid(), SIGKILL);
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
  std::vector<at::Tensor> momentum;
  for (const auto& p : params) momentum.push_back(at::zeros_like(p));

  ftcomm::DdpOptions options;
  options.bucket_bytes = static_cast<int64_t>(args.bucket_mb * (1 << 20));
  options.hook = args.hook;
  options.hook_args = args.hook_args;
  options.pinned_digests = args.hook_digests;
  options.hook_options.agree_per_bucket = args.hook_agree;
  options.commit_every = args.commit_every;
  options.job_id = "train-" + args.model + "-seed" + std::to_string(args.seed);
  if (!args.ckpt.empty() && args.torch_save_every == 0) options.ckpt_dir = args.ckpt + "/rank" + std::to_string(rank);
  options.on_phase = [&](const std::string& phase) { maybe_fail(-1, phase); };
  ftcomm::DistributedDataParallel ddp(pg, params, momentum, options);
  const auto restart_t0 = Clock::now();
  const auto report = ddp.recover();
  const int64_t start = std::max<int64_t>(0, report.resumed_from_step);
  if (rank == 0) {
    if (report.resumed_from_step >= 0) {
      std::printf("ftcomm train: resumed from step %lld (agreement %.1f ms, load %.1f ms, resync %.1f ms, %lld bytes "
                  "to %zu ranks); rank-local hook state: %s\n",
                  static_cast<long long>(report.resumed_from_step), report.agreement_ms, report.load_ms,
                  report.resync_ms, static_cast<long long>(report.resync_bytes), report.resynced_ranks.size(),
                  report.local_state.c_str());
    } else {
      std::printf("ftcomm train: starting at step 0, world %d, hook %s\n", world, ddp.hook()->name().c_str());
    }
    std::fflush(stdout);
  }
  double loss_last = 0;
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
    const at::Tensor loss = model->loss(step, rank, args.batch, args.seed);
    maybe_fail(step + 1, "backward");
    ddp.before_backward(loss);
    maybe_fail(step + 1, "hook");  // the hook runs during backward; dying here kills it mid-collective for peers
    loss.backward();
    {
      at::NoGradGuard no_grad;
      for (size_t i = 0; i < params.size(); ++i) {
        momentum[i].mul_(args.momentum).add_(params[i].grad());
        params[i].sub_(momentum[i] * args.lr);
      }
    }
    loss_last = loss.item<double>();
    ddp.after_step(step + 1, (step + 1) * args.batch * world);
    if (args.torch_save_every > 0 && (step + 1) % args.torch_save_every == 0 && !args.ckpt.empty()) {
      std::vector<at::Tensor> state;
      for (const auto& p : params) state.push_back(p.detach());
      state.insert(state.end(), momentum.begin(), momentum.end());
      torch::save(state, args.ckpt + "/torchsave-rank" + std::to_string(rank) + ".pt");
    }
    maybe_fail(step + 1, "commit");
    if (step == start) first_step_ms = std::chrono::duration<double, std::milli>(Clock::now() - t_step).count();
    ++steps_since_log;
    if (rank == 0 && args.log_every > 0 && ((step + 1) % args.log_every == 0 || step + 1 == args.steps)) {
      const double s = std::chrono::duration<double>(Clock::now() - t_log).count();
      const double comm = ddp.comm_seconds();
      std::printf("step %lld/%lld loss %.6f samples/s %.0f comm ms/step %.2f\n", static_cast<long long>(step + 1),
                  static_cast<long long>(args.steps), loss_last,
                  steps_since_log * args.batch * world / std::max(s, 1e-9), (comm - comm_at_log) * 1000 / steps_since_log);
      std::fflush(stdout);
      t_log = Clock::now();
      comm_at_log = comm;
      steps_since_log = 0;
    }
  }
  ddp.flush();
  const std::string digest = ftcomm::tensors_digest(params);
  if (rank == 0 && !args.summary.empty()) {
    std::ofstream out(args.summary);
    out << "{\"steps\": " << args.steps << ", \"world_size\": " << world << ", \"restarts\": " << pgo.restart_count
        << ", \"resumed_from_step\": " << report.resumed_from_step << ", \"param_digest\": \"" << digest
        << "\", \"loss_last\": " << loss_last << ", \"recovery_ms\": {\"agreement\": " << report.agreement_ms
        << ", \"load\": " << report.load_ms << ", \"resync\": " << report.resync_ms
        << ", \"first_step\": " << first_step_ms << ", \"since_start\": "
        << std::chrono::duration<double, std::milli>(Clock::now() - restart_t0).count()
        << "}, \"train_ms\": " << std::chrono::duration<double, std::milli>(Clock::now() - train_t0).count()
        << ", \"resync_bytes\": " << report.resync_bytes << ", \"hook\": \"" << ddp.hook()->name() << "\"}\n";
  }
  if (rank == 0) std::printf("ftcomm train: done, %lld steps, param digest %s\n", static_cast<long long>(args.steps), digest.c_str());
  return 0;
}
